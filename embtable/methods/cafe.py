"""CAFE: hot ids get exclusive rows of a pool all features share, found by a HotSketch of gradient norms.

Zhang, Zhao, Jiang, Zhang, Miao, Shen and Cui, "CAFE: Towards Compact, Adaptive, and Fast Embedding for
Large-scale Recommendation Models", SIGMOD 2024. The compressed features of one embedding dim share one
storage table: a pool of ``H`` exclusive ("hot") rows that ids of any of them can hold, then ``M`` hashed
rows into which every other id of these features hashes (``multiplex``, each feature with its own salt).
Features stored full keep their own table (identity mapping)::

    pool table of dim d (H + M rows)                          id x of compressed feature f (key = base_f + x)
    +------------------+  row 0                              |
    | hot pool         |  <-- slot s, if key is hot: --------+ hot index: sorted keys -> slot
    | (exclusive rows, |                                     | (searchsorted, O(log H) per id)
    |  any feature)    |                                     |
    +------------------+  row H                              |
    | hashed rows      |  <-- H + h_f(x) mod M, else --------+ h_f: feature f's salted hash
    | (all features)   |
    +------------------+  row H + M - 1

``M = sum_f m_f`` over the pool's features. The paper's multi-level variant (``medium_ids`` ``K``, or
``medium_ratio``: ``K = medium_ratio * H`` planned; needs ``multiplex``): the ``K`` ids ranked just below the
hot ones are medium, found by a second sorted index (keys only), and each reads the sum of two hashed rows::

    medium id x of f:  row H + h_f(x) mod M  +  row H + h'_f(x) mod M     (h'_f: an independent salt)
    any other id:      its row as above      +  row H + M (the zero row, the table's last; K > 0 only)

The second lookups run as extra keys of the same storage table (same lengths and weights, so sum and mean
pooling are exact); every id of a pool's features makes one, non-medium ids into the zero row, which
``train_step_end`` zeroes after every optimizer step (the gradient it gets is discarded): a loop that never
calls ``train_step_end`` must call ``zero_medium_rows()`` itself. With ``multiplex=False`` feature ``f`` hashes into a segment of
its own, ``m_f`` rows long (``offset_f + h_f(x) mod m_f``), as in the paper's code: same rows, same bytes.

Importance is the paper's: the L2 norm of the gradient an id's embedding receives. In training mode a
backward hook on the pooled output reads each bag's gradient, gives each of its ids ``|weight| * ||grad||``
(divided by the bag length under mean pooling; with ``normalize_scores`` divided again by the mean of the
feature's scores in the batch, as the paper's code does) and adds it to a HotSketch: per pool ``b`` buckets
of ``c`` slots of ``(key, score)``, the bucket chosen by a salted hash of the key. A batch updates the sketch
at once: keys already in their bucket add their score; of the other keys of a bucket, the ``c`` with the
largest batch scores are inserted as in Space-Saving, smallest first: each replaces the bucket's lowest slot
(empty slots first) and inherits its score plus its own (scores never underestimate); the rest of a batch's
newcomers to a full bucket are dropped (at most ``c`` rounds, all buckets in parallel).
``train_step_end(step)`` (called by the trainer after each optimizer step) migrates every ``migrate_every``
steps: the ``H`` highest-scoring sketch entries of the pool become its hot set, whichever features they
belong to; ids that stay keep their row, ids that left free theirs, and an id that enters is given a free
row initialised with its current (hashed; a medium id: the sum of its two rows) vector, so migration does not
change its output, and
(``optimizer_state="copy"``, fused FBGEMM storage) with that hashed row's optimizer state, so its step size
carries on too. The next ``K`` entries become the medium set. Its rows are shared, so a change of level
other than promotion to hot changes a vector: an id that becomes medium adds its second hashed row (trained
by the other medium ids sharing it; no row of its own can start at zero), a demoted medium id loses it, and
a demoted hot id reads its hashed row(s) again (as without medium ids). Scores are multiplied by ``decay``
after each migration. At inference the mapping is fixed
(eval mode records nothing; ``train_step_end`` is a training hook). Before the first migration the hot set
is empty, or, for features with ``counts`` (``hot_from_counts``), the pool's ``H`` most frequent ids.

What issue 13 found (demo preset, DLRM, one epoch, seed 0, test AUC, full tables about 0.79; at 1/1000:
hash 0.6321, unified 0.7228, this module's first version 0.6752 -- a hot/hashed split inside each feature,
each feature's cold ids hashed into its own rows). Not the causes: the hot share (``hot_fraction`` 0.8, the
paper's setting at 1/1000: 0.6435 against 0.6458 at 0.5), the optimizer state a migrated row gets (copy
0.6458, keep 0.6459, reset 0.6493), one hot pool for all features instead of one per feature (0.6721 with
hashed rows in proportion to ``n_f``, 0.6764 in proportion to ``sqrt(n_f)``). Harmful: the paper's code's
per-batch normalisation of the scores (0.6458 against 0.6721 without): it gives each feature the same score
mass per batch, so the ids of 16-id features took the pool whatever their gradients; off by default. The
cause: every feature's cold ids hashed into that feature's few rows. Hashing them into all of the pool's
hashed rows (``multiplex``, what ``unified`` does for every id) gives 0.7038 at 1/1000 (+0.029 over the
first version) and 0.7669 at 1/100 (first version 0.7611, hash 0.7493, unified 0.7719).
The medium level (same preset, test AUC; ``medium_ratio`` 0 is the default): at 1/100 it helps, seed 0
0.7669 -> 0.7691 / 0.7699 / 0.7624 at ratios 1 / 4 / 16, seed 1 0.7636 -> 0.7678 at 4; at 1/1000 (56
hashed rows for 24 compressed features) it does not, 0.7038 -> 0.7024 / 0.7001 / 0.7014 / 0.6933 at ratios
1 / 2 / 4 / 16 (0.7034 at 8 with ``hot_fraction`` 0.2; seed 1: 0.7064 -> 0.7036 at 4): medium keys (8 bytes each) take hot rows, and a
second row among so few shared rows adds as much collision as it removes. Unified stays ahead at both
(0.7228, 0.7719), so it is off by default.

Memory (inference): per feature ``m_f * d_f * 4 + 64`` (rows; ``a0, a1, a2, b, modulus, n, row offset,
key base`` as int64; a full feature has ``m_f = n_f``), plus per pool ``H * (d * 4 + 16)`` (the hot rows and
their hot index entries: sorted int64 keys and int64 slots; empty slots hold a padding key), plus per pool
with ``K > 0`` medium ids ``K * 8 + d * 4`` (the sorted int64 medium keys and the zero row; the second salt
is a permutation of the feature's, no bytes). Training adds the sketch, a training-only buffer (in
``state_dict``, counted by ``training_bytes``, not by ``memory_report``): ``12 * c * b`` per pool (int64 key +
float32 score per slot) with ``b = ceil(sketch_slots * (H + K) / c)``, plus 48 bytes of bucket-hash parameters
per feature.

Budget planning: a row cap ``T`` as in ``hash`` (features with ``n_f <= T`` stay full); the compressed
features of a dim together get ``T * d * 4`` bytes each, ``hot_fraction`` of them for the pool's hot rows
(each ``d * 4 + 16`` bytes with its index entry, plus ``medium_ratio * 8`` for its share of medium keys,
and with medium ids one zero row first) and the rest for hashed rows: one per feature plus a share
in proportion to ``n_f`` (``hash_split="proportional"``, the paper's), to ``sqrt(n_f)`` or an equal share
(``"uniform"``); under ``multiplex`` only their sum ``M`` matters.

Distributed (DMP): each pool and each full feature is a TorchRec table, so DMP shards them like ``hash``'s.
Migration writes rows and needs the same sketch on every rank; it is not implemented for sharded storage:
under DMP use ``migrate_every=0`` (a fixed mapping, e.g. from a single-process warm-up) -- ``train_step_end``
raises otherwise. Medium ids (their zero row) are not implemented for sharded storage either. With unfused storage a Python optimizer holds the rows' state, out of the module's
reach: a reused hot row keeps its previous holder's state there.
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

PARAM_BYTES = 8 * 8  # a0, a1, a2, b, m, n, row offset, key base per feature, int64
HOT_INDEX_BYTES = 8 + 8  # per hot row: its key (int64) in the sorted index and its slot (int64)
MEDIUM_INDEX_BYTES = 8  # per medium id: its key (int64) in the sorted medium index
SKETCH_SLOT_BYTES = 8 + 4  # training only: key (int64) and score (float32) per sketch slot
SKETCH_PARAM_BYTES = 6 * 8  # training only: bucket hash a0, a1, a2, b, buckets, first bucket per feature
HASH_SPLITS = ("proportional", "sqrt", "uniform")
OPTIMIZER_STATES = ("copy", "keep", "reset")


@dataclasses.dataclass(frozen=True)
class CafeConfig(MethodConfig):
    """CAFE (SIGMOD 2024): exclusive rows for ids a HotSketch finds hot, hashed rows for the rest.

    Args:
        hot_rows: ``H``, the exclusive rows of the hot pool all compressed features share (int; when the
            compressed features have several embedding dims, ``{dim: rows}``, one pool per dim), or
            ``None`` to plan.
        hash_rows: ``m_f`` hashed rows per feature (int, ``{feature: rows}``); a feature with
            ``m_f >= n_f`` is stored full. Give both or neither.
        hot_fraction: share of the compressed features' bytes the planner gives to the hot pool, in ``[0, 1)``.
        hash_split: how the planner splits the hashed rows among compressed features: ``"proportional"``
            to ``n_f`` (the paper's), to ``sqrt(n_f)`` (``"sqrt"``) or ``"uniform"`` (the same count each).
        sketch_slots: sketch slots per hot row (the sketch tracks ``sketch_slots * H`` candidates).
        bucket_size: slots per sketch bucket (``c``).
        migrate_every: migrate every this many training steps (``train_step_end``); 0 never migrates.
        decay: factor applied to every sketch score after each migration (1.0: no decay), in ``(0, 1]``.
        normalize_scores: divide each feature's gradient norms in a batch by their mean over the batch's
            ids of that feature (the paper's code), so every batch and feature weighs alike.
        optimizer_state: on migration, an entering id's row gets the fused optimizer state of the hashed
            row its vector came from (``"copy"``), keeps the state of the row's previous holder
            (``"keep"``), or starts at zero (``"reset"``). Fused (FBGEMM) storage only: a Python optimizer's
            state is out of the module's reach.
        multiplex: the compressed features of a pool hash their cold ids into all of the pool's hashed rows
            (each feature with its own salt, as ``unified`` does) instead of each into its own segment;
            same rows, same bytes.
        medium_ids: ``K``, the ids of medium importance per pool (int, or ``{dim: K}``), ranked just below the
            ``H`` hot ones: each reads the sum of its hashed row and a second hashed row (an independent
            salt, same hashed rows); ``None``: planned as ``medium_ratio * H`` (0 with explicit sizes).
        medium_ratio: medium ids per hot row the planner gives each pool (0: no medium level, the default).
        hot_from_counts: with ``counts``, start with the ``H`` most frequent ids of the pool hot (their rows
            start at random, as fresh table rows do); the sketch replaces them from the first migration.
        hash_fn: ``"universal"`` (salted hash) or ``"modulo"`` (``id mod m``) for the hashed rows.
        seed: seed of the salts.
    """

    method = "cafe"
    hot_rows: int | Mapping[int, int] | None = None
    hash_rows: int | Mapping[str, int] | None = None
    hot_fraction: float = 0.5
    hash_split: str = "proportional"
    sketch_slots: int = 4
    bucket_size: int = 4
    migrate_every: int = 100
    decay: float = 1.0
    normalize_scores: bool = False
    optimizer_state: str = "copy"
    multiplex: bool = True
    medium_ids: int | Mapping[int, int] | None = None
    medium_ratio: float = 0.0
    hot_from_counts: bool = True
    hash_fn: str = "universal"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hash_fn not in ("universal", "modulo"):
            raise ValueError(f"CafeConfig.hash_fn must be 'universal' or 'modulo', got {self.hash_fn!r}")
        if self.hash_split not in HASH_SPLITS:
            raise ValueError(f"CafeConfig.hash_split must be one of {HASH_SPLITS}, got {self.hash_split!r}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"CafeConfig.optimizer_state must be one of {OPTIMIZER_STATES}, got "
                             f"{self.optimizer_state!r}")
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
        if not (self.medium_ratio >= 0 and math.isfinite(self.medium_ratio)):
            raise ValueError(f"CafeConfig.medium_ratio must be a finite number >= 0, got {self.medium_ratio!r}")
        medium = self.medium_ids.values() if isinstance(self.medium_ids, Mapping) else [self.medium_ids]
        for v in medium:
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 0 or v > PRIME):
                raise ValueError(f"CafeConfig.medium_ids must be integers in [0, 2**31 - 1], got {v!r}")
        if not self.multiplex and (self.medium_ratio or self.medium_ids):
            raise ValueError("CafeConfig: medium ids (medium_ratio, medium_ids) need multiplex=True (their second "
                             "row hashes into all of the pool's hashed rows)")
        if not 0 < self.decay <= 1:
            raise ValueError(f"CafeConfig.decay must be in (0, 1], got {self.decay!r}")
        if (self.hot_rows is None) != (self.hash_rows is None):
            raise ValueError("CafeConfig: give both hot_rows and hash_rows, or neither (the planner sizes both)")
        for name, lo in (("hot_rows", 0), ("hash_rows", 1)):
            value = getattr(self, name)
            values = value.values() if isinstance(value, Mapping) else [value]
            for v in values:
                if v is not None and (isinstance(v, bool) or int(v) != v or v < lo or v > PRIME):
                    raise ValueError(f"CafeConfig.{name} must be integers in [{lo}, 2**31 - 1], got {v!r}")


@dataclasses.dataclass(frozen=True)
class _Pool:
    """The compressed features of one embedding dim: one table of ``hot`` rows, then their hashed segments."""

    dim: int
    features: tuple[int, ...]  # indices into the features, in order
    hot: int
    offsets: tuple[int, ...]  # first row of each feature's hashed segment in the pool's table
    medium: int = 0  # medium ids; > 0: the table has one more row (the zero row, last) and a medium index


def _per_dim(value, field: str, what: str, dims: Mapping[int, list[int]]) -> dict[int, int]:
    """``CafeConfig.<field>`` per compressed dim: a ``{dim: n}`` mapping, or one int when one dim is compressed."""
    if isinstance(value, Mapping):
        per_dim = {int(k): int(v) for k, v in value.items()}
        unknown = sorted(d for d, v in per_dim.items() if v and d not in dims)
        if unknown:
            raise ValueError(f"cafe: {field} gives {what} to dims {unknown}, which no compressed feature has "
                             f"(compressed dims: {sorted(dims)})")
        return per_dim
    if value and len(dims) > 1:
        raise ValueError(f"cafe: the compressed features have dims {sorted(dims)}, one pool each; give "
                         f"{field} as {{dim: {what}}}")
    return {d: int(value or 0) for d in dims}


def _layout(features: Sequence[FeatureSpec], config: CafeConfig) -> tuple[list[int], list[_Pool]]:
    """``m_f`` per feature (``n_f`` for a full one) and the hot pools (see the module docstring)."""
    hashed = config_field_per_feature(config.hash_rows, features, "hash_rows", "cafe")
    if config.hot_rows is None or hashed is None:
        raise ValueError(
            "cafe: hot_rows / hash_rows are not set; give a byte budget (build(features, CafeConfig(), "
            "budget=...)) or CafeConfig(hot_rows=..., hash_rows=...)"
        )
    rows = [min(int(hashed[f.name]), f.num_embeddings) for f in features]
    dims: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        if rows[i] < f.num_embeddings:
            dims.setdefault(f.embedding_dim, []).append(i)
    hot = _per_dim(config.hot_rows, "hot_rows", "rows", dims)
    medium = _per_dim(config.medium_ids, "medium_ids", "ids", dims)
    pools = []
    for d, members in dims.items():
        h = hot.get(d, 0)
        offsets = [h + sum(rows[j] for j in members[:k]) for k in range(len(members))]
        pools.append(_Pool(d, tuple(members), h, tuple(offsets), medium.get(d, 0)))
    return rows, pools



def _pool_table_name(features: Sequence[FeatureSpec], dim: int) -> str:
    names = {f.name for f in features}
    name = f"cafe_pool_d{dim}"
    while name in names:
        name = "_" + name
    return name


def _plan_sizes(features: Sequence[FeatureSpec], cap: int,
                config: CafeConfig) -> tuple[dict[int, int], dict[int, int], list[int]]:
    """Hot rows and medium ids per dim and hashed rows per feature when features over ``cap`` ids share ``cap``
    rows each."""
    hashed = [f.num_embeddings for f in features]
    dims: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        if f.num_embeddings > cap:
            dims.setdefault(f.embedding_dim, []).append(i)
    hot, medium = {}, {}
    ratio = config.medium_ratio
    for d, members in dims.items():
        row, k = d * FP32, len(members)
        allowance = cap * row * k - (row if ratio else 0)  # the medium level's zero row
        unit = row + HOT_INDEX_BYTES + ratio * MEDIUM_INDEX_BYTES  # a hot row and its share of medium ids
        h = max(0, min(int(config.hot_fraction * allowance / unit), int((allowance - k * row) / unit)))
        medium[d] = int(ratio * h)
        extra = (allowance - h * (row + HOT_INDEX_BYTES) - medium[d] * MEDIUM_INDEX_BYTES) // row - k
        weight = {"proportional": lambda n: n, "sqrt": math.isqrt, "uniform": lambda n: 1}[config.hash_split]
        total = sum(weight(features[i].num_embeddings) for i in members)
        for i in members:
            n = features[i].num_embeddings
            hashed[i] = min(1 + extra * weight(n) // total, n - 1)
        hot[d] = h
    return hot, medium, hashed


@register_method(CafeConfig)
class CafeEmbeddingBagCollection(EmbeddingModule):
    """CAFE (Zhang et al., SIGMOD 2024): see the module docstring for the layout, the sketch and the bytes.

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, CafeConfig(migrate_every=1), budget="1/100", seed=0)
    >>> m.config.hot_rows, m.config.hash_rows
    (320, {'user': 400, 'country': 200})
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
        rows, pools = _layout(self.features, config)
        self.pools = pools
        self.hash_fn, self.optimizer_state = config.hash_fn, config.optimizer_state
        self.migrate_every, self.decay, self.bucket_size = config.migrate_every, config.decay, config.bucket_size
        self.normalize_scores = config.normalize_scores
        pool_of = [-1] * len(self.features)
        offset = [-1] * len(self.features)
        for g, p in enumerate(pools):
            for i, o in zip(p.features, p.offsets):
                pool_of[i], offset[i] = g, o
        self.pool_of = pool_of
        self.table_names = [_pool_table_name(self.features, pools[g].dim) if g >= 0 else f.name
                            for f, g in zip(self.features, pool_of)]
        params, key_base, base = [], [], 0
        modulus = list(rows)
        if config.multiplex:  # every compressed feature of a pool hashes into all of its hashed rows
            for p in pools:
                for i in p.features:
                    modulus[i], offset[i] = sum(rows[j] for j in p.features), p.hot
        for f, m, o in zip(self.features, modulus, offset):
            key_base.append(base)
            params.append(hash_coefficients(config.seed, "cafe", f.name) + [m, f.num_embeddings, o, base])
            base += f.num_embeddings
        self.key_base, self.pad_key = key_base, base  # no id has the padding key
        # [F, 8] int64: a0, a1, a2, b, m, n, row offset (-1: full), key base
        self.register_buffer("params", torch.tensor(params, dtype=torch.int64, device=self.device))
        # the hot index: the sorted keys (key base + id) of every hot id of every pool, then padding keys; and
        # the row ("slot") of each in its pool's table
        total_hot = sum(p.hot for p in pools)
        self.register_buffer("hot_keys", torch.full((total_hot,), base, dtype=torch.int64, device=self.device))
        self.register_buffer("hot_slots", torch.zeros(total_hot, dtype=torch.int64, device=self.device))
        # the medium level: the sorted keys of every medium id of every pool (then padding keys); a medium id's
        # second row is H + h'_f(x) mod M, h'_f the salt (a1, a0, a2, a2) of h_f's (a0, a1, a2, b): for ids
        # below 2**31 (x1 = x2 = 0) h_f reads a0, b and h'_f a1, a2, four independent coefficients; the zero
        # row is the table's last, H + M
        table_rows = [p.hot + sum(rows[j] for j in p.features) + (1 if p.medium else 0) for p in pools]
        self.medium_features = [i for i in range(len(self.features)) if pool_of[i] >= 0 and pools[pool_of[i]].medium]
        self.medium_names = []
        names = set(self.feature_names)
        for i in self.medium_features:
            name = f"{self.features[i].name}@medium"
            while name in names:
                name = "_" + name
            names.add(name)
            self.medium_names.append(name)
        total_medium = sum(p.medium for p in pools)
        self.register_buffer("medium_keys", torch.full((total_medium,), base, dtype=torch.int64, device=self.device))
        # the HotSketch (training only): per pool b_g buckets of c (key, score) slots
        buckets = [math.ceil(config.sketch_slots * (p.hot + p.medium) / config.bucket_size) for p in pools]
        self.bucket_base = [sum(buckets[:g]) for g in range(len(pools))]
        self.buckets = buckets
        sketch_params = []
        for g in pool_of:
            if g < 0:
                sketch_params.append([0] * 6)
            else:
                sketch_params.append(hash_coefficients(config.seed, "cafe-sketch", pools[g].dim)
                                     + [buckets[g], self.bucket_base[g]])
        self.register_training_buffer("sketch_params", torch.tensor(sketch_params, dtype=torch.int64,
                                                                    device=self.device))
        self.register_training_buffer("sketch_keys", torch.full((sum(buckets), config.bucket_size), -1,
                                                                dtype=torch.int64, device=self.device))
        self.register_training_buffer("sketch_scores", torch.zeros(sum(buckets), config.bucket_size,
                                                                   device=self.device))
        tables, seen = [], set()
        for i, f in enumerate(self.features):
            g = pool_of[i]
            if g < 0:
                tables.append((f.name, f.num_embeddings, f.embedding_dim, [f.name]))
            elif g not in seen:
                seen.add(g)
                p = pools[g]
                tables.append((self.table_names[i], table_rows[g], p.dim,
                               [self.features[j].name for j in p.features]
                               + [n for j, n in zip(self.medium_features, self.medium_names) if pool_of[j] == g]))
        self.storage = storage_collection(tables, self.pooling, self._is_weighted, self.device)
        if self.device.type != "meta":
            self.zero_medium_rows()
            if config.hot_from_counts:
                self._hot_from_counts()

    @torch.no_grad()
    def _hot_from_counts(self) -> None:
        """The initial hot set: per pool, the ``H`` most frequent ids of its features (ties: smaller key)."""
        keys, slots, medium = [], [], []
        for p in self.pools:
            if p.hot + p.medium == 0:
                continue
            have = [i for i in p.features if self.features[i].counts is not None]
            if not have:
                continue
            counts = np.concatenate([np.asarray(self.features[i].counts, dtype=np.float64) for i in have])
            key = np.concatenate([self.key_base[i] + np.arange(self.features[i].num_embeddings) for i in have])
            ranked = np.argsort(-counts, kind="stable")[:p.hot + p.medium]
            ranked = ranked[counts[ranked] > 0]
            top, middle = ranked[:p.hot], ranked[p.hot:]
            keys.append(torch.as_tensor(key[top], dtype=torch.int64))
            slots.append(torch.arange(top.size, dtype=torch.int64))
            medium.append(torch.as_tensor(key[middle], dtype=torch.int64))
        if keys:
            self._set_index(torch.cat(keys).to(self.device), torch.cat(slots).to(self.device))
            self._set_medium(torch.cat(medium).to(self.device))

    def _set_index(self, keys: torch.Tensor, slots: torch.Tensor) -> None:
        order = torch.argsort(keys)
        k = keys.numel()
        self.hot_keys.fill_(self.pad_key)
        self.hot_slots.zero_()
        self.hot_keys[:k] = keys[order]
        self.hot_slots[:k] = slots[order]

    def _set_medium(self, keys: torch.Tensor) -> None:
        self.medium_keys.fill_(self.pad_key)
        self.medium_keys[:keys.numel()] = torch.sort(keys).values

    @torch.no_grad()
    def zero_medium_rows(self) -> None:
        """Zero each pool's zero row (where non-medium ids' second lookup points); ``train_step_end`` calls it
        after every optimizer step, so the forward passes always read it as zero."""
        if not isinstance(self.storage, EmbeddingBagCollection | FusedEmbeddingBagStorage):  # DMP-sharded
            raise RuntimeError("cafe: medium ids need their zero row zeroed after each step, not implemented for "
                               "sharded (DMP) storage; build with CafeConfig(medium_ratio=0) to train sharded")
        for p in self.pools:
            if p.medium:
                weight = self.storage.embedding_bags[self.table_names[p.features[0]]].weight
                weight[-1] = 0

    # ----- lookup -----
    def _keys_and_rows(self, ids: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, rows, _ = self._lookup(ids, feature)
        return keys, rows

    def _lookup(self, ids: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, first rows and second rows (medium ids: a second hashed row; others: the pool's zero row;
        features of pools without medium ids: -1) of ids ``[N]`` of features ``[N]``."""
        p = self.params[feature]  # [N, 8]
        m, offset, base = p[:, 4], p[:, 6], p[:, 7]
        hashed = ids % m if self.hash_fn == "modulo" else universal_hash(ids, p[:, :4], m)
        keys = base + ids
        rows = offset + hashed
        if self.hot_keys.numel():
            at = torch.searchsorted(self.hot_keys, keys).clamp(max=self.hot_keys.numel() - 1)
            rows = torch.where(self.hot_keys[at] == keys, self.hot_slots[at], rows)
        second = torch.full_like(ids, -1)
        if self.medium_keys.numel():  # a static shape: no data-dependent branch
            at = torch.searchsorted(self.medium_keys, keys).clamp(max=self.medium_keys.numel() - 1)
            medium = (self.medium_keys[at] == keys) & (offset >= 0)
            salt = p[:, [1, 0, 2, 2]]
            second = torch.where(medium, offset + universal_hash(ids, salt, m), offset + m)
        return keys, torch.where(offset >= 0, rows, ids), second

    def second_rows(self, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Second rows of ids ``[N]`` of features ``[N]``: a medium id's second hashed row, else the zero row."""
        return self._lookup(ids, feature)[2]

    def rows(self, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Rows of ids ``[N]`` of features (indices into this module's features) ``[N]`` in their tables."""
        return self._keys_and_rows(ids, feature)[1]

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        ids = kjt.values()
        feature = torch.repeat_interleave(
            torch.arange(len(self.features), device=ids.device),
            torch.tensor(kjt.length_per_key(), device=ids.device), output_size=ids.numel(),
        )
        keys, rows, second = self._lookup(ids, feature)
        if not self.medium_features:
            out = storage_values(self.storage(with_values(kjt, rows)), self.feature_names)
        else:  # medium features look up again, under their second names, each id's second row
            offsets, stride = kjt.offset_per_key(), kjt.stride()
            lengths, weights = kjt.lengths(), kjt.weights_or_none()
            pick = [slice(offsets[i], offsets[i + 1]) for i in self.medium_features]
            both = KeyedJaggedTensor(
                keys=self.feature_names + self.medium_names,
                values=torch.cat([rows] + [second[s] for s in pick]),
                weights=None if weights is None else torch.cat([weights] + [weights[s] for s in pick]),
                lengths=torch.cat([lengths] + [lengths[i * stride:(i + 1) * stride] for i in self.medium_features]),
                stride=stride,
            )
            pooled = self.storage(both)
            first = storage_values(pooled, self.feature_names).split(self.embedding_dims, dim=1)
            extra = dict(zip(self.medium_features,
                             storage_values(pooled, self.medium_names).split(
                                 [self.embedding_dims[i] for i in self.medium_features], dim=1)))
            out = torch.cat([x + extra[i] if i in extra else x for i, x in enumerate(first)], dim=1)
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
        if self.normalize_scores:  # each feature's scores in this batch average 1 (a zero-gradient feature: 0)
            f = len(self.features)
            total = torch.zeros(f, dtype=scores.dtype, device=scores.device).index_add_(0, feature, scores)
            count = torch.zeros(f, dtype=scores.dtype, device=scores.device).index_add_(
                0, feature, torch.ones_like(scores))
            scale = torch.where(total > 0, count / total.clamp(min=torch.finfo(scores.dtype).tiny), 0.0)
            scores = scores * scale[feature]
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
        bucket = sp[:, 5] + universal_hash(keys, sp[:, :4], sp[:, 4])
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
        if self.medium_features:
            self.zero_medium_rows()
        if self.migrate_every and (step + 1) % self.migrate_every == 0 and self.sketch_keys.numel():
            self.migrate()

    @torch.no_grad()
    def migrate(self) -> None:
        """Give the ``H`` highest-scoring sketch entries of each pool exclusive rows (see the docstring)."""
        if not isinstance(self.storage, EmbeddingBagCollection | FusedEmbeddingBagStorage):  # DMP-sharded
            raise RuntimeError(
                "cafe: migration writes storage rows and needs the same sketch on every rank; it is not "
                "implemented for sharded (DMP) storage; build with CafeConfig(migrate_every=0) to train sharded "
                "with a fixed mapping"
            )
        device = self.hot_keys.device
        self.zero_medium_rows()
        real = self.hot_keys != self.pad_key
        all_keys, all_slots = self.hot_keys[real], self.hot_slots[real]
        key_base = torch.tensor(self.key_base, dtype=torch.int64, device=device)
        pool_of = torch.tensor(self.pool_of, dtype=torch.int64, device=device)
        key_pool = pool_of[torch.searchsorted(key_base, all_keys, right=True) - 1]
        states = self.storage.optimizer_states() if isinstance(self.storage, FusedEmbeddingBagStorage) else {}
        keys_out, slots_out, medium_out = [], [], []
        for g, p in enumerate(self.pools):
            mine = key_pool == g
            old_keys, old_slots = all_keys[mine], all_slots[mine]
            if p.hot + p.medium == 0 or self.buckets[g] == 0:
                continue
            lo = self.bucket_base[g]
            keys = self.sketch_keys[lo:lo + self.buckets[g]].reshape(-1)
            scores = self.sketch_scores[lo:lo + self.buckets[g]].reshape(-1)
            order = torch.sort(keys, stable=True).indices
            order = order[torch.sort(-scores[order], stable=True).indices]  # score desc, then key asc
            order = order[keys[order] >= 0][:p.hot + p.medium]
            new = keys[order[:p.hot]]  # the new hot set, hottest first
            medium_out.append(keys[order[p.hot:]])  # the next K: the new medium set
            stay = torch.isin(old_keys, new)
            entering = new[~torch.isin(new, old_keys)]
            used = torch.zeros(p.hot, dtype=torch.bool, device=device)
            used[old_slots[stay]] = True
            free = (~used).nonzero()[:, 0][: entering.numel()]
            # an entering id's exclusive row starts as its current (hashed) vector, and (optimizer_state
            # "copy") with that row's fused optimizer state
            feature = torch.searchsorted(key_base, entering, right=True) - 1
            _, source, second = self._lookup(entering - key_base[feature], feature)
            table = self.table_names[p.features[0]]
            weight = self.storage.embedding_bags[table].weight
            weight[free] = weight[source] + weight[second] if p.medium else weight[source]
            for name, state in states.items():
                if name.rsplit(".", 1)[0] == table and state.shape[0] == weight.shape[0]:
                    if self.optimizer_state == "copy":
                        state[free] = state[source]
                    elif self.optimizer_state == "reset":
                        state[free] = 0
            keys_out += [old_keys[stay], entering]
            slots_out += [old_slots[stay], free]
        if keys_out:
            self._set_index(torch.cat(keys_out), torch.cat(slots_out))
        if medium_out and self.medium_keys.numel():
            self._set_medium(torch.cat(medium_out))
        if self.decay != 1.0:
            self.sketch_scores.mul_(self.decay)

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """Hot rows = the trained rows of the hot ids; hashed rows = the mean trained row of the other ids
        sharing each (used by ``compress``); a full feature copies its table. Under ``multiplex`` a hashed
        row that several features' ids share ends with the mean of the last of them initialised."""
        i = self.feature_names.index(name)
        table = self.storage.embedding_bags[self.table_names[i]].weight
        n = weight.shape[0]
        weight = weight.to(table)
        if self.pool_of[i] < 0:
            table.copy_(weight)
            return "trained weights copied (identity mapping)"
        sums = torch.zeros_like(table)
        hits = torch.zeros(table.shape[0], dtype=table.dtype, device=table.device)
        for start in range(0, n, 1 << 16):
            ids = torch.arange(start, min(n, start + (1 << 16)), device=table.device)
            rows = self.rows(ids, torch.full_like(ids, i))
            sums.index_add_(0, rows, weight[start:start + ids.numel()])
            hits.index_add_(0, rows, torch.ones_like(ids, dtype=table.dtype))
        used = hits > 0  # this feature's rows only: its hot ids' and its hashed segment
        table[used] = sums[used] / hits[used, None]
        return f"{self.hot_ids(name).numel():,} hot rows copied, hashed rows the mean of their ids' trained rows"

    def hot_ids(self, name: str) -> torch.Tensor:
        """The ids of feature ``name`` that hold an exclusive row now (sorted)."""
        i = self.feature_names.index(name)
        lo, hi = self.key_base[i], self.key_base[i] + self.features[i].num_embeddings
        return self.hot_keys[(self.hot_keys >= lo) & (self.hot_keys < hi)] - lo

    # ----- planning (pure) -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.hot_rows is not None or budget_bytes is None:
            if config.hot_rows is not None and config.medium_ids is None and config.medium_ratio:
                hot = config.hot_rows
                medium = ({d: int(config.medium_ratio * h) for d, h in hot.items()} if isinstance(hot, Mapping)
                          else int(config.medium_ratio * hot))
                return dataclasses.replace(config, medium_ids=medium)
            return config

        def sized(cap: int) -> CafeConfig:
            hot, medium, hashed = _plan_sizes(features, cap, config)
            return dataclasses.replace(config, hot_rows=hot if len(hot) > 1 else sum(hot.values()),
                                       hash_rows={f.name: m for f, m in zip(features, hashed)},
                                       medium_ids=medium if len(medium) > 1 else sum(medium.values()))

        def total(cap: int) -> int:  # from the sizes directly: a huge cap's row counts are no valid config
            hot, medium, hashed = _plan_sizes(features, cap, config)
            tables = sum(m * f.embedding_dim * FP32 + PARAM_BYTES for f, m in zip(features, hashed))
            return (tables + sum(h * (d * FP32 + HOT_INDEX_BYTES) for d, h in hot.items())
                    + sum(k * MEDIUM_INDEX_BYTES + d * FP32 for d, k in medium.items() if k))

        cap = largest_feasible(total, budget_bytes, 1, max(f.num_embeddings for f in features))
        if cap is None:
            raise smallest_budget_error("cafe", total(1), budget_bytes, features, "one row per feature")
        return sized(cap)

    @classmethod
    def describe(cls, features, config):
        rows, pools = _layout(features, config)
        pool_dims = {i: p.dim for p in pools for i in p.features}
        plans = []
        for i, (f, m) in enumerate(zip(features, rows)):
            compressed = i in pool_dims
            plans.append(FeaturePlan(
                f.name, f.num_embeddings, f.embedding_dim, m, f.embedding_dim, m * f.embedding_dim * FP32 + PARAM_BYTES,
                compressed, f"{m:,} {config.hash_fn}-hashed rows + the dim-{f.embedding_dim} hot pool" if compressed
                else "identity",
            ))
        shared = {f"hot pool (dim {p.dim}, {p.hot:,} rows)": p.hot * (p.dim * FP32 + HOT_INDEX_BYTES) for p in pools}
        for p in pools:
            if p.medium:
                shared[f"medium index (dim {p.dim}, {p.medium:,} ids) + zero row"] = (
                    p.medium * MEDIUM_INDEX_BYTES + p.dim * FP32)
        return plans, shared
