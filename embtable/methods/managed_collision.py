"""TorchRec's managed-collision tables (zero-collision hashing with eviction), wrapped as an embtable method.

This is what a TorchRec user already has: ``torchrec.modules.mc_modules.MCHManagedCollisionModule`` per
feature (an LFU, LRU or distance-LFU eviction policy) inside a ``ManagedCollisionCollection``, in front of
an ``EmbeddingBagCollection``, together TorchRec's ``ManagedCollisionEmbeddingBagCollection``. Nothing of
TorchRec's module is rewritten here: embtable sizes it from the budget, warm-starts its remap, keeps
small features as plain tables, and counts its bytes. The idea is the zero-collision hash of Monolith
(Liu et al., "Monolith: Real Time Recommendation System With Collisionless Embedding Table", ORSUM
@ RecSys 2022) with frequency-based admission and eviction, as TorchRec implements it.

A compressed feature ``f`` gets a table of ``z_f`` rows (``zch_size``). The module keeps the raw ids that
currently own a row, sorted, and the row of each; an id that owns no row reads the last row, the shared
"miss" row::

    raw id ──► searchsorted in _mch_sorted_raw_ids [z] ──► found: _mch_remapped_ids_mapping[pos]  (its row)
                                                          └─► not found: row z - 1 (shared miss row)

    rows of f:  [ row 0 | row 1 | ... | row z-2 | miss row z-1 ]   (z - 1 ids own a row at a time)

In training, every forward records the ids (a history buffer); every ``eviction_interval`` forwards
TorchRec merges the recorded ids with the owners by the policy's score (LFU: access counts; LRU: last
access; distance-LFU: counts decayed by distance) and the best ``z - 1`` own the rows (a newcomer takes
an evicted id's row, whose weights it inherits: TorchRec's unsharded eviction does not reset rows).
In eval the mapping is fixed. ``warm_start=True`` (default) admits, at build, the ``z - 1`` most frequent
ids (by ``FeatureSpec.counts``; without counts the first ids, id order taken as popularity order) with
zero access counts, so eval is meaningful before training and eviction proceeds as in TorchRec from there;
``warm_start=False`` starts empty, as TorchRec does (every id reads the miss row until it is admitted).

Memory. Inference needs the rows and the remap (the sorted ids and their rows, int64 each)::

    compressed feature:  z_f * (d_f * 4 + 16) bytes       full feature:  n_f * d_f * 4

Training-only tensors (counted by :func:`embtable.training_bytes`, not by :func:`embtable.memory_report`;
their names are listed in each TorchRec module's ``training_only_tensors``): the policy's per-row
metadata (``_mch_counts`` and/or ``_mch_last_access_iter``, ``z * 8`` bytes each), its history buffers
(``_history_last_access_iter``, created at the first training forward), and TorchRec's bookkeeping
(``_output_segments_tensor``: 1025 int64 for resharding, ``_current_iter_tensor``, ``_mch_slots``,
``_delimiter``): the eval remap reads none of them. TorchRec's ``_history_accumulator`` (``1.25 *
eviction_interval`` times the first training batch's ids, int64) is a plain attribute, not a buffer, so
no byte count sees it. Also from TorchRec: the history buffer is sized by the first training batch, so
ids beyond that size in a later, larger batch are not recorded for eviction.

Budget planning: water-filling on a byte cap ``C`` per feature: a feature whose full table fits ``C``
stays full (no remap), a larger one gets ``z_f = floor(C / (4 d_f + 16))`` rows (at least 2: one owned row
and the miss row); the largest feasible ``C``, then what is left goes to the largest compressed features
(first a promotion to the full table where it fits, else more rows).

Sharding: not supported by :func:`embtable.sharding.shard`. Its sharders would shard only the inner
``EmbeddingBagCollection`` and leave every rank its own remap, which each rank's eviction would then
change differently (rank-local ids); TorchRec's own path is ``ManagedCollisionEmbeddingBagCollectionSharder``
(row-wise, the remap sharded with the rows), not wired into embtable's sharding here.

Example:
    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, ManagedCollisionConfig(), budget="1/10", seed=0)
    >>> m.config.zch_size
    {'user': 7856, 'country': None}
    >>> embtable.memory_report(m).inference_bytes == 7856 * (16 * 4 + 16) + 200 * 16 * 4
    True
    >>> _ = m.eval()
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([5, 99_999, 42]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> m(kjt).values().shape
    torch.Size([2, 32])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchrec.modules import mc_embedding_modules as trec_mc
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, register_method
from ..features import FeatureSpec
from ..module import EmbeddingModule, config_field_per_feature, storage_collection

__all__ = ["ManagedCollisionConfig", "ManagedCollisionEmbeddingBagCollection", "EVICTION_POLICIES"]

REMAP_BYTES_PER_ROW = 2 * 8  # _mch_sorted_raw_ids + _mch_remapped_ids_mapping, int64 each
EVICTION_POLICIES = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy, "distance_lfu": DistanceLFU_EvictionPolicy}
# TorchRec's tensors the eval remap does not read (policy metadata, history, resharding bookkeeping)
_TRAINING_ONLY = ("_mch_counts", "_mch_last_access_iter", "_history_counts", "_history_last_access_iter",
                  "_output_segments_tensor", "_current_iter_tensor", "_mch_slots", "_delimiter")


@dataclasses.dataclass(frozen=True)
class ManagedCollisionConfig(MethodConfig):
    """TorchRec managed-collision tables.

    Args:
        zch_size: rows per feature, the shared miss row included (``>= 2``): one int for all features, a
            ``{feature: rows or None}`` mapping (``None``: the feature keeps its full table, no remap), or
            ``None`` to let the planner size it from the budget. More than ``num_embeddings + 1`` rows are
            never used and are capped.
        eviction_policy: ``"lfu"`` (TorchRec's ``LFU_EvictionPolicy``, default), ``"lru"`` or ``"distance_lfu"``.
        eviction_interval: training forwards between evictions (TorchRec's ``eviction_interval``); 1 admits
            new ids at every step.
        warm_start: admit the most frequent ids at build (see the module docstring); ``False`` starts empty.
    """

    method = "managed_collision"
    zch_size: int | Mapping[str, int | None] | None = None
    eviction_policy: str = "lfu"
    eviction_interval: int = 1
    warm_start: bool = True

    def __post_init__(self) -> None:
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"ManagedCollisionConfig.eviction_policy must be one of {sorted(EVICTION_POLICIES)}, "
                             f"got {self.eviction_policy!r}")
        if isinstance(self.eviction_interval, bool) or not isinstance(self.eviction_interval, int) \
                or self.eviction_interval < 1:
            raise ValueError(f"ManagedCollisionConfig.eviction_interval must be an integer >= 1 (forwards between "
                             f"evictions), got {self.eviction_interval!r}")
        values = self.zch_size.values() if isinstance(self.zch_size, Mapping) else [self.zch_size]
        for v in values:
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 2):
                raise ValueError(
                    "ManagedCollisionConfig.zch_size must be integers >= 2 (at least one owned row and the shared "
                    f"miss row), or None in a mapping for a full table; got {v!r}"
                )


def _zch_sizes(features: Sequence[FeatureSpec], config: ManagedCollisionConfig) -> list[int | None]:
    per_feature = config_field_per_feature(config.zch_size, features, "zch_size", "managed_collision")
    if per_feature is None:
        raise ValueError(
            "managed_collision: zch_size is not set; give a byte budget "
            "(build(features, ManagedCollisionConfig(), budget=...)) or ManagedCollisionConfig(zch_size=...)"
        )
    return [None if per_feature[f.name] is None else min(int(per_feature[f.name]), f.num_embeddings + 1)
            for f in features]


def _row_bytes(f: FeatureSpec) -> int:
    return f.embedding_dim * FP32 + REMAP_BYTES_PER_ROW


def _bytes(f: FeatureSpec, z: int | None) -> int:
    return f.full_table_bytes if z is None else z * _row_bytes(f)


def _admitted(f: FeatureSpec, k: int) -> np.ndarray:
    """The ``k`` ids a warm start admits: the most frequent by counts (ties by id), else the first ``k``."""
    if f.counts is None or int(f.counts.sum()) == 0:
        return np.arange(k, dtype=np.int64)
    return np.sort(np.argsort(-f.counts, kind="stable")[:k]).astype(np.int64)


@register_method(ManagedCollisionConfig)
class ManagedCollisionEmbeddingBagCollection(EmbeddingModule):
    """Managed-collision tables (TorchRec's ``ManagedCollisionEmbeddingBagCollection``) for the large features,
    plain tables for the rest.

    Attributes:
        mc_storage: TorchRec's ``ManagedCollisionEmbeddingBagCollection`` over the compressed features (table
            ``f`` has ``z_f`` rows), or ``None`` when every feature is full. Its
            ``_managed_collision_collection._managed_collision_modules[f]`` is the feature's
            ``MCHManagedCollisionModule``.
        storage: a plain ``EmbeddingBagCollection`` over the full features, or ``None``.

    Shape:
        input: ``KeyedJaggedTensor`` with the features' keys; output: ``KeyedTensor`` ``[B, sum(d_f)]``.
    """

    sharding_unsupported = (
        "managed-collision remaps are per-rank state that eviction changes; embtable's sharders would shard only "
        "the tables and leave each rank its own remap. Train it unsharded, or shard it with TorchRec's "
        "ManagedCollisionEmbeddingBagCollectionSharder yourself"
    )

    fused_storage_unsupported = (
        "its tables sit inside TorchRec's ManagedCollisionEmbeddingBagCollection, whose remap and eviction own them"
    )

    def __init__(self, features: Sequence[FeatureSpec], config: ManagedCollisionConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.zch_sizes = _zch_sizes(self.features, config)
        mc = [(f, z) for f, z in zip(self.features, self.zch_sizes) if z is not None]
        full = [f for f, z in zip(self.features, self.zch_sizes) if z is None]
        self.mc_names = [f.name for f, _ in mc]
        self.full_names = [f.name for f in full]
        self.mc_storage = None
        if mc:
            tables = storage_collection([(f.name, z, f.embedding_dim, [f.name]) for f, z in mc],
                                        self.pooling, self._is_weighted, self.device)
            modules = {}
            for f, z in mc:
                module = MCHManagedCollisionModule(
                    zch_size=z, device=self.device, eviction_policy=EVICTION_POLICIES[config.eviction_policy](),
                    eviction_interval=config.eviction_interval, input_hash_size=f.num_embeddings, name=f.name,
                )
                module.training_only_tensors = _TRAINING_ONLY  # read by embtable.memory.training_only_names
                if config.warm_start and self.device.type != "meta":
                    self._warm_start(module, f, z)
                modules[f.name] = module
            collection = ManagedCollisionCollection(modules, tables.embedding_bag_configs())
            self.mc_storage = trec_mc.ManagedCollisionEmbeddingBagCollection(tables, collection)
        self.storage = (storage_collection([(f.name, f.num_embeddings, f.embedding_dim, [f.name]) for f in full],
                                           self.pooling, self._is_weighted, self.device) if full else None)

    @staticmethod
    @torch.no_grad()
    def _warm_start(module: MCHManagedCollisionModule, f: FeatureSpec, z: int) -> None:
        """Admit ``min(z - 1, n)`` ids: in sorted order, ids own rows ``0, 1, ...``; the empty slots keep TorchRec's
        empty marker (int64 max) and the last position keeps the miss row ``z - 1``."""
        ids = torch.from_numpy(_admitted(f, min(z - 1, f.num_embeddings)))
        k = ids.numel()
        module._mch_sorted_raw_ids[:k] = ids.to(module._mch_sorted_raw_ids.device)
        module._mch_remapped_ids_mapping.copy_(torch.arange(z, dtype=torch.int64))

    def mc_module(self, feature: str) -> MCHManagedCollisionModule:
        """TorchRec's ``MCHManagedCollisionModule`` of a compressed feature."""
        if feature not in self.mc_names:
            raise KeyError(f"managed_collision: {feature!r} is not a compressed feature; compressed: {self.mc_names}")
        return self.mc_storage._managed_collision_collection._managed_collision_modules[feature]

    def table_weight(self, feature: str) -> torch.Tensor:
        """The rows of ``feature``'s table (``[z_f, d_f]``, or ``[n_f, d_f]`` for a full feature)."""
        if feature in self.mc_names:
            return self.mc_storage._embedding_module.embedding_bags[feature].weight
        return self.storage.embedding_bags[feature].weight

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pieces: dict[str, torch.Tensor] = {}
        if self.mc_storage is not None:
            if kjt.values().numel() == 0 and self.training:
                # a batch of empty bags: TorchRec sizes its eviction history by the first training batch, so it
                # must not see one without ids; with no ids, no row is read and the remap is not needed
                pooled = self.mc_storage._embedding_module(kjt)
            else:
                pooled, _ = self.mc_storage(kjt)  # remap (and, in training, record / evict), then look up
            pieces.update(pooled.to_dict())
        if self.storage is not None:
            pieces.update(self.storage(kjt).to_dict())
        return torch.cat([pieces[k] for k in self.feature_names], dim=1)  # [B, sum(d_f)]

    def extra_repr(self) -> str:
        zch = {n: z for n, z in zip(self.feature_names, self.zch_sizes) if z is not None}
        return f"{super().extra_repr()}, zch_size={zch}"

    # ----- planning -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.zch_size is not None or budget_bytes is None:
            return config

        def choice(f: FeatureSpec, cap: int) -> int | None:
            if f.full_table_bytes <= cap:
                return None
            return max(2, min(f.num_embeddings + 1, cap // _row_bytes(f)))

        def total(cap: int) -> int:
            return sum(_bytes(f, choice(f, cap)) for f in features)

        lo = max(min(f.full_table_bytes, 2 * _row_bytes(f)) for f in features)
        cap = largest_feasible(total, budget_bytes, lo, max(f.full_table_bytes for f in features))
        if cap is None:
            raise smallest_budget_error(
                "managed_collision", total(lo), budget_bytes, features,
                "two rows per large feature: one owned, one shared miss row",
            )
        sizes = {f.name: choice(f, cap) for f in features}
        left = budget_bytes - total(cap)
        for f in sorted(features, key=lambda f: -f.num_embeddings):  # top-up, largest first
            z = sizes[f.name]
            if z is None:
                continue
            now = _bytes(f, z)
            if f.full_table_bytes - now <= left:
                sizes[f.name] = None
            else:
                sizes[f.name] = min(f.num_embeddings + 1, z + left // _row_bytes(f))
            left -= _bytes(f, sizes[f.name]) - now
        return dataclasses.replace(config, zch_size=sizes)

    @classmethod
    def describe(cls, features, config):
        plans = []
        for f, z in zip(features, _zch_sizes(features, config)):
            if z is None:
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings,
                                         f.embedding_dim, f.full_table_bytes, False, "identity"))
            else:
                plans.append(FeaturePlan(
                    f.name, f.num_embeddings, f.embedding_dim, z, f.embedding_dim, _bytes(f, z), True,
                    f"{config.eviction_policy} managed collisions: {z - 1:,} owned rows + 1 miss row, remap "
                    f"{z * REMAP_BYTES_PER_ROW:,} B"))
        return plans, {}
