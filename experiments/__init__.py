"""Experiments: train and evaluate one configuration; sweeps, searches and reports over many.

    from experiments import load_config, run
    result = run(load_config("demo"), out_dir="runs/demo")   # -> RunResult

Names are imported on first use, so that ``import experiments`` (and the command line's ``--help``)
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "experiments.training.config",
    "RunConfig": "experiments.training.config",
    "load_config": "experiments.training.config",
    "RunFailed": "experiments.training.train",
    "RunHooks": "experiments.training.train",
    "RunResult": "experiments.training.train",
    "TrainState": "experiments.training.train",
    "evaluate": "experiments.training.train",
    "make_optimizers": "experiments.training.train",
    "run": "experiments.training.train",
    "train_steps": "experiments.training.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
