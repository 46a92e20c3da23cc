"""OptEmbed's compact table: only the kept rows, each field at its own dim (Lyu et al., CIKM 2022,
"OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction").

This is the *final* artifact of OptEmbed (what a server loads). The supernet, the budget-constrained
evolutionary search and the retraining that produce it live in :mod:`embtable.methods.optembed_search`
(declared to the trainer as the ``optembed`` pipeline, :mod:`embtable.stages`). Without a search result,
the budget planner keeps the most frequent ids (by ``FeatureSpec.counts``; ids ``0..k-1`` when there are
no counts) at the base dim.

Layout of one field ``f`` with ``n`` ids, ``k`` kept rows, dim ``d <= D`` and ``b`` OOV buckets::

    id ──► remap ──► row r in [0, k)        kept id: its own row (rows in increasing id order)
                 └─► k + oov(id) in [k, k+b)  pruned id, b >= 1: a shared OOV row (hashed when b > 1)
                 └─► dropped                  pruned id, b == 0: reads the zero vector
    storage: a (k + b) x d table  ──► pooled [B, d] ──► zero-padded to [B, D]

The remap is a dense ``[n]`` array (id -> row, -1 = pruned) or the sorted ``[k]`` array of kept ids
(row = ``searchsorted`` position); the smaller one is used (``remap="auto"``), so a 2**33-id feature
stores only its kept ids. A field that keeps every id has no remap and no OOV rows (identity).
Output is zero-padded to the base dim (as OptEmbed's dimension mask zeroes the trailing dims), so
models that need one dim for all features (DLRM, FM) take it unchanged, and padding costs no bytes.
Pruned ids count in a bag's mean (they are zero vectors), as in the supernet.

Memory, per feature (``w(x)`` = 4 if ``x <= 2**31`` else 8 bytes, the narrowest int that holds ``x - 1``)::

    k == n:  n * d * 4
    k <  n:  (k + b) * d * 4 + min(n * w(k + b), k * w(n)) + (32 if b > 1 else 0)
             (rows)             (dense remap | sorted ids)    (OOV hash salt: 4 x int64)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, Pooling, register_method
from ..features import FeatureSpec
from ..hashing import hash_coefficients, universal_hash
from ..module import EmbeddingModule, config_field_per_feature, is_tracing, storage_collection, storage_values

__all__ = [
    "OptEmbedConfig",
    "OptEmbedEmbeddingBagCollection",
    "OptEmbedIdMapper",
    "RemapLayout",
    "field_bytes",
    "remap_layout",
    "most_frequent_ids",
]

INT32_LIMIT = 2**31  # an int32 holds every value < 2**31
OOV_HASH_BYTES = 4 * 8  # a0, a1, a2, b of the OOV bucket hash, int64
REMAPS = ("auto", "dense", "sorted")


@dataclasses.dataclass(frozen=True)
class OptEmbedConfig(MethodConfig):
    """OptEmbed's compact table.

    Args:
        num_kept: rows kept per feature: one int for all, a ``{feature: rows}`` mapping, or ``None`` to let
            the planner keep the most frequent ids that fit the budget (all ids without a budget).
            Capped at ``num_embeddings``.
        dims: dim of each feature's stored rows (``<= embedding_dim``; the output is zero-padded to
            ``embedding_dim``): one int, a mapping, or ``None`` for the base dim (OptEmbed's search sets it).
        oov_buckets: where pruned ids go: ``0`` the zero vector (the paper), ``1`` one shared
            out-of-vocabulary row per feature, ``b > 1`` ``b`` OOV rows chosen by a salted hash of the id.
        remap: id -> row map of a pruned feature: ``"dense"`` (``[n]`` array, O(1) lookup), ``"sorted"``
            (``[k]`` kept ids, binary search) or ``"auto"`` (whichever has fewer bytes; dense on a tie).
        seed: salt of the OOV hash.
    """

    method = "optembed"
    num_kept: int | Mapping[str, int] | None = None
    dims: int | Mapping[str, int] | None = None
    oov_buckets: int = 0
    remap: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for field, lowest in (("num_kept", 1), ("dims", 1)):
            value = getattr(self, field)
            values = value.values() if isinstance(value, Mapping) else [value]
            for v in values:
                if v is not None and (isinstance(v, bool) or int(v) != v or v < lowest):
                    raise ValueError(f"OptEmbedConfig.{field} must be integers >= {lowest}, got {v!r}")
        if int(self.oov_buckets) != self.oov_buckets or self.oov_buckets < 0:
            raise ValueError(
                f"OptEmbedConfig.oov_buckets must be an integer >= 0 (0: pruned ids read zeros), got {self.oov_buckets!r}"
            )
        if self.remap not in REMAPS:
            raise ValueError(f"OptEmbedConfig.remap must be one of {REMAPS}, got {self.remap!r}")


@dataclasses.dataclass(frozen=True)
class RemapLayout:
    """How one field is stored: ``kind`` in {"identity", "dense", "sorted"}, storage rows, dim, remap dtype."""

    kind: str
    kept: int
    rows: int
    dim: int
    remap_dtype: torch.dtype | None
    remap_bytes: int
    oov_buckets: int

    @property
    def bytes(self) -> int:
        salt = OOV_HASH_BYTES if self.oov_buckets > 1 else 0
        return self.rows * self.dim * FP32 + self.remap_bytes + salt


def _int_width(limit: int) -> tuple[torch.dtype, int]:
    """The narrowest int dtype holding every value in ``[0, limit)``."""
    return (torch.int32, 4) if limit <= INT32_LIMIT else (torch.int64, 8)


def remap_layout(num_embeddings: int, kept: int, dim: int, oov_buckets: int, remap: str = "auto") -> RemapLayout:
    """The storage of one field keeping ``kept`` of ``num_embeddings`` ids at ``dim`` (pure).

    >>> remap_layout(1000, 1000, 8, 0).bytes          # identity: the plain table
    32000
    >>> r = remap_layout(1000, 100, 8, 1)             # 101 rows + 100 sorted int32 ids
    >>> r.kind, r.rows, r.bytes
    ('sorted', 101, 3632)
    >>> remap_layout(2**33, 10, 4, 0).remap_dtype     # ids above 2**31 need int64
    torch.int64
    """
    kept = min(int(kept), int(num_embeddings))
    if kept < 1 or dim < 1:
        raise ValueError(f"a field keeps at least one row of at least dim 1, got {kept} rows of dim {dim}")
    if kept == num_embeddings:
        return RemapLayout("identity", kept, kept, dim, None, 0, 0)
    rows = kept + oov_buckets
    dense_dtype, dense_width = _int_width(rows)
    sorted_dtype, sorted_width = _int_width(num_embeddings)
    dense_bytes, sorted_bytes = num_embeddings * dense_width, kept * sorted_width
    use_dense = remap == "dense" or (remap == "auto" and dense_bytes <= sorted_bytes)
    if use_dense:
        return RemapLayout("dense", kept, rows, dim, dense_dtype, dense_bytes, oov_buckets)
    return RemapLayout("sorted", kept, rows, dim, sorted_dtype, sorted_bytes, oov_buckets)


def field_bytes(num_embeddings: int, kept: int, dim: int, oov_buckets: int = 0, remap: str = "auto") -> int:
    """Exact inference bytes of one field (see the module docstring's formula)."""
    return remap_layout(num_embeddings, kept, dim, oov_buckets, remap).bytes


def _dims(features: Sequence[FeatureSpec], config: OptEmbedConfig) -> list[int]:
    per_feature = config_field_per_feature(config.dims, features, "dims", "optembed")
    if per_feature is None:
        return [f.embedding_dim for f in features]
    dims = []
    for f in features:
        d = int(per_feature[f.name])
        if d > f.embedding_dim:
            raise ValueError(
                f"optembed: feature {f.name!r}: dims={d} exceeds its embedding_dim {f.embedding_dim}; "
                "a field's stored dim is at most its base dim (the output is zero-padded to it)"
            )
        dims.append(d)
    return dims


def _kept(features: Sequence[FeatureSpec], config: OptEmbedConfig) -> list[int]:
    per_feature = config_field_per_feature(config.num_kept, features, "num_kept", "optembed")
    if per_feature is None:
        return [f.num_embeddings for f in features]
    return [min(int(per_feature[f.name]), f.num_embeddings) for f in features]


def layouts(features: Sequence[FeatureSpec], config: OptEmbedConfig) -> list[RemapLayout]:
    """Per-feature storage of a sized config (pure)."""
    return [
        remap_layout(f.num_embeddings, k, d, config.oov_buckets, config.remap)
        for f, k, d in zip(features, _kept(features, config), _dims(features, config))
    ]


def most_frequent_ids(feature: FeatureSpec, kept: int) -> np.ndarray:
    """The ``kept`` ids with the highest ``feature.counts`` (ties: smaller id first), sorted by id.

    Without counts: ids ``0 .. kept-1`` (data_prep numbers ids by decreasing frequency).

    >>> most_frequent_ids(FeatureSpec("a", 5, 4, counts=np.array([3, 9, 0, 9, 1])), 3)
    array([0, 1, 3])
    """
    if feature.counts is None:
        return np.arange(kept, dtype=np.int64)
    order = np.argsort(-feature.counts, kind="stable")[:kept]
    return np.sort(order).astype(np.int64)


class OptEmbedIdMapper(nn.Module):
    """Maps logical ids to compact-table rows per field; pruned ids go to OOV rows or are dropped.

    KJT in, KJT out (same keys); with ``oov_buckets == 0`` pruned ids (and their weights) are removed
    from their bags. Buffers: ``remap_<i>`` (dense id -> row, or sorted kept ids) and ``oov_salt_<i>``.
    """

    def __init__(self, features: Sequence[FeatureSpec], layouts: Sequence[RemapLayout], seed: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.kinds = [lay.kind for lay in layouts]
        self.kept = [lay.kept for lay in layouts]
        self.oov_buckets = [lay.oov_buckets for lay in layouts]
        self.num_embeddings = [f.num_embeddings for f in features]
        for i, (f, lay) in enumerate(zip(features, layouts)):
            if lay.kind == "dense":
                self.register_buffer(f"remap_{i}", torch.empty(f.num_embeddings, dtype=lay.remap_dtype, device=device))
            elif lay.kind == "sorted":
                self.register_buffer(f"remap_{i}", torch.empty(lay.kept, dtype=lay.remap_dtype, device=device))
            if lay.oov_buckets > 1:
                salt = torch.tensor(hash_coefficients(seed, "optembed-oov", f.name), dtype=torch.int64, device=device)
                self.register_buffer(f"oov_salt_{i}", salt)
        self.set_kept_ids([most_frequent_ids(f, lay.kept) for f, lay in zip(features, layouts)])

    @torch.no_grad()
    def set_kept_ids(self, kept_ids: Sequence[np.ndarray | torch.Tensor]) -> None:
        """Set which ids each field keeps (sorted, unique, ``len == kept``); row ``j`` = the ``j``-th kept id."""
        for i, ids in enumerate(kept_ids):
            ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
            n, k = self.num_embeddings[i], self.kept[i]
            if ids.numel() != k:
                raise ValueError(f"field {i}: {ids.numel()} kept ids given, the table has {k} rows")
            if k and (ids.min() < 0 or ids.max() >= n or bool((ids[1:] <= ids[:-1]).any())):
                raise ValueError(f"field {i}: kept ids must be sorted, unique and in [0, {n})")
            kind = self.kinds[i]
            if kind == "identity":
                continue
            buf = getattr(self, f"remap_{i}")
            if kind == "sorted":
                buf.copy_(ids.to(buf.dtype))
            else:
                buf.fill_(-1)
                buf[ids.to(buf.device)] = torch.arange(k, dtype=buf.dtype, device=buf.device)

    def kept_ids(self, i: int) -> torch.Tensor:
        """The sorted kept ids of field ``i`` (int64)."""
        kind = self.kinds[i]
        if kind == "identity":
            return torch.arange(self.kept[i], dtype=torch.int64)
        buf = getattr(self, f"remap_{i}")
        if kind == "sorted":
            return buf.to(torch.int64)
        return (buf >= 0).nonzero().flatten()

    def _map_field(self, i: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of ``ids`` [N] and a keep mask [N] (``None``: all kept)."""
        kind, k = self.kinds[i], self.kept[i]
        if kind == "identity" or (not is_tracing() and ids.numel() == 0):
            return ids, None
        buf = getattr(self, f"remap_{i}")
        if kind == "dense":
            rows = buf[ids].to(torch.int64)
            hit = rows >= 0
        else:
            pos = torch.searchsorted(buf, ids.to(buf.dtype))  # int64 positions in [0, k]
            pos = pos.clamp_(max=k - 1)
            hit = buf[pos] == ids
            rows = pos
        b = self.oov_buckets[i]
        if b == 0:
            return rows, hit
        if b == 1:
            oov = torch.full_like(rows, k)
        else:
            oov = k + universal_hash(ids, getattr(self, f"oov_salt_{i}"), b)
        return torch.where(hit, rows, oov), None

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values, lengths, weights = kjt.values(), kjt.lengths(), kjt.weights_or_none()
        batch = kjt.stride()
        mapped = [i for i, kind in enumerate(self.kinds) if kind != "identity"]
        if mapped:
            # one remap gather per pruned field (each has its own buffer), written into one array of rows
            offsets = kjt.offset_per_key()
            rows = values.to(torch.int64, copy=True)
            keep = torch.ones_like(rows, dtype=torch.bool) if self._drops_pruned() else None
            for i in mapped:
                start, end = offsets[i], offsets[i + 1]
                field_rows, hit = self._map_field(i, values[start:end])
                rows[start:end] = field_rows
                if hit is not None:
                    keep[start:end] = hit
            values = rows
            if keep is not None:  # pruned ids without OOV rows leave their bags: one compaction for all fields
                bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths,
                                              output_size=values.numel())
                kept_bags = bag[keep]
                ones = torch.ones(kept_bags.numel(), dtype=lengths.dtype, device=values.device)
                lengths = torch.zeros_like(lengths).index_add_(0, kept_bags, ones)
                values = values[keep]
                weights = weights[keep] if weights is not None else None
        return KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=lengths, weights=weights, stride=batch)

    def _drops_pruned(self) -> bool:
        """Whether some pruned field drops its pruned ids (no OOV rows): then bags are compacted."""
        return any(kind != "identity" and b == 0 for kind, b in zip(self.kinds, self.oov_buckets))

    def extra_repr(self) -> str:
        return f"kinds={self.kinds}, oov_buckets={sorted(set(self.oov_buckets))}"


@register_method(OptEmbedConfig)
class OptEmbedEmbeddingBagCollection(EmbeddingModule):
    """OptEmbed's compact table: kept rows only, per-field dims, zero-padded to the base dim.

    Build it from a budget (frequency pruning, as any method), or from a search result with
    :meth:`set_kept_ids` (the ``optembed`` pipeline of :mod:`embtable.methods.optembed_search` does).

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, OptEmbedConfig(), budget="1/8")
    >>> [(t.num_embeddings, t.embedding_dim) for t in m.storage.embedding_bag_configs()]
    [(11600, 16), (200, 16)]
    >>> m = embtable.build(feats, OptEmbedConfig(num_kept={"user": 50, "country": 200}, dims={"user": 4, "country": 16}))
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([7, 99_999, 3]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> out = m(kjt).values()
    >>> out.shape, bool((out[:, 4:16] == 0).all())   # user: dims 4..15 are padding
    (torch.Size([2, 32]), True)
    """

    @classmethod
    def training_pipelines(cls):
        """OptEmbed's supernet -> search -> retrain (:data:`embtable.methods.optembed_search.PIPELINE`)."""
        from .optembed_search import PIPELINE

        return (PIPELINE,)

    def __init__(self, features: Sequence[FeatureSpec], config: OptEmbedConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.layouts = layouts(self.features, config)
        self.dims = [lay.dim for lay in self.layouts]
        self.mapper = OptEmbedIdMapper(self.features, self.layouts, config.seed, self.device)
        # always sum-pooled storage: a mean divides by the original bag length, pruned ids included
        self.storage = storage_collection(
            [(f.name, lay.rows, lay.dim, [f.name]) for f, lay in zip(self.features, self.layouts)],
            Pooling.SUM,
            self._is_weighted,
            self.device,
        )

    def set_kept_ids(self, kept_ids: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Choose the kept ids of every pruned feature (e.g. from OptEmbed's search); sorted, unique ids."""
        missing = [f.name for f, lay in zip(self.features, self.layouts) if lay.kind != "identity" and f.name not in kept_ids]
        if missing:
            raise ValueError(f"optembed: set_kept_ids needs the kept ids of every pruned feature; missing {missing}")
        self.mapper.set_kept_ids([
            kept_ids[f.name] if f.name in kept_ids else np.arange(lay.kept)
            for f, lay in zip(self.features, self.layouts)
        ])

    def kept_ids(self) -> dict[str, torch.Tensor]:
        """The sorted ids each feature keeps; row ``j`` of its table is its ``j``-th kept id."""
        return {f.name: self.mapper.kept_ids(i) for i, f in enumerate(self.features)}

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.storage(self.mapper(kjt))  # KeyedTensor, field f: [B, d_f]
        batch = kjt.stride()
        parts = storage_values(pooled, self.feature_names).split(self.dims, dim=1)
        lengths = kjt.lengths().view(len(self.features), batch) if self.pooling is Pooling.MEAN else None
        out = []
        for i, (x, base) in enumerate(zip(parts, self.embedding_dims)):
            if lengths is not None:
                x = x / lengths[i].clamp(min=1).unsqueeze(1).to(x.dtype)
            if x.shape[1] < base:
                x = nn.functional.pad(x, (0, base - x.shape[1]))
            out.append(x)
        return torch.cat(out, dim=1)  # [B, sum(D_f)]

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.num_kept is not None or budget_bytes is None:
            return config
        dims = _dims(features, config)

        def cost(f: FeatureSpec, d: int, cap: int) -> int:
            full = f.num_embeddings * d * FP32
            if cap >= f.num_embeddings:
                return full
            return min(full, field_bytes(f.num_embeddings, cap, d, config.oov_buckets, config.remap))

        def total(cap: int) -> int:
            return sum(cost(f, d, cap) for f, d in zip(features, dims))

        cap = largest_feasible(total, budget_bytes, 1, max(f.num_embeddings for f in features))
        if cap is None:
            raise smallest_budget_error(
                "optembed", total(1), budget_bytes, features,
                "one kept row per feature; or set smaller dims (OptEmbedConfig(dims=...))"
                + ("; remap='dense' stores one entry per id: use remap='auto' for large features"
                   if config.remap == "dense" else ""),
            )
        kept = {}
        for f, d in zip(features, dims):
            pruned = cap < f.num_embeddings and cost(f, d, cap) < f.num_embeddings * d * FP32
            kept[f.name] = min(cap, f.num_embeddings) if pruned else f.num_embeddings
        return dataclasses.replace(config, num_kept=kept)

    @classmethod
    def describe(cls, features, config):
        plans = []
        for f, lay in zip(features, layouts(features, config)):
            compressed = lay.kind != "identity" or lay.dim < f.embedding_dim
            detail = f"keep {lay.kept:,} of {f.num_embeddings:,} ids at dim {lay.dim}"
            if lay.kind != "identity":
                detail += f", {lay.kind} remap ({lay.remap_dtype}".replace("torch.", "") + ")"
            plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, lay.rows, lay.dim, lay.bytes,
                                     compressed, detail))
        return plans, {}
