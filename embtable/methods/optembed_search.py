"""OptEmbed's supernet and its budget-constrained search (Lyu et al., CIKM 2022, "OptEmbed").

Stage 1, the supernet (:class:`OptEmbedSupernet`): full tables; row ``i`` of field ``f`` is kept when its
norm exceeds a learnable per-field threshold, ``mask = 1[||e_i|| - t_f > 0]``. The step function is
trained straight-through with the long-tailed surrogate derivative of Dynamic Sparse Training (Liu et
al., ICLR 2020): ``H'(x) = 2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` for ``0.4 < |x| <= 1``, ``0`` beyond.
The regulariser ``alpha * sum_f exp(-t_f)`` (:meth:`OptEmbedSupernet.auxiliary_loss`) pushes the
thresholds up. While training, each field uses a prefix of its dims whose length is drawn uniformly
from ``[min_dim, D]`` every batch, so every candidate dim is trained; in eval mode a given dim
assignment (and optionally explicit kept rows) is used.

Stage 2, the search (:func:`evolutionary_search`): per-field dims evolve by mutation and crossover
(seeded, resumable from a :class:`SearchState`); a candidate's fitness is the validation AUC of the
supernet with those dims and with the rows that :func:`fit_rows` keeps. Unlike the paper, the search
respects a byte budget: :func:`fit_rows` raises all thresholds by one common margin ``c >= 0`` (keeps the
rows with ``||e_i|| - t_f > c``) until the compact table's bytes (rows x dims + remap, exactly
:class:`~embtable.methods.optembed.OptEmbedEmbeddingBagCollection`'s) fit; a candidate that cannot fit
even with one row per field does not survive.

Stage 3, retraining, builds the compact table (:func:`compact_from_supernet` or from scratch). The three
stages are declared as :data:`PIPELINE` (options :class:`OptEmbedStages`; see :mod:`embtable.stages`);
a trainer runs them, e.g. ``python -m experiments.training.stages optembed demo --budget 1/4 --out DIR``.

Supernet memory: ``sum_f n_f * D_f * 4 + F * 4`` bytes (full tables and one fp32 threshold per field).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, BudgetError, FeaturePlan
from ..config import MethodConfig, Pooling
from ..features import FeatureSpec
from ..module import EmbeddingModule
from ..stages import Pipeline, Stage, StageContext, StageFailed, StageOutput
from .optembed import OptEmbedConfig, OptEmbedEmbeddingBagCollection, field_bytes

__all__ = [
    "OptEmbedSupernetConfig",
    "OptEmbedSupernet",
    "step_ste",
    "RowFit",
    "SortedMargins",
    "fit_rows",
    "SearchConfig",
    "SearchState",
    "evolutionary_search",
    "compact_config",
    "compact_from_supernet",
    "OptEmbedStages",
    "PIPELINE",
]


class _StepSTE(torch.autograd.Function):
    """Unit step forward, DST's long-tailed surrogate derivative backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        a = x.abs()
        surrogate = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))
        return grad * surrogate


def step_ste(x: torch.Tensor) -> torch.Tensor:
    """``1[x > 0]`` with a straight-through surrogate gradient.

    >>> x = torch.tensor([-2.0, -0.1, 0.3, 0.7], requires_grad=True)
    >>> step_ste(x).tolist()
    [0.0, 0.0, 1.0, 1.0]
    >>> step_ste(x).sum().backward(); [round(g, 2) for g in x.grad.tolist()]
    [0.0, 1.6, 0.8, 0.4]
    """
    return _StepSTE.apply(x)


