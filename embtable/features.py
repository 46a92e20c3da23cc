"""What a categorical feature is, as far as an embedding table is concerned."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["FeatureSpec", "check_features"]


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSpec:
    """One categorical feature: its name, how many distinct ids it has, and the dim its vector has.

    Args:
        name: the feature's key in the ``KeyedJaggedTensor`` (TorchRec's ``feature_names``).
        num_embeddings: number of distinct ids; valid ids are ``0 .. num_embeddings - 1``.
        embedding_dim: the dim of the pooled vector the model receives for this feature.
        counts: optional id frequency counts, ``counts[i]`` = how often id ``i`` occurs in the training
            data (shape ``[num_embeddings]``). Mixed-dimension and OptEmbed use them, and planners
            that care about popularity.

    Example:
        >>> FeatureSpec("C1", num_embeddings=1460, embedding_dim=16)
        FeatureSpec(name='C1', num_embeddings=1460, embedding_dim=16)
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    counts: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"FeatureSpec.name must be a non-empty string, got {self.name!r}")
        if int(self.num_embeddings) != self.num_embeddings or self.num_embeddings < 1:
            raise ValueError(
                f"feature {self.name!r}: num_embeddings must be a positive integer, got {self.num_embeddings!r}"
            )
        if int(self.embedding_dim) != self.embedding_dim or self.embedding_dim < 1:
            raise ValueError(
                f"feature {self.name!r}: embedding_dim must be a positive integer, got {self.embedding_dim!r}"
            )
        object.__setattr__(self, "num_embeddings", int(self.num_embeddings))
        object.__setattr__(self, "embedding_dim", int(self.embedding_dim))
        if self.counts is not None:
            counts = np.asarray(self.counts)
            if counts.shape != (self.num_embeddings,):
                raise ValueError(
                    f"feature {self.name!r}: counts must have shape ({self.num_embeddings},) "
                    f"(one count per id), got {counts.shape}"
                )
            if counts.size and counts.min() < 0:
                raise ValueError(f"feature {self.name!r}: counts must be non-negative")
            object.__setattr__(self, "counts", counts.astype(np.int64, copy=False))

    def with_dim(self, embedding_dim: int) -> FeatureSpec:
        """The same feature with another embedding dim."""
        return dataclasses.replace(self, embedding_dim=embedding_dim)

    @property
    def full_table_bytes(self) -> int:
        """Bytes of the uncompressed fp32 table: ``num_embeddings * embedding_dim * 4``."""
        return self.num_embeddings * self.embedding_dim * 4


def check_features(features: Sequence[FeatureSpec]) -> list[FeatureSpec]:
    """Validate a list of features (non-empty, unique names) and return it as a list."""
    features = list(features)
    if not features:
        raise ValueError("at least one FeatureSpec is needed")
    for f in features:
        if not isinstance(f, FeatureSpec):
            raise TypeError(f"expected FeatureSpec, got {type(f).__name__}: {f!r}")
    names = [f.name for f in features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"feature names must be unique; repeated: {dupes}")
    return features
