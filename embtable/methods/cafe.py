"""CAFE: hot ids get exclusive rows, found by a HotSketch of gradient norms; the rest share hashed rows.

Zhang, Zhao, Jiang, Zhang, Miao, Shen and Cui, "CAFE: Towards Compact, Adaptive, and Fast Embedding for
Large-scale Recommendation Models", SIGMOD 2024. Each compressed feature ``f`` has one storage table of
``H_f + m_f`` rows: ``H_f`` exclusive ("hot") rows and ``m_f`` hashed rows shared by every other id::

    feature f's table (H_f + m_f rows, dim d_f)              id x of feature f
    +------------------+  row 0                              |
    | hot rows         |  <-- slot s, if x is hot: ----------+ hot index: sorted keys -> slot
    | (exclusive)      |                                     | (searchsorted, O(log H) per id)
    +------------------+  row H_f                            |
    | hashed rows      |  <-- H_f + h_f(x) mod m_f, else ----+
    | (shared)         |
    +------------------+  row H_f + m_f - 1

Importance is the paper's: the L2 norm of the gradient an id's embedding receives. In training mode a
backward hook on the pooled output reads each bag's gradient, gives each of its ids ``|weight| * ||grad||``
(divided by the bag length under mean pooling) and adds it to a HotSketch: per feature ``b_f`` buckets of
``c`` slots of ``(id, score)``, the bucket chosen by a salted hash of the id. A batch updates the sketch at
once: ids already in their bucket add their score; of the other ids of a bucket, the ``c`` with the
largest batch scores are inserted as in Space-Saving, smallest first: each replaces the bucket's lowest slot
(empty slots first) and inherits its score plus its own (scores never underestimate); the rest of a
batch's newcomers to a full bucket are dropped (at most ``c`` rounds, all buckets in parallel). ``train_step_end(step)``
(called by the trainer after each optimizer step) migrates every ``migrate_every`` steps: the ``H_f``
highest-scoring sketch entries of each feature become its hot set; ids that stay keep their row, ids that
left free theirs, and an id that enters is given a free row initialised with its current (hashed) vector, so
migration does not change any output. Scores are multiplied by ``decay`` after each migration. At
inference the mapping is fixed (eval mode records nothing; ``train_step_end`` is a training hook).

A feature is stored full (identity mapping, no hot rows, no sketch) when ``H_f = 0`` and ``m_f >= n_f``;
the planner does so for features whose full table fits the per-feature row cap (as ``hash`` does).
Before the first migration the hot set is empty, or, for a feature with ``counts`` (``hot_from_counts``),
its ``H_f`` most frequent ids: a warm start, so the hot rows serve from the first step.

Memory (inference), per feature: ``(H_f + m_f) * d_f * 4`` (rows) ``+ 16 * H_f`` (the hot index: sorted
int64 keys and int64 slots; empty slots hold a padding key) ``+ 64`` (``a0, a1, a2, b, m, n, H, key base``
as int64). Training adds the sketch, a training-only buffer (in ``state_dict``, counted by
``training_bytes``, not by ``memory_report``): ``12 * c * b_f`` (int64 id + float32 score per slot) plus
48 bytes of bucket-hash parameters per feature, with ``b_f = ceil(sketch_slots * H_f / c)``.

Budget planning: a row cap ``T`` as in ``hash`` (features with ``n_f <= T`` stay full); a compressed
feature spends ``T * d_f * 4`` bytes, ``hot_fraction`` of them on hot rows (each ``d_f * 4 + 16`` bytes with
its index entry) and the rest on hashed rows (at least one). ``hot_fraction = 0.5`` by default: under a
Zipf-like popularity a few thousand exclusive rows already cover most lookups, while the hashed half keeps
the collision rate of the long tail at that of a hashed table half the size; the paper's own tuning puts
roughly this share of the memory in the hot part.

Distributed (DMP): each feature's table is a TorchRec table, so DMP shards it like ``hash``'s. Migration
writes rows and needs the same sketch on every rank; it is not implemented for sharded storage: under DMP
use ``migrate_every=0`` (a fixed mapping, e.g. from a single-process warm-up) — ``train_step_end`` raises
otherwise. Optimizer state of a reused hot row is not reset on migration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, Pooling, register_method
from ..features import FeatureSpec
from ..fused import FusedEmbeddingBagStorage
from ..hashing import PRIME, hash_coefficients, universal_hash
from ..module import (
    EmbeddingModule,
    config_field_per_feature,
    storage_collection,
    storage_values,
    with_values,
)

__all__ = ["CafeConfig", "CafeEmbeddingBagCollection"]

PARAM_BYTES = 8 * 8  # a0, a1, a2, b, m, n, H, key base per feature, int64
HOT_INDEX_BYTES = 8 + 8  # per hot row: its key (int64) in the sorted index and its slot (int64)
SKETCH_SLOT_BYTES = 8 + 4  # training only: id (int64) and score (float32) per sketch slot
SKETCH_PARAM_BYTES = 6 * 8  # training only: bucket hash a0, a1, a2, b, buckets, first bucket per feature


@dataclasses.dataclass(frozen=True)
class CafeConfig(MethodConfig):
    """CAFE (SIGMOD 2024): exclusive rows for ids a HotSketch finds hot, hashed rows for the rest.

    Args:
        hot_rows: ``H_f`` exclusive rows per feature (int, ``{feature: rows}``, or ``None`` to plan).
        hash_rows: ``m_f`` shared hashed rows per feature (same forms); give both or neither.
        hot_fraction: share of a compressed feature's bytes the planner gives to hot rows, in ``[0, 1)``.
        sketch_slots: sketch slots per hot row (the sketch tracks ``sketch_slots * H_f`` candidates).
        bucket_size: slots per sketch bucket (``c``).
        migrate_every: migrate every this many training steps (``train_step_end``); 0 never migrates.
        decay: factor applied to every sketch score after each migration (1.0: no decay), in ``(0, 1]``.
        hot_from_counts: when a feature has ``counts``, start with its ``H_f`` most frequent ids hot (their
            rows start at random, as fresh table rows do); the sketch replaces them from the first migration.
        hash_fn: ``"universal"`` (salted hash) or ``"modulo"`` (``id mod m``) for the hashed rows.
        seed: seed of the salts.
    """

    method = "cafe"
    hot_rows: int | Mapping[str, int] | None = None
    hash_rows: int | Mapping[str, int] | None = None
    hot_fraction: float = 0.5
    sketch_slots: int = 4
    bucket_size: int = 4
    migrate_every: int = 100
    decay: float = 1.0
    hot_from_counts: bool = True
    hash_fn: str = "universal"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hash_fn not in ("universal", "modulo"):
            raise ValueError(f"CafeConfig.hash_fn must be 'universal' or 'modulo', got {self.hash_fn!r}")
        if not 0 <= self.hot_fraction < 1:
            raise ValueError(f"CafeConfig.hot_fraction must be in [0, 1) (hashed rows get the rest), got "
                             f"{self.hot_fraction!r}")
        for name in ("sketch_slots", "bucket_size"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"CafeConfig.{name} must be a positive integer, got {v!r}")
        if int(self.migrate_every) != self.migrate_every or self.migrate_every < 0:
            raise ValueError(f"CafeConfig.migrate_every must be an integer >= 0 (0: never), got "
                             f"{self.migrate_every!r}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"CafeConfig.decay must be in (0, 1], got {self.decay!r}")
        if (self.hot_rows is None) != (self.hash_rows is None):
            raise ValueError("CafeConfig: give both hot_rows and hash_rows, or neither (the planner sizes both)")
        for name, lo in (("hot_rows", 0), ("hash_rows", 1)):
            value = getattr(self, name)
            values = value.values() if isinstance(value, Mapping) else [value]
            for v in values:
                if v is not None and (int(v) != v or v < lo or v > PRIME):
                    raise ValueError(f"CafeConfig.{name} must be integers in [{lo}, 2**31 - 1], got {v!r}")


def _sizes(features: Sequence[FeatureSpec], config: CafeConfig) -> list[tuple[int, int]]:
    """``(H_f, m_f)`` per feature; a feature with ``H_f = 0`` and ``m_f >= n_f`` is full: ``(0, n_f)``."""
    hot = config_field_per_feature(config.hot_rows, features, "hot_rows", "cafe")
    hashed = config_field_per_feature(config.hash_rows, features, "hash_rows", "cafe")
    if hot is None or hashed is None:
        raise ValueError(
            "cafe: hot_rows / hash_rows are not set; give a byte budget (build(features, CafeConfig(), "
            "budget=...)) or CafeConfig(hot_rows=..., hash_rows=...)"
        )
    out = []
    for f in features:
        h, m = int(hot[f.name]), int(hashed[f.name])
        out.append((0, f.num_embeddings) if h == 0 and m >= f.num_embeddings else (h, m))
    return out


def _split(f: FeatureSpec, cap: int, hot_fraction: float) -> tuple[int, int]:
    """Hot and hashed rows of a compressed feature given ``cap * d * 4`` bytes (at least one hashed row)."""
    row = f.embedding_dim * FP32
    allowance = cap * row
    hot = min(int(hot_fraction * allowance) // (row + HOT_INDEX_BYTES), (allowance - row) // (row + HOT_INDEX_BYTES))
    hot = max(hot, 0)
    return hot, (allowance - hot * (row + HOT_INDEX_BYTES)) // row


def _feature_bytes(f: FeatureSpec, hot: int, hashed: int) -> int:
    return (hot + hashed) * f.embedding_dim * FP32 + HOT_INDEX_BYTES * hot + PARAM_BYTES


@register_method(CafeConfig)
class CafeEmbeddingBagCollection(EmbeddingModule):
    """CAFE (Zhang et al., SIGMOD 2024): see the module docstring for the layout, the sketch and the bytes.

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, CafeConfig(migrate_every=1), budget="1/100", seed=0)
    >>> m.config.hot_rows, m.config.hash_rows
    ({'user': 320, 'country': 0}, {'user': 400, 'country': 200})
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123, 7, 3]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> before = m(kjt).values()
    >>> before.sum().backward()              # the sketch records each id's gradient norm
    >>> m.train_step_end(0)                  # migration: ids 123 and 7 get exclusive rows
    >>> m.hot_ids("user").tolist(), torch.equal(m(kjt).values(), before)   # with their current vectors
    ([7, 123], True)
    >>> embtable.memory_report(m).inference_bytes, embtable.training_bytes(m, "sgd")  # sketch: training only
    (64128, 79584)
    """

    def __init__(self, features: Sequence[FeatureSpec], config: CafeConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        sizes = _sizes(self.features, config)
        self.hot_sizes = [h for h, _ in sizes]
        self.hash_fn = config.hash_fn
        self.migrate_every, self.decay, self.bucket_size = config.migrate_every, config.decay, config.bucket_size
        params, key_base, base = [], [], 0
        for f, (h, m) in zip(self.features, sizes):
            key_base.append(base)
            params.append(hash_coefficients(config.seed, "cafe", f.name) + [m, f.num_embeddings, h, base])
            base += f.num_embeddings + 1  # one key per id plus the padding key of the hot index
        self.key_base = key_base
        # [F, 8] int64: a0, a1, a2, b, m, n, H, key base
        self.register_buffer("params", torch.tensor(params, dtype=torch.int64, device=self.device))
        self.hot_base = [sum(self.hot_sizes[:i]) for i in range(len(sizes))]
        # the hot index: per feature a segment of H_f sorted keys (key base + id; empty slots hold the
        # feature's padding key, key base + n, which no id has) and the hot row ("slot") of each
        pads = [torch.full((h,), kb + f.num_embeddings, dtype=torch.int64)
                for f, h, kb in zip(self.features, self.hot_sizes, key_base)]
        self.register_buffer("hot_keys", torch.cat(pads).to(self.device))
        self.register_buffer("hot_slots", torch.zeros(sum(self.hot_sizes), dtype=torch.int64, device=self.device))
        if config.hot_from_counts and self.device.type != "meta":
            self._hot_from_counts()
        # the HotSketch (training only): b_f buckets of c (id key, score) slots per feature with hot rows
        buckets = [math.ceil(config.sketch_slots * h / config.bucket_size) for h in self.hot_sizes]
        self.bucket_base = [sum(buckets[:i]) for i in range(len(buckets))]
        sketch_params = [hash_coefficients(config.seed, "cafe-sketch", f.name) + [b, bb]
                         for f, b, bb in zip(self.features, buckets, self.bucket_base)]
        self.register_training_buffer("sketch_params", torch.tensor(sketch_params, dtype=torch.int64,
                                                                    device=self.device))
        self.register_training_buffer("sketch_keys", torch.full((sum(buckets), config.bucket_size), -1,
                                                                dtype=torch.int64, device=self.device))
        self.register_training_buffer("sketch_scores", torch.zeros(sum(buckets), config.bucket_size,
                                                                   device=self.device))
        self.storage = storage_collection(
            [(f.name, h + m, f.embedding_dim, [f.name]) for f, (h, m) in zip(self.features, sizes)],
            self.pooling,
            self._is_weighted,
            self.device,
        )

    @torch.no_grad()
    def _hot_from_counts(self) -> None:
        """The initial hot set: per feature with counts, its ``H_f`` most frequent ids (ties: smaller id)."""
        for i, f in enumerate(self.features):
            hot = self.hot_sizes[i]
            if hot == 0 or f.counts is None:
                continue
            counts = np.asarray(f.counts)
            top = np.argsort(-counts, kind="stable")[:hot]
            top = np.sort(top[counts[top] > 0])
            k = len(top)
            lo = self.hot_base[i]
            self.hot_keys[lo:lo + k] = torch.as_tensor(top, dtype=torch.int64) + self.key_base[i]
            self.hot_slots[lo:lo + k] = torch.arange(k)

    # ----- lookup -----
    def _keys_and_rows(self, ids: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params[feature]  # [N, 8]
        m, n, hot, base = p[:, 4], p[:, 5], p[:, 6], p[:, 7]
        hashed = ids % m if self.hash_fn == "modulo" else universal_hash(ids, p[:, :4], m)
        keys = base + ids
        rows = hot + hashed
        if self.hot_keys.numel():
            at = torch.searchsorted(self.hot_keys, keys).clamp(max=self.hot_keys.numel() - 1)
            rows = torch.where(self.hot_keys[at] == keys, self.hot_slots[at], rows)
        return keys, torch.where((hot > 0) | (m < n), rows, ids)

    def rows(self, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Storage rows of ids ``[N]`` of features (indices into this module's features) ``[N]``."""
        return self._keys_and_rows(ids, feature)[1]

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        ids = kjt.values()
        feature = torch.repeat_interleave(
            torch.arange(len(self.features), device=ids.device),
            torch.tensor(kjt.length_per_key(), device=ids.device), output_size=ids.numel(),
        )
        keys, rows = self._keys_and_rows(ids, feature)
        out = storage_values(self.storage(with_values(kjt, rows)), self.feature_names)
        if self.training and out.requires_grad and self.sketch_keys.numel():
            lengths, weights = kjt.lengths(), kjt.weights_or_none()
            out.register_hook(lambda grad: self._record(grad, keys, feature, lengths, weights))
        return out

    # ----- the HotSketch -----
    @torch.no_grad()
    def _record(self, grad: torch.Tensor, keys: torch.Tensor, feature: torch.Tensor, lengths: torch.Tensor,
                weights: torch.Tensor | None) -> None:
        """Backward hook: each id's gradient norm ``|w| * ||d loss / d bag||`` (``/ len`` for mean) to the sketch."""
        norms = torch.stack([g.norm(dim=1) for g in grad.split(self.embedding_dims, dim=1)])  # [F, B]
        bag = torch.repeat_interleave(torch.arange(norms.numel(), device=grad.device), lengths,
                                      output_size=keys.numel())
        scores = norms.reshape(-1)[bag]
        if weights is not None:
            scores = scores * weights.abs()
        elif self.pooling is Pooling.MEAN:
            scores = scores / lengths[bag].to(scores.dtype)
        tracked = self.sketch_params[feature, 4] > 0
        self.update_sketch(keys[tracked], scores[tracked], feature[tracked])

    @torch.no_grad()
    def update_sketch(self, keys: torch.Tensor, scores: torch.Tensor, feature: torch.Tensor) -> None:
        """Add ``scores`` of ``keys`` (key base + id) of features ``feature`` to the sketch (see the module docstring)."""
        if keys.numel() == 0:
            return
        keys, inverse = torch.unique(keys, return_inverse=True)
        scores = torch.zeros(keys.numel(), dtype=self.sketch_scores.dtype, device=keys.device).index_add_(
            0, inverse, scores.to(self.sketch_scores.dtype))
        feature = torch.zeros_like(keys).scatter_(0, inverse, feature)
        sp = self.sketch_params[feature]
        ids = keys - self.params[feature, 7]
        bucket = sp[:, 5] + universal_hash(ids, sp[:, :4], sp[:, 4])
        c = self.bucket_size
        match = self.sketch_keys[bucket] == keys[:, None]  # [U, c]: at most one slot holds the key
        hit = match.any(dim=1)
        flat_scores = self.sketch_scores.view(-1)
        flat_scores.index_add_(0, (bucket * c + match.to(torch.int8).argmax(dim=1))[hit], scores[hit])
        # the others (newcomers): ranked per bucket, largest score first (ties: smaller key)
        miss = ~hit
        bucket, keys, scores = bucket[miss], keys[miss], scores[miss]
        order = torch.sort(-scores, stable=True).indices  # keys are sorted already (unique)
        order = order[torch.sort(bucket[order], stable=True).indices]
        bucket, keys, scores = bucket[order], keys[order], scores[order]
        rank = torch.arange(bucket.numel(), device=bucket.device) - torch.searchsorted(bucket, bucket)
        # Space-Saving, one newcomer per bucket at a time (the c largest of each bucket, smallest first, so
        # the largest is inserted last): it replaces its bucket's lowest slot (empty ones first) and
        # inherits that slot's score; buckets run in parallel, c rounds at most
        keys_flat = self.sketch_keys.view(-1)
        for r in reversed(range(c)):
            now = rank == r
            b, k, s = bucket[now], keys[now], scores[now]
            empty = self.sketch_keys[b] < 0
            current = torch.where(empty, float("-inf"), self.sketch_scores[b])
            slot = current.argmin(dim=1)  # the first lowest slot
            old = current.gather(1, slot[:, None])[:, 0].clamp(min=0.0)  # an empty slot counts 0
            keys_flat[b * c + slot] = k
            flat_scores[b * c + slot] = old + s

    # ----- migration (training only) -----
    def train_step_end(self, step: int) -> None:
        if self.migrate_every and (step + 1) % self.migrate_every == 0 and self.sketch_keys.numel():
            self.migrate()

    @torch.no_grad()
    def migrate(self) -> None:
        """Give the ``H_f`` highest-scoring sketch entries of each feature exclusive rows (see the docstring)."""
        if not isinstance(self.storage, EmbeddingBagCollection | FusedEmbeddingBagStorage):  # DMP-sharded
            raise RuntimeError(
                "cafe: migration writes storage rows and needs the same sketch on every rank; it is not "
                "implemented for sharded (DMP) storage; build with CafeConfig(migrate_every=0) to train sharded "
                "with a fixed mapping"
            )
        for i, f in enumerate(self.features):
            hot = self.hot_sizes[i]
            buckets = int(self.sketch_params[i, 4])
            if hot == 0 or buckets == 0:
                continue
            lo = self.bucket_base[i]
            keys = self.sketch_keys[lo:lo + buckets].reshape(-1)
            scores = self.sketch_scores[lo:lo + buckets].reshape(-1)
            order = torch.sort(keys, stable=True).indices
            order = order[torch.sort(-scores[order], stable=True).indices]  # score desc, then key asc
            order = order[keys[order] >= 0][:hot]
            new = keys[order]  # the new hot set, hottest first
            segment = slice(self.hot_base[i], self.hot_base[i] + hot)
            pad = self.key_base[i] + f.num_embeddings
            old_keys, old_slots = self.hot_keys[segment], self.hot_slots[segment]
            real = old_keys != pad
            old_keys, old_slots = old_keys[real], old_slots[real]
            stay = torch.isin(old_keys, new)
            entering = new[~torch.isin(new, old_keys)]
            used = torch.zeros(hot, dtype=torch.bool, device=keys.device)
            used[old_slots[stay]] = True
            free = (~used).nonzero()[:, 0][: entering.numel()]
            # an entering id's exclusive row starts as its current (hashed) vector
            weight = self.storage.embedding_bags[f.name].weight
            ids = entering - self.key_base[i]
            feature = torch.full_like(ids, i)
            weight[free] = weight[self.rows(ids, feature)]
            keys_out = torch.cat([old_keys[stay], entering])
            slots_out = torch.cat([old_slots[stay], free])
            sort = torch.argsort(keys_out)
            k = keys_out.numel()
            self.hot_keys[segment] = torch.cat([keys_out[sort], torch.full((hot - k,), pad, device=keys.device)])
            self.hot_slots[segment] = torch.cat([slots_out[sort], torch.zeros(hot - k, dtype=torch.int64,
                                                                             device=keys.device)])
        if self.decay != 1.0:
            self.sketch_scores.mul_(self.decay)

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """Hot rows = the trained rows of the hot ids; hashed rows = the mean trained row of the other ids
        sharing each (used by ``compress``); a full feature copies its table."""
        i = self.feature_names.index(name)
        table = self.storage.embedding_bags[name].weight
        hot = self.hot_sizes[i]
        n = weight.shape[0]
        weight = weight.to(table)
        if hot == 0 and table.shape[0] == n:
            table.copy_(weight)
            return "trained weights copied (identity mapping)"
        sums = torch.zeros_like(table)
        hits = torch.zeros(table.shape[0], dtype=table.dtype, device=table.device)
        for start in range(0, n, 1 << 16):
            ids = torch.arange(start, min(n, start + (1 << 16)), device=table.device)
            rows = self.rows(ids, torch.full_like(ids, i))
            sums.index_add_(0, rows, weight[start:start + ids.numel()])
            hits.index_add_(0, rows, torch.ones_like(ids, dtype=table.dtype))
        used = hits > 0
        table[used] = sums[used] / hits[used, None]
        return f"{self.hot_ids(name).numel():,} hot rows copied, hashed rows the mean of their ids' trained rows"

    def hot_ids(self, name: str) -> torch.Tensor:
        """The ids of feature ``name`` that hold an exclusive row now (sorted)."""
        i = self.feature_names.index(name)
        keys = self.hot_keys[self.hot_base[i]:self.hot_base[i] + self.hot_sizes[i]]
        return keys[keys != self.key_base[i] + self.features[i].num_embeddings] - self.key_base[i]

    # ----- planning (pure) -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.hot_rows is not None or budget_bytes is None:
            return config

        def sizes(cap: int) -> list[tuple[int, int]]:
            return [(0, f.num_embeddings) if f.num_embeddings <= cap else _split(f, cap, config.hot_fraction)
                    for f in features]

        def total(cap: int) -> int:
            return sum(_feature_bytes(f, h, m) for f, (h, m) in zip(features, sizes(cap)))

        cap = largest_feasible(total, budget_bytes, 1, max(f.num_embeddings for f in features))
        if cap is None:
            raise smallest_budget_error("cafe", total(1), budget_bytes, features, "one row per feature")
        chosen = sizes(cap)
        return dataclasses.replace(config, hot_rows={f.name: h for f, (h, _) in zip(features, chosen)},
                                   hash_rows={f.name: m for f, (_, m) in zip(features, chosen)})

    @classmethod
    def describe(cls, features, config):
        plans = []
        for f, (h, m) in zip(features, _sizes(features, config)):
            compressed = h > 0 or m < f.num_embeddings
            plans.append(FeaturePlan(
                f.name, f.num_embeddings, f.embedding_dim, h + m, f.embedding_dim, _feature_bytes(f, h, m), compressed,
                f"{h:,} hot + {m:,} {config.hash_fn}-hashed rows" if compressed else "identity",
            ))
        return plans, {}