@dataclasses.dataclass(frozen=True)
class OptEmbedSupernetConfig(MethodConfig):
    """OptEmbed's supernet (stage 1).

    Args:
        threshold_init: initial per-field threshold; at 0 no row is pruned at first (norms are > 0).
        threshold_reg: ``alpha`` of the regulariser ``alpha * sum_f exp(-t_f)`` that pushes thresholds up
            (more pruning); 0 disables it.
        norm: row norm compared with the threshold, ``"l1"`` (the paper) or ``"l2"``.
        min_dim: smallest dim a field samples while training (and the search may choose).
        sample_dims: draw a dim prefix per field per training batch (the paper); ``False`` trains full dims.
    """

    method = "optembed_supernet"
    threshold_init: float = 0.0
    threshold_reg: float = 1e-4
    norm: str = "l1"
    min_dim: int = 1
    sample_dims: bool = True

    def __post_init__(self) -> None:
        if self.norm not in ("l1", "l2"):
            raise ValueError(f"OptEmbedSupernetConfig.norm must be 'l1' or 'l2', got {self.norm!r}")
        if self.threshold_reg < 0 or not math.isfinite(self.threshold_reg):
            raise ValueError(f"OptEmbedSupernetConfig.threshold_reg must be a finite value >= 0, got {self.threshold_reg}")
        if int(self.min_dim) != self.min_dim or self.min_dim < 1:
            raise ValueError(f"OptEmbedSupernetConfig.min_dim must be an integer >= 1, got {self.min_dim!r}")


