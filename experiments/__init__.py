"""Experiments: train and evaluate one configuration, and (elsewhere in this package) sweeps over many.

    from experiments import load_config, run
    result = run(load_config("hash"), out_dir="runs/hash")   # -> RunResult
"""

from experiments.config import ConfigError, RunConfig, load_config
from experiments.train import RunFailed, RunHooks, RunResult, evaluate, run, train_steps

__all__ = [
    "ConfigError",
    "RunConfig",
    "RunFailed",
    "RunHooks",
    "RunResult",
    "evaluate",
    "load_config",
    "run",
    "train_steps",
]
