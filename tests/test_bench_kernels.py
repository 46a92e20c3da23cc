"""The kernel benchmark runs end to end on a tiny shape and reports shares of its own ceiling."""

from __future__ import annotations

import torch

from experiments.benchmarks.bench_kernels import bench, format_table


def test_bench_kernels_smoke():
    before = torch.get_num_threads()
    result = bench(rows=200, budget="1/2", methods=["full", "hash"], paths="unfused", threads=before + 1,
                   batch_size=64, iters=1, rounds=1, log=lambda s: None)
    assert torch.get_num_threads() == before  # the benchmark gives the caller its thread count back
    paths = [r["path"] for r in result["rows"]]
    assert paths[:2] == ["ceiling", "tbe"] and "full" in paths and "hash 1/2" in paths
    ceiling = result["rows"][0]
    assert ceiling["forward_share"] == 1.0 and ceiling["train_share"] == 1.0
    assert all(r["forward_samples_per_s"] > 0 and r["train_samples_per_s"] > 0 for r in result["rows"])
    assert "| hash 1/2 |" in format_table(result)


def test_bench_kernels_compiled_smoke():
    # backend "eager" (dynamo only) keeps this fast; the benchmark's default is inductor
    result = bench(rows=200, budget="1/2", methods=["hash"], paths="unfused", threads=1, batch_size=16, iters=1,
                   rounds=1, compiled=True, backend="eager", log=lambda s: None)
    assert result["backend"] == "eager" and result["backend_note"] == ""
    assert [r["path"] for r in result["rows"]][-2:] == ["hash 1/2", "hash 1/2 compiled"]
    (row,) = result["compiled"]
    assert row["path"] == "hash 1/2" and row["forward_speedup"] > 0 and row["train_speedup"] > 0
    assert row["forward_compile_s"] > 0 and row["train_compile_s"] > 0
    assert "torch.compile (backend eager)" in format_table(result)
