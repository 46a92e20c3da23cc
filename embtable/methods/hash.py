"""The hashing trick: each feature's ids are hashed into ``m`` rows of its own table.

Ids are mapped with a salted universal hash (:mod:`embtable.hashing`: stable across processes and runs,
exact int64 arithmetic) or, with ``hash_fn="modulo"``, with ``id mod m`` (the DLRM reference's
"max index range"; with ``m = n`` it is the identity). A feature whose table already fits its share of the
budget (``n <= m``) keeps its full table and an identity mapping.

Memory: ``sum_f (m_f * d_f * 4 + 48)`` bytes, where 48 is the feature's hash parameters
(``a0, a1, a2, b, m, n`` as int64, a buffer the server needs too).

Budget planning: one row cap ``T`` for all features, ``m_f = min(n_f, T)``, the largest ``T`` that fits
(water-filling: small features stay full, large ones share what is left equally).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, register_method
from ..features import FeatureSpec
from ..hashing import PRIME, hash_coefficients, universal_hash
from ..module import (
    EmbeddingModule,
    config_field_per_feature,
    is_tracing,
    per_id,
    storage_collection,
    storage_values,
    with_values,
)

__all__ = ["HashConfig", "HashEmbeddingBagCollection", "HashIdMapper"]

HASH_PARAM_BYTES = 6 * 8  # a0, a1, a2, b, m, n per feature, int64
INIT_CHUNK = 1 << 20  # ids per step when averaging a trained table into its hashed rows


@dataclasses.dataclass(frozen=True)
class HashConfig(MethodConfig):
    """Hashing trick.

    Args:
        num_buckets: rows per feature: one int for all features, a ``{feature: rows}`` mapping, or
            ``None`` to let the planner size it from the budget. Capped at the feature's ``num_embeddings``.
        hash_fn: ``"universal"`` (salted Carter-Wegman hash, default) or ``"modulo"`` (``id mod m``).
        seed: seed of the salts; the same seed gives the same mapping in every process.
    """

    method = "hash"
    num_buckets: int | Mapping[str, int] | None = None
    hash_fn: str = "universal"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hash_fn not in ("universal", "modulo"):
            raise ValueError(f"HashConfig.hash_fn must be 'universal' or 'modulo', got {self.hash_fn!r}")
        values = self.num_buckets.values() if isinstance(self.num_buckets, Mapping) else [self.num_buckets]
        for v in values:
            if v is not None and (int(v) != v or v < 1 or v > PRIME):
                raise ValueError(f"HashConfig.num_buckets must be integers in [1, 2**31 - 1], got {v!r}")


def _buckets(features: Sequence[FeatureSpec], config: HashConfig) -> list[int]:
    per_feature = config_field_per_feature(config.num_buckets, features, "num_buckets", "hash")
    if per_feature is None:
        raise ValueError(
            "hash: num_buckets is not set; give a byte budget (build(features, HashConfig(), budget=...)) "
            "or HashConfig(num_buckets=...)"
        )
    return [min(int(per_feature[f.name]), f.num_embeddings) for f in features]


class HashIdMapper(nn.Module):
    """Maps logical ids to storage rows: salted hash (or modulo) for compressed features, identity otherwise.

    A separate leaf module (ids in, ids out), so pipelines can run it apart from the storage lookup.
    """

    def __init__(self, features: Sequence[FeatureSpec], buckets: Sequence[int], hash_fn: str, seed: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        rows = []
        for f, m in zip(features, buckets):
            rows.append(hash_coefficients(seed, "hash", f.name) + [m, f.num_embeddings])
        # [F, 6] int64: a0, a1, a2, b, m, n
        self.register_buffer("hash_params", torch.tensor(rows, dtype=torch.int64, device=device))
        self.hash_fn = hash_fn

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values = kjt.values()
        if not is_tracing() and values.numel() == 0:
            return kjt
        params = per_id(kjt, self.hash_params, values.shape[0])  # [N, 6]
        m, n = params[:, 4], params[:, 5]
        if self.hash_fn == "modulo":
            hashed = values % m
        else:
            hashed = universal_hash(values, params[:, :4], m)
        return with_values(kjt, torch.where(m < n, hashed, values))

    def extra_repr(self) -> str:
        return f"hash_fn={self.hash_fn}"


@register_method(HashConfig)
class HashEmbeddingBagCollection(EmbeddingModule):
    """Per-feature hashed tables (Weinberger et al., 2009, "Feature Hashing for Large Scale Multitask Learning").

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 1_000_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, HashConfig(), budget="1/100")
    >>> [t.num_embeddings for t in m.storage.embedding_bag_configs()]
    [9800, 200]
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123456, 7, 3]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> m(kjt).values().shape
    torch.Size([2, 32])
    """

    def __init__(self, features: Sequence[FeatureSpec], config: HashConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        buckets = _buckets(self.features, config)
        self.mapper = HashIdMapper(self.features, buckets, config.hash_fn, config.seed, self.device)
        self.storage = storage_collection(
            [(f.name, m, f.embedding_dim, [f.name]) for f, m in zip(self.features, buckets)],
            self.pooling,
            self._is_weighted,
            self.device,
        )

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return storage_values(self.storage(self.mapper(kjt)), self.feature_names)

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """Each stored row = the mean of the trained rows of the ids that hash to it (used by ``compress``)."""
        table = self.storage.embedding_bags[name].weight
        position = self.feature_names.index(name)
        n = weight.shape[0]
        if table.shape[0] == n and self.mapper.hash_params[position, 4] >= n:
            table.copy_(weight)
            return "trained weights copied (identity mapping)"
        sums = torch.zeros_like(table)
        hits = torch.zeros(table.shape[0], dtype=table.dtype, device=table.device)
        for start in range(0, n, INIT_CHUNK):
            ids = torch.arange(start, min(n, start + INIT_CHUNK), device=table.device)
            lengths = torch.zeros(len(self.feature_names), dtype=torch.int64, device=table.device)
            lengths[position] = ids.numel()
            rows = self.mapper(KeyedJaggedTensor(keys=self.feature_names, values=ids, lengths=lengths)).values()
            sums.index_add_(0, rows, weight[start : start + ids.numel()].to(table.dtype))
            hits.index_add_(0, rows, torch.ones_like(ids, dtype=table.dtype))
        used = hits > 0
        table[used] = sums[used] / hits[used, None]
        return f"mean of the trained rows sharing a slot ({n:,} -> {table.shape[0]:,} rows)"

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.num_buckets is not None or budget_bytes is None:
            return config

        def total(cap: int) -> int:
            return sum(min(f.num_embeddings, cap) * f.embedding_dim * FP32 + HASH_PARAM_BYTES for f in features)

        cap = largest_feasible(total, budget_bytes, 1, max(f.num_embeddings for f in features))
        if cap is None:
            raise smallest_budget_error("hash", total(1), budget_bytes, features,
                                        "one row per feature; raise the budget or embed fewer features")
        return dataclasses.replace(config, num_buckets={f.name: min(f.num_embeddings, cap) for f in features})

    @classmethod
    def describe(cls, features, config):
        plans = []
        for f, m in zip(features, _buckets(features, config)):
            compressed = m < f.num_embeddings
            plans.append(FeaturePlan(
                f.name, f.num_embeddings, f.embedding_dim, m, f.embedding_dim,
                m * f.embedding_dim * FP32 + HASH_PARAM_BYTES, compressed,
                f"{config.hash_fn} hash into {m:,} rows" if compressed else "identity",
            ))
        return plans, {}
