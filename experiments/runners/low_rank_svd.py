"""Low-rank compression after training: train the full table, compress it by SVD, fine-tune.

The post-training path of the "Unified Low-rank Compression Framework for Click-through Rate Prediction"
recipe, as stages of the trainer:

1. ``full``: train the run's model with full tables (:func:`experiments.training.train.run`, checkpointed);
2. ``compress``: replace the trained tables by :func:`embtable.methods.low_rank.low_rank_from_trained`
   at the run's budget: the truncated SVD of each table (``moments="table"``), or the projection that
   keeps most of the energy of the table's outputs on training batches (``moments="data"``);
3. ``finetune``: train the compressed model for ``finetune_steps`` steps (sparse rows, Adam for the rest)
   and evaluate it.

    python -m experiments.runners.low_rank_svd demo --budget 1/8 --out runs/svd_demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch

import data_prep
import embtable
from embtable.atomic import atomic_write_json
from embtable.methods.full import FullConfig
from embtable.methods.low_rank import low_rank_from_trained, output_second_moments
from experiments.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from experiments.training.config import RunConfig, load_config
from experiments.training.distributed import build_model
from experiments.training.train import (
    TrainState,
    dataset_path,
    deterministic,
    evaluate,
    loader_epochs,
    make_optimizers,
    run,
    train_epochs,
)

__all__ = ["StageFailed", "run_svd_finetune", "main"]

RESULT = "svd_result.json"


class StageFailed(RuntimeError):
    """A stage's training run failed (diverged, NaN, constant predictions); ``reason`` says why."""

    def __init__(self, stage: str, reason: str | None) -> None:
        super().__init__(f"the {stage} stage failed: {reason}")
        self.stage, self.reason = stage, reason


def run_svd_finetune(config: RunConfig, out_dir: str | os.PathLike, *, moments: str = "table",
                     finetune_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """See :func:`_run`; runs with the config's thread count and deterministic kernels, as ``run`` does."""
    with deterministic(config.train.num_threads):
        return _run(config, out_dir, moments=moments, finetune_steps=finetune_steps, progress=progress)


def _run(config: RunConfig, out_dir: str | os.PathLike, *, moments: str = "table",
         finetune_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` with full tables, compress them to ``config.embedding.budget`` by SVD, fine-tune.

    Args:
        config: the run; its ``embedding.budget`` is the compressed budget (its method is ignored).
        out_dir: where the full run's checkpoint and the result go (the full stage resumes from it).
        moments: ``"table"`` (truncated SVD of each table) or ``"data"`` (second moments of the outputs
            on up to 50 training batches).
        finetune_steps: steps of fine-tuning; default one epoch.

    Returns:
        bytes, and valid/test AUC and logloss of the full model, the compressed model before fine-tuning,
        and after; the time of each stage.
    """
    if moments not in ("table", "data"):
        raise ValueError(f"moments must be 'table' or 'data', got {moments!r}")
    if config.embedding.budget is None:
        raise ValueError("low-rank compression needs embedding.budget (e.g. --budget 1/8)")
    out = Path(out_dir)
    times: dict[str, float] = {}
    start = time.perf_counter()
    full_config = dataclasses.replace(
        config, embedding=dataclasses.replace(config.embedding, method={"method": FullConfig.method}, budget=None))
    full = run(full_config, out / "full", progress=progress)
    if full.status != "ok":
        raise StageFailed("full-table", full.failure_reason)
    times["full"] = time.perf_counter() - start

    start = time.perf_counter()
    path = dataset_path(config.data)
    model, embedding, _ = build_model(full_config)
    model.load_state_dict(load_checkpoint(out / "full" / CHECKPOINT_NAME)["model"])
    second = None
    if moments == "data":
        loader = data_prep.BatchLoader(path, "train", config.train.batch_size, shuffle=True, seed=config.train.seed)
        with torch.no_grad():
            second = output_second_moments(embedding, (b.sparse_features for b in islice(loader, 50)))
    compressed = low_rank_from_trained(embedding, budget=config.embedding.budget, second_moments=second)
    model.embedding = compressed
    valid_loader = lambda split: data_prep.BatchLoader(path, split, config.train.eval_batch_size, shuffle=False)  # noqa: E731
    before = {s: evaluate(model, valid_loader(s), split=s) for s in ("valid", "test")}
    times["compress"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(config.train.seed)
    optimizers = make_optimizers(model, compressed, config.train.embedding_optimizer, config.train.embedding_lr,
                                 config.train.dense_lr)
    loader = data_prep.BatchLoader(path, "train", config.train.batch_size, shuffle=True, seed=config.train.seed + 1)
    steps = finetune_steps if finetune_steps is not None else len(loader)
    state = TrainState()
    train_epochs(model, loader_epochs(loader), len(loader), steps, optimizers, state, max_loss=config.train.max_loss)
    after = {s: evaluate(model, valid_loader(s), split=s) for s in ("valid", "test")}
    times["finetune"] = time.perf_counter() - start

    result = {
        "name": config.name, "budget": str(config.embedding.budget), "moments": moments,
        "ranks": compressed.config.rank, "tail_rows": compressed.config.tail_rows,
        "inference_bytes": embtable.memory_report(compressed).inference_bytes,
        "full_inference_bytes": full.inference_bytes,
        "full": {"valid_auc": full.valid_auc, "test_auc": full.test_auc, "test_logloss": full.test_logloss},
        "compressed": {f"{s}_{k}": before[s][k] for s in before for k in ("auc", "logloss")},
        "finetuned": {f"{s}_{k}": after[s][k] for s in after for k in ("auc", "logloss")},
        "finetune_steps": state.step, "seconds": times,
        "train_samples_per_s": state.samples / state.train_seconds if state.train_seconds else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULT, result)  # atomic: a kill leaves the previous result or none
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.runners.low_rank_svd", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a named config in experiments/configs/ or a YAML path")
    parser.add_argument("--budget", required=True, help="compressed budget, e.g. 1/8")
    parser.add_argument("--moments", choices=["table", "data"], default="table")
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config, overrides=[*args.set, f"embedding.budget={args.budget}"])
    result = run_svd_finetune(config, args.out, moments=args.moments, finetune_steps=args.finetune_steps,
                              progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
