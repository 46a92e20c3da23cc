"""GPU readiness (marked ``gpu``; skipped, saying why, without CUDA). Run them all with
``bash experiments/benchmarks/gpu_check.sh`` (about 8 minutes on one H200): every method's forward and backward on
CUDA equal the CPU's, the fused path on CUDA, DMP with NCCL on one GPU, export and load on CUDA, and the
kernel benchmark against the GPU's gather ceiling."""

from __future__ import annotations

import copy

import pytest
import torch
from method_cases import CASES

import embtable
from experiments.benchmarks.bench_kernels import zipf_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run experiments/benchmarks/gpu_check.sh on a GPU)"),
]

FEATURES = [embtable.FeatureSpec("a", 5000, 16), embtable.FeatureSpec("b", 40, 16), embtable.FeatureSpec("c", 30000, 16)]
CUDA = torch.device("cuda")


def _kjt(seed=0, batch=64):
    return zipf_batch(FEATURES, batch, torch.Generator().manual_seed(seed))


def _build(name):
    case = CASES[name]
    return embtable.build(FEATURES, case.config, case.budget, seed=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_on_cuda_equal_cpu(name):
    cpu = _build(name)
    gpu = copy.deepcopy(cpu).to(CUDA)
    kjt = _kjt()
    out_cpu, out_gpu = cpu(kjt).values(), gpu(kjt.to(CUDA)).values()
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out_cpu)
    (out_cpu * g).sum().backward()
    (out_gpu * g.to(CUDA)).sum().backward()
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.grad is None:
            assert q.grad is None, n
            continue
        a, b = p.grad.to_dense() if p.grad.is_sparse else p.grad, q.grad.to_dense() if q.grad.is_sparse else q.grad
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{name} {n}: {m}")


@pytest.mark.parametrize("name", ["full", "hash", "qr", "unified", "optembed"])
def test_fused_path_on_cuda_equals_unfused(name):
    from experiments.training.train import make_optimizers

    plain = _build(name).to(CUDA)
    fused = copy.deepcopy(plain)
    ref = make_optimizers(plain, plain, "rowwise_adagrad", 0.1, 1e-3, fused_tables=False)
    opts = make_optimizers(fused, fused, "rowwise_adagrad", 0.1, 1e-3, fused_tables=True)
    assert opts.fused
    for step in range(2):
        for m, o in ((plain, ref), (fused, opts)):
            o.zero_grad()
            m(_kjt(step).to(CUDA)).values().pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(fused(_kjt(5).to(CUDA)).values(), plain(_kjt(5).to(CUDA)).values(),
                               rtol=1e-4, atol=1e-5)


def test_dmp_with_nccl_on_one_gpu(tmp_path):
    import torch.distributed as dist

    from embtable.sharding import shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        module = _build("hash").to(CUDA)
        expected = module(_kjt().to(CUDA)).values().detach()
        dmp = shard(copy.deepcopy(module), optimizer="rowwise_adagrad", lr=0.1, device=CUDA)
        torch.testing.assert_close(dmp(_kjt().to(CUDA)).values(), expected, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_export_and_load_on_cuda(tmp_path):
    module = _build("qr").to(CUDA).eval()
    expected = module(_kjt().to(CUDA)).values().detach()
    embtable.export.export(module, tmp_path / "m.pt")
    loaded = embtable.export.load(tmp_path / "m.pt", map_location=CUDA)
    torch.testing.assert_close(loaded(_kjt().to(CUDA)).values(), expected, rtol=1e-5, atol=1e-6)


def test_kernel_benchmark_against_the_gpu_gather_ceiling():
    from experiments.benchmarks.bench_kernels import bench

    result = bench(rows=20_000, budget="1/4", methods=["full", "hash"], paths="both", threads=2, batch_size=1024,
                   iters=2, rounds=2, device="cuda", log=lambda s: None)
    shares = {r["path"]: r["train_share"] for r in result["rows"]}
    assert shares["ceiling"] == 1.0 and shares["tbe"] > 0 and shares["full fused"] > 0
