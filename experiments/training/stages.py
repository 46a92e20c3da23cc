"""Run a method's declared training stages (:mod:`embtable.stages`) through the one training loop.

    from experiments.training.config import load_config
    from experiments.training.stages import run_stages
    record = run_stages(load_config("smoke", overrides=["embedding.budget=1/4"]), "svd", {"moments": "data"},
                        "runs/svd")

or ``python -m experiments.training.stages svd smoke --budget 1/4 --out runs/svd --option moments=data``
(``--list`` shows the pipelines the methods declare and their options).

For each stage in order: torch is seeded with the run's seed, the stage's ``prepare`` builds its module
(the CTR model of ``config.model`` is built around it), and a training stage is trained with
:func:`~experiments.training.train.train_epochs` (sparse rows, Adam for the rest, the method's auxiliary
loss and per-step hooks). ``embedding.budget`` of the run config is the final tables' budget.

Checkpoints: every stage writes ``<stage>.pt`` into ``out_dir`` (a training stage every
``train.checkpoint_every`` steps and at its end; a stage that trains nothing whenever it saves progress and
at its end). A re-run skips finished stages (their ``prepare`` runs again to rebuild the modules, then
what they trained is loaded) and resumes an interrupted one, so a killed run ends as an uninterrupted
one. The final embedding module is saved as ``compact.pt`` (its config and ``state_dict``), the record as
``stages_result.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

import ctr_models
import embtable
from embtable.atomic import atomic_write_json
from embtable.stages import Pipeline, Stage, StageContext, StageFailed, declared_pipelines, options_dict
from experiments.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from experiments.training.config import RunConfig, load_config
from experiments.training.train import (
    TrainState,
    comparable_config,
    dataset_path,
    deterministic,
    evaluate,
    keep_callers_rng,
    make_optimizers,
    train_epochs,
)

__all__ = ["DataSource", "StageHooks", "RESULT_NAME", "COMPACT_NAME", "dataset_source", "pipeline", "run_stages",
           "main"]

RESULT_NAME = "stages_result.json"
COMPACT_NAME = "compact.pt"


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
        is_weighted: the bags carry per-id weights.
    """

    name: str
    features: list[embtable.FeatureSpec]
    num_dense: int
    train_batches: Callable[[int], Iterable[Any]]
    steps_per_epoch: int
    valid_batches: Callable[[], Iterable[Any]]
    test_batches: Callable[[], Iterable[Any]]
    is_weighted: bool = False


@dataclasses.dataclass
class StageHooks:
    """Callbacks into running stages (tests interrupt them with these).

    Args:
        on_step: ``(stage name, TrainState)`` after every training step.
        on_progress: ``(stage name, data)`` after a stage's progress is checkpointed.
    """

    on_step: Callable[[str, TrainState], None] | None = None
    on_progress: Callable[[str, Any], None] | None = None


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
        is_weighted=bool(meta.weighted_features),
    )


def pipeline(name: str) -> Pipeline:
    """The pipeline ``name`` some method declares (:func:`embtable.stages.declared_pipelines`)."""
    found = declared_pipelines()
    if name not in found:
        raise ValueError(f"unknown pipeline {name!r}; the methods declare {sorted(found)}")
    return found[name]


def _identity(config: RunConfig, pipe: Pipeline, options: Any) -> dict[str, Any]:
    """What a stage checkpoint must match to be resumed: the run config (as a single run compares it, but
    with its training length, which the pipeline's stages may follow), the pipeline and its options."""
    data = {"config": comparable_config(config.to_dict()), "length": [config.train.epochs, config.train.max_steps],
            "pipeline": pipe.name, "options": options_dict(options)}
    return {"identity": json.dumps(data, sort_keys=True, default=str)}


def _check_identity(path: Path, saved: dict, identity: dict) -> None:
    if saved.get("identity") != identity["identity"]:
        raise ValueError(f"{path} belongs to another run (config, pipeline or options differ); use another "
                         "out_dir or delete it to start afresh")


