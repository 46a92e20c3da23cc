"""Train one run with its embedding storage sharded by TorchRec's DistributedModelParallel.

The same run as :func:`experiments.training.train.run` (same config file, model, method and budget), on
``world_size`` processes: every global batch is split evenly across ranks, the storage tables are sharded
by TorchRec's planner (``embtable.sharding``), everything else is data-parallel. Backends: gloo on CPU,
NCCL on GPU. At the end the sharded model is saved with ``torch.distributed.checkpoint`` and reloaded into
an ordinary, unsharded model for evaluation (and export).

Usage (spawns its own processes on this machine; for several machines run one process per rank under
``torchrun`` with ``--spawn no``)::

    python -m experiments.training.distributed hash --world-size 2 --out runs/dist_hash
    torchrun --nnodes 2 --nproc-per-node 1 ... -m experiments.training.distributed hash --spawn no --out /shared/run

Gradients: each rank's loss is the mean over its share of the batch (plus the embtable modules'
``auxiliary_loss()``); DMP averages table gradients and DDP averages dense gradients over ranks, so training
equals single-process training on the global batch. The step loop is :func:`experiments.training.train.train_steps`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm.auto import tqdm

import ctr_models
import data_prep
import embtable
from embtable.atomic import atomic_write_json
from embtable.sharding import shard
from experiments.training.config import RunConfig, load_config
from experiments.training.train import TrainState, dataset_path, evaluate, train_epochs

__all__ = ["build_model", "slice_kjt", "slice_batch", "load_unsharded", "train_distributed", "main"]

SHARDED_CHECKPOINT = "sharded_checkpoint"
RESULT = "distributed_result.json"


def build_model(config: RunConfig) -> tuple[nn.Module, nn.Module, Any]:
    """(model, embedding module, dataset metadata) for ``config``, initialised from its seed."""
    meta = data_prep.load_meta(dataset_path(config.data))
    features = meta.feature_specs(config.model.embedding_dim)
    method = embtable.method_config_from_dict(config.embedding.method, source=f"{config.name}: embedding.method")
    embedding = embtable.build(features, method, config.embedding.budget, pooling=config.embedding.pooling,
                               seed=config.train.seed)
    torch.manual_seed(config.train.seed)
    model = ctr_models.build_model(config.model.name, embedding, meta.num_dense, **config.model.options)
    return model, embedding, meta


def slice_kjt(kjt: KeyedJaggedTensor, lo: int, hi: int) -> KeyedJaggedTensor:
    """Bags ``lo:hi`` of every feature of ``kjt`` (weights kept)."""
    values, lengths, weights = [], [], []
    for key in kjt.keys():
        jt = kjt[key]
        offsets = jt.offsets()
        values.append(jt.values()[offsets[lo]:offsets[hi]])
        lengths.append(jt.lengths()[lo:hi])
        if jt.weights_or_none() is not None:
            weights.append(jt.weights()[offsets[lo]:offsets[hi]])
    return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths),
                             weights=torch.cat(weights) if weights else None)


def slice_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s contiguous share of a global batch (the batch size must divide evenly)."""
    size = batch.labels.shape[0]
    if size % world_size:
        raise ValueError(f"global batch of {size} does not split evenly over {world_size} ranks; "
                         "choose a batch size divisible by the world size (drop_last batches are used)")
    lo, hi = rank * size // world_size, (rank + 1) * size // world_size
    return Batch(dense_features=batch.dense_features[lo:hi], sparse_features=slice_kjt(batch.sparse_features, lo, hi),
                 labels=batch.labels[lo:hi])


def _worker(rank: int, world_size: int, config_dict: dict, out_dir: str, sharding_types: list[str] | None,
            init_method: str, backend: str, progress: bool) -> None:
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=10))
    try:
        _train(rank, world_size, RunConfig.from_dict(config_dict), Path(out_dir), sharding_types, progress)
    finally:
        dist.destroy_process_group()


