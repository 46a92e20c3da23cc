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

__all__ = ["pool_rows", "select_features", "pooled_full_and_rows"]


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
    """The KJT restricted to the keys at ``indices`` (in that order).

    Traced (``torch.export``), slices of the values and lengths instead of ``kjt.permute``: TorchRec's
    permute asserts under a non-strict export that the kept keys hold at least one id, so a program would
    fail on a batch where they hold none (e.g. a batch of 1 whose full-table features are empty).
    """
    from .module import is_tracing

    indices = list(indices)
    if indices == list(range(len(kjt.keys()))):
        return kjt
    if not is_tracing() or kjt.variable_stride_per_key():
        return kjt.permute(indices)
    keys, per_key, stride = kjt.keys(), kjt.length_per_key(), kjt.stride()
    values, lengths = kjt.values().split(per_key), kjt.lengths().split([stride] * len(keys))
    weights = kjt.weights_or_none()
    if weights is not None:
        weights = torch.cat([weights.split(per_key)[i] for i in indices])
    return KeyedJaggedTensor(keys=[keys[i] for i in indices], values=torch.cat([values[i] for i in indices]),
                             lengths=torch.cat([lengths[i] for i in indices]), weights=weights, stride=stride,
                             length_per_key=[per_key[i] for i in indices])


def pooled_full_and_rows(module, kjt: KeyedJaggedTensor, row_fns: Sequence) -> torch.Tensor:
    """``[B, sum(dims)]`` of a module whose features ``module.full`` read its TorchRec ``module.storage``
    and whose features ``module.compressed`` compute their rows: ``row_fns[i](ids) -> [N, d]`` for the i-th
    compressed feature (TT-Rec's cores, DHE's decoder), pooled per bag here."""
    from .module import storage_values

    num, batch = len(module.features), kjt.stride()
    pieces: list[torch.Tensor | None] = [None] * num
    if module.full:
        full = storage_values(module.storage(select_features(kjt, module.full)), module.full_names)
        for j, part in zip(module.full, full.split([module.embedding_dims[j] for j in module.full], dim=1)):
            pieces[j] = part
    if module.compressed:
        per_key = kjt.length_per_key()
        values = kjt.values().split(per_key)
        weights = kjt.weights_or_none()
        weights = weights.split(per_key) if weights is not None else [None] * num
        lengths = kjt.lengths().view(num, batch)
        for j, rows in zip(module.compressed, row_fns):
            pieces[j] = pool_rows(rows(values[j]), lengths[j], weights[j], module.pooling)  # [B, d]
    return torch.cat(pieces, dim=1) if num > 1 else pieces[0]
