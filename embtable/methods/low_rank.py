"""Low-rank tables: an ``n x r`` table times an ``r x d`` projection, trained end to end or compressed from a
trained full table.

A compressed feature stores ``E = A P`` instead of its ``n x d`` table::

    ids of "user" ──► rows of A_user [n x r] ──► pool (sum/mean, weights) ──► @ P_user [r x d] ──► dim d

Pooling commutes with the projection (``sum_i w_i a_i P = (sum_i w_i a_i) P``), so the rows are pooled in the
narrow ``r`` dims by a TorchRec ``EmbeddingBagCollection`` and projected once per bag: every bag mode is
exact. The projections are small dense ``nn.Parameter``s (trained by the dense optimizer, e.g. Adam),
applied to views of the pooled output, one small matmul per compressed feature.

Post-training path (the "Unified Low-rank Compression Framework for Click-through Rate Prediction" recipe):
:func:`low_rank_from_trained` takes a trained table ``W`` (a ``FullEmbeddingBagCollection``, a torchrec
``EmbeddingBagCollection``, an ``nn.Embedding(Bag)`` or a weight tensor) and a second-moment matrix
``C = E[y yᵀ]`` of the outputs ``y`` the table should keep, and sets ``P = V_rᵀ`` (the top-``r``
eigenvectors of ``C``) and ``A = W V_r``: every output is projected onto the ``r``-dim subspace that
keeps most of its energy. With ``C = Wᵀ W`` (the default) this is the truncated SVD of ``W``, the best
rank-``r`` table in Frobenius norm; with ``C`` from data (:func:`output_second_moments`, pooled outputs on
batches) or from id frequencies (:func:`count_second_moments`, ``Wᵀ diag(counts) W``) it is the best
projection for the outputs the model actually sees. (An uncentred second moment, not a covariance: the
projection has no bias.) The module is then fine-tuned like any other. The ``svd`` pipeline
(:data:`SVD_PIPELINE`, :mod:`embtable.stages`) declares the whole path to a trainer: train full tables,
compress them to the budget, fine-tune (``python -m experiments.training.stages svd demo --budget 1/8
--out DIR``).

Memory (fp32, no buffers)::

    compressed feature:  (n * r + r * d) * 4 bytes
    full feature:        n * d * 4

Budget planning: water-filling on a cap ``T`` in rows of the feature's dim (as for hashing): a feature with
``n <= T`` stays full, a larger one gets the largest rank with ``(n + d) * r <= T * d`` (at least 1); what the
largest feasible ``T`` leaves is handed out greedily, largest features first. The largest compressed
feature has the coarsest steps, so each of its ranks ``1 .. d-1`` is tried with the others water-filled
around it; among the plans that use at least 95% of the budget the one with the fewest compressed
features wins (else the one that uses the most). A rank step of a feature
costs ``(n + d) * 4`` bytes, about ``1/d`` of its full table: with few features and a small dim the plan can
stay below 95% of the budget. Keeping every row, budgets below about ``1/d`` of the full tables are out of
reach (rank >= 1); the hashed tail reaches them.

**Hashed tail** (``tail="hash"``, the default; used only when rank 1 for every large feature does not fit,
so every plan that fits without a tail is unchanged). A large feature of ``n`` ids stores ``K + T < n`` rows
of its ``A``: its ``K`` most popular ids own a row each, every other id shares one of ``T`` tail rows by a
salted universal hash (:mod:`embtable.hashing`, salt ``("low_rank_tail", feature)``, seed 0: the same
mapping in every build)::

    id ──► exclusive?  ids in popularity order (counts decreasing, or no counts: id order is taken as
    │                  popularity order): id < K;  else: id in the sorted list of the K most counted ids
    ├─ yes ──► row = id  (in id order)  or  its position in that sorted list
    └─ no  ──► row = K + hash(id) mod T
    rows of A_f:  [ K exclusive rows | T tail rows ] x r ──► pool ──► @ P_f [r x d]

Memory of a module with at least one tail (every feature adds its 8 mapping parameters ``a0, a1, a2, b,
T, K``, list start, key base as int64; a feature without a tail has ``T = 1, K = n``, so all its ids are
exclusive)::

    tail feature:   ((K + T) * r + r * d) * 4  +  [counts not in id order] * K * 8  +  64
    other feature:  its bytes above  +  64

(the exclusive-id list holds int64 keys ``key base + id``, one sorted array over all features). Planning:
like mixed_dim's tail, a row cap ``C`` (the largest one at which every capped feature at rank 1 uses at
most half the budget): a feature with ``n > C`` stores ``C`` rows, ``T = C / 2`` of them tail rows; the
ranks are water-filled on the stored rows with the rest of the budget, and what the coarse rank steps
leave goes back to rows (the largest ``C`` that fits with those ranks), so the plan uses >= 95% of the
budget. Too small a budget raises :class:`BudgetError` naming the smallest one (2 rows per large feature).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, Budget, BudgetError, FeaturePlan, largest_feasible, smallest_budget_error
from ..build import build
from ..config import MethodConfig, OutOfRange, Pooling, register_method
from ..features import FeatureSpec
from ..hashing import PRIME, hash_coefficients, universal_hash
from ..module import (
    EmbeddingModule,
    config_field_per_feature,
    storage_collection,
    storage_values,
    with_values,
)
from ..stages import Pipeline, Stage, StageContext, StageOutput

__all__ = [
    "LowRankConfig",
    "LowRankEmbeddingBagCollection",
    "LowRankTailMapper",
    "low_rank_factors",
    "low_rank_from_trained",
    "output_second_moments",
    "count_second_moments",
    "SVDStages",
    "SVD_PIPELINE",
]


@dataclasses.dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Low-rank tables.

    Args:
        rank: ``r`` per feature: one int for all features, a ``{feature: r or None}`` mapping (``None``: the
            feature keeps its full table, no projection), or ``None`` to let the planner pick the ranks
            from the budget. ``1 <= r <= embedding_dim``; ``r = embedding_dim`` stores more than the full table
            and only serves as a check (with an identity projection it is the plain table).
        tail: ``"hash"`` (default): when rank 1 for every large feature does not fit the budget, the rarest
            ids of large features share hashed tail rows (see the module docstring); ``"none"``: such
            budgets raise :class:`BudgetError`. Budgets that fit without a tail plan exactly as with ``"none"``.
        tail_rows: the sized tail: ``{feature: (exclusive, tail)}`` for the features with a hashed tail (the
            ``exclusive`` most popular ids own rows, the others hash into ``tail`` shared rows); features left
            out keep every row. ``None``: planned (only when needed).
    """

    method = "low_rank"
    rank: int | Mapping[str, int | None] | None = None
    tail: str = "hash"
    tail_rows: Mapping[str, tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        values = self.rank.values() if isinstance(self.rank, Mapping) else [self.rank]
        for v in values:
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise ValueError(
                    f"LowRankConfig.rank must be integers >= 1 (or None in a mapping for a full table), got {v!r}"
                )
        if self.tail not in ("hash", "none"):
            raise ValueError(f"LowRankConfig.tail must be 'hash' (rarest ids share hashed rows) or 'none', "
                             f"got {self.tail!r}")
        if self.tail_rows is not None:
            if not isinstance(self.tail_rows, Mapping):
                raise ValueError("LowRankConfig.tail_rows must map feature names to (exclusive rows, tail rows), "
                                 f"e.g. {{'user': (5000, 5000)}}; got {self.tail_rows!r}")
            clean = {}
            for name, pair in dict(self.tail_rows).items():
                pair = tuple(pair)
                if (len(pair) != 2 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in pair)
                        or pair[1] > PRIME):
                    raise ValueError(f"LowRankConfig.tail_rows[{name!r}] must be (exclusive rows >= 1, tail rows in "
                                     f"[1, 2**31 - 1]), got {pair!r}")
                clean[name] = (int(pair[0]), int(pair[1]))
            object.__setattr__(self, "tail_rows", clean)