def _train_stage(stage: Stage, model: nn.Module, embedding: nn.Module, config: RunConfig, source: DataSource,
                 saved: dict | None, ckpt: Path | None, identity: dict, seconds: float, progress: bool,
                 hooks: StageHooks) -> tuple[TrainState, float]:
    """Train ``model`` for ``stage``, resuming from its checkpoint ``saved``; checkpoint to ``ckpt``.

    Returns the final training state and the stage's seconds (``seconds`` spent before, plus this call's).
    """
    cfg = config.train
    optimizers = make_optimizers(model, embedding, cfg.embedding_optimizer, cfg.embedding_lr, cfg.dense_lr)
    state = TrainState()
    if saved is not None and "state" in saved:
        model.load_state_dict(saved["model"])
        optimizers.load_state_dict(saved["optimizers"])
        state = TrainState(**saved["state"])
        set_rng_state(saved["rng"])
        if saved["done"]:
            return state, seconds
    epochs, max_steps = stage.epochs, stage.max_steps
    if epochs is None and max_steps is None:
        epochs, max_steps = cfg.epochs, cfg.max_steps
    if epochs is None:  # steps alone: as many epochs as they take
        total = max_steps
    else:
        total = source.steps_per_epoch * epochs if max_steps is None else min(source.steps_per_epoch * epochs, max_steps)
    start = time.perf_counter()

    def checkpoint(done: bool) -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, {**identity, "model": model.state_dict(), "optimizers": optimizers.state_dict(),
                                   "state": dataclasses.asdict(state), "rng": rng_state(), "done": done,
                                   "seconds": seconds + time.perf_counter() - start})

    bar = tqdm(total=total, initial=state.step, unit="batch", desc=stage.name, disable=not progress,
               dynamic_ncols=True, mininterval=0.5)

    def after_step(s: TrainState) -> None:
        bar.update(1)
        if s.step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{s.smoothed_loss:.4f}", refresh=False)
        if cfg.checkpoint_every is not None and s.step % cfg.checkpoint_every == 0:
            checkpoint(False)
        if hooks.on_step is not None:
            hooks.on_step(stage.name, s)

    try:
        train_epochs(model, source.train_batches, source.steps_per_epoch, total, optimizers, state,
                     max_loss=cfg.max_loss, on_step=after_step)
    finally:
        bar.close()
    checkpoint(True)
    return state, seconds + time.perf_counter() - start


def _with_dense_of(model: nn.Module, embedding: nn.Module, previous: nn.Module, previous_embedding: nn.Module) -> None:
    """Load ``previous``'s parameters and buffers outside its embedding module into ``model``'s."""
    def outside(m: nn.Module, emb: nn.Module) -> dict[str, torch.Tensor]:
        prefix = next(name for name, sub in m.named_modules() if sub is emb)
        return {k: v for k, v in m.state_dict().items() if not (prefix == "" or k.startswith(prefix + "."))}

    mine = outside(model, embedding)
    theirs = outside(previous, previous_embedding)
    if mine.keys() != theirs.keys():
        raise ValueError("keep_dense: the stage's model and the previous stage's differ outside the embedding module")
    model.load_state_dict(theirs, strict=False)