class OptEmbedSupernet(EmbeddingModule):
    """Full tables with learnable row pruning and sampled per-field dims (OptEmbed's stage 1).

    Not a registered method (it needs the full tables, so it fits no compressing budget); build it
    directly. Storage: one TorchRec ``EmbeddingCollection`` per distinct base dim (unpooled lookups:
    the row mask acts before pooling). Output: ``[B, sum(D_f)]`` with the unused dims zero.

    >>> feats = [FeatureSpec("a", 100, 8), FeatureSpec("b", 20, 8)]
    >>> net = OptEmbedSupernet(feats, OptEmbedSupernetConfig())
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1, 0]))
    >>> _ = net.eval(); net.set_eval(dims=[2, 8])
    >>> out = net(kjt).values()
    >>> out.shape, bool((out[:, 2:8] == 0).all())
    (torch.Size([2, 16]), True)
    >>> round(float(net.auxiliary_loss()), 6)   # alpha * sum_f exp(-t_f) at t = 0
    0.0002
    """

    config_cls = OptEmbedSupernetConfig

    def __init__(self, features: Sequence[FeatureSpec], config: OptEmbedSupernetConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        too_small = [f.name for f in self.features if f.embedding_dim < config.min_dim]
        if too_small:
            raise ValueError(f"optembed supernet: min_dim={config.min_dim} exceeds the embedding_dim of {too_small}")
        groups: dict[int, list[FeatureSpec]] = {}
        for f in self.features:
            groups.setdefault(f.embedding_dim, []).append(f)
        self._groups = {f"dim{d}": [i for i, f in enumerate(self.features) if f.embedding_dim == d] for d in groups}
        self.storage = nn.ModuleDict({
            f"dim{d}": EmbeddingCollection(
                tables=[EmbeddingConfig(name=f.name, num_embeddings=f.num_embeddings, embedding_dim=d,
                                        feature_names=[f.name]) for f in fs],
                device=self.device,
            )
            for d, fs in groups.items()
        })
        self.thresholds = nn.Parameter(torch.full((len(self.features),), float(config.threshold_init),
                                                  device=self.device))
        self.eval_dims: list[int] = []
        self.eval_keep: list[torch.Tensor] | None = None
        self._eval_keep_flat: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.set_eval()

    # ----- search-time settings (plain attributes, not state) -----
    def set_eval(self, dims: Sequence[int] | None = None, keep: Sequence[torch.Tensor] | None = None) -> None:
        """Dims (default: all) and kept-row masks (``[n_f]`` bool per field; default: the learned thresholds)
        used in eval mode."""
        dims = list(self.embedding_dims) if dims is None else [int(d) for d in dims]
        if len(dims) != len(self.features) or any(not 1 <= d <= D for d, D in zip(dims, self.embedding_dims)):
            raise ValueError(f"dims must give one dim in [1, embedding_dim] per feature, got {dims}")
        if keep is not None:
            keep = [torch.as_tensor(k, dtype=torch.bool, device=self.device) for k in keep]
            if [k.numel() for k in keep] != [f.num_embeddings for f in self.features]:
                raise ValueError("keep must give one [num_embeddings] bool mask per feature")
        self.eval_dims, self.eval_keep = dims, keep
        self._eval_keep_flat = {}
        if keep is not None:  # per group: the masks end to end, and where each field's starts
            for name, members in self._groups.items():
                sizes = torch.tensor([0] + [self.features[i].num_embeddings for i in members[:-1]])
                self._eval_keep_flat[name] = (torch.cat([keep[i] for i in members]),
                                              torch.cumsum(sizes, 0).to(self.device))

    def tables(self) -> dict[str, torch.Tensor]:
        """Each feature's full table weight ``[n_f, D_f]``."""
        out = {}
        for ec in self.storage.values():
            for name, emb in ec.embeddings.items():
                out[name] = emb.weight
        return out

    @torch.no_grad()
    def row_margins(self) -> dict[str, np.ndarray]:
        """``||e_i|| - t_f`` for every row (float64); a row is kept by the learned mask when > 0."""
        tables = self.tables()
        out = {}
        for i, f in enumerate(self.features):
            w = tables[f.name].detach().float()
            norm = w.abs().sum(1) if self.config.norm == "l1" else w.norm(dim=1)
            out[f.name] = (norm.double() - float(self.thresholds[i])).cpu().numpy()
        return out

    def inference_module(self) -> nn.Module:
        """Refused: the supernet is a training stage (full tables and masks), not a serving form."""
        raise ValueError(
            "it is an OptEmbed supernet (a training stage: full tables and masks); build the compact table first "
            "(embtable.methods.optembed_search.compact_from_supernet, then retrain) and export that"
        )

    def auxiliary_loss(self) -> torch.Tensor | None:
        if self.config.threshold_reg == 0:
            return None
        return self.config.threshold_reg * torch.exp(-self.thresholds).sum()

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        batch = kjt.stride()
        counts = kjt.length_per_key()
        ids_per_key = kjt.values().split(counts)
        weights = kjt.weights_or_none()
        weights_per_key = weights.split(counts) if weights is not None else None
        lengths_per_key = kjt.lengths().view(len(self.features), batch)
        out: list[torch.Tensor | None] = [None] * len(self.features)
        for dim, ec in self.storage.items():
            members = self._groups[dim]  # feature indices stored in this EmbeddingCollection
            looked_up = ec(kjt)
            D = self.embedding_dims[members[0]]
            rows = torch.cat([looked_up[self.feature_names[i]].values() for i in members])  # [N, D]
            n_ids = torch.tensor([counts[i] for i in members], device=rows.device)
            field = torch.repeat_interleave(torch.arange(len(members), device=rows.device), n_ids,
                                            output_size=rows.shape[0])  # [N] position in the group
            if self.training or self.eval_keep is None:
                norm = rows.abs().sum(1) if self.config.norm == "l1" else rows.norm(dim=1)
                x = norm - self.thresholds[torch.tensor(members, device=rows.device)][field]
                mask = step_ste(x) if self.training else (x > 0).to(rows.dtype)
            else:
                keep, offsets = self._eval_keep_flat[dim]
                ids = torch.cat([ids_per_key[i] for i in members])
                mask = keep[ids + offsets[field]].to(rows.dtype)
            if weights_per_key is not None:
                mask = mask * torch.cat([weights_per_key[i] for i in members])
            lengths = lengths_per_key[members].reshape(-1)  # [G * B]
            bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths,
                                          output_size=rows.shape[0])
            pooled = torch.zeros(lengths.numel(), D, dtype=rows.dtype, device=rows.device)
            pooled = pooled.index_add(0, bag, rows * mask.unsqueeze(1))  # [G * B, D]
            if self.pooling is Pooling.MEAN:
                pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(rows.dtype)
            dims = self._dims(members)  # [G]
            prefix = (torch.arange(D, device=rows.device) < dims.unsqueeze(1)).to(rows.dtype)  # [G, D]
            pooled = pooled.view(len(members), batch, D) * prefix.unsqueeze(1)  # [G, B, D]
            for g, i in enumerate(members):
                out[i] = pooled[g]
        return torch.cat(out, dim=1)  # [B, sum(D_f)]

    def _dims(self, members: list[int]) -> torch.Tensor:
        """The dim each member field uses now: sampled in training, ``eval_dims`` in eval mode."""
        D = self.embedding_dims[members[0]]
        if not self.training:
            return torch.tensor([self.eval_dims[i] for i in members], device=self.thresholds.device)
        if not self.config.sample_dims:
            return torch.full((len(members),), D, device=self.thresholds.device)
        return torch.randint(self.config.min_dim, D + 1, (len(members),)).to(self.thresholds.device)

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        need = sum(f.full_table_bytes for f in features) + len(features) * FP32
        if budget_bytes is not None and need > budget_bytes:
            raise BudgetError(
                f"optembed supernet: the full tables and thresholds need {need:,} bytes, over the budget of "
                f"{budget_bytes:,}; the supernet is trained at full size and the budget applies to the "
                "compact table the search produces"
            )
        return config

    @classmethod
    def describe(cls, features, config):
        plans = [FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings, f.embedding_dim,
                             f.full_table_bytes + FP32, False, "supernet: full table + threshold")
                 for f in features]
        return plans, {}


