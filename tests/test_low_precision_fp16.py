"""low_precision at fp16: TorchRec storage at DataType.FP16, trained in FBGEMM's fused fp16 TBE (or unfused by the
trainer's sparse optimizer), sharded by DMP, exported for serving."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

import embtable
from embtable import FeatureSpec, LowPrecisionConfig
from embtable.fused import FusedEmbeddingBagStorage, fuse_storage, unfuse_storage

FEATURES = [FeatureSpec("a", 40, 8), FeatureSpec("b", 7, 4)]  # dims of 4k: FBGEMM's kernels need them
FP16 = LowPrecisionConfig(precision="fp16")


def _kjt(batch=8, seed=0, features=FEATURES):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (len(features) * batch,), generator=g)
    per_feature = lengths.view(len(features), batch).sum(1)
    values = torch.cat([torch.randint(0, f.num_embeddings, (int(n),), generator=g)
                        for f, n in zip(features, per_feature)])
    return KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths)


def _weights(m):
    return {n: t.detach().float().clone() for n, t in m.state_dict().items() if n.endswith(".weight")}


def test_rows_are_a_torchrec_collection_at_fp16_with_exact_bytes():
    m = embtable.build(FEATURES, FP16, seed=0)
    assert type(m.storage) is EmbeddingBagCollection
    assert [c.data_type for c in m.storage.embedding_bag_configs()] == [DataType.FP16] * 2
    assert [p.dtype for p in m.parameters()] == [torch.float16] * 2
    assert sorted(k for k in m.state_dict() if k.endswith(".weight")) == [
        "storage.embedding_bags.a.weight", "storage.embedding_bags.b.weight"]
    assert embtable.memory_report(m).inference_bytes == (40 * 8 + 7 * 4) * 2 + 2 * 48
    assert not m.sharding_unsupported
    # at 1/4 the fp16 rows (half of fp32) must be hashed as well: bytes stay exact
    m = embtable.build(FEATURES, FP16, budget="1/4", seed=0)
    rows = m.config.num_buckets
    assert rows["a"] < 40
    assert embtable.memory_report(m).inference_bytes == (rows["a"] * 8 + rows["b"] * 4) * 2 + 2 * 48
    assert m(_kjt()).values().dtype == torch.float32


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_fp16_tbe_trains_like_the_plain_collection(optimizer):
    from fbgemm_gpu.split_embedding_configs import SparseType

    torch.set_num_threads(1)
    plain = embtable.build(FEATURES, FP16, seed=0)
    fused = copy.deepcopy(plain)
    lr = 0.5 if optimizer == "sgd" else 0.05
    assert fuse_storage(fused, optimizer, lr=lr) == 1
    assert isinstance(fused.storage, FusedEmbeddingBagStorage)
    assert fused.storage.tbe.weights_precision == SparseType.FP16
    assert [p.dtype for p in fused.parameters()] == [torch.float16] * 2
    assert embtable.memory_report(fused).inference_bytes == embtable.memory_report(plain).inference_bytes
    # the kernel's state, counted exactly: one fp32 float per row (row-wise Adagrad), none for SGD
    assert embtable.optimizer_state_bytes(fused, optimizer, tables_only=True) == (47 * 4 if optimizer != "sgd" else 0)
    kjt = _kjt()
    torch.testing.assert_close(fused(kjt).values(), plain(kjt).values(), atol=1e-6, rtol=1e-6)

    table_opt = (torch.optim.SGD if optimizer == "sgd" else embtable.RowWiseAdagrad)(
        embtable.sparse_parameters(plain), lr=lr)
    before = _weights(fused)
    target = torch.linspace(-1, 1, 12)
    losses = []
    for step in range(8):
        kjt = _kjt(seed=step % 2)
        for m in (plain, fused):
            loss = ((m(kjt).values() - target) ** 2).sum(1).mean()
            loss.backward()
            if m is plain:
                table_opt.step()
                table_opt.zero_grad()
                losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    after = _weights(fused)
    for name, f in (("a", FEATURES[0]), ("b", FEATURES[1])):
        key = f"storage.embedding_bags.{name}.weight"
        used = torch.unique(torch.cat([_kjt(seed=s)[name].values() for s in (0, 1)]))
        changed = (after[key] != before[key]).any(1)
        assert changed[used].all() and not changed[~torch.isin(torch.arange(f.num_embeddings), used)].any()
        # the same updates (the kernel sums the gradients in fp32, the Python optimizer in fp16): a few fp16 ulps
        torch.testing.assert_close(after[key], _weights(plain)[key], atol=2e-3, rtol=0)
    kjt = _kjt(seed=3)
    out = fused(kjt).values().detach()
    torch.testing.assert_close(out, plain(kjt).values(), atol=1e-2, rtol=0)
    # unfused again: a plain fp16 collection with the trained weights and the same forward
    assert unfuse_storage(fused) == 1 and type(fused.storage) is EmbeddingBagCollection
    assert fused.storage.embedding_bag_configs()[0].data_type == DataType.FP16
    torch.testing.assert_close(fused(kjt).values(), out, atol=1e-6, rtol=1e-6)


def test_fused_adagrad_state_is_fp32_per_weight():
    m = embtable.build(FEATURES, FP16, seed=0)
    assert fuse_storage(m, "adagrad", lr=0.1) == 1
    assert embtable.optimizer_state_bytes(m, "adagrad", tables_only=True) == (40 * 8 + 7 * 4) * 4


def test_the_trainer_fuses_fp16_tables_and_counts_their_state():
    from experiments.training.train import make_optimizers

    for fused_tables in (True, False):
        m = embtable.build(FEATURES, FP16, seed=0)
        opts = make_optimizers(m, m, "rowwise_adagrad", 0.05, 1e-3, fused_tables=fused_tables)
        assert opts.fused is fused_tables
        assert isinstance(m.storage, FusedEmbeddingBagStorage) is fused_tables
        # one fp32 accumulator per row either way (the kernel's, or embtable.RowWiseAdagrad's)
        assert embtable.optimizer_state_bytes(m, "rowwise_adagrad", tables_only=True) == 47 * 4
        before = _weights(m)
        m(_kjt()).values().pow(2).sum().backward()
        if opts.sparse is not None:
            opts.sparse.step()
        after = _weights(m)
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert all(p.dtype == torch.float16 for p in m.parameters())


def test_fp16_that_cannot_fuse_stays_a_plain_collection():
    m = embtable.build([FeatureSpec("a", 40, 6)], FP16, seed=0)  # dim 6: no FBGEMM kernel
    assert fuse_storage(m, "rowwise_adagrad") == 0 and type(m.storage) is EmbeddingBagCollection


def test_export_and_pt2_program_of_fp16_rows(tmp_path):
    from embtable import export as E

    torch.set_num_threads(1)
    m = embtable.build(FEATURES, FP16, budget="1/4", seed=0).eval()
    kjt = _kjt(batch=5, seed=4)
    with torch.no_grad():
        ref = m(kjt).values()
    for dtype, tol in (("fp32", 0.0), ("int8", 2e-2)):
        report = E.export(m, tmp_path / f"{dtype}.pt", dtype)
        with torch.no_grad():
            got = E.load(tmp_path / f"{dtype}.pt")(kjt).values()
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)
        if dtype == "fp32":  # the fp16 rows are written as they are: 2 bytes a value
            assert report.table_bytes == embtable.memory_report(m).inference_bytes
    E.export(m, tmp_path / "m.pt2", "fp32", format="pt2", example_inputs=(kjt,))
    served = torch.export.load(str(tmp_path / "m.pt2")).module()
    torch.testing.assert_close(served(kjt.values(), kjt.lengths()), ref, atol=1e-6, rtol=1e-6)


# ----- DMP (gloo): one rank in this process; two spawned ranks with EMBTABLE_TEST_DMP_FP16=2 (slow) -----
def _shard_worker(rank: int, world: int, port: int, out: str) -> None:
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from embtable.sharding import shard
    from experiments.training.distributed import slice_kjt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    per_rank = 8 // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    results = {}
    for sharding in ("table_wise", "row_wise"):
        model = embtable.build(FEATURES, FP16, seed=0)
        reference = embtable.build(FEATURES, FP16, seed=0)
        dmp = shard(model, optimizer="sgd", lr=0.5, sharding_types=[sharding])
        assert not [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        diffs = []
        for step in range(3):
            kjt = _kjt(batch=8, seed=10 + step)
            mine = dmp(slice_kjt(kjt, lo, hi)).values()
            theirs = reference(kjt).values()
            diffs.append(float((mine - theirs[lo:hi]).abs().max()))
            target = torch.linspace(-1, 1, 12)
            ((mine - target) ** 2).mean().backward()
            ref_opt.zero_grad()
            ((theirs - target) ** 2).mean().backward()
            ref_opt.step()
        results[sharding] = {"diffs": diffs, "dtype": str(mine.dtype),
                             "planned": sorted({s.sharding_type for p in dmp.plan.plan.values() for s in p.values()})}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_dmp_shards_fp16_rows(tmp_path):
    world = int(os.environ.get("EMBTABLE_TEST_DMP_FP16", "1"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if world == 1:
        if dist.is_initialized():
            pytest.skip("a process group is already initialised in this process")
        try:
            _shard_worker(0, 1, port, str(tmp_path))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    else:
        mp.start_processes(_shard_worker, args=(world, port, str(tmp_path)), nprocs=world, start_method="spawn",
                           join=True)
    for rank in range(world):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for sharding, r in results.items():
            assert r["planned"] == [sharding] and r["dtype"] == "torch.float32"
            forward, *trained = r["diffs"]
            assert forward <= 1e-6, (sharding, r)  # the sharded fp16 TBE pools in fp32, as the plain lookup
            assert max(trained) < 5e-3, (sharding, r)  # fp16 write-backs of gradients summed in another order