def _ranks(features: Sequence[FeatureSpec], config: LowRankConfig) -> list[int | None]:
    """``r`` per feature, ``None`` where the feature keeps its full table."""
    per_feature = config_field_per_feature(config.rank, features, "rank", "low_rank")
    if per_feature is None:
        raise ValueError(
            "low_rank: rank is not set; give a byte budget (build(features, LowRankConfig(), budget=...)) "
            "or LowRankConfig(rank=...)"
        )
    out = []
    for f in features:
        r = per_feature[f.name]
        if r is not None and r > f.embedding_dim:
            raise ValueError(
                f"low_rank: rank {r} of feature {f.name!r} exceeds its embedding_dim {f.embedding_dim}; use a rank "
                f"<= {f.embedding_dim}, or None in a rank mapping to keep the full table"
            )
        out.append(None if r is None else int(r))
    return out


TAIL_PARAM_BYTES = 8 * 8  # per feature of a module with a tail: a0, a1, a2, b, T, K, list start, key base (int64)
EXCLUSIVE_ID_BYTES = 8  # one int64 key per exclusive id of a feature whose counts are not in id order
TAIL_SHARE = 0.5  # a tail feature's stored rows that are shared tail rows (the rest are exclusive rows)
TAIL_ROW_BUDGET = 0.5  # the tail planner's row cap: the capped features at rank 1 use at most this share


def _tails(features: Sequence[FeatureSpec], config: LowRankConfig) -> list[tuple[int, int] | None]:
    """``(exclusive, tail)`` per feature, ``None`` where the feature keeps every row."""
    tail_rows = config.tail_rows or {}
    unknown = sorted(set(tail_rows) - {f.name for f in features})
    if unknown:
        raise ValueError(f"low_rank: tail_rows names unknown feature(s) {unknown}; features are "
                         f"{[f.name for f in features]}")
    out = []
    for f in features:
        pair = tail_rows.get(f.name)
        if pair is not None and sum(pair) >= f.num_embeddings:
            raise ValueError(f"low_rank: feature {f.name!r}: tail_rows {pair} must store fewer rows than its "
                             f"{f.num_embeddings:,} ids; leave the feature out of tail_rows to keep every row")
        out.append(pair)
    return out


