"""OptEmbed's three stages through the trainer: supernet -> budget-constrained search -> retrain.

    from experiments import load_config
    from experiments.runners.optembed import OptEmbedStages, run_optembed
    result = run_optembed(load_config("smoke", overrides=["embedding.budget=1/4"]), OptEmbedStages(), "runs/oe")

or ``python -m experiments.runners.optembed smoke --budget 1/4 --out runs/oe``.

1. **supernet**: :class:`embtable.methods.optembed_search.OptEmbedSupernet` inside the configured CTR
   model, trained with the trainer's :func:`~experiments.training.train.train_steps` (threshold regulariser
   included through ``auxiliary_loss``), sparse row updates for the tables, Adam for the rest.
2. **search**: evolutionary search over per-field dims; fitness = validation AUC of the supernet with
   those dims and the rows :func:`~embtable.methods.optembed_search.fit_rows` keeps within the budget.
3. **retrain**: the compact :class:`~embtable.OptEmbedEmbeddingBagCollection` of the best candidate,
   from scratch (``retrain_init="scratch"``) or from the supernet's kept rows and dense layers
   (``"supernet"``), trained and evaluated on the validation and test splits.

``embedding.budget`` of the run config is the compact table's byte budget (``None``: the learned
thresholds alone decide, as in the paper). Every stage checkpoints atomically into ``out_dir``
(``supernet.pt``, ``search.pt`` after every evaluated candidate, ``retrain.pt``); a killed run resumes
where it stopped and ends with the same result as an uninterrupted one. The compact module is saved as
``compact.pt`` (its config and ``state_dict``), the record as ``optembed_result.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import ctr_models
import embtable
from embtable.atomic import atomic_write_json
from embtable.methods.optembed_search import (
    OptEmbedSupernet,
    OptEmbedSupernetConfig,
    SearchConfig,
    SearchState,
    SortedMargins,
    compact_config,
    compact_from_supernet,
    evolutionary_search,
    field_cost,
    fit_rows,
)
from experiments.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from experiments.training.config import RunConfig, load_config
from experiments.training.train import (
    RunFailed,
    TrainState,
    dataset_path,
    deterministic,
    evaluate,
    make_optimizers,
    train_epochs,
)

__all__ = ["OptEmbedStages", "DataSource", "StageHooks", "dataset_source", "run_optembed", "main", "RESULT_NAME"]

RESULT_NAME = "optembed_result.json"
STAGES = ("supernet", "search", "retrain")


@dataclasses.dataclass(frozen=True)
class OptEmbedStages:
    """Settings of OptEmbed's stages (the data, model, optimizers and seed come from the ``RunConfig``).

    Args:
        supernet_epochs / supernet_max_steps: length of supernet training (steps cap the epochs).
        retrain_epochs / retrain_max_steps: length of retraining.
        threshold_init / threshold_reg / norm / min_dim: the supernet (see ``OptEmbedSupernetConfig``).
        population / generations / parents / mutation_prob: the evolutionary search (``SearchConfig``);
            its seed is the run's seed.
        retrain_init: ``"scratch"`` (fresh weights, the paper's retraining) or ``"supernet"`` (kept rows,
            dim prefixes and dense layers of the supernet).
        oov_buckets / remap: the compact table (see ``OptEmbedConfig``).
        checkpoint_every: training steps between checkpoints (also at each stage's end).
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
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.retrain_init not in ("scratch", "supernet"):
            raise ValueError(f"OptEmbedStages.retrain_init must be 'scratch' or 'supernet', got {self.retrain_init!r}")
        for name in ("supernet_epochs", "retrain_epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"OptEmbedStages.{name} must be >= 1, got {getattr(self, name)}")

    def supernet_config(self) -> OptEmbedSupernetConfig:
        return OptEmbedSupernetConfig(threshold_init=self.threshold_init, threshold_reg=self.threshold_reg,
                                      norm=self.norm, min_dim=self.min_dim)

    def search_config(self, seed: int) -> SearchConfig:
        return SearchConfig(population=self.population, generations=self.generations, parents=self.parents,
                            mutation_prob=self.mutation_prob, seed=seed)


@dataclasses.dataclass
class DataSource:
    """Where the stages read batches (``torchrec.datasets.utils.Batch``) from.

    Args:
        name: shown in the record.
        features: the categorical features at the model's embedding dim (with counts when known).
        num_dense: dense input width.
        train_batches: epoch -> that epoch's training batches (the same order for the same epoch).
        steps_per_epoch: number of training batches per epoch.
        valid_batches / test_batches: the evaluation splits.
    """

    name: str
    features: list[embtable.FeatureSpec]
    num_dense: int
    train_batches: Callable[[int], Iterable[Any]]
    steps_per_epoch: int
    valid_batches: Callable[[], Iterable[Any]]
    test_batches: Callable[[], Iterable[Any]]


@dataclasses.dataclass
class StageHooks:
    """Callbacks into a running OptEmbed pipeline (tests use them to interrupt it).

    Args:
        on_step: ``(stage, TrainState)`` after every training step of the supernet or retrain stage.
        on_search: ``SearchState`` after every evaluated candidate (after its checkpoint is written).
    """

    on_step: Callable[[str, TrainState], None] | None = None
    on_search: Callable[[SearchState], None] | None = None


def dataset_source(config: RunConfig) -> DataSource:
    """The :class:`DataSource` of a data_prep dataset (generated on first use for a preset)."""
    import data_prep

    path = dataset_path(config.data)
    meta = data_prep.load_meta(path)
    train_cfg = config.train
    loader = data_prep.BatchLoader(path, "train", train_cfg.batch_size, shuffle=True, seed=train_cfg.seed)

    def train_batches(epoch: int) -> Iterable[Any]:
        loader.set_epoch(epoch)
        return iter(loader)

    return DataSource(
        name=str(path),
        features=meta.feature_specs(config.model.embedding_dim),
        num_dense=meta.num_dense,
        train_batches=train_batches,
        steps_per_epoch=len(loader),
        valid_batches=lambda: data_prep.BatchLoader(path, "valid", train_cfg.eval_batch_size, shuffle=False),
        test_batches=lambda: data_prep.BatchLoader(path, "test", train_cfg.eval_batch_size, shuffle=False),
    )


def _train_stage(stage: str, model: nn.Module, embedding: nn.Module, config: RunConfig, source: DataSource,
                 epochs: int, max_steps: int | None, checkpoint_every: int, ckpt: Path | None, identity: dict,
                 progress: bool, hooks: StageHooks) -> tuple[TrainState, float]:
    """Train ``model`` for one stage with the trainer's steps; resume from / checkpoint to ``ckpt``.

    Returns the final training state and the stage's seconds (accumulated over resumes).
    """
    cfg = config.train
    optimizers = make_optimizers(model, embedding, cfg.embedding_optimizer, cfg.embedding_lr, cfg.dense_lr)
    state, seconds = TrainState(), 0.0
    saved = load_checkpoint(ckpt) if ckpt is not None else None
    if saved is not None:
        _check_identity(ckpt, saved, identity)
        model.load_state_dict(saved["model"])
        optimizers.load_state_dict(saved["optimizers"])
        state, seconds = TrainState(**saved["state"]), saved["seconds"]
        set_rng_state(saved["rng"])
        if saved["done"]:
            return state, seconds
    total = source.steps_per_epoch * epochs if max_steps is None else min(source.steps_per_epoch * epochs, max_steps)
    start = time.perf_counter()

    def checkpoint(done: bool) -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, {**identity, "model": model.state_dict(), "optimizers": optimizers.state_dict(),
                                   "state": dataclasses.asdict(state), "rng": rng_state(), "done": done,
                                   "seconds": seconds + time.perf_counter() - start})

    bar = tqdm(total=total, initial=state.step, unit="batch", desc=f"optembed {stage}", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)

    def after_step(s: TrainState) -> None:
        bar.update(1)
        if s.step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{s.smoothed_loss:.4f}", refresh=False)
        if s.step % checkpoint_every == 0:
            checkpoint(False)
        if hooks.on_step is not None:
            hooks.on_step(stage, s)

    try:
        train_epochs(model, source.train_batches, source.steps_per_epoch, total, optimizers, state,
                     max_loss=cfg.max_loss, on_step=after_step)
    finally:
        bar.close()
    checkpoint(True)
    return state, seconds + time.perf_counter() - start


@contextlib.contextmanager
def _keep_callers_rng() -> Iterator[None]:
    """Leave the caller's torch, NumPy and Python generators as they were (stages seed / restore their own)."""
    outer = rng_state()
    try:
        yield
    finally:
        set_rng_state(outer)


def _check_identity(path: Path, saved: dict, identity: dict) -> None:
    if saved.get("identity") != identity["identity"]:
        raise ValueError(f"{path} belongs to another OptEmbed run (config or stages differ); use another out_dir "
                         "or delete it to start afresh")


def _identity(config: RunConfig, stages: OptEmbedStages) -> dict:
    data = {"config": config.to_dict(), "stages": dataclasses.asdict(stages)}
    for key in ("checkpoint_every", "log_every"):
        data["config"]["train"].pop(key, None)
    data["config"].pop("name", None)
    data["config"]["data"].pop("data_dir", None)
    data["stages"].pop("checkpoint_every")
    return {"identity": json.dumps(data, sort_keys=True)}


def run_optembed(
    config: RunConfig,
    stages: OptEmbedStages,
    out_dir: str | Path | None = None,
    *,
    source: DataSource | None = None,
    progress: bool = True,
    hooks: StageHooks | None = None,
) -> dict[str, Any]:
    """Run OptEmbed's supernet, search and retrain stages for ``config`` and return the result record.

    Args:
        config: data, model, budget (``embedding.budget``; ``embedding.method`` is ignored), training
            settings and seed; each training stage uses its optimizers and learning rates.
        stages: the stages' settings.
        out_dir: checkpoints, ``compact.pt`` and ``optembed_result.json``; ``None`` keeps nothing.
        source: batches to use instead of ``config.data`` (tests pass synthetic data).
        progress: progress bars.
        hooks: callbacks (tests interrupt the run with them).

    Returns:
        A JSON-able record: ``status``, the searched ``dims`` and ``num_kept``, ``inference_bytes`` of the
        compact table, ``budget_bytes``, supernet / final validation and test AUC and logloss,
        ``stage_seconds`` per stage, the search ``history``.
    """
    hooks = hooks or StageHooks()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = {s: (out / f"{s}.pt" if out is not None else None) for s in STAGES}
    identity = _identity(config, stages)
    cfg = config.train
    with deterministic(cfg.num_threads), _keep_callers_rng():
        source = source if source is not None else dataset_source(config)
        features = source.features
        budget = embtable.as_budget(config.embedding.budget)
        budget_bytes = budget.resolve(features) if budget is not None else None
        record: dict[str, Any] = {
            "name": config.name, "config": config.to_dict(), "stages": dataclasses.asdict(stages),
            "dataset": source.name, "seed": cfg.seed, "budget_bytes": budget_bytes,
            "full_table_bytes": sum(f.full_table_bytes for f in features), "stage_seconds": {},
        }
        build = dict(pooling=config.embedding.pooling)
        try:
            if budget_bytes is not None:  # fail before training when not even one row per field fits
                least = sum(field_cost(f, 1, stages.min_dim, stages.oov_buckets, stages.remap)[1] for f in features)
                if least > budget_bytes:
                    raise embtable.BudgetError(
                        f"optembed: one row per feature at dim {stages.min_dim} needs {least:,} bytes, over the "
                        f"budget of {budget_bytes:,}; raise embedding.budget"
                    )
            # ---- 1. supernet ----
            torch.manual_seed(cfg.seed)
            supernet = OptEmbedSupernet(features, stages.supernet_config(), **build)
            super_model = ctr_models.build_model(config.model.name, supernet, source.num_dense, **config.model.options)
            state, seconds = _train_stage("supernet", super_model, supernet, config, source, stages.supernet_epochs,
                                          stages.supernet_max_steps, stages.checkpoint_every, ckpt["supernet"],
                                          identity, progress, hooks)
            record["stage_seconds"]["supernet"] = seconds
            record["supernet_steps"] = state.step
            supernet.set_eval()
            valid = list(source.valid_batches())  # evaluated once per candidate: read it once
            sup_metrics = evaluate(super_model, valid)
            record["supernet_valid_auc"], record["supernet_valid_logloss"] = sup_metrics["auc"], sup_metrics["logloss"]
            margins = supernet.row_margins()
            record["supernet_rows_kept"] = {k: int((m > 0).sum()) for k, m in margins.items()}
            record["thresholds"] = [float(t) for t in supernet.thresholds.detach()]

            # ---- 2. search ----
            search_state, search_seconds = _search(supernet, super_model, features, margins, valid, budget_bytes,
                                                   stages, cfg.seed, ckpt["search"], identity, progress, hooks)
            record["stage_seconds"]["search"] = search_seconds
            dims, fitness = search_state.best
            fit = fit_rows(features, margins, dims, budget_bytes, oov_buckets=stages.oov_buckets, remap=stages.remap)
            compact_cfg = compact_config(features, fit, dims, oov_buckets=stages.oov_buckets, remap=stages.remap)
            record.update(dims=dict(zip([f.name for f in features], dims)), num_kept=fit.num_kept,
                          search_valid_auc=fitness, threshold_cut=fit.cut, history=search_state.history,
                          candidates_evaluated=len(search_state.fitness))

            # ---- 3. retrain ----
            torch.manual_seed(cfg.seed)
            if stages.retrain_init == "supernet":
                compact = compact_from_supernet(supernet, compact_cfg, fit.kept_ids, **build)
            else:
                compact = embtable.OptEmbedEmbeddingBagCollection(features, compact_cfg, **build)
                compact.set_kept_ids(fit.kept_ids)
            model = ctr_models.build_model(config.model.name, compact, source.num_dense, **config.model.options)
            if stages.retrain_init == "supernet":
                dense = {k: v for k, v in super_model.state_dict().items() if not k.startswith("embedding.")}
                model.load_state_dict(dense, strict=False)
            inference = embtable.memory_report(compact).inference_bytes
            if inference != fit.total_bytes:
                raise AssertionError(f"compact table has {inference} bytes, the search planned {fit.total_bytes}")
            record["inference_bytes"] = inference
            state, seconds = _train_stage("retrain", model, compact, config, source, stages.retrain_epochs,
                                          stages.retrain_max_steps, stages.checkpoint_every, ckpt["retrain"],
                                          identity, progress, hooks)
            record["stage_seconds"]["retrain"] = seconds
            record["retrain_steps"] = state.step
            record["train_samples_per_s"] = state.samples / state.train_seconds if state.train_seconds else None
            valid_m = evaluate(model, valid)
            test_m = evaluate(model, source.test_batches(), split="test")
        except RunFailed as failure:
            record.update(status="failed", failure_reason=failure.reason)
        except embtable.BudgetError as err:
            record.update(status="failed", failure_reason=f"infeasible budget: {err}")
        else:
            record.update(status="ok", failure_reason=None, valid_auc=valid_m["auc"], valid_logloss=valid_m["logloss"],
                          test_auc=test_m["auc"], test_logloss=test_m["logloss"])
            if out is not None:
                save_checkpoint(out / "compact.pt", {"config": compact_cfg.to_dict(), "state_dict": compact.state_dict()})
    if out is not None:
        atomic_write_json(out / RESULT_NAME, record)
    return record


def _search(supernet: OptEmbedSupernet, model: nn.Module, features: Sequence[embtable.FeatureSpec],
            margins: dict[str, np.ndarray], valid: list, budget_bytes: int | None, stages: OptEmbedStages,
            seed: int, ckpt: Path | None, identity: dict, progress: bool, hooks: StageHooks) -> tuple[SearchState, float]:
    """Stage 2: evolutionary search, checkpointed after every evaluated candidate."""
    saved = load_checkpoint(ckpt) if ckpt is not None else None
    state, seconds = None, 0.0
    if saved is not None:
        _check_identity(ckpt, saved, identity)
        state, seconds = SearchState.from_dict(json.loads(saved["search"])), saved["seconds"]
        if state.done:
            return state, seconds
    start = time.perf_counter()
    fits: dict[tuple[int, ...], Any] = {}
    prepared = SortedMargins(margins)

    def fit(dims: list[int]):
        key = tuple(dims)
        if key not in fits:
            fits[key] = fit_rows(features, prepared, dims, budget_bytes, oov_buckets=stages.oov_buckets,
                                 remap=stages.remap)
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
            return evaluate(model, valid)["auc"]
        except RunFailed:  # constant predictions: the candidate lost everything that matters
            return 0.0
        finally:
            supernet.set_eval()

    total = stages.population * stages.generations
    bar = tqdm(total=total, initial=len(state.fitness) if state else 0, unit="cand", desc="optembed search",
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    evaluated = [len(state.fitness) if state else 0]

    def on_progress(s: SearchState) -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, {**identity, "search": json.dumps(s.to_dict()),
                                   "seconds": seconds + time.perf_counter() - start})
        if len(s.fitness) > evaluated[0]:
            bar.update(len(s.fitness) - evaluated[0])
            evaluated[0] = len(s.fitness)
            best_dims, best = s.best
            bar.set_postfix(generation=s.generation, best_auc=f"{best:.4f}", refresh=False)
            if hooks.on_search is not None:
                hooks.on_search(s)

    max_dims = [f.embedding_dim for f in features]
    try:
        state = evolutionary_search(fitness, lambda d: fit(d) is not None, max_dims, stages.search_config(seed),
                                    min_dim=stages.min_dim, state=state, on_progress=on_progress)
    finally:
        bar.close()
    return state, seconds + time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m experiments.runners.optembed [CONFIG ...] --budget 1/4 --out DIR [options]``."""
    parser = argparse.ArgumentParser(prog="python -m experiments.runners.optembed", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="run config names / YAML files applied over base.yaml")
    parser.add_argument("--budget", help="compact table budget: bytes, '64MiB' or a fraction such as 1/4")
    parser.add_argument("--out", help="output directory (checkpoints, compact.pt, optembed_result.json)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="run config override, e.g. train.seed=3 (repeatable)")
    defaults = OptEmbedStages()
    for f in dataclasses.fields(OptEmbedStages):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type))  # "int | None" fields follow
        if kind is not None:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name))
    parser.add_argument("--supernet-max-steps", type=int, default=None)
    parser.add_argument("--retrain-max-steps", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    if args.budget is not None:
        overrides.append(f"embedding.budget={args.budget}")
    config = load_config(*args.configs, overrides=overrides)
    stages = OptEmbedStages(**{f.name: getattr(args, f.name) for f in dataclasses.fields(OptEmbedStages)})
    result = run_optembed(config, stages, args.out, progress=not args.no_progress)
    summary = {k: result.get(k) for k in ("status", "failure_reason", "budget_bytes", "inference_bytes",
                                           "supernet_valid_auc", "search_valid_auc", "valid_auc", "test_auc",
                                           "stage_seconds", "dims", "num_kept")}
    print(json.dumps(summary, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    return result


if __name__ == "__main__":
    main()
