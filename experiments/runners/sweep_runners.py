"""Multi-stage runners a sweep cell can run instead of one training run.

A sweep's method entry names a runner with ``runner`` (and its settings with ``runner_options``)::

    methods:
      - {label: optembed_search, method: optembed, runner: optembed,
         runner_options: {population: 10, generations: 5}}
      - {label: low_rank_svd, method: low_rank, runner: svd, runner_options: {moments: data}}

Runners:

* ``optembed``: OptEmbed's supernet -> budget-constrained evolutionary search -> retrain
  (:func:`experiments.runners.optembed.run_optembed`); ``runner_options`` are :class:`~experiments.runners.optembed.OptEmbedStages`
  fields (e.g. ``supernet_max_steps``, ``population``).
* ``svd``: full tables trained, compressed by SVD to the budget, fine-tuned
  (:func:`experiments.runners.low_rank_svd.run_svd_finetune`); ``runner_options``: ``moments``, ``finetune_steps``.

The cell's run config (data, model, budget, seed, optimizers) is the runner's config; the runner keeps its
checkpoints in the cell's directory, so a killed cell resumes where its stages stopped. The runner's record
is turned into the fields of a :class:`experiments.training.train.RunResult` (status, bytes, validation and test
AUC / logloss, samples/s, wall time), plus ``runner``, ``stage_seconds`` (seconds per stage) and
``runner_record`` (everything the runner returned), so a runner cell is one ordinary row of the results store.

This module imports torch only when a runner runs or its options are checked.

Example:
    >>> check_runner("svd", {"method": "low_rank"}, {"finetune_steps": 10})
    >>> check_runner("svd", {"method": "hash"}, {})
    Traceback (most recent call last):
    ...
    ValueError: runner 'svd' produces 'low_rank' tables, but the entry's method is 'hash'
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments.training.config import RunConfig

__all__ = ["Runner", "runners", "check_runner", "run_runner"]


@dataclasses.dataclass(frozen=True)
class Runner:
    """A multi-stage pipeline that a sweep cell can run.

    Args:
        name: what a spec's ``runner`` key names.
        method: the registered method whose tables the runner produces (the entry's ``method``).
        option_names: returns the valid ``runner_options`` keys.
        check: raises ``ValueError``/``TypeError`` on bad ``runner_options``.
        run: ``(config, options, out_dir, progress) -> result dict`` (RunResult fields).
    """

    name: str
    method: str
    option_names: Callable[[], tuple[str, ...]]
    check: Callable[[Mapping[str, Any]], None]
    run: Callable[[RunConfig, Mapping[str, Any], Path, bool], dict[str, Any]]


def _training_bytes(config: RunConfig, method: Mapping[str, Any], inference_bytes: int) -> int:
    """``training_bytes`` as :func:`experiments.training.train.run` counts it, for the runner's final tables
    (``method``: their config as plain data): inference bytes, the table optimizer's state, Adam's state
    for dense parameters inside the embedding module."""
    import data_prep
    import embtable
    from experiments.training.train import adam_bytes, dataset_path

    features = data_prep.load_meta(dataset_path(config.data)).feature_specs(config.model.embedding_dim)
    module = embtable.build(features, embtable.method_config_from_dict(dict(method), source="runner tables"),
                            pooling=config.embedding.pooling)
    built = embtable.memory_report(module).inference_bytes
    if built != inference_bytes:
        raise AssertionError(f"rebuilt {method.get('method')} tables hold {built} bytes, the runner reported "
                             f"{inference_bytes}")
    state = embtable.optimizer_state_bytes(module, config.train.embedding_optimizer, tables_only=True)
    return inference_bytes + state + adam_bytes(embtable.dense_parameters(module))


# ---- optembed: supernet -> search -> retrain ----

def _optembed_options() -> tuple[str, ...]:
    from experiments.runners.optembed import OptEmbedStages

    return tuple(f.name for f in dataclasses.fields(OptEmbedStages))


def _optembed_check(options: Mapping[str, Any]) -> None:
    from experiments.runners.optembed import OptEmbedStages

    OptEmbedStages(**options)


def _optembed_run(config: RunConfig, options: Mapping[str, Any], out: Path, progress: bool) -> dict[str, Any]:
    from experiments.runners.optembed import OptEmbedStages, run_optembed
    from experiments.training.checkpoint import load_checkpoint

    stages = OptEmbedStages(**{"checkpoint_every": config.train.checkpoint_every, **options})
    record = run_optembed(config, stages, out, progress=progress)
    ok = record["status"] == "ok"
    training = None
    if ok:
        compact = load_checkpoint(out / "compact.pt")
        training = _training_bytes(config, compact["config"], record["inference_bytes"])
    return {
        "dataset": record["dataset"],
        "status": record["status"],
        "failure_reason": record.get("failure_reason"),
        "inference_bytes": record.get("inference_bytes") if ok else None,
        "training_bytes": training,
        "full_table_bytes": record.get("full_table_bytes"),
        "budget_bytes": record.get("budget_bytes"),
        "valid_auc": record.get("valid_auc"),
        "valid_logloss": record.get("valid_logloss"),
        "test_auc": record.get("test_auc"),
        "test_logloss": record.get("test_logloss"),
        "train_samples_per_s": record.get("train_samples_per_s"),
        "steps": record.get("retrain_steps") or 0,
        "stage_seconds": dict(record.get("stage_seconds") or {}),
        "runner_record": record,
    }


# ---- svd: full tables -> SVD to the budget -> fine-tune ----

_SVD_OPTIONS = ("moments", "finetune_steps")


def _svd_check(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(_SVD_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}")
    if options.get("moments", "table") not in ("table", "data"):
        raise ValueError(f"moments must be 'table' or 'data', got {options['moments']!r}")
    steps = options.get("finetune_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"finetune_steps must be an integer >= 1, got {steps!r}")


def _svd_run(config: RunConfig, options: Mapping[str, Any], out: Path, progress: bool) -> dict[str, Any]:
    import embtable
    from embtable.methods.low_rank import LowRankConfig
    from experiments.runners.low_rank_svd import StageFailed, run_svd_finetune
    from experiments.training.train import RunFailed, dataset_path, deterministic

    base = {"dataset": str(dataset_path(config.data))}
    try:  # the run's thread count and deterministic kernels for every stage, as experiments.training.train.run does
        with deterministic(config.train.num_threads):
            record = run_svd_finetune(config, out, moments=options.get("moments", "table"),
                                      finetune_steps=options.get("finetune_steps"), progress=progress)
    except RunFailed as failure:
        return {**base, "status": "failed", "failure_reason": failure.reason}
    except embtable.BudgetError as err:
        return {**base, "status": "failed", "failure_reason": f"infeasible budget: {err}"}
    except StageFailed as failure:
        return {**base, "status": "failed", "failure_reason": str(failure)}
    tuned = record["finetuned"]
    return {
        **base,
        "status": "ok",
        "failure_reason": None,
        "inference_bytes": record["inference_bytes"],
        "training_bytes": _training_bytes(config, {"method": LowRankConfig.method, "rank": record["ranks"]},
                                          record["inference_bytes"]),
        "full_table_bytes": record["full_inference_bytes"],
        "valid_auc": tuned["valid_auc"],
        "valid_logloss": tuned["valid_logloss"],
        "test_auc": tuned["test_auc"],
        "test_logloss": tuned["test_logloss"],
        "train_samples_per_s": record.get("train_samples_per_s"),
        "steps": record["finetune_steps"],
        "stage_seconds": dict(record["seconds"]),
        "runner_record": record,
    }


@functools.cache
def runners() -> dict[str, Runner]:
    """The runners by name. The method each one produces is read from its config class (imports torch)."""
    from embtable.methods.low_rank import LowRankConfig
    from embtable.methods.optembed import OptEmbedConfig

    found = [
        # the supernet -> search -> retrain pipeline is named after the method it produces
        Runner(OptEmbedConfig.method, OptEmbedConfig.method, _optembed_options, _optembed_check, _optembed_run),
        Runner("svd", LowRankConfig.method, lambda: _SVD_OPTIONS, _svd_check, _svd_run),
    ]
    return {r.name: r for r in found}


def check_runner(name: str, method: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Check a spec entry's ``runner``, its ``method`` mapping and ``runner_options``.

    Raises:
        ValueError: unknown runner, a method the runner does not produce, method knobs (the runner's
            settings go in ``runner_options``), or bad options (the message names the valid ones).
    """
    if name not in runners():
        raise ValueError(f"unknown runner {name!r}; runners: {sorted(runners())}")
    runner = runners()[name]
    if method.get("method") != runner.method:
        raise ValueError(f"runner {name!r} produces {runner.method!r} tables, but the entry's method is "
                         f"{method.get('method')!r}")
    knobs = sorted(set(method) - {"method"})
    if knobs:
        raise ValueError(f"runner {name!r} builds its own tables: method settings {knobs} are not used; put the "
                         f"runner's settings in runner_options (valid: {list(runner.option_names())})")
    if not isinstance(options, Mapping):
        raise ValueError(f"runner_options must be a mapping, got {options!r}")
    try:
        runner.check(options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"runner {name!r}: bad runner_options {dict(options)}: {err} "
                         f"(valid: {list(runner.option_names())})") from None


def run_runner(name: str, config: RunConfig, options: Mapping[str, Any], out_dir: str | Path, *,
               progress: bool = False) -> dict[str, Any]:
    """Run runner ``name`` for one sweep cell and return its result as RunResult fields.

    Args:
        name: a key of :func:`runners`.
        config: the cell's run config (its ``embedding.budget`` is the runner's budget).
        options: the runner's ``runner_options``.
        out_dir: the cell's directory (the runner's checkpoints: a re-run resumes from them).
        progress: progress bars.

    Returns:
        The fields of :class:`experiments.training.train.RunResult` (``dense_*`` and ``bayes_auc`` are ``None``:
        the runners do not measure them), plus ``runner``, ``runner_options``,
        ``stage_seconds`` and ``runner_record``. Metrics are ``None`` unless ``status == "ok"``.
    """
    from experiments.training.train import versions

    runner = runners()[name]
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    produced = runner.run(config, options, out, progress)
    ok = produced["status"] == "ok"
    result: dict[str, Any] = {
        "name": config.name, "config": config.to_dict(), "versions": versions(), "seed": config.train.seed,
        "embedding_optimizer": config.train.embedding_optimizer, "training_bytes": None, "dense_bytes": None,
        "dense_training_bytes": None, "bayes_auc": None, "inference_bytes": None, "full_table_bytes": None,
        "train_samples_per_s": None, "steps": 0, "stage_seconds": {}, "runner_record": None,
        **produced,
        "runner": name, "runner_options": dict(options), "wall_seconds": time.perf_counter() - start,
    }
    if not ok:
        for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss", "train_samples_per_s"):
            result[key] = None
    return result