# ---------------------------------------------------------------------------------------------------
# Fitting kept rows to the budget


@dataclasses.dataclass(frozen=True)
class RowFit:
    """The rows kept for one dim assignment.

    Attributes:
        cut: the common margin ``c``: a row is kept when ``||e|| - t_f > c``.
        num_kept: rows kept per feature.
        kept_ids: sorted kept ids per feature.
        total_bytes: exact bytes of the compact table (equal to the built module's).
    """

    cut: float
    num_kept: dict[str, int]
    kept_ids: dict[str, np.ndarray]
    total_bytes: int


def field_cost(f: FeatureSpec, kept: int, dim: int, oov_buckets: int, remap: str) -> tuple[int, int]:
    """(rows kept, bytes): a field whose pruned storage would cost as much as its whole table keeps it all."""
    full = f.num_embeddings * dim * FP32
    if kept >= f.num_embeddings:
        return f.num_embeddings, full
    pruned = field_bytes(f.num_embeddings, kept, dim, oov_buckets, remap)
    return (f.num_embeddings, full) if pruned >= full else (kept, pruned)


class SortedMargins:
    """Row margins sorted once, for many :func:`fit_rows` calls (one per search candidate).

    Args:
        margins: ``||e_i|| - t_f`` per feature (:meth:`OptEmbedSupernet.row_margins`).
    """

    def __init__(self, margins: Mapping[str, np.ndarray]) -> None:
        self.raw = {k: np.asarray(v, dtype=np.float64) for k, v in margins.items()}
        self.ascending = {k: np.sort(v) for k, v in self.raw.items()}
        positive = [a[a > 0] for a in self.ascending.values()]
        self.levels = np.unique(np.concatenate(positive + [np.zeros(1)]))  # candidate cuts, 0 first