def _in_id_order(f: FeatureSpec) -> bool:
    """Whether id order is popularity order: counts decreasing, or no (or all-zero) counts."""
    c = f.counts
    return c is None or int(c.sum()) == 0 or bool(np.all(c[:-1] >= c[1:]))


def _exclusive_ids(f: FeatureSpec, exclusive: int) -> np.ndarray:
    """The ``exclusive`` most counted ids of ``f``, sorted by id (ties by id)."""
    return np.sort(np.argsort(-f.counts, kind="stable")[:exclusive])


def _tail_extra_bytes(f: FeatureSpec, exclusive: int) -> int:
    """What a tail adds beyond its rows: the exclusive-id list when the counts are not in id order."""
    return 0 if _in_id_order(f) else exclusive * EXCLUSIVE_ID_BYTES


def _stored(f: FeatureSpec, tail: tuple[int, int] | None) -> FeatureSpec:
    """The rows ``f`` stores, as a feature (no counts: the planner only needs its size)."""
    return f if tail is None else FeatureSpec(f.name, sum(tail), f.embedding_dim)


def _bytes(f: FeatureSpec, rank: int | None) -> int:
    if rank is None:
        return f.full_table_bytes
    return (f.num_embeddings + f.embedding_dim) * rank * FP32


def _compressible(f: FeatureSpec) -> bool:
    return f.num_embeddings + f.embedding_dim < f.num_embeddings * f.embedding_dim  # rank 1 beats the full table


def _total(features: Sequence[FeatureSpec], ranks: Mapping[str, int | None]) -> int:
    return sum(_bytes(f, ranks[f.name]) for f in features)


