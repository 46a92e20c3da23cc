"""Tensor-train tables (Yin et al., MLSys 2021, "TT-Rec: Tensor Train Compression for Deep Learning
Recommendation Model Embeddings").

A compressed feature's ``n x d`` table is never stored: it is the tensor train of three cores. The row
count is written as ``n <= n1 * n2 * n3`` (each ``n_k`` about the cube root of ``n``, as balanced as
possible) and the dim as ``d = d1 * d2 * d3`` (``16 = 2 * 2 * 4``). Core ``k`` has shape
``[n_k, R_(k-1), d_k, R_k]`` with ``R_0 = R_3 = 1`` and ``R_1 = R_2 = R``, the TT-rank::

    id ──► digits (integer // and %, exact for every int64 id):
           i1 = id // (n2*n3)      i2 = (id % (n2*n3)) // n3      i3 = id % n3

    core 1 [n1, 1, d1, R]   core 2 [n2, R, d2, R]   core 3 [n3, R, d3, 1]
              │ slice i1              │ slice i2              │ slice i3
              ▼                       ▼                       ▼
           [d1, R]      x          [R, d2*R]      ->  [d1*d2, R]   x   [R, d3]  ->  [d1*d2, d3] = row (d)

    row[(j1*d2 + j2)*d3 + j3] = sum_{a,b} core1[i1, 0, j1, a] * core2[i2, a, j2, b] * core3[i3, b, j3, 0]

All ids of a feature are contracted at once with two batched matmuls, then pooled per bag (sum, weighted
sum or mean; an empty bag is zeros). Features too small to gain keep a plain table in a TorchRec
``EmbeddingBagCollection`` child (``storage``).

Optionally ``c`` hot rows of a compressed feature are kept whole (the paper's cache of the most accessed
rows; hottest by ``FeatureSpec.counts``): an id found (``searchsorted``) among the sorted ``hot_ids``
reads its trainable ``hot_rows`` vector instead of the cores' product.

Memory (fp32)::

    compressed feature:  sum_k n_k * R_(k-1) * d_k * R_k * 4  +  c * (d * 4 + 8)
                       = (n1*d1*R + n2*R*d2*R + n3*R*d3) * 4  +  c * (d * 4 + 8) bytes
    full feature:        n * d * 4 bytes
    (no buffers: the factors are Python ints)

Initialisation (the paper's sampled-Gaussian idea, made to match TorchRec's table): a plain table row has
entries ``U(-s, s)``, ``s = sqrt(1/n)``, of variance ``1/(3n)``. A reconstructed entry is a sum of
``R_1 * R_2`` products of three independent zero-mean core entries, so with every core entry
``N(0, sigma^2)`` its variance is ``R_1 * R_2 * sigma^6``; we take ``sigma = (1 / (3 n R_1 R_2)) ** (1/6)``.

Budget planning: water-filling on a byte cap ``T`` per feature (as for hashing): a feature whose table
fits ``T`` stays full, a larger one gets the largest rank whose cores fit ``T`` (at least 1), and a feature
whose rank-1 cores would cost as much as its table keeps the table; the largest ``T`` whose total fits is
taken, and what is left goes to the largest features first (a full table if it fits, else the largest
rank that fits). Ranks are per feature: ``rank={feature: R_f}``, ``0`` = full table. The bytes still
left after that (less than one rank step) buy cached rows, largest features first.

Sharding: the cores are dense parameters (DMP replicates them, like an MLP, and averages their gradients);
only the full features' tables are sharded. A TT-compressed model is small, so replication is cheap.
The cached rows are dense parameters too (a small ``[c, d]`` block; replicated like the cores).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, register_method
from ..features import FeatureSpec
from ..module import EmbeddingModule, config_field_per_feature, storage_collection
from ..pooling import pooled_full_and_rows

__all__ = ["TTRecConfig", "TTRecEmbeddingBagCollection", "TTCores", "tt_row_factors", "tt_dim_factors",
           "tt_bytes", "tt_digits"]

Factors = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class TTRecConfig(MethodConfig):
    """Tensor-train compressed tables.

    Args:
        rank: the TT-rank ``R``: one int for all features (every feature compressed), a ``{feature: R}``
            mapping (``0`` keeps that feature's full table), or ``None`` to let the planner pick it.
        row_factors: ``{feature: (n1, n2, n3)}`` with ``n1 * n2 * n3 >= num_embeddings``; ``None`` (default)
            or a missing feature: the balanced cube-root split (:func:`tt_row_factors`).
        dim_factors: ``(d1, d2, d3)`` for all features or ``{feature: (d1, d2, d3)}``, with product the
            feature's ``embedding_dim``; ``None`` (default): the balanced split (:func:`tt_dim_factors`).
        cache_rows: hot rows of a compressed feature kept as whole trainable vectors (the paper's cache of
            the most accessed rows): one int, a ``{feature: rows}`` mapping, or ``None`` (the planner spends
            what the ranks leave on it; 0 when the rank is given). The hottest ids by
            ``FeatureSpec.counts``; without counts, the lowest ids.
    """

    method = "tt_rec"
    rank: int | Mapping[str, int] | None = None
    row_factors: Mapping[str, Sequence[int]] | None = None
    dim_factors: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    cache_rows: int | Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        for c in self.cache_rows.values() if isinstance(self.cache_rows, Mapping) else [self.cache_rows]:
            if c is not None and (isinstance(c, bool) or int(c) != c or c < 0):
                raise ValueError(f"TTRecConfig.cache_rows must be integers >= 0 (hot rows kept whole), got {c!r}")
        ranks = self.rank.values() if isinstance(self.rank, Mapping) else [self.rank]
        lowest = 0 if isinstance(self.rank, Mapping) else 1
        for r in ranks:
            if r is not None and (isinstance(r, bool) or int(r) != r or r < lowest):
                raise ValueError(
                    f"TTRecConfig.rank must be an integer >= 1 (or, per feature in a mapping, >= 0 where 0 keeps "
                    f"the full table), got {r!r}"
                )
        if self.row_factors is not None and not isinstance(self.row_factors, Mapping):
            raise ValueError("TTRecConfig.row_factors must be a {feature: (n1, n2, n3)} mapping or None")
        if self.row_factors is not None:
            for v in self.row_factors.values():
                _check_triple(v, "row_factors")
        if self.dim_factors is not None:
            for v in self.dim_factors.values() if isinstance(self.dim_factors, Mapping) else [self.dim_factors]:
                _check_triple(v, "dim_factors")


def _check_triple(value, field: str) -> None:
    if (not isinstance(value, Sequence) or len(value) != 3
            or any(isinstance(x, bool) or int(x) != x or x < 1 for x in value)):
        raise ValueError(f"TTRecConfig.{field}: each entry must be three positive integers, got {value!r}")


# ----- pure integer helpers -----
def _iroot(n: int, k: int) -> int:
    """The smallest integer ``r >= 1`` with ``r**k >= n`` (exact for big ints)."""
    r = max(1, int(round(n ** (1.0 / k))))
    while r > 1 and (r - 1) ** k >= n:
        r -= 1
    while r**k < n:
        r += 1
    return r


def tt_row_factors(n: int) -> Factors:
    """A balanced split ``(n1, n2, n3)`` with ``n1 * n2 * n3 >= n`` (each about the cube root).

    >>> tt_row_factors(1000), tt_row_factors(3000), tt_row_factors(2**33 + 7)
    ((10, 10, 10), (15, 15, 14), (2049, 2048, 2048))
    """
    n1 = _iroot(n, 3)
    n2 = _iroot(-(-n // n1), 2)
    n3 = -(-n // (n1 * n2))
    return n1, n2, n3


def tt_dim_factors(d: int) -> Factors:
    """``(d1, d2, d3)`` with product ``d``, as balanced as possible, the smallest in the middle (core 2,
    the one with ``R**2`` entries per slice).

    >>> tt_dim_factors(16), tt_dim_factors(8), tt_dim_factors(12), tt_dim_factors(7)
    ((2, 2, 4), (2, 2, 2), (2, 2, 3), (1, 1, 7))
    """
    best = None
    for a in range(1, d + 1):
        if d % a:
            continue
        for b in range(a, d // a + 1):
            if (d // a) % b:
                continue
            c = d // (a * b)
            if c < b:
                continue
            key = (c - a, -a)  # most balanced, then the largest smallest factor
            if best is None or key < best[0]:
                best = (key, (a, b, c))
    a, b, c = best[1]
    return b, a, c


def tt_bytes(rows: Factors, dims: Factors, rank: int) -> int:
    """Bytes of the three cores: ``(n1*d1*R + n2*R*d2*R + n3*R*d3) * 4``.

    >>> tt_bytes((10, 10, 10), (2, 2, 2), 4)
    1920
    """
    (n1, n2, n3), (d1, d2, d3) = rows, dims
    return (n1 * d1 * rank + n2 * rank * d2 * rank + n3 * rank * d3) * FP32


def tt_digits(ids: torch.Tensor, rows: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(i1, i2, i3)`` with ``id = (i1 * n2 + i2) * n3 + i3``: int64 ``//`` and ``%`` only, exact for every id.

    >>> [t.tolist() for t in tt_digits(torch.tensor([0, 7, 123, 2**33 + 6, 2**22 + 2**11 + 5]), (2049, 2048, 2048))]
    [[0, 0, 0, 2048, 1], [0, 0, 0, 0, 1], [0, 7, 123, 6, 5]]
    """
    _, n2, n3 = rows
    i1 = torch.div(ids, n2 * n3, rounding_mode="floor")
    rest = torch.remainder(ids, n2 * n3)
    return i1, torch.div(rest, n3, rounding_mode="floor"), torch.remainder(rest, n3)


CACHE_ID_BYTES = 8  # the int64 id of a cached row (searched with searchsorted)


def cache_bytes(rows: int, dim: int) -> int:
    """Bytes of ``rows`` cached rows of dim ``dim``: the vectors and their sorted int64 ids."""
    return rows * (dim * FP32 + CACHE_ID_BYTES)


def _cache(features: Sequence[FeatureSpec], config: TTRecConfig, layout) -> list[int]:
    per = config_field_per_feature(config.cache_rows, features, "cache_rows", "tt_rec")
    return [0 if per is None or r == 0 else min(int(per[f.name]), f.num_embeddings)
            for f, (r, _, _) in zip(features, layout)]


def _layout(features: Sequence[FeatureSpec], config: TTRecConfig, *, need_rank: bool = True
            ) -> list[tuple[int, Factors, Factors]]:
    """``(rank, row factors, dim factors)`` per feature; rank 0 = full table."""
    ranks = config_field_per_feature(config.rank, features, "rank", "tt_rec")
    if ranks is None and need_rank:
        raise ValueError(
            "tt_rec: rank is not set; give a byte budget (build(features, TTRecConfig(), budget=...)) "
            "or TTRecConfig(rank=...)"
        )
    names = {f.name for f in features}
    row_map = dict(config.row_factors or {})
    dim_map = (dict(config.dim_factors) if isinstance(config.dim_factors, Mapping)
               else {f.name: config.dim_factors for f in features} if config.dim_factors is not None else {})
    unknown = sorted((set(row_map) | set(dim_map)) - names)
    if unknown:
        raise ValueError(f"tt_rec: row_factors/dim_factors name unknown feature(s) {unknown}; features: {sorted(names)}")
    out = []
    for f in features:
        rows = tuple(int(x) for x in row_map.get(f.name) or tt_row_factors(f.num_embeddings))
        dims = tuple(int(x) for x in dim_map.get(f.name) or tt_dim_factors(f.embedding_dim))
        if math.prod(rows) < f.num_embeddings:
            raise ValueError(
                f"tt_rec: feature {f.name!r}: row_factors {rows} cover {math.prod(rows):,} ids, fewer than its "
                f"{f.num_embeddings:,}; choose factors whose product is at least num_embeddings"
            )
        if math.prod(dims) != f.embedding_dim:
            raise ValueError(
                f"tt_rec: feature {f.name!r}: dim_factors {dims} multiply to {math.prod(dims)}, not its "
                f"embedding_dim {f.embedding_dim}"
            )
        out.append((int(ranks[f.name]) if ranks is not None else 0, rows, dims))
    return out


class TTCores(nn.Module):
    """The three TT cores of one feature; ``forward(ids [N]) -> rows [N, d]``.

    Args:
        num_embeddings: ``n`` (for the initial variance).
        rows, dims: the factors ``(n1, n2, n3)`` and ``(d1, d2, d3)``.
        rank: ``R``.
    """

    def __init__(self, num_embeddings: int, rows: Factors, dims: Factors, rank: int,
                 hot_ids: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.rows, self.dims, self.rank = num_embeddings, tuple(rows), tuple(dims), rank
        ranks = [1, rank, rank, 1]
        for k in range(3):
            shape = (rows[k], ranks[k], dims[k], ranks[k + 1])
            self.register_parameter(f"core{k + 1}", nn.Parameter(torch.empty(shape, device=device)))
        self.cache_rows = 0 if hot_ids is None else int(hot_ids.numel())
        if self.cache_rows:
            # sorted int64 ids of the cached rows, and their whole vectors
            self.register_buffer("hot_ids", torch.sort(hot_ids.to(torch.int64)).values.to(device))
            self.hot_rows = nn.Parameter(torch.empty(self.cache_rows, math.prod(dims), device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Cores ~ ``N(0, sigma^2)``, ``sigma = (1 / (3 n R^2)) ** (1/6)``: rows of variance ``1/(3n)``.

        Cached rows start as the cores' rows for their ids (the output does not change when a row is cached).
        """
        if self.core1.device.type == "meta":
            return
        sigma = (1.0 / (3.0 * self.num_embeddings * self.rank * self.rank)) ** (1.0 / 6.0)
        for core in (self.core1, self.core2, self.core3):
            core.normal_(0.0, sigma)
        if self.cache_rows:
            self.hot_rows.copy_(self._contract(self.hot_ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._contract(ids)
        if not self.cache_rows:
            return rows
        pos = torch.searchsorted(self.hot_ids, ids).clamp(max=self.cache_rows - 1)
        hit = self.hot_ids.index_select(0, pos) == ids  # [N]
        return torch.where(hit.unsqueeze(1), self.hot_rows.index_select(0, pos), rows)

    def _contract(self, ids: torch.Tensor) -> torch.Tensor:
        (d1, d2, d3), r = self.dims, self.rank
        i1, i2, i3 = tt_digits(ids, self.rows)
        n = ids.numel()
        g1 = self.core1.index_select(0, i1).view(n, d1, r)  # [N, d1, R]
        g2 = self.core2.index_select(0, i2).view(n, r, d2 * r)  # [N, R, d2*R]
        g3 = self.core3.index_select(0, i3).view(n, r, d3)  # [N, R, d3]
        t = torch.bmm(g1, g2).view(n, d1 * d2, r)  # [N, d1*d2, R]
        return torch.bmm(t, g3).view(n, d1 * d2 * d3)  # [N, d]

    def extra_repr(self) -> str:
        cache = f", cache_rows={self.cache_rows}" if self.cache_rows else ""
        return f"rows={self.rows}, dims={self.dims}, rank={self.rank}{cache}"


def _hot_ids(f: FeatureSpec, rows: int) -> torch.Tensor | None:
    """The ``rows`` most frequent ids of ``f`` (by ``counts``; the lowest ids without counts)."""
    if rows == 0:
        return None
    if f.counts is None:
        return torch.arange(rows, dtype=torch.int64)
    order = torch.from_numpy(f.counts).argsort(descending=True, stable=True)
    return order[:rows].to(torch.int64)


@register_method(TTRecConfig)
class TTRecEmbeddingBagCollection(EmbeddingModule):
    """TT-Rec: compressed features as TT cores (``cores``, dense parameters), the others as plain tables in a
    TorchRec ``EmbeddingBagCollection`` (``storage``, ``None`` when every feature is compressed).

    Args:
        features, config, pooling, is_weighted, out_of_range, device: see :class:`embtable.EmbeddingModule`.

    Shape:
        input: ``KeyedJaggedTensor`` with the features' keys; output: ``KeyedTensor`` ``[B, sum(d_f)]``.

    Example:
        >>> import embtable
        >>> feats = [embtable.FeatureSpec("user", 1_000_000, 16), embtable.FeatureSpec("country", 200, 16)]
        >>> m = embtable.build(feats, TTRecConfig(), budget="1/100", seed=0)
        >>> m.config.rank, m.config.cache_rows
        ({'user': 26, 'country': 0}, {'user': 335, 'country': 0})
        >>> [tuple(p.shape) for p in m.cores[0].parameters()]
        [(100, 1, 2, 26), (100, 26, 2, 26), (100, 26, 4, 1), (335, 16)]
        >>> cores = (100*2*26 + 100*26*2*26 + 100*26*4) * 4
        >>> embtable.memory_report(m).inference_bytes == cores + 335 * (16*4 + 8) + 200 * 16 * 4
        True
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123456, 7, 3]),
        ...                                           torch.tensor([2, 0, 1, 0]))
        >>> m(kjt).values().shape
        torch.Size([2, 32])
    """

    def __init__(self, features: Sequence[FeatureSpec], config: TTRecConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        layout = _layout(self.features, config)
        self.full = [j for j, (r, _, _) in enumerate(layout) if r == 0]
        self.compressed = [j for j, (r, _, _) in enumerate(layout) if r > 0]
        self.full_names = [self.feature_names[j] for j in self.full]
        cache = _cache(self.features, config, layout)
        self.cores = nn.ModuleList(
            TTCores(self.features[j].num_embeddings, layout[j][1], layout[j][2], layout[j][0],
                    _hot_ids(self.features[j], cache[j]), self.device)
            for j in self.compressed
        )
        self.storage = storage_collection(
            [(self.features[j].name, self.features[j].num_embeddings, self.features[j].embedding_dim,
              [self.features[j].name]) for j in self.full],
            self.pooling, self._is_weighted, self.device,
        ) if self.full else None

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return pooled_full_and_rows(self, kjt, list(self.cores))

    # ----- planning -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.rank is not None or budget_bytes is None:
            return config
        layout = _layout(features, config, need_rank=False)
        full = [f.full_table_bytes for f in features]

        def tt(j: int, r: int) -> int:
            return tt_bytes(layout[j][1], layout[j][2], r)

        # the rank at which each feature's cores cost at least its table (no point going there)
        top = []
        for j in range(len(features)):
            r = 1
            while tt(j, r) < full[j]:
                r *= 2
            top.append(r)

        def cost(j: int, cap: int) -> tuple[int, int]:
            """(rank, bytes) of feature j under a cap of ``cap`` bytes per feature (rank 0 = full table)."""
            if full[j] <= cap or tt(j, 1) >= full[j]:
                return 0, full[j]
            r = largest_feasible(lambda x: tt(j, x), cap, 1, top[j]) or 1
            return r, tt(j, r)

        def total(cap: int) -> int:
            return sum(cost(j, cap)[1] for j in range(len(features)))

        cap = largest_feasible(total, budget_bytes, 0, max(full))
        if cap is None:
            raise smallest_budget_error("tt_rec", total(0), budget_bytes, features,
                                        "rank-1 cores for every feature whose table is larger")
        chosen = [cost(j, cap) for j in range(len(features))]
        left = budget_bytes - sum(b for _, b in chosen)
        # hand what the cap leaves to the largest features first: a full table if it fits, else more rank
        for j in sorted(range(len(features)), key=lambda j: -features[j].num_embeddings):
            r, nbytes = chosen[j]
            if r == 0 or left <= 0:
                continue
            if full[j] - nbytes <= left:
                new = (0, full[j])
            else:
                best = largest_feasible(lambda x, j=j: tt(j, x), nbytes + left, r, top[j])
                new = (best, tt(j, best))
            left -= new[1] - nbytes
            chosen[j] = new
        # what the ranks leave buys cached hot rows, largest features first
        cache = {}
        for j in sorted(range(len(features)), key=lambda j: -features[j].num_embeddings):
            f, rows = features[j], 0
            if chosen[j][0] > 0 and left > 0:
                rows = min(f.num_embeddings, left // cache_bytes(1, f.embedding_dim))
                left -= cache_bytes(rows, f.embedding_dim)
            cache[f.name] = rows
        return dataclasses.replace(config, rank={f.name: r for f, (r, _) in zip(features, chosen)},
                                   cache_rows=cache)

    @classmethod
    def describe(cls, features, config):
        plans = []
        layout = _layout(features, config)
        for f, (r, rows, dims), c in zip(features, layout, _cache(features, config, layout)):
            if r == 0:
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings,
                                         f.embedding_dim, f.full_table_bytes, False, "full table"))
            else:
                plans.append(FeaturePlan(
                    f.name, f.num_embeddings, f.embedding_dim, sum(rows) + c, f.embedding_dim,
                    tt_bytes(rows, dims, r) + cache_bytes(c, f.embedding_dim), True,
                    f"TT cores rows {rows[0]}x{rows[1]}x{rows[2]}, dims {dims[0]}x{dims[1]}x{dims[2]}, rank {r}"
                    + (f", {c:,} cached rows" if c else ""),
                ))
        return plans, {}