def fit_rows(
    features: Sequence[FeatureSpec],
    margins: Mapping[str, np.ndarray] | SortedMargins,
    dims: Sequence[int],
    budget_bytes: int | None,
    *,
    oov_buckets: int = 0,
    remap: str = "auto",
) -> RowFit | None:
    """Keep the rows with ``margin > c`` for the smallest ``c >= 0`` whose compact table fits the budget.

    Every field keeps at least its best row. Returns ``None`` when even one row per field does not fit.

    Args:
        features: the features (``num_embeddings`` and order).
        margins: ``||e_i|| - t_f`` per feature (:meth:`OptEmbedSupernet.row_margins`), or
            :class:`SortedMargins` of them (sorted once for many calls).
        dims: the dim of each feature's stored rows.
        budget_bytes: the compact table's byte budget (``None``: the learned thresholds, ``c = 0``).

    >>> feats = [FeatureSpec("a", 6, 4)]
    >>> m = {"a": np.array([0.5, -0.1, 0.2, 0.9, 0.05, 0.3])}
    >>> fit = fit_rows(feats, m, [4], budget_bytes=70)   # c = 0 keeps 5 rows: 80 + 20 > the whole 96
    >>> fit.cut, fit.num_kept, fit.kept_ids["a"].tolist(), fit.total_bytes
    (0.2, {'a': 3}, [0, 3, 5], 60)
    """
    prepared = margins if isinstance(margins, SortedMargins) else SortedMargins(margins)
    asc = prepared.ascending

    def counts(cut: float) -> list[tuple[int, int]]:
        out = []
        for f, d in zip(features, dims):
            kept = max(1, f.num_embeddings - int(np.searchsorted(asc[f.name], cut, side="right")))
            out.append(field_cost(f, kept, d, oov_buckets, remap))
        return out

    def total(cut: float) -> int:
        return sum(b for _, b in counts(cut))

    cut = 0.0
    if budget_bytes is not None and total(0.0) > budget_bytes:
        levels = prepared.levels
        if total(float(levels[-1])) > budget_bytes:
            return None
        lo, hi = 0, len(levels) - 1  # total(levels[hi]) fits, total(levels[0] = 0) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if total(float(levels[mid])) <= budget_bytes:
                hi = mid
            else:
                lo = mid
        cut = float(levels[hi])
    kept_ids, num_kept = {}, {}
    for f, (kept, _) in zip(features, counts(cut)):
        m = prepared.raw[f.name]
        if kept == f.num_embeddings:
            ids = np.arange(f.num_embeddings, dtype=np.int64)
        else:
            ids = np.flatnonzero(m > cut)
            if ids.size == 0:
                ids = np.array([int(np.argmax(m))])
        kept_ids[f.name], num_kept[f.name] = ids.astype(np.int64), int(ids.size)
    return RowFit(cut, num_kept, kept_ids, total(cut))


def compact_config(features: Sequence[FeatureSpec], fit: RowFit, dims: Sequence[int], *,
                   oov_buckets: int = 0, remap: str = "auto", seed: int = 0) -> OptEmbedConfig:
    """The :class:`OptEmbedConfig` of a search result."""
    return OptEmbedConfig(
        num_kept=dict(fit.num_kept), dims={f.name: int(d) for f, d in zip(features, dims)},
        oov_buckets=oov_buckets, remap=remap, seed=seed,
    )


@torch.no_grad()
def compact_from_supernet(
    supernet: OptEmbedSupernet, config: OptEmbedConfig, kept_ids: Mapping[str, np.ndarray], **kwargs: Any
) -> OptEmbedEmbeddingBagCollection:
    """The compact table holding the supernet's kept rows, truncated to each field's dim.

    OOV rows (if any) start at zero, the vector pruned ids had in the supernet. ``kwargs`` go to the
    module (``pooling``, ``is_weighted``, ``out_of_range``, ``device``); use the supernet's.
    """
    module = OptEmbedEmbeddingBagCollection(supernet.logical_features, config, **kwargs)
    module.set_kept_ids(kept_ids)
    tables = supernet.tables()
    kept = module.kept_ids()
    for f, lay in zip(module.features, module.layouts):
        weight = module.storage.embedding_bags[f.name].weight
        weight.zero_()
        ids = kept[f.name].to(tables[f.name].device)
        weight[: lay.kept] = tables[f.name][ids, : lay.dim].to(weight.device)
    return module


