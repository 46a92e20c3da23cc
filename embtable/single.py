"""Single-feature modules with the call signatures of ``nn.EmbeddingBag`` and ``nn.Embedding``.

They wrap a one-feature embtable collection, so every method, its planning and its memory report work
for models that are not written against TorchRec.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .budget import Budget
from .build import build
from .config import MethodConfig, OutOfRange, Pooling
from .features import FeatureSpec
from .memory import MemoryReport, memory_report
from .methods.full import FullConfig

__all__ = ["EmbeddingBag", "Embedding"]


class EmbeddingBag(nn.Module):
    """A compressed stand-in for ``nn.EmbeddingBag``: ``forward(input, offsets=None, per_sample_weights=None)``.

    Args:
        num_embeddings, embedding_dim: as in ``nn.EmbeddingBag``.
        method: a method config (default: the full table).
        budget: bytes, fraction of the full table, or :class:`Budget`.
        mode: ``"sum"`` or ``"mean"`` (``"max"`` is not supported by the compressed methods).
        include_last_offset: as in ``nn.EmbeddingBag``.
        counts: optional id frequency counts (for methods that use popularity).
        out_of_range, device, seed: as in :func:`embtable.build`.
        padding_idx: as in ``nn.EmbeddingBag``: entries of this id are left out of their bag (a mean
            counts only the others; a bag of padding only is zeros), so the id never trains. Whatever
            row the method stores for it is not read.

    Shape:
        - input ``[B, L]`` (fixed-length bags, ``offsets`` None) or ``[N]`` with ``offsets [B]``
          (``[B + 1]`` with ``include_last_offset``)
        - output ``[B, embedding_dim]``

    Example:
        >>> import embtable
        >>> bag = EmbeddingBag(1_000_000, 16, method=embtable.HashConfig(), budget="1/100", seed=0)
        >>> bag(torch.tensor([1, 2, 999_999, 5]), torch.tensor([0, 3])).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        method: MethodConfig | None = None,
        budget: Budget | int | float | str | None = None,
        *,
        mode: str = "sum",
        include_last_offset: bool = False,
        counts=None,
        out_of_range: OutOfRange | str = OutOfRange.ERROR,
        device: torch.device | str | None = None,
        seed: int | None = None,
        name: str = "feature",
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean' for a compressed EmbeddingBag, got {mode!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.include_last_offset, self.name = mode, include_last_offset, name
        self.padding_idx = _padding_idx(padding_idx, num_embeddings)
        self.collection = build(
            [FeatureSpec(name, num_embeddings, embedding_dim, counts)],
            method if method is not None else FullConfig(),
            budget,
            pooling=Pooling(mode),
            is_weighted=mode == "sum",  # so per_sample_weights can be given per call, as in nn.EmbeddingBag
            out_of_range=out_of_range,
            device=device,
            seed=seed,
        )

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D (fixed-length bags), as in nn.EmbeddingBag")
            batch, length = input.shape
            values = input.reshape(-1)
            lengths = torch.full((batch,), length, dtype=torch.int64, device=input.device)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError("a 1-D input needs offsets (the start of each bag), as in nn.EmbeddingBag")
            offsets = offsets.to(torch.int64)
            ends = offsets[1:] if self.include_last_offset else torch.cat(
                [offsets[1:], torch.tensor([input.numel()], device=input.device)]
            )
            starts = offsets[:-1] if self.include_last_offset else offsets
            lengths = ends - starts
            values = input
        else:
            raise ValueError(f"input must be 1-D or 2-D, got shape {tuple(input.shape)}")
        if per_sample_weights is not None and self.mode != "sum":
            raise ValueError("per_sample_weights are only supported with mode='sum', as in nn.EmbeddingBag")
        if self.padding_idx is not None:  # drop the padding entries from their bags (no Python branch on data)
            keep = values != self.padding_idx
            kept = torch.cat([torch.zeros(1, dtype=torch.int64, device=values.device), keep.cumsum(0)])
            ends = lengths.cumsum(0)
            lengths = kept[ends] - kept[ends - lengths]
            values = values[keep]
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights[keep]
        weights = None
        if self.mode == "sum":
            weights = (
                per_sample_weights.to(torch.float32)
                if per_sample_weights is not None
                else torch.ones(values.numel(), dtype=torch.float32, device=values.device)
            )
        kjt = KeyedJaggedTensor(keys=[self.name], values=values, lengths=lengths, weights=weights)
        return self.collection(kjt).values()

    def memory(self) -> MemoryReport:
        return memory_report(self)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}{pad}"


def _padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """``padding_idx`` checked and made non-negative, as ``nn.Embedding`` does."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


class Embedding(nn.Module):
    """A compressed stand-in for ``nn.Embedding``: ids of any shape -> vectors ``[*ids.shape, embedding_dim]``.

    Each id is looked up as a bag of one, so every method works unchanged. With ``padding_idx`` (as in
    ``nn.Embedding``) that id reads an exact zero vector and gets no gradient, whatever the method stores.

    >>> import embtable
    >>> emb = Embedding(50_000, 8, method=embtable.HashConfig(), budget="1/10", seed=0)
    >>> emb(torch.tensor([[1, 2, 3], [4, 5, 49_999]])).shape
    torch.Size([2, 3, 8])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        method: MethodConfig | None = None,
        budget: Budget | int | float | str | None = None,
        *,
        counts=None,
        out_of_range: OutOfRange | str = OutOfRange.ERROR,
        device: torch.device | str | None = None,
        seed: int | None = None,
        name: str = "feature",
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.name = num_embeddings, embedding_dim, name
        self.padding_idx = _padding_idx(padding_idx, num_embeddings)
        self.collection = build(
            [FeatureSpec(name, num_embeddings, embedding_dim, counts)],
            method if method is not None else FullConfig(),
            budget,
            out_of_range=out_of_range,
            device=device,
            seed=seed,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1)
        lengths = torch.ones(flat.numel(), dtype=torch.int64, device=input.device)
        kjt = KeyedJaggedTensor(keys=[self.name], values=flat, lengths=lengths)
        out = self.collection(kjt).values()  # [N, D]
        if self.padding_idx is not None:  # an exact zero row that never trains
            out = out.masked_fill((flat == self.padding_idx).unsqueeze(-1), 0.0)
        return out.reshape(*input.shape, self.embedding_dim)

    def memory(self) -> MemoryReport:
        return memory_report(self)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"