def _water_fill(features: Sequence[FeatureSpec], budget_bytes: int,
                fixed: Mapping[str, int]) -> dict[str, int | None] | None:
    """Ranks under the largest feasible cap (``fixed`` ranks kept), then a greedy top-up; None if infeasible."""
    def choice(f: FeatureSpec, cap: int) -> int | None:
        if f.name in fixed:
            return fixed[f.name]
        if f.num_embeddings <= cap or not _compressible(f):
            return None
        return max(1, cap * f.embedding_dim // (f.num_embeddings + f.embedding_dim))

    def total(cap: int) -> int:
        return sum(_bytes(f, choice(f, cap)) for f in features)

    cap = largest_feasible(total, budget_bytes, 1, max(f.num_embeddings for f in features))
    if cap is None:
        return None
    ranks = {f.name: choice(f, cap) for f in features}
    left = budget_bytes - total(cap)
    for f in sorted(features, key=lambda f: -f.num_embeddings):  # greedy top-up, largest first
        r = ranks[f.name]
        if r is None or f.name in fixed:
            continue
        now = _bytes(f, r)
        if f.full_table_bytes - now <= left:
            ranks[f.name] = None
        else:
            ranks[f.name] = (now + left) // ((f.num_embeddings + f.embedding_dim) * FP32)
        left -= _bytes(f, ranks[f.name]) - now
    return ranks


def _tail_split(n: int, cap: int) -> tuple[int, int]:
    """``(exclusive, tail)`` rows of a feature of ``n > cap >= 2`` ids stored in ``cap`` rows."""
    tail = min(PRIME, max(1, int(cap * TAIL_SHARE)))
    return cap - tail, tail


def _solve_tail(features: Sequence[FeatureSpec], budget_bytes: int
                ) -> tuple[dict[str, int | None], dict[str, tuple[int, int]]]:
    """``(ranks, tail_rows)`` with hashed tails (see the module docstring); BudgetError naming the smallest
    budget when even 2 rows per large feature do not fit."""
    def at(cap: int) -> tuple[dict[str, tuple[int, int]], list[FeatureSpec], int]:
        tails, stored, fixed = {}, [], 0
        for f in features:
            if f.num_embeddings > cap and _compressible(f):
                tails[f.name] = _tail_split(f.num_embeddings, cap)
                stored.append(_stored(f, tails[f.name]))
                fixed += _tail_extra_bytes(f, tails[f.name][0])
            else:
                stored.append(f)
        return tails, stored, fixed + (TAIL_PARAM_BYTES * len(features) if tails else 0)

    def floor(cap: int) -> int:  # every large feature at rank 1 (every tail feature is large)
        _, stored, fixed = at(cap)
        return fixed + sum(_bytes(f, 1 if _compressible(f) else None) for f in stored)

    largest = max(f.num_embeddings for f in features)
    if floor(2) > budget_bytes:
        raise smallest_budget_error(
            "low_rank", floor(2), budget_bytes, features,
            "hashed tails: every large feature in 2 rows at rank 1, with its projection and tail parameters; "
            "small features at rank 1 or full",
        )
    cap = largest_feasible(floor, int(TAIL_ROW_BUDGET * budget_bytes), 2, largest) or 2
    while True:
        _, stored, fixed = at(cap)
        ranks = _water_fill(stored, budget_bytes - fixed, {})
        if ranks is not None or cap <= 2:
            break
        cap = max(2, cap // 2)
    if ranks is None:  # cannot happen (floor(2) fits), kept as a guard
        raise smallest_budget_error("low_rank", floor(2), budget_bytes, features, "hashed tails of 2 rows")

    def with_ranks(c: int) -> int:  # the solved ranks kept, more rows
        _, stored, fixed = at(c)
        return fixed + sum(_bytes(f, ranks[f.name]) for f in stored)

    # rank steps are coarse (one more column for every stored row): what they leave goes to more rows
    cap = largest_feasible(with_ranks, budget_bytes, cap, largest) or cap
    return ranks, at(cap)[0]


class LowRankTailMapper(nn.Module):
    """Maps ids to rows of the low-rank tables of a module with hashed tails (ids in, rows out, same layout).

    Buffers: ``tail_params`` (int64 ``[F, 8]``: ``a0, a1, a2, b, T, K, start, key_base`` per feature; a
    feature without a tail has ``T = 1, K = n``, ``start = -1``); ``exclusive_keys`` (int64, sorted), only
    when some tail feature's counts are not in id order: ``key_base_f + id`` for its ``K_f`` most counted
    ids, the features' lists one after another (``start_f`` is where feature ``f``'s list begins). The
    mapping is masks and ``torch.where`` over every id at once: no data-dependent Python branch.
    """

    def __init__(self, features: Sequence[FeatureSpec], tails: Sequence[tuple[int, int] | None],
                 device: torch.device | None = None) -> None:
        super().__init__()
        rows, keys, start, key_base = [], [], 0, 0
        for f, t in zip(features, tails):
            if t is None:
                rows.append([0, 0, 0, 0, 1, f.num_embeddings, -1, 0])
                continue
            exclusive, tail = t
            coefficients = hash_coefficients(0, "low_rank_tail", f.name)
            if _in_id_order(f):
                rows.append(coefficients + [tail, exclusive, -1, 0])
                continue
            rows.append(coefficients + [tail, exclusive, start, key_base])
            keys.append(_exclusive_ids(f, exclusive).astype(np.int64) + key_base)
            start += exclusive
            key_base += f.num_embeddings
        self.register_buffer("tail_params", torch.tensor(rows, dtype=torch.int64, device=device))
        self.has_list = bool(keys)
        if self.has_list:  # each feature's keys are above the previous features': the concatenation is sorted
            self.register_buffer("exclusive_keys", torch.from_numpy(np.concatenate(keys)).to(device))

    def rows(self, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (int64 ``[N]``), ``feature`` (int64 ``[N]``) the index of each id's feature."""
        params = self.tail_params.index_select(0, feature)  # [N, 8]
        tail, exclusive, start = params[:, 4], params[:, 5], params[:, 6]
        listed = start >= 0
        own, found = ids, ~listed & (ids < exclusive)
        if self.has_list:  # a fixed property of the module, not of the data
            keys = self.exclusive_keys
            key = torch.where(listed, ids + params[:, 7], -1)  # -1: below every key, never found
            at = torch.searchsorted(keys, key).clamp(max=keys.numel() - 1)
            found = found | (listed & (keys.index_select(0, at) == key))
            own = torch.where(listed, at - start, ids)
        return torch.where(found, own, exclusive + universal_hash(ids, params[:, :4], tail))

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values = kjt.values().to(torch.int64)
        num_features = self.tail_params.shape[0]
        per_key = kjt.lengths().view(num_features, -1).sum(1)
        feature = torch.repeat_interleave(torch.arange(num_features, device=values.device), per_key,
                                          output_size=values.numel())
        return with_values(kjt, self.rows(values, feature))

    def extra_repr(self) -> str:
        return f"features={self.tail_params.shape[0]}, exclusive_list={self.has_list}"


@register_method(LowRankConfig)
class LowRankEmbeddingBagCollection(EmbeddingModule):
    """Per-feature ``n x r`` tables in one TorchRec ``EmbeddingBagCollection``, projected to ``d`` after pooling.

    Args:
        features, config, pooling, is_weighted, out_of_range, device: see :class:`embtable.EmbeddingModule`.

    Attributes:
        storage: the ``EmbeddingBagCollection`` (table ``f`` is ``n_f x r_f``, or ``n_f x d_f`` when full).
        projections: ``nn.ParameterDict``, ``projections[f]`` is ``P_f`` of shape ``[r_f, d_f]``.

    Shape:
        input: ``KeyedJaggedTensor`` with the features' keys; output: ``KeyedTensor`` ``[B, sum(d_f)]``.

    Example:
        >>> import embtable
        >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("item", 20_000, 16),
        ...          embtable.FeatureSpec("country", 200, 16)]
        >>> m = embtable.build(feats, LowRankConfig(), budget="1/4", seed=0)
        >>> m.config.rank
        {'user': 2, 'item': 13, 'country': None}
        >>> {k: tuple(p.shape) for k, p in m.projections.items()}
        {'user': (2, 16), 'item': (13, 16)}
        >>> embtable.memory_report(m).inference_bytes == ((100_000 + 16) * 2 + (20_000 + 16) * 13 + 200 * 16) * 4
        True
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item", "country"], torch.tensor([99_999, 7, 3]),
        ...                                           torch.tensor([2, 0, 1, 0, 0, 0]))
        >>> m(kjt).values().shape
        torch.Size([2, 48])
        >>> tiny = embtable.plan(feats, LowRankConfig(), "1/100")  # below 1/d: hashed tails (K exclusive, T shared)
        >>> tiny.config.tail_rows, tiny.config.rank, tiny.total_bytes == tiny.budget_bytes
        ({'user': (2656, 2656), 'item': (2656, 2656)}, {'user': 2, 'item': 1, 'country': None}, True)
    """

    def __init__(self, features: Sequence[FeatureSpec], config: LowRankConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.ranks = _ranks(self.features, config)
        self.tails = _tails(self.features, config)
        # only a module with a tail maps ids (a plan without one is the plain low-rank module, bytes unchanged)
        self.mapper = LowRankTailMapper(self.features, self.tails, self.device) if any(self.tails) else None
        self.storage = storage_collection(
            [(f.name, _stored(f, t).num_embeddings, f.embedding_dim if r is None else r, [f.name])
             for f, r, t in zip(self.features, self.ranks, self.tails)],
            self.pooling, self._is_weighted, self.device,
        )
        self.projections = nn.ParameterDict()  # filled in feature order (a plain dict would be sorted by name)
        for f, r in zip(self.features, self.ranks):
            if r is not None:
                self.projections[f.name] = nn.Parameter(torch.empty(r, f.embedding_dim, device=self.device))
        self._widths = [f.embedding_dim if r is None else r for f, r in zip(self.features, self.ranks)]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Tables ``U(-s, s)``, ``s = sqrt(1/n)`` (TorchRec's full-table init); projections ``sqrt(d/r)`` times a
        matrix with orthonormal rows, so a projected row has on average the variance of a full table's row
        (``var(y_j) = var(a) * sum_i P_ij**2``, and ``sum_ij P_ij**2 = d``)."""
        if self.device.type == "meta":
            return
        for f, t in zip(self.features, self.tails):
            s = math.sqrt(1.0 / _stored(f, t).num_embeddings)
            self.storage.embedding_bags[f.name].weight.uniform_(-s, s)
        for p in self.projections.values():
            nn.init.orthogonal_(p)
            p.mul_(math.sqrt(p.shape[1] / p.shape[0]))

    @classmethod
    def training_pipelines(cls):
        """``svd``: train full tables, compress them by SVD to the budget, fine-tune (:data:`SVD_PIPELINE`)."""
        return (SVD_PIPELINE,)

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """The truncated SVD of the trained table (:func:`low_rank_factors`); used by ``compress``."""
        rank = self.ranks[self.feature_names.index(name)]
        target = self.storage.embedding_bags[name].weight
        if rank is None:
            shared = self.load_rows(name, weight)
            return "trained weights copied" + (" (tail rows: the mean of the ids sharing them)" if shared else "")
        table, projection = low_rank_factors(weight.to(target.device), rank)
        shared = self.load_rows(name, table)
        self.projections[name].copy_(projection)
        return f"truncated SVD of the trained table (rank {rank})" + (
            "; a tail row is the mean of the rows of the ids sharing it" if shared else "")

    @torch.no_grad()
    def load_rows(self, name: str, table: torch.Tensor) -> bool:
        """Set feature ``name``'s stored rows from a table with a row per id (``[n, width]``): copied, or with a
        hashed tail each stored row is the mean of its ids' rows. Returns whether rows were shared."""
        position = self.feature_names.index(name)
        target = self.storage.embedding_bags[name].weight
        if self.tails[position] is None:
            target.copy_(table)
            return False
        sums = torch.zeros_like(target)
        hits = torch.zeros(target.shape[0], dtype=target.dtype, device=target.device)
        for start in range(0, table.shape[0], _CHUNK):
            ids = torch.arange(start, min(table.shape[0], start + _CHUNK), device=target.device)
            rows = self.mapper.rows(ids, torch.full_like(ids, position))
            sums.index_add_(0, rows, table[start:start + ids.numel()].to(device=target.device, dtype=target.dtype))
            hits.index_add_(0, rows, torch.ones_like(ids, dtype=target.dtype))
        used = hits > 0
        target[used] = sums[used] / hits[used, None]
        return True

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        if self.mapper is not None:
            kjt = self.mapper(kjt)
        x = storage_values(self.storage(kjt), self.feature_names)  # [B, S]: r_f columns per compressed feature, d_f per full one
        if not self.projections:
            return x
        # per-feature [B, r_f] @ [r_f, d_f] on views of x, then one cat (a padded batched matmul needs column
        # gathers whose cost, measured on CPU for the demo preset, is three times that of these small matmuls)
        pieces = x.split(self._widths, dim=1)
        return torch.cat([piece if r is None else piece @ self.projections[f.name]
                          for piece, f, r in zip(pieces, self.features, self.ranks)], dim=1)  # [B, sum(d_f)]

    def extra_repr(self) -> str:
        ranks = {f.name: r for f, r in zip(self.features, self.ranks) if r is not None}
        tails = {f.name: t for f, t in zip(self.features, self.tails) if t is not None}
        return f"{super().extra_repr()}, ranks={ranks}" + (f", tail_rows={tails}" if tails else "")

    # ----- planning -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.rank is not None or budget_bytes is None:
            return config
        ranks = _water_fill(features, budget_bytes, {})
        if ranks is None and config.tail == "hash":
            ranks, tails = _solve_tail(features, budget_bytes)
            return dataclasses.replace(config, rank=ranks, tail_rows=tails)
        if ranks is None:
            total = sum(_bytes(f, 1 if _compressible(f) else None) for f in features)
            raise BudgetError(
                f"low_rank: rank 1 for every large feature needs {total:,} bytes, over the budget of "
                f"{budget_bytes:,}; a low-rank table keeps every row (at least (n + d) * 4 bytes a feature, about "
                "1/d of its full table), so raise the budget, or use a method whose rows are shared (hash, qr, "
                "unified)",
                total,
            )
        # the largest compressed feature has the coarsest rank steps: try each of its ranks with the others
        # water-filled around it; keep the plan with the fewest compressed features among those that use
        # >= 95% of the budget (small features stay full when they can), else the one that uses the most
        largest = max((f for f in features if ranks[f.name] is not None), key=lambda f: f.num_embeddings,
                      default=None)
        candidates = [ranks]
        if largest is not None:
            candidates += [c for r in range(1, largest.embedding_dim)
                           if (c := _water_fill(features, budget_bytes, {largest.name: r})) is not None]

        def preference(c: dict[str, int | None]) -> tuple:
            used = _total(features, c)
            full_enough = used >= 0.95 * budget_bytes
            return (full_enough, -sum(r is not None for r in c.values()) if full_enough else 0, used)

        ranks = max(candidates, key=preference)
        return dataclasses.replace(config, rank=ranks)

    @classmethod
    def describe(cls, features, config):
        plans = []
        tails = _tails(features, config)
        params = TAIL_PARAM_BYTES if any(tails) else 0
        for f, r, t in zip(features, _ranks(features, config), tails):
            sf = _stored(f, t)
            nbytes = _bytes(sf, r) + params
            if r is None:
                detail = "identity"
            else:
                detail = f"rank {r}: {sf.num_embeddings:,}x{r} table + {r}x{f.embedding_dim} projection"
            if t is not None:
                nbytes += _tail_extra_bytes(f, t[0])
                detail = ("full dim" if r is None else detail) + (
                    f"; {t[0]:,} exclusive ids, the rest hashed into {t[1]:,} tail rows"
                    + ("" if _in_id_order(f) else " (sorted exclusive-id list)"))
            plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, sf.num_embeddings,
                                     f.embedding_dim if r is None else r, nbytes, r is not None or t is not None,
                                     detail))
        return plans, {}


# ----- post-training compression -----
_CHUNK = 1 << 18  # rows per step of the float64 accumulations (bounds the extra memory)


def _gram(weight: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``Wᵀ diag(c) W`` in float64, accumulated over row chunks."""
    d = weight.shape[1]
    out = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK):
        w = weight[start:start + _CHUNK].detach().to(torch.float64)
        if row_weights is not None:
            out += (w * row_weights[start:start + _CHUNK].to(torch.float64).unsqueeze(1)).T @ w
        else:
            out += w.T @ w
    return out


def low_rank_factors(weight: torch.Tensor, rank: int,
                     second_moment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a trained table ``W [n, d]`` into ``A [n, r]`` and ``P [r, d]`` with ``A P ≈ W``.

    ``P = V_rᵀ``, the top-``r`` eigenvectors of ``second_moment`` (``C [d, d]``, default ``Wᵀ W``), and
    ``A = W V_r``. This minimises ``E ||y - y V_r V_rᵀ||²`` over the outputs whose second moment is ``C``;
    for the default it is the truncated SVD of ``W`` (Eckart-Young: the least Frobenius error).

    >>> w = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    >>> a, p = low_rank_factors(w, 6)
    >>> torch.allclose(a @ p, w, atol=1e-5), tuple(a.shape), tuple(p.shape)
    (True, (50, 6), (6, 6))
    """
    n, d = weight.shape
    if not 1 <= rank <= d:
        raise ValueError(f"low_rank_factors: rank must be in [1, {d}] for a table of dim {d}, got {rank}")
    c = _gram(weight) if second_moment is None else second_moment.to(device=weight.device, dtype=torch.float64)
    if c.shape != (d, d):
        raise ValueError(f"low_rank_factors: the second moment must be [{d}, {d}] for a table of dim {d}, "
                         f"got {tuple(c.shape)}")
    _, vectors = torch.linalg.eigh((c + c.T) / 2)  # ascending eigenvalues
    v = vectors[:, -rank:].flip(1)  # [d, r], the leading direction first
    table = torch.empty(n, rank, dtype=weight.dtype, device=weight.device)
    for start in range(0, n, _CHUNK):
        table[start:start + _CHUNK] = (weight[start:start + _CHUNK].detach().to(torch.float64) @ v).to(weight.dtype)
    return table, v.T.contiguous().to(weight.dtype)


def _trained_tables(source) -> tuple[list[FeatureSpec], dict[str, torch.Tensor], dict]:
    """(logical features, weight per feature as stored, build kwargs) of a trained source."""
    from .full import FullEmbeddingBagCollection

    if isinstance(source, FullEmbeddingBagCollection):
        weights = {f.name: source.storage.embedding_bags[f.name].weight for f in source.features}
        kwargs = dict(pooling=source.pooling, is_weighted=source.is_weighted(), out_of_range=source.out_of_range)
        return list(source.logical_features), weights, kwargs
    if isinstance(source, EmbeddingBagCollection):
        features, weights, poolings = [], {}, set()
        for cfg in source.embedding_bag_configs():
            if len(cfg.feature_names) != 1:
                raise ValueError(
                    f"low_rank_from_trained: table {cfg.name!r} serves features {cfg.feature_names}; a low-rank "
                    "module has one table per feature; give it a collection with one feature per table"
                )
            name = cfg.feature_names[0]
            features.append(FeatureSpec(name, cfg.num_embeddings, cfg.embedding_dim))
            weights[name] = source.embedding_bags[cfg.name].weight
            poolings.add(cfg.pooling)
        if not poolings <= {PoolingType.SUM, PoolingType.MEAN} or len(poolings) != 1:
            raise ValueError(f"low_rank_from_trained: all tables must pool with SUM or all with MEAN, got {poolings}")
        pooling = Pooling.SUM if poolings == {PoolingType.SUM} else Pooling.MEAN
        return features, weights, dict(pooling=pooling, is_weighted=source.is_weighted())
    if isinstance(source, nn.Embedding | nn.EmbeddingBag):
        source = source.weight
    if isinstance(source, torch.Tensor) and source.dim() == 2:
        return [FeatureSpec("table", *source.shape)], {"table": source}, {}
    raise TypeError(
        "low_rank_from_trained takes a FullEmbeddingBagCollection, a torchrec EmbeddingBagCollection, an "
        f"nn.Embedding / nn.EmbeddingBag or a [n, d] weight tensor; got {type(source).__name__}"
    )


def count_second_moments(source, counts: Mapping[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """``Wᵀ diag(counts) W / sum(counts)`` per feature: the outputs' second moment for one-id bags whose ids
    occur with frequencies ``counts``.

    Args:
        source: a trained table (see :func:`low_rank_from_trained`).
        counts: ``{feature: counts [n]}``; default: the ``counts`` of the source's ``FeatureSpec``s (a
            ``FullEmbeddingBagCollection``). Features without counts are left out (plain SVD).
    """
    features, weights, _ = _trained_tables(source)
    out = {}
    for f in features:
        c = counts.get(f.name) if counts is not None else f.counts
        if c is None:
            continue
        w = weights[f.name]
        c = torch.as_tensor(np.asarray(c), dtype=torch.float64, device=w.device)
        if c.shape[0] < w.shape[0]:  # a reserved out-of-range row the counts do not cover
            c = torch.cat([c, c.new_zeros(w.shape[0] - c.shape[0])])
        if c.shape != (w.shape[0],):
            raise ValueError(f"count_second_moments: feature {f.name!r} has {w.shape[0]} rows but "
                             f"{c.shape[0]} counts")
        out[f.name] = _gram(w, c) / max(float(c.sum()), 1.0)
    return out


@torch.no_grad()
def output_second_moments(module: nn.Module, batches: Iterable[KeyedJaggedTensor]) -> dict[str, torch.Tensor]:
    """``E[y yᵀ]`` of each feature's pooled output ``y`` of ``module`` over ``batches`` (float64, ``[d, d]``).

    Args:
        module: any ``EmbeddingBagCollection``-like module (the trained full table).
        batches: ``KeyedJaggedTensor``s of the data the compressed table should serve.
    """
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for kjt in batches:
        out = module(kjt)
        for key in out.keys():
            y = out[key].to(torch.float64)
            sums[key] = sums.get(key, 0) + y.T @ y
        count += kjt.stride()
    if count == 0:
        raise ValueError("output_second_moments: no batches (or only empty ones) were given")
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def low_rank_from_trained(
    source,
    rank: int | Mapping[str, int | None] | None = None,
    budget: Budget | int | float | str | None = None,
    *,
    second_moments: Mapping[str, torch.Tensor] | None = None,
    out_of_range: OutOfRange | str | None = None,
    device: torch.device | str | None = None,
) -> LowRankEmbeddingBagCollection:
    """Compress a trained full table into a :class:`LowRankEmbeddingBagCollection`, ready for fine-tuning.

    Args:
        source: a ``FullEmbeddingBagCollection``, a torchrec ``EmbeddingBagCollection`` (one feature per
            table), an ``nn.Embedding`` / ``nn.EmbeddingBag`` or a ``[n, d]`` weight tensor (one feature
            named ``"table"``). Pooling, weighting and the out-of-range policy are taken from it.
        rank: ranks as in :class:`LowRankConfig`, or ``None`` to plan them from ``budget``.
        budget: the byte budget (bytes, fraction of the full tables, or :class:`embtable.Budget`).
        second_moments: ``{feature: C [d, d]}``, the second moments of the outputs to keep
            (:func:`output_second_moments` on data, or :func:`count_second_moments`); features left out use
            ``Wᵀ W``, i.e. the truncated SVD of the table.
        out_of_range: overrides the source's policy (a tensor source defaults to ``"error"``).
        device: where to build (default: the source's device).

    Example:
        >>> import embtable
        >>> full = embtable.build([embtable.FeatureSpec("a", 1000, 8)], embtable.FullConfig(), seed=0)
        >>> small = low_rank_from_trained(full, budget="1/4")
        >>> small.config.rank, embtable.memory_report(small).inference_bytes <= 1000 * 8 * 4 // 4
        ({'a': 1}, True)
    """
    features, weights, kwargs = _trained_tables(source)
    if out_of_range is not None:
        kwargs["out_of_range"] = out_of_range
    if device is None:
        device = next(iter(weights.values())).device
    config = LowRankConfig(rank=rank)
    module = build(features, config, budget, device=device, **kwargs)
    for f, r in zip(module.features, module.ranks):
        w = weights[f.name]
        if tuple(w.shape) != (f.num_embeddings, f.embedding_dim):
            raise ValueError(
                f"low_rank_from_trained: feature {f.name!r} has a {tuple(w.shape)} table but the module stores "
                f"{f.num_embeddings} x {f.embedding_dim} rows; build both with the same out_of_range policy"
            )
        if r is None:
            module.load_rows(f.name, w)
            continue
        moment = None if second_moments is None else second_moments.get(f.name)
        table, projection = low_rank_factors(w.to(module.projections[f.name].device), r, moment)
        module.load_rows(f.name, table)  # with a hashed tail: a tail row is the mean of its ids' rows
        module.projections[f.name].copy_(projection)
    return module


# ----- post-training compression as stages (embtable.stages): train full -> SVD to the budget -> fine-tune -----

@dataclasses.dataclass(frozen=True)
class SVDStages:
    """Options of the ``svd`` pipeline (the data, model, optimizers, budget and seed come from the run).

    Args:
        moments: ``"table"`` (truncated SVD of each trained table) or ``"data"`` (keep most of the energy
            of the table's outputs on up to 50 training batches, :func:`output_second_moments`).
        finetune_steps: steps of fine-tuning the compressed model; ``None``: one epoch.
    """

    moments: str = "table"
    finetune_steps: int | None = None

    def __post_init__(self) -> None:
        if self.moments not in ("table", "data"):
            raise ValueError(f"moments must be 'table' or 'data', got {self.moments!r}")
        steps = self.finetune_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"finetune_steps must be an integer >= 1, got {steps!r}")


def _full_stage(context: StageContext) -> StageOutput:
    """Stage 1: full tables, trained for the run's length."""
    from .full import FullConfig

    if context.budget_bytes is None:
        raise ValueError("low-rank compression needs embedding.budget (e.g. --budget 1/8)")
    return StageOutput(embedding=build(context.features, FullConfig(), seed=context.seed, **context.build_kwargs))


def _compress_stage(context: StageContext) -> StageOutput:
    """Stage 2: the trained tables compressed to the budget (:func:`low_rank_from_trained`), the model's other
    layers kept."""
    full, model = context.embedding, context.model
    metrics = {s: context.evaluate(model, s) for s in ("valid", "test")}
    second = None
    if context.options.moments == "data":
        batches = itertools.islice(iter(context.train_batches(0)), 50)
        second = output_second_moments(full, (b.sparse_features for b in batches))
    compressed = low_rank_from_trained(full, budget=context.budget_bytes, second_moments=second)
    sized = compressed.config.to_dict()
    record = {
        "moments": context.options.moments, "ranks": sized["rank"],
        "tail_rows": None if sized.get("tail_rows") is None else {k: list(v) for k, v in sized["tail_rows"].items()},
        "full_inference_bytes": full.memory().inference_bytes,
        "full": {"valid_auc": metrics["valid"]["auc"], "test_auc": metrics["test"]["auc"],
                 "test_logloss": metrics["test"]["logloss"]},
    }
    return StageOutput(embedding=compressed, keep_dense=True, record=record)


def _finetune_stage(context: StageContext) -> StageOutput:
    """Stage 3: the compressed model as it starts fine-tuning (its metrics recorded), then trained."""
    before = {s: context.evaluate(context.model, s) for s in ("valid", "test")}
    return StageOutput(record={"compressed": {f"{s}_{k}": before[s][k] for s in before for k in ("auc", "logloss")}})


def _svd_stages(o: SVDStages) -> tuple[Stage, ...]:
    return (Stage("full", _full_stage), Stage("compress", _compress_stage, train=False),
            Stage("finetune", _finetune_stage, epochs=1 if o.finetune_steps is None else None,
                  max_steps=o.finetune_steps))


#: the post-training path of the module docstring, as stages
SVD_PIPELINE = Pipeline("svd", LowRankConfig.method, SVDStages, _svd_stages)