def run_stages(
    config: RunConfig,
    pipeline_name: str | Pipeline,
    options: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    source: DataSource | None = None,
    progress: bool = True,
    hooks: StageHooks | None = None,
) -> dict[str, Any]:
    """Run the stages of pipeline ``pipeline_name`` for ``config`` and return the result record.

    Args:
        config: data, model, budget (``embedding.budget``; ``embedding.method`` is not used), training
            settings and seed; every training stage uses its optimizers and learning rates.
        pipeline_name: a pipeline a method declares (:func:`embtable.stages.declared_pipelines`), by name, or
            a :class:`~embtable.stages.Pipeline` itself.
        options: the pipeline's options (keyword arguments of its ``options`` class).
        out_dir: stage checkpoints, ``compact.pt`` and ``stages_result.json``; ``None`` keeps nothing.
        source: batches to use instead of ``config.data`` (tests pass synthetic data).
        progress: progress bars.
        hooks: callbacks (tests interrupt the run with them).

    Returns:
        A JSON-able record: ``status`` / ``failure_reason``, ``budget_bytes``, ``full_table_bytes``, the
        final tables' ``inference_bytes`` and ``method_config``, their validation and test AUC and logloss,
        ``stage_seconds`` per stage, ``<stage>_steps`` per training stage, ``steps`` and
        ``train_samples_per_s`` of the last training stage, and what the stages recorded.

    Raises:
        ValueError: unknown pipeline or bad options, or ``out_dir`` holds checkpoints of another run.
    """
    pipe = pipeline_name if isinstance(pipeline_name, Pipeline) else pipeline(pipeline_name)
    opts = pipe.options(**dict(options or {}))
    hooks = hooks or StageHooks()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    identity = _identity(config, pipe, opts)
    cfg = config.train
    with deterministic(cfg.num_threads), keep_callers_rng():
        source = source if source is not None else dataset_source(config)
        budget = embtable.as_budget(config.embedding.budget)
        budget_bytes = budget.resolve(source.features) if budget is not None else None
        record: dict[str, Any] = {
            "name": config.name, "pipeline": pipe.name, "options": options_dict(opts), "config": config.to_dict(),
            "dataset": source.name, "seed": cfg.seed, "budget_bytes": budget_bytes,
            "full_table_bytes": sum(f.full_table_bytes for f in source.features), "stage_seconds": {},
        }
        valid = list(source.valid_batches())  # a search evaluates it once per candidate: read it once

        def evaluate_split(model: nn.Module, split: str = "valid") -> dict[str, float]:
            if split not in ("valid", "test"):
                raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
            return evaluate(model, valid if split == "valid" else source.test_batches(), split=split)

        model: nn.Module | None = None
        embedding: nn.Module | None = None
        carried: dict[str, Any] = {}
        try:
            for stage in pipe.stages(opts):
                model, embedding, state = _run_stage(stage, config, source, record, model, embedding, carried, out,
                                                     identity, evaluate_split, opts, progress, hooks)
                if state is not None:
                    record[f"{stage.name}_steps"] = record["steps"] = state.step
                    record["train_samples_per_s"] = state.samples / state.train_seconds if state.train_seconds else None
            if model is None or embedding is None:
                raise ValueError(f"pipeline {pipe.name!r} built no model")
            valid_m, test_m = evaluate_split(model, "valid"), evaluate_split(model, "test")
        except StageFailed as failure:
            record.update(status="failed", failure_reason=failure.reason)
        except embtable.BudgetError as err:
            record.update(status="failed", failure_reason=f"infeasible budget: {err}")
        else:
            record.update(status="ok", failure_reason=None, inference_bytes=embtable.memory_report(embedding).inference_bytes,
                          method_config=embedding.config.to_dict(), valid_auc=valid_m["auc"],
                          valid_logloss=valid_m["logloss"], test_auc=test_m["auc"], test_logloss=test_m["logloss"])
            if out is not None:
                save_checkpoint(out / COMPACT_NAME, {"config": record["method_config"],
                                                     "state_dict": embedding.state_dict()})
    record = json.loads(json.dumps(record))  # plain JSON data, as the file holds it
    if out is not None:
        atomic_write_json(out / RESULT_NAME, record)
    return record


