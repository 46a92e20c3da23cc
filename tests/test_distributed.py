"""Compressed tables sharded by TorchRec's DistributedModelParallel: 2 processes, gloo, loopback.

For every registered method, the sharded module's outputs, and after a few optimizer steps its outputs
and weights, equal the unsharded module's trained on the same global batches. Gradients of the local
mean loss are averaged over ranks by DMP (tables) and DDP (dense parameters), so the reference is trained
on the global mean loss with the same learning rate.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import embtable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_cases import CASES  # noqa: E402

WORLD = 2
BATCH = 8  # per rank
STEPS = 3
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")


def _features():
    from test_contract import make_features

    return make_features()


def _batch(features, step: int):
    from test_contract import make_kjt

    return make_kjt(features, batch=WORLD * BATCH, seed=100 + step, max_len=2)


def _worker(rank: int, port: int, methods: dict[str, str], out: str) -> None:
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from embtable.sharding import shard
    from experiments.training.distributed import slice_kjt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    features = _features()
    results = {}
    for method, sharding in methods.items():
        case = CASES[method]
        config, budget = case.sharded or (case.config, case.budget)
        model = embtable.build(features, config, budget, seed=0)
        reference = embtable.build(features, config, budget, seed=0)
        dmp = shard(model, optimizer="sgd", lr=0.5, sharding_types=[sharding])
        dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
        dense_opt = torch.optim.SGD(dense, lr=0.5) if dense else None
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        lo, hi = rank * BATCH, (rank + 1) * BATCH
        diffs = []
        for step in range(STEPS + 1):
            kjt = _batch(features, step)
            mine = dmp(slice_kjt(kjt, lo, hi)).values()
            theirs = reference(kjt).values()
            diffs.append(float((mine - theirs[lo:hi]).abs().max().detach()))
            if step == STEPS:
                break
            target = torch.linspace(-1, 1, theirs.shape[1])
            ((mine - target) ** 2).mean().backward()
            if dense_opt:
                dense_opt.step()
                dense_opt.zero_grad()
            ref_opt.zero_grad()
            ((theirs - target) ** 2).mean().backward()
            ref_opt.step()
        planned = {name: [s.sharding_type for s in plan.values()] for name, plan in dmp.plan.plan.items()}
        results[method] = {"diffs": diffs, "plan": planned}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharding_unsupported(method: str) -> str | None:
    """The reason a method's module gives for not being shardable by DMP (None: it is)."""
    case = CASES[method]
    config, budget = case.sharded or (case.config, case.budget)
    return embtable.build(_features(), config, budget).sharding_unsupported


METHODS = [m for m in sorted(embtable.registered_methods()) if not _sharding_unsupported(m)]
UNSHARDABLE = sorted(set(embtable.registered_methods()) - set(METHODS))


# each method is sharded one way per run (all three ways are covered, in one pair of processes);
# EMBTABLE_TEST_SHARDING=row_wise (say) shards every method that way instead
_ONLY = os.environ.get("EMBTABLE_TEST_SHARDING")
PLAN = {m: _ONLY or SHARDING_TYPES[i % len(SHARDING_TYPES)] for i, m in enumerate(METHODS)}


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dmp")
    mp.start_processes(_worker, args=(_free_port(), PLAN, str(out)), nprocs=WORLD, start_method="spawn", join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_sharded_equals_unsharded(sharded_results, method):
    sharding, per_rank = PLAN[method], sharded_results
    for rank, results in enumerate(per_rank):
        result = results[method]
        types = {t for types in result["plan"].values() for t in types}
        assert types == {sharding}, f"{method}: planned {types}, asked for {sharding}"
        forward, *trained = result["diffs"]
        # table lookups are exact; a dense decoder (dhe's MLP) may sum in another order once DMP wraps it
        assert forward <= 1e-6, f"{method} rank {rank}: sharded forward differs by {forward}"
        assert max(trained) < 1e-5, f"{method} rank {rank}: after training, outputs differ by {max(trained)}"


@pytest.mark.parametrize("method", UNSHARDABLE)
def test_unshardable_methods_say_why(method):
    from embtable.sharding import shard

    case = CASES[method]
    model = embtable.build(_features(), case.config, case.budget)
    with pytest.raises(ValueError, match="shard"):
        shard(model)
