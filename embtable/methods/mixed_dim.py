"""Mixed-dimension embeddings: popular ids get more dims, rare ids fewer, all projected to the base dim.

Ginart et al., 2021, "Mixed Dimension Embeddings with Application to Memory-Efficient Recommendation
Systems" (ISIT). The rows of a feature are split into popularity blocks; block ``b`` of feature ``f``
holds its rows at dim ``d_{f,b} <= D_f`` and, when ``d_{f,b} < D_f``, a learned projection
``P_{f,b}`` (``d_{f,b} x D_f``, no bias) lifts them to the feature's base dim ``D_f``::

    ids of f ──► rank r of the id (remap buffer, ──► block b: bounds[b] <= r < bounds[b+1]
                 or r = id when the ids are already     row   = r - bounds[b]
                 in frequency order)
    pooled_f = sum_b  (sum of the bag's rows in block b) @ P_{f,b}     (/ bag size for mean pooling)

**Popularity** ``p_{f,b}`` is the probability that one lookup of feature ``f`` hits a given row of
block ``b``: ``p_{f,b} = share_{f,b} / n_{f,b}``, where ``share_{f,b}`` is the block's share of the
feature's lookups and ``n_{f,b}`` its rows. As in the paper's reference solver, every feature is
assumed to be looked up once per sample, so with one block ``p_f = 1 / n_f`` (the paper's table-level
rule). Within a table (``num_blocks > 1``) ids are ranked by ``FeatureSpec.counts`` (descending,
ties by id) and cut into blocks of equal lookup mass, ``share = count of the block / count of the
feature``. Without counts (or with all-zero counts), id order is taken as popularity order with a
Zipf(1) rank-frequency law (lookup share of rank ``r`` proportional to ``1 / (r + 1)``); equal-mass
blocks are then log-uniform in rank (``bounds[b] = round(n ** (b / B))``).

**Power rule** (the paper's ``d = lambda * p ** alpha``, temperature ``alpha >= 0``)::

    d_{f,b} = D_f * scale * p_{f,b} ** alpha, floored to a multiple of dim_multiple, within [1, D_f]

With one block per feature, ``p_f = 1 / n_f`` and this is the reference solver's ``d_f = lambda *
n_f ** -alpha`` on row counts. ``alpha = 0`` gives every block the same dim; larger ``alpha`` shrinks
the rare blocks more. A block
whose compressed storage would not be smaller than its full rows, ``(n_{f,b} + D_f) * d >= n_{f,b} * D_f``,
stays full (no projection); a feature whose blocks are all full is one plain table (no remap).

**Budget planning** (pure, a few hundred power-rule evaluations over the blocks, never over ids
unless counts are given): with ``alpha`` fixed the scale is solved by bisection; with ``alpha=None``
the most popular block is anchored at the base dim (``scale = p_max ** -alpha``, the reference
solver's ``d0`` mode) and ``alpha`` is solved. The floored dims are then rounded up, largest
remainder first, while they fit; only if that uses less than 95% of the budget do the most popular
blocks get further steps. Without a budget, a given ``alpha`` uses the ``d0`` anchoring.

Memory (fp32 weights, int64 bounds)::

    sum_f [ sum_b ( n_{f,b} * d_{f,b} * 4  +  [d_{f,b} < D_f] * d_{f,b} * D_f * 4 )
            + [B_f > 1] * ( (B_f + 1) * 8  +  remap_f ) ]

    remap_f = 0                          ids already in decreasing-count order (or no counts)
            = n_f * s(n_f)               "dense": the rank of every id
            = H_f * (s(n_f) + s(H_f))    "hot": the sorted ids of the H_f = bounds[-2] rows outside the
                                         coldest block and their ranks; the cold ids take the rows
                                         after them in id order (row = id - number of hot ids below it)

**Hashed tail** (``tail="hash"``, the default; the paper's suggestion to combine mixed dims with hashing).
Mixed dims keep every row, so they cannot go below about ``1/D`` of the full tables. Below that, a
feature of ``n_f`` ids stores ``K_f + T_f < n_f`` rows: its ``K_f`` most popular ids own rows, the others
share ``T_f`` tail rows by a salted universal hash; the stored rows, in popularity order (the tail rows
last, so in the coldest block), are then split into blocks and given dims as above::

    id ──► exclusive? (sorted list of the K_f exclusive ids, or id < K_f when the ids are in count order)
             yes: its rank r < K_f                      no: K_f + hash(id) mod T_f
    stored rows of f:  [ exclusive rows, hottest first .......... | T_f tail rows ]
                       [ block 0 @ d0 | block 1 @ d1 | ...  block B-1 @ d_{B-1}   ]

and adds ``48 + [counts not in id order] * K_f * (s(n_f) + s(K_f))`` bytes (hash parameters ``a0, a1, a2,
b, T_f, K_f`` as int64, and the exclusive ids with their ranks) to the formula above, where ``n_f``
becomes ``K_f + T_f``. The planner (:func:`solve_tail`, only when the budget is below what mixed dims
reach, so every plan that fitted before is unchanged) chooses ``K_f`` and ``T_f`` (half the stored rows)
by water-filling a row cap.

where ``B_f`` is the number of blocks of feature ``f`` (1 for a plain or single-dim table), the
``(B_f + 1) * 8`` bytes are its block bounds, ``s(x)`` is 4 bytes (int32) for ``x <= 2**31 - 1``, else
8, and the planner takes the cheaper remap (the hot list wins when fewer than about half the ids lie
outside the coldest block, as with heavy-tailed counts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, BudgetError, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, Pooling, register_method
from ..features import FeatureSpec
from ..hashing import hash_coefficients, universal_hash
from ..module import EmbeddingModule, device_constants, storage_collection, with_values

__all__ = [
    "MixedDimConfig",
    "MixedDimEmbeddingBagCollection",
    "MixedDimIdMapper",
    "PopularityBlocks",
    "popularity_blocks",
    "power_rule_dims",
    "solve_block_dims",
    "mixed_dim_bytes",
]

BOUND_BYTES = 8  # block bounds are int64
TAIL_PARAM_BYTES = 6 * 8  # a hashed tail's a0, a1, a2, b, tail rows, exclusive rows (int64)
AUTO_BLOCKS = 4  # popularity blocks of a single table when num_blocks is not given
TAIL_SHARE = 0.5  # a tail feature's stored rows that are shared tail rows (the rest are exclusive rows)
TAIL_ROW_BUDGET = 0.5  # the tail planner's row cap: the smallest dims use at most this share of the budget
INT32_MAX = 2**31 - 1
_BISECTION_STEPS = 100  # halves the search interval to far below one dim step
_EULER_GAMMA = 0.5772156649015329


def _int_dtype(n: int) -> type:
    return np.int32 if n <= INT32_MAX else np.int64


@dataclasses.dataclass(frozen=True)
class MixedDimConfig(MethodConfig):
    """Mixed-dimension embeddings (power-rule dims per feature and per popularity block).

    Args:
        alpha: temperature of the power rule ``d ~ p ** alpha`` (``>= 0``; 0 gives equal dims).
            ``None`` (default): solved from the budget, with the most popular block kept at the base dim.
        num_blocks: popularity blocks per feature (``1``: one dim per feature, as in the paper's
            reference; ``> 1``: blocks of equal lookup mass, see the module docstring). A feature
            has at most ``num_embeddings`` blocks. ``None`` (default): 1 per feature when there are
            several features, ``AUTO_BLOCKS`` (4) for a single table (blocks inside one table are the
            paper's point; with one block its only block would keep the base dim). The planner writes
            the number it used into the sized config.
        tail: ``"hash"`` (default): when the budget is below what mixed dims can reach (every row kept at
            the smallest dim), the rarest ids of a feature share hashed tail rows (see the module
            docstring); ``"none"``: such budgets raise :class:`BudgetError`. Budgets that fit without a
            tail are planned exactly as with ``"none"``, so the default changes no plan that worked before.
        tail_rows: the sized tail: ``{feature: (exclusive, tail)}`` for the features with a hashed tail
            (``exclusive`` most popular ids own rows, the others hash into ``tail`` shared rows); features
            left out keep every row. ``None``: planned.
        dim_multiple: block dims are multiples of this (below the base dim), e.g. 4 or 8 for
            vectorised kernels.
        block_dims: the sized field: ``{feature: (d_block0, d_block1, ...)}``, hottest block first, one
            dim per block, or a 1-tuple ``(d,)`` for one plain table of dim ``d``. ``None``: planned
            from the budget (or from ``alpha`` without one).
    """

    method = "mixed_dim"
    alpha: float | None = None
    num_blocks: int | None = None
    dim_multiple: int = 1
    block_dims: Mapping[str, tuple[int, ...]] | None = None
    tail: str = "hash"
    tail_rows: Mapping[str, tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.alpha is not None and (not isinstance(self.alpha, int | float) or not self.alpha >= 0
                                       or math.isinf(self.alpha)):
            raise ValueError(
                f"MixedDimConfig.alpha must be a finite number >= 0 (e.g. 0.3), or None to solve it from the "
                f"budget; got {self.alpha!r}"
            )
        if self.tail not in ("hash", "none"):
            raise ValueError(f"MixedDimConfig.tail must be 'hash' (rarest ids share hashed rows) or 'none', "
                             f"got {self.tail!r}")
        if self.tail_rows is not None:
            clean = {}
            for name, pair in dict(self.tail_rows).items():
                pair = tuple(pair)
                if len(pair) != 2 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in pair):
                    raise ValueError(f"MixedDimConfig.tail_rows[{name!r}] must be (exclusive rows >= 1, tail rows "
                                     f">= 1), got {pair!r}")
                clean[name] = (int(pair[0]), int(pair[1]))
            object.__setattr__(self, "tail_rows", clean)
        for name in ("num_blocks", "dim_multiple"):
            value = getattr(self, name)
            if value is None and name == "num_blocks":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MixedDimConfig.{name} must be an integer >= 1{' or None' if name == 'num_blocks' else ''}, "
                                 f"got {value!r}")
        if self.block_dims is not None:
            if not isinstance(self.block_dims, Mapping):
                raise ValueError(
                    "MixedDimConfig.block_dims must map each feature name to its block dims, e.g. "
                    f"{{'C1': (16, 4)}}; got {self.block_dims!r}"
                )
            clean = {}
            for name, dims in self.block_dims.items():
                dims = (dims,) if isinstance(dims, int) else tuple(dims)
                if not dims or any(isinstance(d, bool) or int(d) != d or d < 1 for d in dims):
                    raise ValueError(
                        f"MixedDimConfig.block_dims[{name!r}] must be positive integer dims, got {dims!r}"
                    )
                clean[name] = tuple(int(d) for d in dims)
            object.__setattr__(self, "block_dims", clean)


# ---------------------------------------------------------------------------------------------------
# Popularity blocks (pure)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PopularityBlocks:
    """How one feature's ids split into popularity blocks.

    Attributes:
        bounds: rank boundaries, ``bounds[0] = 0 < ... < bounds[-1] = num_embeddings``; block ``b``
            holds the ids of popularity rank ``bounds[b] <= r < bounds[b + 1]``.
        shares: each block's share of the feature's lookups (sums to 1).
        remap: how ids reach their rank: ``None`` (ids already in decreasing-count order, or no
            counts), ``"dense"`` (a rank per id) or ``"hot"`` (a sorted list of the ids outside the
            coldest block; cold ids keep their id order), whichever is fewer bytes.
    """

    bounds: tuple[int, ...]
    shares: tuple[float, ...]
    remap: str | None

    @property
    def remap_bytes(self) -> int:
        n, hot = self.bounds[-1], self.bounds[-2]
        return {None: 0, "dense": n * _int_bytes(n), "hot": hot * (_int_bytes(n) + _int_bytes(hot))}[self.remap]

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in zip(self.bounds[:-1], self.bounds[1:]))

    @property
    def popularity(self) -> tuple[float, ...]:
        """Per-row lookup probability of each block: ``share / rows``."""
        return tuple(s / r for s, r in zip(self.shares, self.rows))


def _harmonic(k: int) -> float:
    """``H(k) = sum_{i=1..k} 1/i`` (exact below 64, asymptotic expansion above; ``H(0) = 0``)."""
    if k < 64:
        return sum(1.0 / i for i in range(1, k + 1))
    return math.log(k) + _EULER_GAMMA + 1 / (2 * k) - 1 / (12 * k * k) + 1 / (120 * k**4)


def popularity_blocks(feature: FeatureSpec, num_blocks: int) -> PopularityBlocks:
    """Split ``feature``'s ids into at most ``num_blocks`` blocks of (about) equal lookup mass.

    With counts, ids are ranked by decreasing count and the cuts fall where the cumulative count
    crosses ``b / num_blocks`` of the total (cost: one sort of the counts). Without counts, id order is
    the popularity order under a Zipf(1) law and the cuts are ``round(n ** (b / num_blocks))``
    (integer and float scalars only: no per-id array, whatever ``n`` is). Cuts that coincide merge.

    >>> popularity_blocks(FeatureSpec("a", 1000, 8), 4).bounds
    (0, 6, 32, 178, 1000)
    >>> b = popularity_blocks(FeatureSpec("a", 5, 8, counts=[1, 5, 0, 3, 1]), 2)
    >>> b.bounds, b.shares, b.remap, b.remap_bytes  # the hot list: id 1 and its rank, 4 bytes each
    ((0, 1, 5), (0.5, 0.5), 'hot', 8)
    """
    n = feature.num_embeddings
    blocks = min(int(num_blocks), n)
    if blocks == 1:
        return PopularityBlocks((0, n), (1.0,), None)
    counts = feature.counts
    if counts is not None and int(counts.sum()) > 0:
        ordered = bool(np.all(counts[:-1] >= counts[1:]))
        ranked = counts if ordered else np.sort(counts)[::-1]
        cum = np.cumsum(ranked)
        total = int(cum[-1])
        # smallest k with cum[k - 1] >= ceil(b * total / blocks): the top k ids hold b/blocks of the mass
        targets = np.array([-(-b * total // blocks) for b in range(1, blocks)], dtype=np.int64)
        cuts = (np.searchsorted(cum, targets, side="left") + 1).tolist()
        bounds = sorted({0, n, *(c for c in cuts if 0 < c < n)})
        mass = [int(cum[e - 1]) - (int(cum[s - 1]) if s else 0) for s, e in zip(bounds[:-1], bounds[1:])]
        remap = None
        if not ordered:
            hot = bounds[-2]
            remap = "hot" if hot * (_int_bytes(n) + _int_bytes(hot)) < n * _int_bytes(n) else "dense"
        return PopularityBlocks(tuple(bounds), tuple(m / total for m in mass), remap)
    cuts = (round(n ** (b / blocks)) for b in range(1, blocks))
    bounds = sorted({0, n, *(c for c in cuts if 0 < c < n)})
    h_n = _harmonic(n)
    shares = [(_harmonic(e) - _harmonic(s)) / h_n for s, e in zip(bounds[:-1], bounds[1:])]
    return PopularityBlocks(tuple(bounds), tuple(shares), None)


# ---------------------------------------------------------------------------------------------------
# Bytes and the power rule (pure)
# ---------------------------------------------------------------------------------------------------
def _int_bytes(n: int) -> int:
    """Bytes of an integer type that holds ``0 .. n``: int32 when it fits, else int64."""
    return 4 if n <= INT32_MAX else 8


def _effective_dims(dim: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    """Blocks that are all at the base dim are one plain table (no bounds, no remap)."""
    return (dim,) if len(dims) > 1 and all(d == dim for d in dims) else dims


def mixed_dim_bytes(feature: FeatureSpec, blocks: PopularityBlocks | None, dims: tuple[int, ...]) -> int:
    """Exact inference bytes of one feature stored with ``dims`` (see the memory formula).

    ``blocks`` may be ``None`` when ``dims`` has one entry (one table over all ids).

    >>> mixed_dim_bytes(FeatureSpec("a", 1000, 16), None, (4,))  # 1000*4*4 + 4*16*4
    16256
    """
    D = feature.embedding_dim
    dims = _effective_dims(D, tuple(dims))
    if len(dims) == 1:
        d = dims[0]
        return feature.num_embeddings * d * FP32 + (d * D * FP32 if d < D else 0)
    total = sum(r * d * FP32 + (d * D * FP32 if d < D else 0) for r, d in zip(blocks.rows, dims))
    total += (len(dims) + 1) * BOUND_BYTES
    return total + blocks.remap_bytes


# ---------------------------------------------------------------------------------------------------
# The hashed tail (pure)
# ---------------------------------------------------------------------------------------------------
def num_blocks_for(features: Sequence[FeatureSpec], num_blocks: int | None) -> int:
    """``num_blocks``, or its default: 1 per feature for several features, ``AUTO_BLOCKS`` for one table."""
    if num_blocks is not None:
        return int(num_blocks)
    return AUTO_BLOCKS if len(features) == 1 else 1


def _has_counts(f: FeatureSpec) -> bool:
    return f.counts is not None and int(f.counts.sum()) > 0


def _tail_hot_list(f: FeatureSpec) -> bool:
    """A tail feature needs the sorted list of its exclusive ids when its counts are not in id order."""
    return _has_counts(f) and not bool(np.all(f.counts[:-1] >= f.counts[1:]))


def tail_feature(f: FeatureSpec, exclusive: int, tail: int, ranked: np.ndarray | None = None) -> FeatureSpec:
    """The rows a feature with a hashed tail stores, as a feature of ``exclusive + tail`` ids in popularity
    order: rank ``r < exclusive`` is the ``r``-th most popular id, ranks ``exclusive ..`` are the tail rows.

    Counts (when ``f`` has them): the exclusive ids' counts, then each tail row the tail's mass spread over
    its rows (capped at the last exclusive count, so the counts stay in decreasing order and need no remap).
    ``ranked``: ``f``'s counts sorted in decreasing order, if already at hand.

    >>> tail_feature(FeatureSpec("a", 10, 4, counts=[1, 9, 0, 5, 0, 0, 2, 0, 0, 1]), 2, 2).counts.tolist()
    [9, 5, 2, 2]
    """
    if not _has_counts(f):
        return FeatureSpec(f.name, exclusive + tail, f.embedding_dim)
    ranked = np.sort(f.counts)[::-1] if ranked is None else ranked
    top = ranked[:exclusive].astype(np.int64)
    mass = int(ranked[exclusive:].sum())
    per = min(int(top[-1]), -(-mass // tail))
    return FeatureSpec(f.name, exclusive + tail, f.embedding_dim,
                       counts=np.concatenate([top, np.full(tail, per, dtype=np.int64)]))


def tail_bytes(f: FeatureSpec, exclusive: int) -> int:
    """Bytes a hashed tail adds beyond its rows: the hash parameters (``a0, a1, a2, b, tail, exclusive``, int64)
    and, when the counts are not in id order, the exclusive ids sorted with their ranks."""
    hot = exclusive * (_int_bytes(f.num_embeddings) + _int_bytes(exclusive)) if _tail_hot_list(f) else 0
    return TAIL_PARAM_BYTES + hot


def _tail_split(n: int, rows: int) -> tuple[int, int] | None:
    """``(exclusive, tail)`` for a feature of ``n`` ids stored in ``rows < n`` rows (None: no tail)."""
    if rows >= n:
        return None
    tail = max(1, int(rows * TAIL_SHARE))
    return rows - tail, tail


def stored_features(features: Sequence[FeatureSpec], tail_rows: Mapping[str, tuple[int, int]] | None
                    ) -> list[FeatureSpec]:
    """What each feature stores: itself, or its :func:`tail_feature` when it has a hashed tail."""
    tail_rows = tail_rows or {}
    unknown = sorted(set(tail_rows) - {f.name for f in features})
    if unknown:
        raise ValueError(f"mixed_dim: tail_rows names unknown feature(s) {unknown}")
    out = []
    for f in features:
        if f.name not in tail_rows:
            out.append(f)
            continue
        exclusive, tail = tail_rows[f.name]
        if exclusive + tail >= f.num_embeddings or tail > INT32_MAX:
            raise ValueError(f"mixed_dim: feature {f.name!r}: tail_rows {tail_rows[f.name]} must store fewer rows "
                             f"than its {f.num_embeddings} ids (and at most 2**31 - 1 tail rows)")
        out.append(tail_feature(f, exclusive, tail))
    return out


def _quantize(target: float, D: int, rows: int, multiple: int) -> int:
    """The block dim for a power-rule target: floored to ``multiple``, at least ``multiple``, and the
    base dim ``D`` when reaching it or when compression would not save bytes."""
    if not target + 1e-9 < D:  # also catches inf / nan
        return D
    d = max(multiple, int(target / multiple + 1e-9) * multiple)  # 1e-9: 64 * 0.25 ** 0.5 may be 15.99..
    if d >= D or (rows + D) * d >= rows * D:
        return D
    return d


class _Layout:
    """The blocks of every feature, flattened, with O(1) byte deltas for the planner's fill step."""

    def __init__(self, features: Sequence[FeatureSpec], num_blocks: int) -> None:
        self.features = list(features)
        self.blocks = [popularity_blocks(f, num_blocks) for f in self.features]
        self.popularity = [b.popularity for b in self.blocks]

    def targets(self, alpha: float, scale: float) -> list[list[float]]:
        """The power rule's real-valued dims ``D_f * scale * p ** alpha`` (``0.0 ** 0 == 1``)."""
        return [[scale * f.embedding_dim * p**alpha for p in pops] for f, pops in zip(self.features, self.popularity)]

    def dims_for(self, alpha: float, scale: float, multiple: int) -> list[list[int]]:
        return [
            [_quantize(t, f.embedding_dim, r, multiple) for t, r in zip(ts, blocks.rows)]
            for f, blocks, ts in zip(self.features, self.blocks, self.targets(alpha, scale))
        ]

    def total(self, dims: list[list[int]]) -> int:
        return sum(mixed_dim_bytes(f, b, tuple(d)) for f, b, d in zip(self.features, self.blocks, dims))

    def fill(self, dims: list[list[int]], targets: list[list[float]], budget: int, multiple: int) -> list[list[int]]:
        """Spend what the floored power rule left of ``budget``, one dim step at a time.

        First the rounding: blocks are rounded up in order of the largest fractional remainder of their
        target (at most one step each), so the dims stay the power rule's. Then, only while less than 95%
        of the budget is used, the most popular blocks that still fit get further steps.
        """
        per_feature = [mixed_dim_bytes(f, b, tuple(d)) for f, b, d in zip(self.features, self.blocks, dims)]
        left = budget - sum(per_feature)
        blocks = [(i, j) for i, ds in enumerate(dims) for j in range(len(ds))]
        by_popularity = sorted(blocks, key=lambda ij: (-self.popularity[ij[0]][ij[1]], ij))
        remainder = {(i, j): (targets[i][j] - dims[i][j]) / multiple for i, j in blocks}
        by_remainder = sorted(by_popularity, key=lambda ij: -remainder[ij])  # stable: ties by popularity

        def bump(i: int, j: int) -> bool:
            nonlocal left
            f, d = self.features[i], dims[i][j]
            if d >= f.embedding_dim:
                return False
            step = _quantize(float(d + multiple), f.embedding_dim, self.blocks[i].rows[j], multiple)
            trial = dims[i][:j] + [step] + dims[i][j + 1:]
            new = mixed_dim_bytes(f, self.blocks[i], tuple(trial))
            if new - per_feature[i] > left:
                return False
            left -= new - per_feature[i]
            per_feature[i], dims[i] = new, trial
            return True

        for i, j in by_remainder:
            if remainder[(i, j)] > 0:
                bump(i, j)
        changed = True
        while changed and 20 * left > budget:  # below 95% used
            changed = False
            for i, j in by_popularity:
                changed |= bump(i, j)
                if 20 * left <= budget:
                    break
        return dims

    def as_config_dims(self, dims: list[list[int]]) -> dict[str, tuple[int, ...]]:
        return {f.name: _effective_dims(f.embedding_dim, tuple(d)) for f, d in zip(self.features, dims)}


def power_rule_dims(
    features: Sequence[FeatureSpec], alpha: float, scale: float | None = None, *, num_blocks: int = 1,
    dim_multiple: int = 1,
) -> dict[str, tuple[int, ...]]:
    """The power rule without a budget: ``d_{f,b} = D_f * scale * p_{f,b} ** alpha`` (quantized).

    ``scale=None`` anchors the most popular block of all at the base dim (``scale = p_max ** -alpha``).

    >>> feats = [FeatureSpec("small", 10, 16), FeatureSpec("big", 10_000, 16)]
    >>> power_rule_dims(feats, alpha=0.25)  # (10 / 10_000) ** 0.25 * 16 = 2.8
    {'small': (16,), 'big': (2,)}
    """
    layout = _Layout(features, num_blocks)
    if scale is None:
        scale = _anchor_scale(layout, alpha)
    return layout.as_config_dims(layout.dims_for(float(alpha), float(scale), dim_multiple))


def _anchor_scale(layout: _Layout, alpha: float) -> float:
    p_max = max(max(p) for p in layout.popularity)
    return p_max ** -alpha


def solve_block_dims(
    features: Sequence[FeatureSpec], budget_bytes: int, *, alpha: float | None = None, num_blocks: int = 1,
    dim_multiple: int = 1,
) -> tuple[dict[str, tuple[int, ...]], float]:
    """The budget planner: block dims whose exact bytes fit ``budget_bytes`` (pure; no tensors).

    Returns ``(block_dims, alpha)``: ``alpha`` is the given one, or the solved one when ``alpha=None``.
    Raises :class:`BudgetError` when even the smallest dims do not fit.

    >>> feats = [FeatureSpec("small", 10, 16), FeatureSpec("big", 100_000, 16)]
    >>> dims, alpha = solve_block_dims(feats, budget_bytes=1_000_000, alpha=0.3)
    >>> dims, sum(mixed_dim_bytes(f, None, dims[f.name]) for f in feats)
    ({'small': (16,), 'big': (2,)}, 800768)
    """
    layout = _Layout(features, num_blocks)
    full = [[f.embedding_dim] * len(b.rows) for f, b in zip(layout.features, layout.blocks)]
    if layout.total(full) <= budget_bytes:
        return layout.as_config_dims(full), 0.0 if alpha is None else float(alpha)
    if alpha is not None:
        alpha = float(alpha)
        smallest = layout.dims_for(alpha, 0.0, dim_multiple)
        if layout.total(smallest) > budget_bytes:
            remaps = any(b.remap for b in layout.blocks)
            raise BudgetError(
                f"mixed_dim: even the smallest dims (every compressible block at dim {dim_multiple}, "
                f"projections{' and id remaps' if remaps else ''} included) need {layout.total(smallest):,} "
                f"bytes, over the budget of {budget_bytes:,}; raise the budget, "
                + ("use a smaller dim_multiple, " if dim_multiple > 1 else "")
                + ("use num_blocks=1 or ids in frequency order (no remap), " if remaps else "")
                + "or choose a method that also shrinks rows (hash, qr)",
                layout.total(smallest),
            )
        # bisection on log(scale): at scale_hi every block reaches its base dim
        log_lo = math.log(1e-300)
        pops = [p for ps in layout.popularity for p in ps if p > 0]
        log_hi = max(-alpha * math.log(p) for p in pops) + math.log(2.0) if pops else 0.0
        for _ in range(_BISECTION_STEPS):
            mid = (log_lo + log_hi) / 2
            if layout.total(layout.dims_for(alpha, math.exp(mid), dim_multiple)) <= budget_bytes:
                log_lo = mid
            else:
                log_hi = mid
        scale = 0.0 if log_lo == math.log(1e-300) else math.exp(log_lo)
        best = layout.dims_for(alpha, scale, dim_multiple)
        return layout.as_config_dims(layout.fill(best, layout.targets(alpha, scale), budget_bytes, dim_multiple)), alpha
    # alpha solved: the most popular block keeps the base dim, alpha grows until the rest fits
    p_max = max(max(p) for p in layout.popularity)
    ratios = [p_max / p for ps in layout.popularity for p in ps if 0 < p < p_max]
    d_max = max(f.embedding_dim for f in layout.features)
    alpha_hi = max((math.log(2.0 * d_max) / math.log(r) for r in ratios), default=1.0)

    def dims_at(a: float) -> list[list[int]]:
        return layout.dims_for(a, p_max ** -a, dim_multiple)

    if layout.total(dims_at(alpha_hi)) > budget_bytes:
        floor = layout.total(layout.dims_for(1.0, 0.0, dim_multiple))
        if floor > budget_bytes:  # no alpha can help: every row keeps at least the smallest dim
            raise BudgetError(
                f"mixed_dim: even the smallest dims (every compressible block at dim {dim_multiple}) need "
                f"{floor:,} bytes, over the budget of {budget_bytes:,}: mixed dimensions keep every row, so they "
                "cannot go below about 1/embedding_dim of the full tables; raise the budget, or choose a method "
                "that also shrinks rows (hash, qr, unified, optembed)",
                floor,
            )
        raise BudgetError(
            f"mixed_dim: with alpha solved, the most popular block keeps the base dim; even the steepest "
            f"power rule (all other blocks at dim {dim_multiple}) needs {layout.total(dims_at(alpha_hi)):,} "
            f"bytes, over the budget of {budget_bytes:,}; give alpha (e.g. MixedDimConfig(alpha=0.3)) so the "
            "scale is solved instead, or raise the budget",
            layout.total(dims_at(alpha_hi)),
        )
    lo, hi = 0.0, alpha_hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if layout.total(dims_at(mid)) <= budget_bytes:
            hi = mid
        else:
            lo = mid
    best = layout.fill(dims_at(hi), layout.targets(hi, p_max**-hi), budget_bytes, dim_multiple)
    return layout.as_config_dims(best), hi


def solve_tail(
    features: Sequence[FeatureSpec], budget_bytes: int, *, alpha: float | None = None, num_blocks: int = 1,
    dim_multiple: int = 1,
) -> tuple[dict[str, tuple[int, ...]], float, dict[str, tuple[int, int]]]:
    """The planner below the mixed-dimension floor: rows of the rarest ids become shared, hashed tail rows.

    Water-filling on a row cap ``R``: a feature of ``n > R`` ids stores ``R`` rows, ``TAIL_SHARE`` of them
    tail rows and the rest exclusive rows of its most popular ids (:func:`tail_feature`); smaller features
    keep every row. ``R`` is the largest cap at which the smallest dims (every compressible block at
    ``dim_multiple``) use at most ``TAIL_ROW_BUDGET`` of the budget, so rows and dims share it; then
    :func:`solve_block_dims` sizes the dims of the stored rows in what the tails' parameters and id lists
    leave (halving ``R`` if that still cannot fit). Returns ``(block_dims, alpha, tail_rows)``.

    >>> feats = [FeatureSpec("small", 10, 16), FeatureSpec("big", 100_000, 16)]
    >>> dims, alpha, tails = solve_tail(feats, budget_bytes=64_000, alpha=0.3)
    >>> tails, dims
    ({'big': (7906, 7906)}, {'small': (16,), 'big': (1,)})
    """
    ranked = {f.name: np.sort(f.counts)[::-1] for f in features if _has_counts(f)}

    def at(cap: int) -> tuple[dict[str, tuple[int, int]], list[FeatureSpec], int]:
        tails, stored, fixed = {}, [], 0
        for f in features:
            split = _tail_split(f.num_embeddings, cap)
            if split is None:
                stored.append(f)
                continue
            tails[f.name] = split
            stored.append(tail_feature(f, *split, ranked.get(f.name)))
            fixed += tail_bytes(f, split[0])
        return tails, stored, fixed

    def floor(cap: int) -> int:
        _, stored, fixed = at(cap)
        layout = _Layout(stored, num_blocks)
        return layout.total(layout.dims_for(1.0, 0.0, dim_multiple)) + fixed

    if floor(2) > budget_bytes:
        raise smallest_budget_error(
            "mixed_dim", floor(2), budget_bytes, features,
            f"hashed tails of 2 rows per large feature at dim {dim_multiple}, with their projections and hash "
            "parameters",
        )
    cap = largest_feasible(floor, int(TAIL_ROW_BUDGET * budget_bytes), 2, max(f.num_embeddings for f in features)) or 2
    while True:
        tails, stored, fixed = at(cap)
        try:
            dims, solved = solve_block_dims(stored, budget_bytes - fixed, alpha=alpha, num_blocks=num_blocks,
                                            dim_multiple=dim_multiple)
            break
        except BudgetError:
            if cap <= 2:
                raise
            cap = max(2, cap // 2)

    def total_with_dims(c: int) -> int:  # the solved dims kept, more rows (inf when the blocks change)
        _, stored, fixed = at(c)
        total = fixed
        for f in stored:
            d = dims[f.name]
            blocks = popularity_blocks(f, num_blocks) if len(d) > 1 else None
            if blocks is not None and len(blocks.rows) != len(d) or max(d) > f.embedding_dim:
                return budget_bytes + 1
            total += mixed_dim_bytes(f, blocks, d)
        return total

    # dim steps are coarse (one more dim for every row of a block): what they leave goes to more rows
    cap = largest_feasible(total_with_dims, budget_bytes, cap, max(f.num_embeddings for f in features)) or cap
    return dims, solved, at(cap)[0]


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------
def _block_dims(features: Sequence[FeatureSpec], config: MixedDimConfig) -> list[tuple[int, ...]]:
    """Validated per-feature dims (all-full blocks collapsed to one plain table)."""
    dims = config.block_dims
    names = [f.name for f in features]
    unknown, missing = sorted(set(dims) - set(names)), [n for n in names if n not in dims]
    if unknown or missing:
        raise ValueError(f"mixed_dim: block_dims must give dims for every feature; unknown {unknown}, "
                         f"missing {missing}")
    out = []
    for f in features:
        d = dims[f.name]
        if max(d) > f.embedding_dim:
            raise ValueError(f"mixed_dim: feature {f.name!r}: block dims {d} exceed its embedding_dim "
                             f"{f.embedding_dim}; dims must be in [1, {f.embedding_dim}]")
        if len(d) > 1:
            expected = len(popularity_blocks(f, num_blocks_for(features, config.num_blocks)).rows)
            if len(d) != expected:
                raise ValueError(
                    f"mixed_dim: feature {f.name!r} has {expected} popularity block(s) with "
                    f"num_blocks={num_blocks_for(features, config.num_blocks)}, but block_dims gives {len(d)} dims {d}; give {expected} "
                    "dims (hottest block first) or one dim for a single table"
                )
        out.append(_effective_dims(f.embedding_dim, d))
    return out


class MixedDimIdMapper(nn.Module):
    """Maps logical ids to rows of the stacked block tables: a KJT over the features in, a KJT over the
    storage keys out (bags keep their sample; ids move to their block's bag).

    The ``(feature, block)`` pairs ("members", feature order, hottest block first; one member for a
    feature without blocks) are laid out by ``layout``: member ``m`` is stored in storage key
    ``key_m`` at bag slot ``slot_m`` and rows ``offset_m ..`` of that key's table. Every storage key
    has ``S = slots * B`` bags for a batch of ``B`` (``slots`` the largest slot + 1): the bag of an id
    of member ``m`` in sample ``s`` is ``slot_m * B + s`` (unused bags stay empty). Default layout:
    one storage key per member, one slot, no row offset.

    Buffers, for each feature ``i`` with blocks: ``bounds_{i}`` (int64 ``[B_i + 1]``, rank boundaries);
    with a ``"dense"`` remap ``rank_{i}`` (``[n_i]``: id -> popularity rank); with a ``"hot"`` remap
    ``hot_ids_{i}`` (the ``H_i`` ids outside the coldest block, sorted) and ``hot_rank_{i}`` (their
    ranks). Integers are int32 where the values fit, else int64. The layout is Python integers (no bytes).

    The mapping is vectorised over all features: ids (remapped to popularity ranks feature by feature
    only where a remap exists) are shifted into one global rank space (feature ``i`` starts at
    ``sum_{j<i} n_j``), one ``searchsorted`` over the members' first ranks finds every id's member.
    """

    def __init__(self, features: Sequence[FeatureSpec], blocks: Sequence[PopularityBlocks | None],
                 storage_keys: list[str], device: torch.device | None = None,
                 layout: Sequence[tuple[int, int, int]] | None = None,
                 tails: Sequence[tuple[FeatureSpec, int, int] | None] | None = None) -> None:
        super().__init__()
        self.storage_keys = list(storage_keys)
        # hashed tails: (exclusive, tail rows, has a hot list) per feature, None without a tail
        self.tails: list[tuple[int, int, bool] | None] = []
        for i, t in enumerate(tails or [None] * len(features)):
            if t is None:
                self.tails.append(None)
                continue
            real, exclusive, tail = t
            params = hash_coefficients(0, "mixed_dim_tail", real.name) + [tail, exclusive]
            self.register_buffer(f"tail_params_{i}", torch.tensor(params, dtype=torch.int64, device=device))
            hot = _tail_hot_list(real)
            if hot:  # the exclusive ids, sorted, and their popularity ranks
                order = np.argsort(-real.counts, kind="stable")[:exclusive]
                by_id = np.argsort(order, kind="stable")
                ids = order[by_id].astype(_int_dtype(real.num_embeddings))
                self.register_buffer(f"tail_ids_{i}", torch.from_numpy(ids).to(device))
                self.register_buffer(f"tail_rank_{i}", torch.from_numpy(by_id.astype(_int_dtype(exclusive))).to(device))
            self.tails.append((exclusive, tail, hot))
        self.blocked: list[bool] = []
        self.remaps: list[str | None] = []
        self.key_offsets: list[int] = []
        offset = 0
        feature_base = 0
        self.feature_base: list[int] = []  # first global rank of each feature
        self.member_base: list[int] = []  # first rank of each member within its feature's base
        for i, (f, b) in enumerate(zip(features, blocks)):
            self.key_offsets.append(offset)
            self.blocked.append(b is not None)
            self.remaps.append(None if b is None else b.remap)
            self.feature_base.append(feature_base)
            count = 1 if b is None else len(b.rows)
            self.member_base.extend([feature_base] * count)
            offset += count
            feature_base += f.num_embeddings
            if b is None:
                continue
            self.register_buffer(f"bounds_{i}", torch.tensor(b.bounds, dtype=torch.int64, device=device))
            if b.remap is None:
                continue
            n, hot = f.num_embeddings, b.bounds[-2]
            order = np.argsort(-f.counts, kind="stable")  # rank -> id, ties keep id order
            if b.remap == "dense":
                rank = np.empty(n, dtype=_int_dtype(n))
                rank[order] = np.arange(n, dtype=rank.dtype)
                self.register_buffer(f"rank_{i}", torch.from_numpy(rank).to(device))
            else:
                by_id = np.argsort(order[:hot], kind="stable")
                hot_ids = order[:hot][by_id].astype(_int_dtype(n))
                hot_rank = by_id.astype(_int_dtype(hot))
                self.register_buffer(f"hot_ids_{i}", torch.from_numpy(hot_ids).to(device))
                self.register_buffer(f"hot_rank_{i}", torch.from_numpy(hot_rank).to(device))
        layout = [(m, 0, 0) for m in range(offset)] if layout is None else [tuple(map(int, t)) for t in layout]
        if len(layout) != offset:
            raise ValueError(f"MixedDimIdMapper: layout gives {len(layout)} members, the features have {offset} "
                             "(feature, block) pairs")
        if any(not 0 <= k < len(self.storage_keys) for k, _, _ in layout):
            raise ValueError(f"MixedDimIdMapper: layout names a storage key outside 0..{len(self.storage_keys) - 1}")
        self.slots = 1 + max((s for _, s, _ in layout), default=0)
        self.codes = [k * self.slots + s for k, s, _ in layout]  # bag of member m, sample s: code * B + s
        self.row_offsets = [o for _, _, o in layout]
        self._identity = all(t == (m, 0, 0) for m, t in enumerate(layout)) and len(layout) == len(self.storage_keys)

    def _constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The layout's integers as tensors on ``device``, built once per device from the Python layout and the
        buffers (copies of constants the byte count already has, or of Python integers: no new state).

        ``base`` [F]: first global rank of each feature; ``table`` [3, M]: per member its feature's base, bag
        code and row offset; ``starts`` [M]: first global rank of each member; ``tail`` [F, 7]: per feature
        ``(is a tail, exclusive, tail rows (1 without a tail), a0, a1, a2, b)``."""
        return device_constants(self, "layout", device, self._build_constants)

    def _build_constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        local = torch.cat([getattr(self, f"bounds_{i}")[:-1].to(device) if blocked else zero
                           for i, blocked in enumerate(self.blocked)])
        table = torch.tensor([self.member_base, self.codes, self.row_offsets], dtype=torch.int64, device=device)
        tail = torch.zeros(len(self.tails), 7, dtype=torch.int64, device=device)
        tail[:, 2] = 1
        for i, t in enumerate(self.tails):
            if t is not None:
                params = getattr(self, f"tail_params_{i}").to(device)  # a0, a1, a2, b, tail, exclusive
                tail[i, 0], tail[i, 1], tail[i, 2] = 1, t[0], t[1]
                tail[i, 3:] = params[:4]
        return {"base": torch.tensor(self.feature_base, dtype=torch.int64, device=device),
                "table": table, "starts": local + table[0], "tail": tail}

    def _tail_ranks(self, ids: torch.Tensor, feature: torch.Tensor, offsets: list[int],
                    tail: torch.Tensor) -> torch.Tensor:
        """Ranks of every id (int64 ``[N]``, feature ``feature`` ``[N]``), the tail features' all at once: an
        exclusive id's popularity rank (``< exclusive``), else ``exclusive + hash(id) mod tail``; ids of other
        features pass through. One hash over all ids; a search per tail feature with a hot list (slices)."""
        per_id = tail.index_select(0, feature)  # [N, 7]
        exclusive = per_id[:, 1]
        hashed = exclusive + universal_hash(ids, per_id[:, 3:], per_id[:, 2])
        found = ids < exclusive  # ids in popularity order: the first `exclusive` ids own rows
        own = ids
        for i, t in enumerate(self.tails):
            if t is None or not t[2] or offsets[i + 1] == offsets[i]:
                continue
            if own is ids:
                own = ids.clone()
            piece = ids[offsets[i]:offsets[i + 1]]
            hot_ids, hot_rank = getattr(self, f"tail_ids_{i}"), getattr(self, f"tail_rank_{i}")
            at = torch.searchsorted(hot_ids, piece.to(hot_ids.dtype)).clamp(max=t[0] - 1)
            found[offsets[i]:offsets[i + 1]] = hot_ids[at] == piece
            own[offsets[i]:offsets[i + 1]] = hot_rank[at].to(torch.int64)
        return torch.where(per_id[:, 0].bool(), torch.where(found, own, hashed), ids)

    def _tail_rank(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """Rank in feature ``i``'s stored rows: an exclusive id's popularity rank (``< exclusive``), else
        ``exclusive + hash(id) mod tail``."""
        exclusive, tail, hot = self.tails[i]
        params = getattr(self, f"tail_params_{i}")
        if hot:
            hot_ids, hot_rank = getattr(self, f"tail_ids_{i}"), getattr(self, f"tail_rank_{i}")
            at = torch.searchsorted(hot_ids, ids.to(hot_ids.dtype)).clamp(max=exclusive - 1)
            found = hot_ids[at] == ids
            rank = hot_rank[at].to(torch.int64)
        else:  # ids in popularity order: the first `exclusive` ids own rows
            found = ids < exclusive
            rank = ids
        return torch.where(found, rank, exclusive + universal_hash(ids, params[:4], tail))

    def _rank(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """Popularity rank (row space of the concatenated blocks) of feature ``i``'s ids."""
        if self.remaps[i] is None:
            return ids
        if self.remaps[i] == "dense":
            return getattr(self, f"rank_{i}")[ids].to(torch.int64)
        hot_ids, hot_rank = getattr(self, f"hot_ids_{i}"), getattr(self, f"hot_rank_{i}")
        hot = hot_ids.numel()
        pos = torch.searchsorted(hot_ids, ids.to(hot_ids.dtype))  # number of hot ids below each id
        at = pos.clamp(max=hot - 1)
        found = hot_ids[at] == ids
        return torch.where(found, hot_rank[at].to(torch.int64), hot + ids - pos)

    def _hot_ranks(self, ids: torch.Tensor, feature: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Ranks of every id, the ``"hot"``-remapped features' all at once (other ids pass through): their
        hot lists, shifted to global ids, are one sorted array, searched once."""
        hot = [i for i, r in enumerate(self.remaps) if r == "hot"]
        hot_ids = torch.cat([getattr(self, f"hot_ids_{i}").to(torch.int64) + self.feature_base[i] for i in hot])
        hot_rank = torch.cat([getattr(self, f"hot_rank_{i}").to(torch.int64) for i in hot])
        counts = [getattr(self, f"hot_ids_{i}").numel() for i in hot]
        per_feature = torch.zeros(3, len(self.remaps), dtype=torch.int64, device=ids.device)  # is hot, start, count
        starts = np.cumsum([0, *counts[:-1]]).tolist()
        per_feature[:, hot] = torch.tensor([[1] * len(hot), starts, counts], dtype=torch.int64, device=ids.device)
        is_hot, start, count = per_feature.index_select(1, feature)  # index_select: faster than [] on CPU
        global_id = ids + base.index_select(0, feature)
        pos = torch.searchsorted(hot_ids, global_id)  # hot ids (of all features) below each id
        at = pos.clamp(max=hot_ids.numel() - 1)
        found = hot_ids.index_select(0, at) == global_id
        # a cold id's row follows the feature's hot rows in id order: id - (its feature's hot ids below it)
        ranked = torch.where(found, hot_rank.index_select(0, at), count + ids - (pos - start))
        return torch.where(is_hot.bool(), ranked, ids)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        has_tail = any(t is not None for t in self.tails)
        if self._identity and not any(self.blocked) and not has_tail:
            return with_values(kjt, kjt.values(), self.storage_keys)
        values, weights = kjt.values(), kjt.weights_or_none()
        stride, num_features = kjt.stride(), len(self.blocked)
        device = values.device
        rank = values.to(torch.int64)
        bag_of_id = torch.repeat_interleave(  # feature * B + sample of every id
            torch.arange(num_features * stride, device=device), kjt.lengths(), output_size=values.numel(),
        )
        feature = bag_of_id // stride
        sample = bag_of_id - feature * stride
        consts = self._constants(device)
        base = consts["base"]
        if has_tail:  # ids -> ranks of the tail features' stored rows (exclusive, then tail rows)
            rank = self._tail_ranks(rank, feature, kjt.offset_per_key(), consts["tail"])
        if "dense" in self.remaps:  # a gather per feature
            offsets = kjt.offset_per_key()
            rank = rank.clone()
            for i, remap in enumerate(self.remaps):
                if remap == "dense" and offsets[i + 1] > offsets[i]:
                    rank[offsets[i]:offsets[i + 1]] = self._rank(i, rank[offsets[i]:offsets[i + 1]])
        if "hot" in self.remaps:
            rank = self._hot_ranks(rank, feature, base)
        global_rank = rank + base.index_select(0, feature)
        # first global rank of every member: the feature's base plus its block bounds (0 without blocks)
        starts, table = consts["starts"], consts["table"]
        member = torch.searchsorted(starts, global_rank, right=True) - 1
        code, row_offset = table[1:].index_select(1, member)
        rows = global_rank - (starts.index_select(0, member) - row_offset)
        bag = code * stride + sample
        # a stable sort groups the ids by (storage key, bag), as the storage KJT wants
        bag_sorted, perm = torch.sort(bag, stable=True)
        lengths = torch.bincount(bag_sorted, minlength=len(self.storage_keys) * self.slots * stride)
        return KeyedJaggedTensor(
            keys=self.storage_keys,
            values=rows.index_select(0, perm),
            weights=None if weights is None else weights.index_select(0, perm),
            lengths=lengths,
            stride=self.slots * stride,
        )

    def extra_repr(self) -> str:
        remapped = sum(r is not None for r in self.remaps)
        return (f"blocked={sum(self.blocked)}/{len(self.blocked)}, remapped={remapped}, "
                f"storage_keys={len(self.storage_keys)}, slots={self.slots}")


@register_method(MixedDimConfig)
class MixedDimEmbeddingBagCollection(EmbeddingModule):
    """Mixed-dimension embedding tables with learned projections (Ginart et al., 2021).

    Storage is one TorchRec ``EmbeddingBagCollection`` with ONE table per distinct block dim ``d``
    (named ``d{d}``): the rows of every (feature, block) pair of that dim are stacked in it, in feature
    order, hottest block first (:meth:`block_weight` gives one pair's rows). The mapper adds each pair's
    row offset and gives it its own bag slot, so one lookup per dim pools every pair's bags (sum); few
    tables keep the per-table cost of the sparse optimizers low. The projections ``projections[key]``
    (``d x D``, ``key`` = the feature name, or ``{feature}__block{j}`` for a feature with blocks; trained
    by the dense optimizer) are applied to the pooled block sums (pooling is linear, so this equals
    projecting each row first). Mean pooling divides the sum over all blocks by the bag's total id count.

    Args:
        features, config: the features and a sized :class:`MixedDimConfig`.
        **kwargs: ``pooling``, ``is_weighted``, ``out_of_range``, ``device`` (see
            :class:`embtable.EmbeddingModule`).

    Shape:
        - input: a ``KeyedJaggedTensor`` holding (at least) the features' keys, ``B`` bags each
        - output: a ``KeyedTensor`` of ``[B, sum_f D_f]``, the features' base dims, in feature order

    Example:
        >>> import embtable
        >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("country", 200, 16)]
        >>> m = embtable.build(feats, MixedDimConfig(alpha=0.3, num_blocks=3), budget="1/4", seed=0)
        >>> m.config.block_dims
        {'user': (16, 16, 3), 'country': (16,)}
        >>> [(c.name, c.num_embeddings) for c in m.storage.embedding_bag_configs()]  # stacked per dim
        [('d3', 97846), ('d16', 2354)]
        >>> tuple(m.block_weight("user", 2).shape)  # the coldest 97,846 user rows at dim 3
        (97846, 3)
        >>> embtable.memory_report(m).inference_bytes <= embtable.Budget(fraction=1 / 4).resolve(feats)
        True
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([5, 99_999, 42]),
        ...                                           torch.tensor([2, 0, 1, 0]))
        >>> m(kjt).values().shape
        torch.Size([2, 32])
    """

    def __init__(self, features: Sequence[FeatureSpec], config: MixedDimConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        if config.block_dims is None:
            config = self.size_config(self.features, config, None)
            self.config = config
        stored = stored_features(self.features, config.tail_rows)  # a tail feature: its stored rows
        num_blocks = num_blocks_for(self.features, config.num_blocks)
        dims = _block_dims(stored, config)
        blocks = [popularity_blocks(f, num_blocks) if len(d) > 1 else None for f, d in zip(stored, dims)]
        self.projections = nn.ParameterDict()
        members: list[tuple[str, int, int]] = []  # (name, rows, dim) of every (feature, block), feature order
        self.feature_members: list[list[int]] = []
        for f, d, b in zip(stored, dims, blocks):
            names = [f.name] if b is None else [f"{f.name}__block{j}" for j in range(len(d))]
            rows = [f.num_embeddings] if b is None else list(b.rows)
            self.feature_members.append(list(range(len(members), len(members) + len(d))))
            for name, n, dim in zip(names, rows, d):
                members.append((name, n, dim))
                if dim < f.embedding_dim:
                    self.projections[name] = nn.Parameter(torch.empty(dim, f.embedding_dim, device=self.device))
        names = [m[0] for m in members]
        if len(set(names)) != len(names):
            clash = sorted({k for k in names if names.count(k) > 1})
            raise ValueError(f"mixed_dim: block table names {clash} collide with feature names; rename the "
                             "features so none ends in '__block<k>'")
        table_dims = sorted({dim for _, _, dim in members})
        key_of = {dim: k for k, dim in enumerate(table_dims)}
        table_rows, slots_used = [0] * len(table_dims), [0] * len(table_dims)
        self.member_names = names
        self.member_layout: list[tuple[int, int, int]] = []  # (storage key, bag slot, first row) per member
        for _, n, dim in members:
            k = key_of[dim]
            self.member_layout.append((k, slots_used[k], table_rows[k]))
            slots_used[k] += 1
            table_rows[k] += n
        self.member_rows = [n for _, n, _ in members]
        self.storage_keys = [f"d{dim}" for dim in table_dims]
        tables = [(key, rows, dim, [key]) for key, rows, dim in zip(self.storage_keys, table_rows, table_dims)]
        self.block_dims = [tuple(d) for d in dims]
        tails = [(f, *config.tail_rows[f.name]) if f.name in (config.tail_rows or {}) else None for f in self.features]
        self.mapper = MixedDimIdMapper(stored, blocks, self.storage_keys, self.device, self.member_layout, tails)
        # per-block sums: the blocks of one bag are added (and divided by the bag size for mean) in pooled
        self.storage = storage_collection(tables, Pooling.SUM, self._is_weighted, self.device)
        self.reset_parameters()

    def block_location(self, feature: str, block: int = 0) -> tuple[str, int, int]:
        """Where ``feature``'s block ``block`` (hottest first; 0 for a feature without blocks) is stored:
        ``(storage table name, first row, end row)`` of its stacked table."""
        if feature not in self.feature_names:
            raise KeyError(f"mixed_dim: no feature {feature!r}; features are {self.feature_names}")
        owned = self.feature_members[self.feature_names.index(feature)]
        if not 0 <= block < len(owned):
            raise ValueError(f"mixed_dim: feature {feature!r} has {len(owned)} block(s); got block {block}")
        m = owned[block]
        k, _, start = self.member_layout[m]
        return self.storage_keys[k], start, start + self.member_rows[m]

    def block_weight(self, feature: str, block: int = 0) -> torch.Tensor:
        """The rows of ``feature``'s block ``block`` in popularity-rank order: a view into its stacked
        table (shape ``[n_{f,b}, d_{f,b}]``; see :meth:`block_location`)."""
        table, start, end = self.block_location(feature, block)
        return self.storage.embedding_bags[table].weight[start:end]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every (feature, block) rows start at ``U(-sqrt(1/n), sqrt(1/n))``, ``n`` its row count (TorchRec's
        default for a table of its own). Projections start at ``U(-sqrt(3/d), sqrt(3/d))`` (variance ``1/d``),
        so a projected row keeps the scale its stored row was initialised with."""
        if self.device.type == "meta":
            return
        for f, owned in zip(self.features, self.feature_members):
            for j, m in enumerate(owned):
                bound = math.sqrt(1.0 / self.member_rows[m])
                self.block_weight(f.name, j).uniform_(-bound, bound)
        for p in self.projections.values():
            bound = math.sqrt(3.0 / p.shape[0])
            nn.init.uniform_(p, -bound, bound)

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pieces = self.storage(self.mapper(kjt)).to_dict()  # key -> [slots * B, d]: bag slot * B + sample
        B = kjt.stride()
        out = []
        for owned in self.feature_members:
            acc = None
            for m in owned:
                k, slot, _ = self.member_layout[m]
                x = pieces[self.storage_keys[k]][slot * B:(slot + 1) * B]  # [B, d]
                name = self.member_names[m]
                if name in self.projections:
                    x = x @ self.projections[name]  # [B, D]
                acc = x if acc is None else acc + x
            out.append(acc)
        values = torch.cat(out, dim=1)  # [B, sum(D_f)]
        if self.pooling is Pooling.MEAN:
            sizes = kjt.lengths().view(len(self.features), -1).clamp(min=1).to(values.dtype)  # [F, B]
            divisor = torch.repeat_interleave(sizes.t(), torch.tensor(self.embedding_dims, device=values.device),
                                              dim=1, output_size=values.shape[1])
            values = values / divisor
        return values

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.block_dims is not None:
            return config
        num_blocks = num_blocks_for(features, config.num_blocks)
        if budget_bytes is None:
            if config.alpha is None:
                raise ValueError(
                    "mixed_dim: give a byte budget (build(features, MixedDimConfig(), budget=...)), or alpha "
                    "(MixedDimConfig(alpha=0.3): the most popular block keeps the base dim), or block_dims"
                )
            dims = power_rule_dims(features, config.alpha, num_blocks=num_blocks, dim_multiple=config.dim_multiple)
            return dataclasses.replace(config, num_blocks=num_blocks, block_dims=dims)
        try:
            dims, alpha = solve_block_dims(features, budget_bytes, alpha=config.alpha, num_blocks=num_blocks,
                                           dim_multiple=config.dim_multiple)
            return dataclasses.replace(config, alpha=alpha, num_blocks=num_blocks, block_dims=dims)
        except BudgetError:
            if config.tail != "hash":
                raise
        dims, alpha, tails = solve_tail(features, budget_bytes, alpha=config.alpha, num_blocks=num_blocks,
                                        dim_multiple=config.dim_multiple)
        return dataclasses.replace(config, alpha=alpha, num_blocks=num_blocks, block_dims=dims, tail_rows=tails)

    @classmethod
    def describe(cls, features, config):
        if config.block_dims is None:
            config = cls.size_config(features, config, None)
        plans = []
        stored = stored_features(features, config.tail_rows)
        num_blocks = num_blocks_for(features, config.num_blocks)
        for f, sf, d in zip(features, stored, _block_dims(stored, config)):
            blocks = popularity_blocks(sf, num_blocks) if len(d) > 1 else None
            nbytes = mixed_dim_bytes(sf, blocks, d)
            if blocks is None:
                detail = "full" if d[0] == f.embedding_dim else f"dim {d[0]} -> {f.embedding_dim}"
            else:
                detail = (f"dims {'/'.join(map(str, d))} over rows {'/'.join(f'{r:,}' for r in blocks.rows)}"
                          + (f" + {blocks.remap} id remap" if blocks.remap else ""))
            tail = (config.tail_rows or {}).get(f.name)
            if tail is not None:
                nbytes += tail_bytes(f, tail[0])
                detail += f"; {tail[0]:,} exclusive ids, the rest hashed into {tail[1]:,} tail rows"
            plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, sf.num_embeddings, max(d), nbytes,
                                     d != (f.embedding_dim,) or tail is not None, detail))
        return plans, {}
