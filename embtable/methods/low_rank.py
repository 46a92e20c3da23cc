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
projection has no bias.) The module is then fine-tuned like any other.

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
stay below 95% of the budget, and budgets below about ``1/d`` of the full tables are out of reach (every
row is kept, at rank >= 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, Budget, BudgetError, FeaturePlan, largest_feasible
from ..build import build
from ..config import MethodConfig, OutOfRange, Pooling, register_method
from ..features import FeatureSpec
from ..module import EmbeddingModule, config_field_per_feature, storage_collection, storage_values

__all__ = [
    "LowRankConfig",
    "LowRankEmbeddingBagCollection",
    "low_rank_factors",
    "low_rank_from_trained",
    "output_second_moments",
    "count_second_moments",
]


@dataclasses.dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Low-rank tables.

    Args:
        rank: ``r`` per feature: one int for all features, a ``{feature: r or None}`` mapping (``None``: the
            feature keeps its full table, no projection), or ``None`` to let the planner pick the ranks
            from the budget. ``1 <= r <= embedding_dim``; ``r = embedding_dim`` stores more than the full table
            and only serves as a check (with an identity projection it is the plain table).
    """

    method = "low_rank"
    rank: int | Mapping[str, int | None] | None = None

    def __post_init__(self) -> None:
        values = self.rank.values() if isinstance(self.rank, Mapping) else [self.rank]
        for v in values:
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise ValueError(
                    f"LowRankConfig.rank must be integers >= 1 (or None in a mapping for a full table), got {v!r}"
                )


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
    """

    def __init__(self, features: Sequence[FeatureSpec], config: LowRankConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.ranks = _ranks(self.features, config)
        self.storage = storage_collection(
            [(f.name, f.num_embeddings, f.embedding_dim if r is None else r, [f.name])
             for f, r in zip(self.features, self.ranks)],
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
        for f in self.features:
            s = math.sqrt(1.0 / f.num_embeddings)
            self.storage.embedding_bags[f.name].weight.uniform_(-s, s)
        for p in self.projections.values():
            nn.init.orthogonal_(p)
            p.mul_(math.sqrt(p.shape[1] / p.shape[0]))

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """The truncated SVD of the trained table (:func:`low_rank_factors`); used by ``compress``."""
        rank = self.ranks[self.feature_names.index(name)]
        target = self.storage.embedding_bags[name].weight
        if rank is None:
            target.copy_(weight)
            return "trained weights copied"
        table, projection = low_rank_factors(weight.to(target.device), rank)
        target.copy_(table)
        self.projections[name].copy_(projection)
        return f"truncated SVD of the trained table (rank {rank})"

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
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
        return f"{super().extra_repr()}, ranks={ranks}"

    # ----- planning -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.rank is not None or budget_bytes is None:
            return config
        ranks = _water_fill(features, budget_bytes, {})
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
        for f, r in zip(features, _ranks(features, config)):
            if r is None:
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings,
                                         f.embedding_dim, f.full_table_bytes, False, "identity"))
            else:
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings, r,
                                         _bytes(f, r), True,
                                         f"rank {r}: {f.num_embeddings:,}x{r} table + {r}x{f.embedding_dim} projection"))
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
        target = module.storage.embedding_bags[f.name].weight
        if r is None:
            target.copy_(w)
            continue
        moment = None if second_moments is None else second_moments.get(f.name)
        table, projection = low_rank_factors(w.to(target.device), r, moment)
        target.copy_(table)
        module.projections[f.name].copy_(projection)
    return module
