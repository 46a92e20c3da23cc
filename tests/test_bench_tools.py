"""The benchmark helpers: bench_tables' Markdown from a results store, bench_methods_speed on the tiny preset."""

from __future__ import annotations

import json
import math

import pytest

from experiments.benchmarks.bench_tables import bench_table
from experiments.sweep.results import ResultStore

FULL = 1_000_000


def _ok(auc: float, nbytes: int, speed: float) -> dict:
    return {"status": "ok", "test_auc": auc, "test_logloss": 1 - auc, "inference_bytes": nbytes,
            "full_table_bytes": FULL, "train_samples_per_s": speed}


@pytest.fixture
def store(tmp_path):
    s = ResultStore(tmp_path / "results.sqlite")
    cell = lambda label, budget, seed: {"label": label, "method": label, "budget": budget, "model": "dlrm", "seed": seed}  # noqa: E731
    s.record("b", "f0", cell("full", None, 0), _ok(0.80, FULL, 1000.0))
    s.record("b", "f1", cell("full", None, 1), _ok(0.78, FULL, 2000.0))
    s.record("b", "h0", cell("hash", "1/4", 0), _ok(0.70, 250_000, 500.0))
    s.record("b", "h1", cell("hash", "1/4", 1), _ok(0.72, 250_000, 4000.0))
    s.record("b", "q0", cell("qr", "1/4", 0), _ok(0.75, 249_000, 1000.0))
    s.record("b", "l0", cell("low_rank", "1/64", 0),
             {"status": "failed", "failure_reason": "infeasible budget: rank 1 needs more", "full_table_bytes": FULL})
    return s.path


def test_bench_table_rows_means_speed_and_failures(store, tmp_path):
    (tmp_path / "oe").mkdir()
    (tmp_path / "oe" / "optembed_result.json").write_text(json.dumps({
        "status": "ok", "seed": 0, "budget_bytes": FULL // 4, "inference_bytes": 240_000, "test_auc": 0.79,
        "test_logloss": 0.2, "train_samples_per_s": 100.0,
        "stage_seconds": {"supernet": 10.0, "search": 20.4, "retrain": 9.0}}))
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps([{"method": "full", "budget": None, "rel_full": 1.0},
                                 {"method": "hash", "budget": "1/4", "rel_full": 0.93}]))
    table, failed = bench_table(str(store), str(tmp_path / "oe" / "*.json"), str(speed))
    lines = table.splitlines()
    assert lines[2].startswith("| none | full | 1,000,000 (1.000) | 0.7900 ± 0.0141 |")  # sample std of .80, .78
    quarter = [line for line in lines if line.startswith("| 1/4 |")]
    assert [line.split(" | ")[1] for line in quarter] == ["optembed (3 stages)", "qr", "hash"]  # best AUC first
    hash_row = quarter[2].split(" | ")
    assert hash_row[3] == f"0.7100 ± {math.sqrt(2) * 0.01:.4f}"
    assert hash_row[5] == "2"
    assert hash_row[6] == "1.25 ± 1.06"  # 500/1000 and 4000/2000, per seed against that seed's full run
    assert hash_row[7] == "0.93"
    assert quarter[0].endswith("| s0: 10 / 20 / 9 |")
    assert "| low_rank | 1/64 | infeasible budget: rank 1 needs more |" in failed
    assert "qr" not in failed


def test_bench_speed_splits_the_forward(tmp_path):
    import data_prep
    from experiments.benchmarks.bench_methods_speed import bench

    data_prep.generate_dataset("tiny", tmp_path / "tiny", progress=False)
    rows = bench([{"method": "full"}, {"method": "hash"}, {"method": "low_rank"}], ["1/4", "1/1000000"],
                 preset="tiny", data_dir=str(tmp_path), steps=3, rounds=1)
    by = {(r["method"], r["budget"]): r for r in rows}
    assert set(by) == {("full", None), ("hash", "1/4"), ("low_rank", "1/4")}  # infeasible cells are skipped
    assert by[("full", None)]["rel_full"] == 1.0 and by[("full", None)]["mapper_ms"] == 0.0
    for r in rows:
        assert r["storage_ms"] > 0 and r["step_ms"] > 0 and r["samples_per_s"] > 0
        # hooks time each lookup once (no nested double count): the parts fit inside the whole forward
        assert r["mapper_ms"] + r["storage_ms"] <= r["embedding_forward_ms"]
    assert by[("hash", "1/4")]["mapper_ms"] > 0
