"""The uncompressed baseline: one full ``num_embeddings x embedding_dim`` fp32 table per feature.

Memory: ``sum_f n_f * d_f * 4`` bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, smallest_budget_error
from ..config import MethodConfig, register_method
from ..features import FeatureSpec
from ..module import EmbeddingModule, storage_collection, storage_values

__all__ = ["FullConfig", "FullEmbeddingBagCollection"]


@dataclasses.dataclass(frozen=True)
class FullConfig(MethodConfig):
    """The full table (no compression). With a budget, the budget must hold all the tables."""

    method = "full"


@register_method(FullConfig)
class FullEmbeddingBagCollection(EmbeddingModule):
    """A plain ``EmbeddingBagCollection`` behind the embtable contract (the baseline every comparison needs).

    >>> import embtable
    >>> m = embtable.build([embtable.FeatureSpec("a", 10, 4)], FullConfig())
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2, 3]), torch.tensor([2, 1]))
    >>> m(kjt).values().shape
    torch.Size([2, 4])
    """

    def __init__(self, features: Sequence[FeatureSpec], config: FullConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.storage = storage_collection(
            [(f.name, f.num_embeddings, f.embedding_dim, [f.name]) for f in self.features],
            self.pooling,
            self._is_weighted,
            self.device,
        )

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return storage_values(self.storage(kjt), self.feature_names)

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """Copy the trained table of feature ``name`` (used by :func:`embtable.compress`)."""
        self.storage.embedding_bags[name].weight.copy_(weight)
        return "trained weights copied"

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        full = sum(f.full_table_bytes for f in features)
        if budget_bytes is not None and full > budget_bytes:
            raise smallest_budget_error(
                "full", full, budget_bytes, features,
                "the uncompressed tables; choose a compressing method (hash, qr, unified, optembed, tt_rec, dhe, ...)",
            )
        return config

    @classmethod
    def describe(cls, features, config):
        plans = [
            FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings, f.embedding_dim,
                        f.num_embeddings * f.embedding_dim * FP32, False, "full")
            for f in features
        ]
        return plans, {}
