"""Pooling of per-id vectors into bags, for methods whose rows are computed (TT cores, MLP decoders)
rather than looked up in a TorchRec table, and the split of a KJT into a method's full-table features.

Same semantics as ``nn.EmbeddingBag`` / TorchRec: sum (optionally weighted per id) or mean over a bag;
an empty bag pools to zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .config import Pooling

__all__ = ["pool_rows", "select_features"]


def pool_rows(rows: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """Pool ``rows`` ``[N, D]`` into ``B = lengths.numel()`` bags of consecutive rows -> ``[B, D]``.

    >>> rows = torch.tensor([[1.0], [2.0], [4.0]])
    >>> pool_rows(rows, torch.tensor([2, 0, 1]), None, Pooling.SUM).tolist()
    [[3.0], [0.0], [4.0]]
    >>> pool_rows(rows, torch.tensor([2, 0, 1]), None, Pooling.MEAN).tolist()
    [[1.5], [0.0], [4.0]]
    """
    lengths = lengths.to(torch.int64)
    bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths,
                                   output_size=rows.size(0))  # [N] bag of each row
    if weights is not None:
        rows = rows * weights.to(rows.dtype).unsqueeze(1)
    out = rows.new_zeros(lengths.numel(), rows.size(1)).index_add(0, bags, rows)
    if Pooling(pooling) is Pooling.MEAN:
        out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


def select_features(kjt: KeyedJaggedTensor, indices: Sequence[int]) -> KeyedJaggedTensor:
    """The KJT restricted to the keys at ``indices`` (in that order)."""
    if list(indices) == list(range(len(kjt.keys()))):
        return kjt
    return kjt.permute(list(indices))
