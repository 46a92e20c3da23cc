"""Experiments: train and evaluate one configuration; sweeps, searches and reports over many.

    from experiments import load_config, run
    result = run(load_config("hash"), out_dir="runs/hash")   # -> RunResult

Names are imported on first use, so that ``import experiments`` (and the command line's ``--help``)
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "experiments.config",
    "RunConfig": "experiments.config",
    "load_config": "experiments.config",
    "RunFailed": "experiments.train",
    "RunHooks": "experiments.train",
    "RunResult": "experiments.train",
    "TrainState": "experiments.train",
    "evaluate": "experiments.train",
    "make_optimizers": "experiments.train",
    "run": "experiments.train",
    "train_steps": "experiments.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