def _run_stage(stage: Stage, config: RunConfig, source: DataSource, record: dict[str, Any], model: nn.Module | None,
               embedding: nn.Module | None, carried: dict[str, Any], out: Path | None, identity: dict,
               evaluate_split: Callable[..., dict[str, float]], options: Any, progress: bool,
               hooks: StageHooks) -> tuple[nn.Module | None, nn.Module | None, TrainState | None]:
    """One stage: prepare (and train); returns the model, its embedding module and the training state."""
    ckpt = out / f"{stage.name}.pt" if out is not None else None
    saved = load_checkpoint(ckpt) if ckpt is not None else None
    if saved is not None:
        _check_identity(ckpt, saved, identity)
    done = saved is not None and saved["done"]
    seconds = saved["seconds"] if saved is not None else 0.0
    start = time.perf_counter()
    latest = [saved.get("progress") if saved is not None else None]

    def save_progress(data: Any) -> None:
        latest[0] = data
        if ckpt is not None and not done:
            save_checkpoint(ckpt, {**identity, "progress": data, "done": False,
                                   "seconds": seconds + time.perf_counter() - start})
        if hooks.on_progress is not None:
            hooks.on_progress(stage.name, data)

    torch.manual_seed(config.train.seed)
    context = StageContext(
        features=source.features, budget_bytes=record["budget_bytes"], options=options, seed=config.train.seed,
        build_kwargs=dict(pooling=config.embedding.pooling, is_weighted=source.is_weighted),
        embedding=embedding, model=model, carried=carried, evaluate=evaluate_split, train_batches=source.train_batches,
        progress=latest[0], save_progress=save_progress,
    )
    output = stage.prepare(context)
    if output.embedding is not None:
        new = ctr_models.build_model(config.model.name, output.embedding, source.num_dense, **config.model.options)
        if output.keep_dense:
            if model is None or embedding is None:
                raise ValueError(f"stage {stage.name!r} keeps the dense layers of a previous stage, but it is the first")
            _with_dense_of(new, output.embedding, model, embedding)
        model, embedding = new, output.embedding
    carried[stage.name] = output.carry
    record.update(output.record)
    state = None
    if stage.train:
        if model is None or embedding is None:
            raise ValueError(f"stage {stage.name!r} trains, but no stage built a model")
        state, seconds = _train_stage(stage, model, embedding, config, source, saved, ckpt, identity,
                                      seconds + (0.0 if done else time.perf_counter() - start), progress, hooks)
    elif not done:
        seconds += time.perf_counter() - start
        if ckpt is not None:
            save_checkpoint(ckpt, {**identity, "progress": latest[0], "done": True, "seconds": seconds})
    record["stage_seconds"][stage.name] = seconds
    return model, embedding, state


def _option_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m experiments.training.stages PIPELINE [CONFIG ...] --budget 1/4 --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m experiments.training.stages",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", nargs="?", help="a pipeline a method declares (see --list)")
    parser.add_argument("configs", nargs="*", help="run config names / YAML files applied over base.yaml")
    parser.add_argument("--list", action="store_true", help="list the pipelines and their options, then exit")
    parser.add_argument("--budget", help="the final tables' budget: bytes, '64MiB' or a fraction such as 1/4")
    parser.add_argument("--out", help="output directory (stage checkpoints, compact.pt, stages_result.json)")
    parser.add_argument("--option", action="append", default=[], type=_option_value, metavar="KEY=VALUE",
                        help="a pipeline option, e.g. population=10 (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="run config override, e.g. train.seed=3 (repeatable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.list or args.pipeline is None:
        found = declared_pipelines()
        for name, pipe in sorted(found.items()):
            print(f"{name}: produces {pipe.method!r}; options {options_dict(pipe.options())}")
        return {"pipelines": sorted(found)}
    overrides = list(args.set)
    if args.budget is not None:
        overrides.append(f"embedding.budget={args.budget}")
    config = load_config(*args.configs, overrides=overrides)
    result = run_stages(config, args.pipeline, dict(args.option), args.out, progress=not args.no_progress)
    summary = {k: v for k, v in result.items() if k not in ("config", "history", "options")}
    print(json.dumps(summary, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    return result


if __name__ == "__main__":
    main()
