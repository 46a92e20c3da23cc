"""Multi-stage pipelines a sweep cell can run instead of one training run.

A sweep's method entry names a pipeline with ``runner`` (and its options with ``runner_options``)::

    methods:
      - {label: optembed_search, method: optembed, runner: optembed,
         runner_options: {population: 10, generations: 5}}
      - {label: low_rank_svd, method: low_rank, runner: svd, runner_options: {moments: data}}

The runners are the pipelines the registered methods declare (:func:`embtable.stages.declared_pipelines`;
e.g. ``optembed``: supernet -> budget-constrained evolutionary search -> retrain, ``svd``: full tables
trained, compressed by SVD to the budget, fine-tuned); ``runner_options`` are the fields of the pipeline's
options class. :func:`experiments.training.stages.run_stages` runs them.

The cell's run config (data, model, budget, seed, optimizers) is the pipeline's config; the stages keep
their checkpoints in the cell's directory, so a killed cell resumes where its stages stopped. The record
is turned into the fields of a :class:`experiments.training.train.RunResult` (status, bytes, validation and
test AUC / logloss, samples/s, wall time), plus ``runner``, ``stage_seconds`` (seconds per stage) and
``runner_record`` (everything the stages recorded), so a runner cell is one ordinary row of the results store.

This module imports torch only when a runner runs or its options are checked.

Example:
    >>> check_runner("svd", {"method": "low_rank"}, {"finetune_steps": 10})
    >>> check_runner("svd", {"method": "hash"}, {})
    Traceback (most recent call last):
    ...
    ValueError: runner 'svd' produces 'low_rank' tables, but the entry's method is 'hash'
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments.training.config import RunConfig

__all__ = ["runners", "check_runner", "run_runner"]


def runners() -> dict[str, Any]:
    """The runners by name: the :class:`embtable.stages.Pipeline` s the methods declare (imports torch)."""
    from embtable.stages import declared_pipelines

    return declared_pipelines()


def check_runner(name: str, method: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Check a spec entry's ``runner``, its ``method`` mapping and ``runner_options``.

    Raises:
        ValueError: unknown runner, a method the runner does not produce, method knobs (the runner's
            settings go in ``runner_options``), or bad options (the message names the valid ones).
    """
    found = runners()
    if name not in found:
        raise ValueError(f"unknown runner {name!r}; runners: {sorted(found)}")
    pipeline = found[name]
    if method.get("method") != pipeline.method:
        raise ValueError(f"runner {name!r} produces {pipeline.method!r} tables, but the entry's method is "
                         f"{method.get('method')!r}")
    knobs = sorted(set(method) - {"method"})
    if knobs:
        raise ValueError(f"runner {name!r} builds its own tables: method settings {knobs} are not used; put the "
                         f"runner's settings in runner_options (valid: {list(pipeline.option_names())})")
    if not isinstance(options, Mapping):
        raise ValueError(f"runner_options must be a mapping, got {options!r}")
    try:
        pipeline.options(**options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"runner {name!r}: bad runner_options {dict(options)}: {err} "
                         f"(valid: {list(pipeline.option_names())})") from None


def _training_bytes(config: RunConfig, method: Mapping[str, Any], inference_bytes: int) -> int:
    """``training_bytes`` as :func:`experiments.training.train.run` counts it, for the final tables
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


def run_runner(name: str, config: RunConfig, options: Mapping[str, Any], out_dir: str | Path, *,
               progress: bool = False) -> dict[str, Any]:
    """Run runner ``name`` for one sweep cell and return its result as RunResult fields.

    Args:
        name: a key of :func:`runners`.
        config: the cell's run config (its ``embedding.budget`` is the final tables' budget).
        options: the runner's ``runner_options``.
        out_dir: the cell's directory (the stage checkpoints: a re-run resumes from them).
        progress: progress bars.

    Returns:
        The fields of :class:`experiments.training.train.RunResult` (``dense_*`` and ``bayes_auc`` are ``None``:
        the runners do not measure them), plus ``runner``, ``runner_options``, ``budget_bytes``,
        ``stage_seconds`` and ``runner_record``. Metrics are ``None`` unless ``status == "ok"``.
    """
    from experiments.training.stages import run_stages
    from experiments.training.train import versions

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = run_stages(config, name, options, out, progress=progress)
    ok = record["status"] == "ok"
    result: dict[str, Any] = {
        "name": config.name, "config": config.to_dict(), "versions": versions(), "seed": config.train.seed,
        "embedding_optimizer": config.train.embedding_optimizer, "dense_bytes": None, "dense_training_bytes": None,
        "bayes_auc": None, "dataset": record["dataset"], "status": record["status"],
        "failure_reason": record.get("failure_reason"), "full_table_bytes": record.get("full_table_bytes"),
        "budget_bytes": record.get("budget_bytes"),
        "inference_bytes": record["inference_bytes"] if ok else None,
        "training_bytes": _training_bytes(config, record["method_config"], record["inference_bytes"]) if ok else None,
        "steps": record.get("steps") or 0, "stage_seconds": dict(record.get("stage_seconds") or {}),
        "runner_record": record, "runner": name, "runner_options": dict(options),
    }
    for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss", "train_samples_per_s"):
        result[key] = record.get(key) if ok else None
    result["wall_seconds"] = time.perf_counter() - start
    return result
