"""Unified embedding / feature multiplexing: every feature hashes into ONE shared row space.

Coleman et al., NeurIPS 2023, "Unified Embedding: Battle-Tested Feature Representations for Web-Scale
ML Systems". Instead of one hashed table per feature, all features share the rows of one table. Each
feature's id is hashed with salts of its own; with ``k`` probes per feature, probe ``p`` (its own salt)
looks up a chunk of dim ``d / k`` and the ``k`` chunks are concatenated into the feature's vector. The
byte budget sets the total number of rows; features no longer need table sizes of their own.

Layout (features ``C1`` with ``k = 2`` probes and ``C2`` with ``k = 1``; chunk dim ``c = d1 / 2 = d2``)::

    id space of each feature      salted probes (slot s = (feature, probe))     one logical table, R rows x c
    C1: 0 1 2 .... n1-1 ── id ──► s0 = h(C1, p0)(id) ─┐                         ┌──────────────────────────┐
                          └─────► s1 = h(C1, p1)(id) ─┼──► E + (h mod H) ──────► │ [0, E): own rows (opt.)  │
    C2: 0 1 .... n2-1 ─── id ──► s2 = h(C2, p0)(id) ─┘                          │ [E, R): H shared rows    │
                                                                                └──────────────────────────┘
    vector(C1, id) = row[s0(id)] ‖ row[s1(id)]   (d1 = 2c)        vector(C2, id) = row[s2(id)]   (d2 = c)

The logical table is stored as ``num_tables = T`` TorchRec tables filled round-robin, so TorchRec can
shard them table-wise; global row ``r`` lives in table ``r mod T`` at local row ``r div T``::

    global row r :  0   1   2   3   4   5   6   7   8   9  ...
    table (T = 3):  t0  t1  t2  t0  t1  t2  t0  t1  t2  t0 ...
    local row    :  0   0   0   1   1   1   2   2   2   3  ...

The id mapper (:class:`UnifiedIdMapper`, a leaf module vectorised over all features) turns the input
``KeyedJaggedTensor`` (stride ``B``) into one with a key per table (``unified_0 .. unified_{T-1}``) and
stride ``K * B`` (``K = sum_f k_f`` slots): bag ``s * B + b`` holds the rows of slot ``s`` for the ids of
sample ``b`` (slot-major, so with one probe per feature the ids keep the input's order and lengths); each
row goes to the bag of the table that stores it::

    input  (B = 2)  key   C1              C2
                    bag   b0     b1       b0    b1
                    ids   [7, 9] [3]      [5]   []
    storage (T = 1) key   unified_0
                    bag   s0:b0          s0:b1    s1:b0          s1:b1    s2:b0    s2:b1
                    rows  [s0(7),s0(9)]  [s0(3)]  [s1(7),s1(9)]  [s1(3)]  [s2(5)]  []

One lookup per table pools all bags: ``[K*B, T*c]`` -> (sum over tables) -> ``[K, B, c]`` -> transpose ->
``[B, K*c] = [B, sum_f d_f]``, in feature order (features in order, a feature's probes in order).

Exactness of pooled lookups: pooling is linear and acts column by column, so pooling each probe's chunks
and concatenating equals concatenating then pooling: ``sum_i w_i (row[s0(x_i)] ‖ row[s1(x_i)]) =
(sum_i w_i row[s0(x_i)]) ‖ (sum_i w_i row[s1(x_i)])``. The storage pools with ``sum`` (weighted if the bags
are), the ``T`` tables' partial sums are added, and ``mean`` pooling divides by the logical bag's length,
so sum, mean and weighted bags are exact (a bag split across tables changes nothing).

Shared chunk dim: one table has one dim, so every feature's ``embedding_dim / num_probes`` must be the
same ``c`` (give features with larger dims more probes: dims 16 and 32 with probes 1 and 2 share ``c = 16``).

Small features (optional, ``keep_full_below``): a feature with fewer ids than the threshold gets its own
identity-mapped rows ``[offset, offset + n)`` per probe at the start of the table (the ``E`` rows above),
so it has no collisions at a cost of ``n * k`` rows. Default 0, as in the paper (all features multiplexed):
at a load of ``L`` ids per shared row, a hashed id collides with about ``L`` others whatever its feature, so
tiny features (a few hundred ids) lose most and cost least to keep; raise the threshold when collision
rates (:meth:`UnifiedEmbeddingBagCollection.collision_rates`) of small features matter. When ``num_rows``
equals ``sum_f n_f * k_f`` every feature gets its own identity-mapped rows: no sharing, no hashing, the
same function as a plain ``EmbeddingBagCollection`` (for testing and reference, not compression).

Memory: ``num_rows * c * 4 + 48 * K`` bytes (``K = sum_f k_f``): the rows, plus per slot the int64
``(a0, a1, a2, b, modulus, row offset)`` of its hash (a buffer the server needs too).

Budget planning: ``num_rows = floor((budget - 48 * K) / (c * 4))``, capped at ``sum_f n_f * k_f`` (then
every feature is identity-mapped) and at ``E + 2**31 - 1`` (the hash's range).

Speed: with one probe and one table the mapper is one salted hash per id and the storage one lookup, as
fast as per-feature hashing. ``k`` probes make ``k`` lookups of dim ``d / k`` per id; with ``T > 1`` tables
every table sees all ``K * B`` bags (most empty) and pools ``T`` times the output, so keep ``T = 1`` on one
machine and raise it to let TorchRec spread the rows over ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, BudgetError, FeaturePlan
from ..config import MethodConfig, Pooling, register_method
from ..features import FeatureSpec
from ..hashing import PRIME, hash_coefficients, universal_hash
from ..module import (
    EmbeddingModule,
    config_field_per_feature,
    device_constants,
    is_tracing,
    storage_collection,
)

__all__ = ["UnifiedConfig", "UnifiedEmbeddingBagCollection", "UnifiedIdMapper", "unified_layout"]

SLOT_PARAM_BYTES = 6 * 8  # a0, a1, a2, b, modulus, row offset per (feature, probe) slot, int64


def _positive_int(value: object, what: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"UnifiedConfig.{what} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class UnifiedConfig(MethodConfig):
    """Unified embedding (feature multiplexing).

    Args:
        num_rows: rows of the one logical shared table (all ``num_tables`` tables together); ``None`` lets
            the planner size it from the budget. At most ``sum_f num_embeddings_f * num_probes_f``, which
            is the unshared identity layout (testing/reference).
        num_probes: probes ``k`` per feature: one int for all features (what models with one dim need), a
            ``{feature: k}`` mapping, or ``None`` (default): multi-probe, chunk dim ``c = g / 2`` where ``g``
            is the gcd of the features' dims (``c = g`` when ``g`` is odd or below 8), ``k_f = d_f / c``;
            so two probes per feature when all dims are equal, even and at least 8. Different dims whose
            chunk would be below 4 need explicit probes. Each probe looks up a chunk of
            ``embedding_dim / k``; every feature's chunk dim must be equal (it is the table's dim). With
            one probe, two ids that collide share their whole vector, which models that take dot products
            of raw embeddings (DLRM, FM) cannot undo; with two, they must collide in both probes (see
            experiments/BENCHMARKS.md: one probe loses to per-feature hashing under DLRM, two win).
        num_tables: the logical table is split round-robin into this many TorchRec tables, so
            TorchRec's planner can place them on different ranks (1 = one table).
        keep_full_below: features with fewer ids than this keep their own identity-mapped rows inside the
            table (no collisions); 0 (default, as in the paper) multiplexes every feature.
        seed: seed of the hash salts; the same seed gives the same mapping in every process.
    """

    method = "unified"
    num_rows: int | None = None
    num_probes: int | Mapping[str, int] | None = None
    num_tables: int = 1
    keep_full_below: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_rows is not None:
            _positive_int(self.num_rows, "num_rows")
        probes = self.num_probes.values() if isinstance(self.num_probes, Mapping) else [self.num_probes]
        for k in probes if self.num_probes is not None else []:
            _positive_int(k, "num_probes (probes per feature)")
        _positive_int(self.num_tables, "num_tables")
        _positive_int(self.keep_full_below, "keep_full_below", minimum=0)
        _positive_int(self.seed, "seed", minimum=0)


@dataclasses.dataclass(frozen=True)
class UnifiedLayout:
    """Where every (feature, probe) slot of a sized :class:`UnifiedConfig` looks its rows up (pure ints).

    Slots are numbered in feature order, a feature's probes in order. Identity slots (a feature with its
    own rows) map ``id -> offset + id``; hashed slots map ``id -> E + h_s(id) mod H``.
    """

    probes: tuple[int, ...]  # k_f per feature
    chunk_dim: int  # c, the dim of every table
    own_rows: tuple[bool, ...]  # per feature: identity-mapped own rows instead of hashing
    num_rows: int  # R
    exclusive_rows: int  # E = sum of n_f * k_f over features with own rows (rows [0, E))
    num_tables: int

    @property
    def hashed_rows(self) -> int:
        """H = R - E, the shared rows the hashed features probe."""
        return self.num_rows - self.exclusive_rows

    @property
    def num_slots(self) -> int:
        return sum(self.probes)

    def table_rows(self) -> list[int]:
        """Rows of each round-robin table: table ``t`` holds global rows ``t, t + T, t + 2T, ...``."""
        r, t = self.num_rows, self.num_tables
        return [(r - i + t - 1) // t for i in range(t)]


def _probes_and_chunk_dim(features: Sequence[FeatureSpec], config: UnifiedConfig) -> tuple[tuple[int, ...], int]:
    """Probes per feature and the one chunk dim they imply (errors say how to fix a mismatch)."""
    if config.num_probes is None:  # multi-probe: half the dims' gcd per chunk when it stays >= 4 and even
        g = math.gcd(*(f.embedding_dim for f in features))
        c = g // 2 if g % 2 == 0 and g >= 8 else g
        if c >= 4 or len({f.embedding_dim for f in features}) == 1:
            return tuple(f.embedding_dim // c for f in features), c
        # chunks below 4 dims would take many probes per feature: ask the user (error below)
    probes_by_name = config_field_per_feature(config.num_probes or 1, features, "num_probes", "unified")
    probes = tuple(int(probes_by_name[f.name]) for f in features)
    chunks: dict[int, list[str]] = {}
    for f, k in zip(features, probes):
        if f.embedding_dim % k:
            raise ValueError(
                f"unified: feature {f.name!r} has embedding_dim {f.embedding_dim}, not divisible by its "
                f"num_probes {k}; each probe looks up a chunk of embedding_dim / num_probes, so choose "
                f"num_probes among the divisors of {f.embedding_dim}"
            )
        chunks.setdefault(f.embedding_dim // k, []).append(f.name)
    if len(chunks) > 1:
        detail = "; ".join(f"chunk dim {c}: {fs}" for c, fs in sorted(chunks.items()))
        raise ValueError(
            "unified: all features share one table, so embedding_dim / num_probes must be the same for every "
            f"feature, got {detail}; give features with larger dims proportionally more probes, e.g. "
            "UnifiedConfig(num_probes={'C1': 1, 'C2': 2}) for dims 16 and 32"
        )
    return probes, next(iter(chunks))


def unified_layout(features: Sequence[FeatureSpec], config: UnifiedConfig) -> UnifiedLayout:
    """Validate a sized config against the features and lay out its slots (pure: integers only)."""
    probes, chunk_dim = _probes_and_chunk_dim(features, config)
    full_rows = sum(f.num_embeddings * k for f, k in zip(features, probes))
    num_rows = config.num_rows
    if num_rows is None:
        if config.keep_full_below <= max(f.num_embeddings for f in features):
            raise ValueError(
                "unified: num_rows is not set; give a byte budget (build(features, UnifiedConfig(), budget=...)) "
                "or UnifiedConfig(num_rows=...)"
            )
        num_rows = full_rows  # every feature keeps its own rows: the size follows from the features
    if num_rows > full_rows:
        raise ValueError(
            f"unified: num_rows={num_rows:,} is more than the {full_rows:,} rows that give every feature its own "
            f"identity-mapped rows (sum of num_embeddings * num_probes); use num_rows <= {full_rows:,}"
        )
    if num_rows == full_rows:
        own = tuple(True for _ in features)
    else:
        own = tuple(f.num_embeddings < config.keep_full_below for f in features)
    exclusive = sum(f.num_embeddings * k for f, k, o in zip(features, probes, own) if o)
    hashed = num_rows - exclusive
    if not all(own) and hashed < 1:
        raise ValueError(
            f"unified: num_rows={num_rows:,} leaves no shared rows: features below keep_full_below="
            f"{config.keep_full_below:,} take {exclusive:,} rows of their own; raise num_rows or lower keep_full_below"
        )
    if hashed > PRIME:
        raise ValueError(
            f"unified: {hashed:,} shared rows is over the hash's range of 2**31 - 1 rows; use fewer probes "
            "(a larger chunk dim) or a smaller num_rows"
        )
    if num_rows < config.num_tables:
        raise ValueError(
            f"unified: num_rows={num_rows} cannot fill num_tables={config.num_tables} tables (each needs a row); "
            "use fewer tables"
        )
    return UnifiedLayout(probes, chunk_dim, own, num_rows, exclusive, config.num_tables)


class UnifiedIdMapper(nn.Module):
    """Maps a ``KeyedJaggedTensor`` of logical ids to the storage's: one key per table, stride ``K * B``.

    A leaf module (ids in, ids out), vectorised over all features and probes at once (no Python loop
    over ids or features), so pipelines can run it apart from the storage lookup.

    Args:
        features: the features, in the order of the input keys.
        layout: from :func:`unified_layout`.
        seed: seed of the salts (``hash_coefficients(seed, "unified", feature, probe)``).
        device: where to put the salts.

    Shape:
        input: keys = feature names, stride ``B``, ``N_f`` ids of feature ``f``. Output: keys
        ``unified_0 .. unified_{T-1}``, stride ``K * B`` (bag ``s * B + b``), ``sum_f k_f * N_f`` rows in
        all (local rows of the table of each key).
    """

    def __init__(self, features: Sequence[FeatureSpec], layout: UnifiedLayout, seed: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        params = []
        offset = 0
        for f, k, own in zip(features, layout.probes, layout.own_rows):
            for p in range(k):
                if own:  # identity into rows [offset, offset + n); coefficients 0 mark identity
                    params.append([0, 0, 0, 0, f.num_embeddings, offset])
                    offset += f.num_embeddings
                else:
                    params.append(hash_coefficients(seed, "unified", f.name, p)
                                  + [layout.hashed_rows, layout.exclusive_rows])
        # [K, 6] int64: a0, a1, a2, b, modulus, row offset of each slot
        self.register_buffer("slot_params", torch.tensor(params, dtype=torch.int64, device=device))
        self.probes = list(layout.probes)
        self.slot_start = [sum(self.probes[:i]) for i in range(len(self.probes))]
        self.slot_feature = [f for f, k in enumerate(self.probes) for _ in range(k)]
        self.num_tables = layout.num_tables
        self.storage_keys = [f"unified_{t}" for t in range(layout.num_tables)]

    def slot_feature_tensor(self, device: torch.device) -> torch.Tensor:
        """The feature of every slot, int64 ``[K]`` on ``device`` (layout integers, built once per device)."""
        return device_constants(self, "slot_feature", device,
                                lambda d: torch.tensor(self.slot_feature, dtype=torch.int64, device=d))

    def rows(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Global rows (in ``[0, R)``) of ``ids`` [M] looked up by ``slots`` [M] (int64, same device)."""
        return self._rows(ids, self.slot_params[slots])

    @staticmethod
    def _rows(ids: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        hashed = universal_hash(ids, params[:, :4], params[:, 4])
        return params[:, 5] + torch.where(params[:, 0] == 0, ids, hashed)  # a0 == 0 marks identity slots

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values, weights = kjt.values(), kjt.weights_or_none()
        device = values.device
        batch, num_slots, num_tables = kjt.stride(), len(self.slot_feature), self.num_tables
        stride = num_slots * batch
        per_feature = kjt.length_per_key()
        per_slot = [per_feature[f] for f in self.slot_feature]  # ids each slot looks up
        expanded = sum(per_slot)  # M
        if not is_tracing() and expanded == 0:  # traced: the general path handles no ids too
            return KeyedJaggedTensor(
                keys=self.storage_keys, values=values.new_zeros(0),
                weights=None if weights is None else weights.new_zeros(0),
                lengths=torch.zeros(num_tables * stride, dtype=torch.int64, device=device), stride=stride,
            )
        # storage bags are slot-major (bag s * B + b = probe s of sample b), so with one probe per feature
        # the ids keep the input's order and lengths; with more, slot s repeats its feature's ids as a block
        slot_feature = self.slot_feature_tensor(device)  # [K], a constant built once per device
        feature_counts = kjt.lengths().view(-1, batch).sum(1)  # [F] ids per feature, on the device
        counts = feature_counts.index_select(0, slot_feature)  # [K] ids each slot looks up
        params = torch.repeat_interleave(self.slot_params, counts, dim=0, output_size=expanded)  # [M, 6]
        if num_slots == len(per_feature):
            lengths, ids = kjt.lengths(), values
        else:
            lengths = kjt.lengths().view(-1, batch).index_select(0, slot_feature).reshape(-1)
            feature_start = torch.cumsum(feature_counts, 0) - feature_counts
            shift = feature_start.index_select(0, slot_feature) - (torch.cumsum(counts, 0) - counts)
            src = torch.arange(expanded, device=device) + torch.repeat_interleave(
                shift, counts, output_size=expanded)  # [M]: the id each entry reads
            ids = values[src]
            weights = None if weights is None else weights[src]
        rows = self._rows(ids, params)  # [M] global rows
        if num_tables == 1:
            return KeyedJaggedTensor(keys=self.storage_keys, values=rows, weights=weights, lengths=lengths,
                                     stride=stride)
        # round-robin: row r lives in table r % T at local row r // T; a stable partition by table keeps
        # each bag's ids in order
        table = rows % num_tables
        bag = torch.repeat_interleave(torch.arange(stride, device=device), lengths, output_size=expanded)
        order = torch.argsort(table, stable=True)
        return KeyedJaggedTensor(
            keys=self.storage_keys,
            values=(rows // num_tables)[order],
            weights=None if weights is None else weights[order],
            lengths=torch.bincount(table * stride + bag, minlength=num_tables * stride),
            stride=stride,
        )

    def extra_repr(self) -> str:
        return f"slots={sum(self.probes)}, num_tables={self.num_tables}"


@register_method(UnifiedConfig)
class UnifiedEmbeddingBagCollection(EmbeddingModule):
    """All features multiplexed into one shared row space (see the module docstring for the layout).

    Storage is one TorchRec ``EmbeddingBagCollection`` (``self.storage``) with ``num_tables`` tables
    ``unified_t`` of dim ``chunk_dim``, each with one storage feature ``unified_t``; the mapper is
    ``self.mapper``.

    Example:
        >>> import embtable
        >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("item", 5_000, 16),
        ...          embtable.FeatureSpec("country", 200, 16)]
        >>> m = embtable.build(feats, UnifiedConfig(num_probes=2, num_tables=2), budget="1/16")
        >>> m.chunk_dim, m.config.num_rows, [c.num_embeddings for c in m.storage.embedding_bag_configs()]
        (8, 13141, [6571, 6570])
        >>> embtable.memory_report(m).inference_bytes == 13141 * 8 * 4 + 48 * 6  # rows * c * 4 + 48 * K
        True
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item", "country"],
        ...                                           torch.tensor([123, 99_999, 7, 3]), torch.tensor([2, 0, 1, 0, 1, 0]))
        >>> m(kjt).values().shape
        torch.Size([2, 48])
    """

    def __init__(self, features: Sequence[FeatureSpec], config: UnifiedConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.layout = unified_layout(self.features, config)
        self.chunk_dim = self.layout.chunk_dim
        self.mapper = UnifiedIdMapper(self.features, self.layout, config.seed, self.device)
        # the storage always pools with sum: tables' partial sums add up; mean divides in pooled()
        self.storage = storage_collection(
            [(key, rows, self.chunk_dim, [key]) for key, rows in zip(self.mapper.storage_keys, self.layout.table_rows())],
            Pooling.SUM,
            self._is_weighted,
            self.device,
        )

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        batch, num_slots, c = kjt.stride(), self.layout.num_slots, self.chunk_dim
        out = self.storage(self.mapper(kjt)).values()  # [K*B, T*c], bags slot-major
        if self.layout.num_tables > 1:
            out = out.view(num_slots * batch, self.layout.num_tables, c).sum(1)  # add the tables' partial sums
        if self.pooling is Pooling.MEAN:
            lengths = kjt.lengths().view(len(self.features), batch)  # [F, B]
            slot_lengths = lengths.index_select(0, self.mapper.slot_feature_tensor(lengths.device)).reshape(-1)  # [K*B]
            out = out / slot_lengths.clamp(min=1).unsqueeze(-1).to(out.dtype)
        # [K*B, c] slot-major -> [B, K*c]: slices, not a transpose + reshape (whose view check guards
        # "batch != 1" under torch.export, so the program would refuse a batch of 1)
        return torch.cat([out[k * batch:(k + 1) * batch] for k in range(num_slots)], dim=1)  # features, probes in order

    @torch.no_grad()
    def collision_rates(self, ids_per_feature: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, float]:
        """Per feature, the share of its distinct ids that share a row with another distinct id.

        Definition: an item is a (feature, id) pair of the data, ids of one feature counted once. Item
        ``(f, x)`` collides when, for at least one of its probes ``p``, the row ``row_{f,p}(x)`` is also a
        row of some other item ``(g, y) != (f, x)`` (any feature ``g``, any of its probes; the same id of
        another feature is another item). Two probes of the same item landing on the same row do not count.
        The rate of ``f`` is (colliding items of ``f``) / (distinct ids of ``f``), ``nan`` without ids.
        Only the given features occupy rows: leave none out to measure the whole model.

        Args:
            ids_per_feature: feature name -> ids seen in the data (any shape, any integer dtype, each in
                ``[0, num_embeddings)`` of the feature as stored).
        """
        index = {f.name: i for i, f in enumerate(self.features)}
        device = self.mapper.slot_params.device
        uniques, slots = [], []
        for name, ids in ids_per_feature.items():
            if name not in index:
                raise KeyError(f"unified: no feature {name!r} in this module; its features are {list(index)}")
            f = self.features[index[name]]
            ids = torch.as_tensor(np.asarray(ids) if not torch.is_tensor(ids) else ids).reshape(-1)
            if ids.is_floating_point():
                raise TypeError(f"feature {name!r}: ids must be integers, got {ids.dtype}")
            ids = torch.unique(ids.to(torch.int64))
            if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= f.num_embeddings):
                bad = int(ids[0]) if int(ids[0]) < 0 else int(ids[-1])
                raise ValueError(f"feature {name!r}: id {bad} is outside the table's range [0, {f.num_embeddings})")
            uniques.append(ids.to(device))
            start = self.mapper.slot_start[index[name]]
            slots.append(torch.arange(start, start + self.layout.probes[index[name]], device=device))
        sizes = [u.numel() for u in uniques]
        probes = [s.numel() for s in slots]
        if sum(sizes) == 0:
            return {name: float("nan") for name in ids_per_feature}
        item = torch.arange(sum(sizes), device=device).repeat_interleave(
            torch.tensor(probes, device=device).repeat_interleave(torch.tensor(sizes, device=device)))
        ids = torch.cat([u.repeat_interleave(k) for u, k in zip(uniques, probes)])
        slot = torch.cat([s.repeat(n) for s, n in zip(slots, sizes)])
        pairs = torch.unique(torch.stack([self.mapper.rows(ids, slot), item], 1), dim=0)  # distinct (row, item)
        _, inverse, counts = torch.unique(pairs[:, 0], return_inverse=True, return_counts=True)
        collided = torch.zeros(sum(sizes), dtype=torch.bool, device=device)
        collided[pairs[:, 1][counts[inverse] > 1]] = True
        rates, start = {}, 0
        for name, n in zip(ids_per_feature, sizes):
            rates[name] = float(collided[start:start + n].float().mean()) if n else float("nan")
            start += n
        return rates

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.num_rows is not None or budget_bytes is None:
            return config
        probes, c = _probes_and_chunk_dim(features, config)
        slots = sum(probes)
        full_rows = sum(f.num_embeddings * k for f, k in zip(features, probes))
        exclusive = sum(f.num_embeddings * k for f, k in zip(features, probes)
                        if f.num_embeddings < config.keep_full_below)
        rows = min((budget_bytes - SLOT_PARAM_BYTES * slots) // (c * FP32), full_rows, exclusive + PRIME)
        needed = min(full_rows, max(exclusive + 1, config.num_tables))
        if rows < needed:
            raise BudgetError(
                f"unified: the budget of {budget_bytes:,} bytes holds {max(rows, 0):,} rows of dim {c} after "
                f"{SLOT_PARAM_BYTES * slots:,} bytes of hash parameters ({slots} probes x {SLOT_PARAM_BYTES} B); "
                f"it needs at least {needed:,} rows ({exclusive:,} own rows of features below keep_full_below="
                f"{config.keep_full_below:,}, one shared row, num_tables={config.num_tables}); raise the budget, "
                f"or lower keep_full_below or num_tables; the smallest budget it can meet here is "
                f"{SLOT_PARAM_BYTES * slots + needed * c * FP32:,} bytes",
                SLOT_PARAM_BYTES * slots + needed * c * FP32,
            )
        return dataclasses.replace(config, num_rows=int(rows))

    @classmethod
    def describe(cls, features, config):
        layout = unified_layout(features, config)
        c, shared = layout.chunk_dim, layout.hashed_rows
        plans = []
        for f, k, own in zip(features, layout.probes, layout.own_rows):
            if own:
                rows = f.num_embeddings * k
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, rows, c,
                                         rows * c * FP32 + k * SLOT_PARAM_BYTES, False,
                                         f"own identity rows: {k} probe(s) x {f.num_embeddings:,} rows of dim {c}"))
            else:
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, shared, c,
                                         k * SLOT_PARAM_BYTES, True,
                                         f"{k} probe(s) of dim {c} into {shared:,} shared rows"))
        return plans, ({"unified shared rows": shared * c * FP32} if shared else {})