# ---------------------------------------------------------------------------------------------------
# Evolutionary search over per-field dims


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Evolutionary search over per-field dims (mutation + crossover, as in one-shot NAS).

    Args:
        population: candidates evaluated per generation.
        generations: generations (the first is random).
        parents: the best candidates so far that breed the next generation.
        mutation_prob: chance that a mutated child redraws each field's dim.
        seed: seeds every random draw (generation ``g`` draws from ``default_rng([seed, g])``).
    """

    population: int = 20
    generations: int = 10
    parents: int = 10
    mutation_prob: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "generations", "parents"):
            if getattr(self, name) < 1:
                raise ValueError(f"SearchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.mutation_prob <= 1:
            raise ValueError(f"SearchConfig.mutation_prob must be in (0, 1], got {self.mutation_prob}")


@dataclasses.dataclass
class SearchState:
    """Where a search stands (plain data: checkpoint it, resume from it).

    Attributes:
        generation: the generation being evaluated.
        population: its candidates (a dim per field).
        fitness: every candidate evaluated so far: ``"d1,d2,..."`` -> fitness.
        history: per finished generation: best dims and fitness so far, candidates evaluated.
        done: the last generation is evaluated.
    """

    generation: int = 0
    population: list[list[int]] = dataclasses.field(default_factory=list)
    fitness: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchState:
        return cls(**{k: data[k] for k in ("generation", "population", "fitness", "history", "done")})

    def ranked(self) -> list[tuple[list[int], float]]:
        """Evaluated candidates, best first (ties: smaller dims first, deterministic)."""
        items = [([int(d) for d in key.split(",")], value) for key, value in self.fitness.items()]
        return sorted(items, key=lambda kv: (-kv[1], kv[0]))

    @property
    def best(self) -> tuple[list[int], float]:
        return self.ranked()[0]


def _key(dims: Sequence[int]) -> str:
    return ",".join(str(int(d)) for d in dims)


def evolutionary_search(
    fitness: Callable[[list[int]], float],
    feasible: Callable[[list[int]], bool],
    max_dims: Sequence[int],
    config: SearchConfig,
    *,
    min_dim: int = 1,
    state: SearchState | None = None,
    on_progress: Callable[[SearchState], None] | None = None,
) -> SearchState:
    """Search per-field dims that maximise ``fitness`` among ``feasible`` candidates.

    Args:
        fitness: dims -> score (higher is better), e.g. the supernet's validation AUC.
        feasible: dims -> whether the candidate fits the budget; infeasible ones are never evaluated.
        max_dims: the largest dim of each field; dims are drawn from ``[min_dim, max_dims[f]]``.
        config: population, generations, parents, mutation rate, seed.
        state: resume from here (e.g. a checkpoint); ``None`` starts afresh.
        on_progress: called after every evaluated candidate and every new generation (checkpointing).

    Returns:
        The final state; ``state.best`` is ``(dims, fitness)``. Resuming from any intermediate state
        gives the same result as an uninterrupted search.

    Raises:
        BudgetError: no feasible candidate was found.

    >>> target = [3, 1, 4]
    >>> s = evolutionary_search(lambda d: -sum(abs(a - b) for a, b in zip(d, target)), lambda d: True,
    ...                         [4, 4, 4], SearchConfig(population=8, generations=6, parents=4, mutation_prob=0.3))
    >>> s.best
    ([3, 1, 4], 0.0)
    """
    lows, highs = min_dim, [int(d) for d in max_dims]
    if any(h < lows for h in highs):
        raise ValueError(f"min_dim={min_dim} exceeds a field's largest dim {highs}")
    state = state if state is not None else SearchState()
    max_tries = 50 * config.population

    def rng(generation: int) -> np.random.Generator:
        return np.random.default_rng([config.seed, generation])

    def random_candidate(r: np.random.Generator) -> list[int]:
        return [int(r.integers(lows, h + 1)) for h in highs]

    if not state.population and not state.done:
        r, seen = rng(0), set()
        for _ in range(max_tries):
            cand = random_candidate(r)
            if _key(cand) not in seen and feasible(cand):
                seen.add(_key(cand))
                state.population.append(cand)
            if len(state.population) >= config.population:
                break
        if not state.population:
            raise BudgetError(
                f"optembed search: none of {max_tries} random dim assignments fits the budget; raise the budget"
            )
        if on_progress:
            on_progress(state)

    while not state.done:
        for cand in state.population:
            if _key(cand) not in state.fitness:
                state.fitness[_key(cand)] = float(fitness(cand))
                if on_progress:
                    on_progress(state)
        best_dims, best_fit = state.best
        state.history.append({"generation": state.generation, "best_dims": best_dims, "best_fitness": best_fit,
                              "evaluated": len(state.fitness)})
        if state.generation + 1 >= config.generations:
            state.done = True
        else:
            state.population = _next_generation(state, rng(state.generation + 1), config, feasible, lows, highs,
                                                max_tries)
            state.generation += 1
            if not state.population:  # the space is exhausted: every feasible candidate is evaluated
                state.done = True
        if on_progress:
            on_progress(state)
    return state


def _next_generation(state: SearchState, r: np.random.Generator, config: SearchConfig,
                     feasible: Callable[[list[int]], bool], low: int, highs: list[int],
                     max_tries: int) -> list[list[int]]:
    parents = [dims for dims, _ in state.ranked()[: config.parents]]
    children: list[list[int]] = []
    seen = set(state.fitness)
    n_mutation = config.population // 2
    n_crossover = config.population - n_mutation

    def add(child: list[int]) -> None:
        key = _key(child)
        if key not in seen and feasible(child):
            seen.add(key)
            children.append(child)

    for _ in range(max_tries):
        if len(children) >= n_mutation:
            break
        parent = parents[int(r.integers(len(parents)))]
        redraw = r.random(len(parent)) < config.mutation_prob
        add([int(r.integers(low, h + 1)) if m else d for d, m, h in zip(parent, redraw, highs)])
    target = len(children) + n_crossover
    for _ in range(max_tries):
        if len(children) >= target:
            break
        a, b = (parents[int(i)] for i in r.integers(len(parents), size=2))
        take_a = r.random(len(a)) < 0.5
        add([x if t else y for x, y, t in zip(a, b, take_a)])
    return children


# ---------------------------------------------------------------------------------------------------
# The three stages, declared for a trainer (embtable.stages): supernet -> search -> retrain


@dataclasses.dataclass(frozen=True)
class OptEmbedStages:
    """Options of OptEmbed's stages (the data, model, optimizers, budget and seed come from the run).

    Args:
        supernet_epochs / supernet_max_steps: length of supernet training (steps cap the epochs).
        retrain_epochs / retrain_max_steps: length of retraining.
        threshold_init / threshold_reg / norm / min_dim: the supernet (see ``OptEmbedSupernetConfig``).
        population / generations / parents / mutation_prob: the evolutionary search (``SearchConfig``);
            its seed is the run's seed.
        retrain_init: ``"scratch"`` (fresh weights, the paper's retraining) or ``"supernet"`` (kept rows,
            dim prefixes and dense layers of the supernet).
        oov_buckets / remap: the compact table (see ``OptEmbedConfig``).
    """

    supernet_epochs: int = 1
    supernet_max_steps: int | None = None
    retrain_epochs: int = 1
    retrain_max_steps: int | None = None
    threshold_init: float = 0.0
    threshold_reg: float = 1e-4
    norm: str = "l1"
    min_dim: int = 1
    population: int = 20
    generations: int = 10
    parents: int = 10
    mutation_prob: float = 0.1
    retrain_init: str = "scratch"
    oov_buckets: int = 0
    remap: str = "auto"

    def __post_init__(self) -> None:
        if self.retrain_init not in ("scratch", "supernet"):
            raise ValueError(f"OptEmbedStages.retrain_init must be 'scratch' or 'supernet', got {self.retrain_init!r}")
        for name in ("supernet_epochs", "retrain_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"OptEmbedStages.{name} must be >= 1, got {getattr(self, name)}")

    def supernet_config(self) -> OptEmbedSupernetConfig:
        return OptEmbedSupernetConfig(threshold_init=self.threshold_init, threshold_reg=self.threshold_reg,
                                      norm=self.norm, min_dim=self.min_dim)

    def search_config(self, seed: int) -> SearchConfig:
        return SearchConfig(population=self.population, generations=self.generations, parents=self.parents,
                            mutation_prob=self.mutation_prob, seed=seed)


def _supernet_stage(context: StageContext) -> StageOutput:
    """Stage 1: the supernet (fails before training when not even one row per field fits the budget)."""
    o: OptEmbedStages = context.options
    if context.budget_bytes is not None:
        least = sum(field_cost(f, 1, o.min_dim, o.oov_buckets, o.remap)[1] for f in context.features)
        if least > context.budget_bytes:
            raise BudgetError(f"optembed: one row per feature at dim {o.min_dim} needs {least:,} bytes, over the "
                              f"budget of {context.budget_bytes:,}; raise embedding.budget")
    return StageOutput(embedding=OptEmbedSupernet(context.features, o.supernet_config(), **context.build_kwargs))


def _search_stage(context: StageContext) -> StageOutput:
    """Stage 2: evolutionary search on the trained supernet, its state checkpointed after every candidate."""
    o: OptEmbedStages = context.options
    supernet, model, features = context.embedding, context.model, context.features
    supernet.set_eval()
    metrics = context.evaluate(model, "valid")
    margins = supernet.row_margins()
    record: dict[str, Any] = {
        "supernet_valid_auc": metrics["auc"], "supernet_valid_logloss": metrics["logloss"],
        "supernet_rows_kept": {k: int((m > 0).sum()) for k, m in margins.items()},
        "thresholds": [float(t) for t in supernet.thresholds.detach()],
    }
    fits: dict[tuple[int, ...], RowFit | None] = {}
    prepared = SortedMargins(margins)

    def fit(dims: list[int]) -> RowFit | None:
        key = tuple(dims)
        if key not in fits:
            fits[key] = fit_rows(features, prepared, dims, context.budget_bytes, oov_buckets=o.oov_buckets,
                                 remap=o.remap)
        return fits[key]

    def fitness(dims: list[int]) -> float:
        rows = fit(dims)
        keep = []
        for f in features:
            mask = torch.zeros(f.num_embeddings, dtype=torch.bool)
            mask[torch.from_numpy(rows.kept_ids[f.name])] = True
            keep.append(mask)
        supernet.set_eval(dims, keep)
        try:
            return context.evaluate(model, "valid")["auc"]
        except StageFailed:  # constant predictions: the candidate lost everything that matters
            return 0.0
        finally:
            supernet.set_eval()

    state = SearchState.from_dict(context.progress) if context.progress is not None else None
    if state is None or not state.done:
        state = evolutionary_search(fitness, lambda d: fit(d) is not None, [f.embedding_dim for f in features],
                                    o.search_config(context.seed), min_dim=o.min_dim, state=state,
                                    on_progress=lambda s: context.save_progress(s.to_dict()))
    dims, best = state.best
    rows = fit(dims)
    config = compact_config(features, rows, dims, oov_buckets=o.oov_buckets, remap=o.remap)
    record.update(dims=dict(zip([f.name for f in features], dims)), num_kept=rows.num_kept, search_valid_auc=best,
                  threshold_cut=rows.cut, history=state.history, candidates_evaluated=len(state.fitness))
    return StageOutput(record=record, carry=(rows, config))


def _retrain_stage(context: StageContext) -> StageOutput:
    """Stage 3: the compact table of the best candidate, from scratch or from the supernet."""
    o: OptEmbedStages = context.options
    rows, config = context.carried["search"]
    if o.retrain_init == "supernet":
        compact = compact_from_supernet(context.embedding, config, rows.kept_ids, **context.build_kwargs)
    else:
        compact = OptEmbedEmbeddingBagCollection(context.features, config, **context.build_kwargs)
        compact.set_kept_ids(rows.kept_ids)
    inference = compact.memory().inference_bytes
    if inference != rows.total_bytes:
        raise AssertionError(f"compact table has {inference} bytes, the search planned {rows.total_bytes}")
    return StageOutput(embedding=compact, keep_dense=o.retrain_init == "supernet")


def _stages(o: OptEmbedStages) -> tuple[Stage, ...]:
    return (Stage("supernet", _supernet_stage, epochs=o.supernet_epochs, max_steps=o.supernet_max_steps),
            Stage("search", _search_stage, train=False),
            Stage("retrain", _retrain_stage, epochs=o.retrain_epochs, max_steps=o.retrain_max_steps))


#: supernet -> budget-constrained evolutionary search -> retrain, named after the method it produces
PIPELINE = Pipeline(OptEmbedConfig.method, OptEmbedConfig.method, OptEmbedStages, _stages)
