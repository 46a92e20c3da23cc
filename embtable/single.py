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
    ) -> None:
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean' for a compressed EmbeddingBag, got {mode!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.include_last_offset, self.name = mode, include_last_offset, name
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
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}"


class Embedding(nn.Module):
    """A compressed stand-in for ``nn.Embedding``: ids of any shape -> vectors ``[*ids.shape, embedding_dim]``.

    Each id is looked up as a bag of one, so every method works unchanged.

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
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.name = num_embeddings, embedding_dim, name
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
        return self.collection(kjt).values().reshape(*input.shape, self.embedding_dim)

    def memory(self) -> MemoryReport:
        return memory_report(self)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