def _train(rank: int, world_size: int, config: RunConfig, out: Path, sharding_types: list[str] | None,
           progress: bool) -> None:
    train = config.train
    from experiments.training.train import resolve_threads

    torch.set_num_threads(max(1, resolve_threads(train.num_threads) // world_size))
    device = torch.device("cuda", rank % torch.cuda.device_count()) if dist.get_backend() == "nccl" else torch.device("cpu")
    model, _, _ = build_model(config)
    optimizer = train.embedding_optimizer
    dmp = shard(model, optimizer=optimizer, lr=train.embedding_lr, sharding_types=sharding_types, device=device)
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad]
    dense_opt = torch.optim.Adam(dense, lr=train.dense_lr) if dense else None
    path = dataset_path(config.data)
    loader = data_prep.BatchLoader(path, "train", train.batch_size, shuffle=True, seed=train.seed, drop_last=True)
    total = len(loader) * train.epochs if train.max_steps is None else min(train.max_steps, len(loader) * train.epochs)
    bar = tqdm(total=total, unit="batch", desc=f"{config.name} x{world_size}", disable=not (progress and rank == 0))

    def after_step(s: TrainState) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{s.last_loss:.4f}", refresh=False)

    state, start = TrainState(), time.perf_counter()
    optimizers = _DenseOptimizer(dense_opt)  # the table optimizer is fused into DMP's backward

    def local_batches(epoch: int) -> Iterable[Batch]:
        loader.set_epoch(epoch)
        return (slice_batch(batch, rank, world_size).to(device) for batch in loader)

    train_epochs(dmp, local_batches, len(loader), total, optimizers, state, on_step=after_step)
    bar.close()
    step, samples = state.step, state.samples * world_size  # every rank trains on an equal share
    seconds = time.perf_counter() - start
    dcp.save(dmp.state_dict(), checkpoint_id=str(out / SHARDED_CHECKPOINT))
    dist.barrier()
    plan = {module: {table: spec.sharding_type for table, spec in specs.items()}
            for module, specs in dmp.plan.plan.items()}
    if rank == 0:
        (out / "plan.json").write_text(json.dumps({"plan": plan, "text": str(dmp.plan), "steps": step,
                                                   "samples_per_s": samples / seconds, "train_seconds": seconds}))


class _DenseOptimizer:
    """The optimizer interface :func:`experiments.training.train.train_steps` drives, for the dense parameters only."""

    def __init__(self, dense: torch.optim.Optimizer | None) -> None:
        self.dense = dense

    def zero_grad(self) -> None:
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.dense is not None:
            self.dense.step()


def load_unsharded(config: RunConfig, checkpoint: str | os.PathLike) -> nn.Module:
    """An ordinary (unsharded) model holding the weights of a sharded checkpoint."""
    model, _, _ = build_model(config)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state)
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_distributed(config: RunConfig, out_dir: str | os.PathLike, *, world_size: int = 2,
                      sharding_types: Sequence[str] | None = None, backend: str | None = None,
                      spawn: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` on ``world_size`` processes with sharded storage, then evaluate unsharded.

    Returns:
        A result dict: steps, train samples/s (global), the sharding plan per table, valid/test AUC and
        logloss of the reloaded unsharded model, and the embedding's inference bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if config.embedding and config.train.embedding_optimizer not in ("sgd", "adagrad", "rowwise_adagrad"):
        raise ValueError(f"unknown embedding optimizer {config.train.embedding_optimizer!r}")
    args = (world_size, config.to_dict(), str(out), list(sharding_types) if sharding_types else None)
    if spawn:
        init = f"tcp://127.0.0.1:{_free_port()}"
        mp.start_processes(_worker, args=(*args, init, backend, progress), nprocs=world_size,
                           start_method="spawn", join=True)
    else:  # one rank of a torchrun job
        rank = int(os.environ["RANK"])
        _worker(rank, int(os.environ["WORLD_SIZE"]), *args[1:], "env://", backend, progress)
        if rank != 0:
            return {}
    info = json.loads((out / "plan.json").read_text())
    model = load_unsharded(config, out / SHARDED_CHECKPOINT)
    path = dataset_path(config.data)
    metrics = {}
    for split in ("valid", "test"):
        m = evaluate(model, data_prep.BatchLoader(path, split, config.train.eval_batch_size, shuffle=False), split=split)
        metrics[f"{split}_auc"], metrics[f"{split}_logloss"] = m["auc"], m["logloss"]
    result = {"name": config.name, "world_size": world_size, "backend": backend, "steps": info["steps"],
              "train_samples_per_s": info["samples_per_s"], "train_seconds": info["train_seconds"],
              "sharding": info["plan"], "inference_bytes": embtable.memory_report(model.embedding).inference_bytes
              if hasattr(model, "embedding") else None, **metrics}
    atomic_write_json(out / RESULT, result)  # atomic: a kill leaves the previous result or none
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.training.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a named config in experiments/configs/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--out", required=True, help="output directory (sharded checkpoint, plan, result)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sharding", action="append", choices=embtable.sharding.SHARDING_TYPES,
                        help="restrict the planner to these sharding types (repeatable)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    parser.add_argument("--spawn", choices=["yes", "no"], default="yes",
                        help="'no' when launched by torchrun (one process per rank)")
    args = parser.parse_args(argv)
    config = load_config(args.config, overrides=args.set)
    result = train_distributed(config, args.out, world_size=args.world_size, sharding_types=args.sharding,
                               backend=args.backend, spawn=args.spawn == "yes")
    if result:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
