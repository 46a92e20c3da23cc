"""Sweeps: specs are checked, every finished cell is stored at once, re-runs skip finished cells, and a
sweep killed with SIGKILL loses nothing and resumes (a real subprocess)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest
import yaml
from experiments_helpers import cli, tiny_dataset, wait_for

from experiments.sweep.results import ResultStore, load
from experiments.sweep.sweep import SweepSpec, load_sweep, run_sweep
from experiments.training.config import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory)


def write_spec(path: Path, tiny: Path, **fields) -> Path:
    spec = {
        "name": "t",
        "overrides": {"data": {"path": str(tiny)}, "train": {"max_steps": 12, "checkpoint_every": 4}},
        "methods": ["hash"],
        "budgets": ["1/4"],
        "models": ["dlrm"],
        "seeds": [0],
        **fields,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_spec_errors_name_the_file_and_line(tmp_path: Path, tiny: Path) -> None:
    path = write_spec(tmp_path / "s.yaml", tiny)
    path.write_text(path.read_text() + "seed: [1]\n")
    with pytest.raises(ConfigError, match=r"s\.yaml:\d+: unknown key 'seed'"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="budget 'lots'"):
        load_sweep(write_spec(tmp_path / "b.yaml", tiny, budgets=["lots"]))
    with pytest.raises(ConfigError, match=r"m\.yaml:\d+: unknown embedding method .hashh."):
        load_sweep(write_spec(tmp_path / "m.yaml", tiny, methods=["hashh"]))
    with pytest.raises(ConfigError, match="appear twice"):
        load_sweep(write_spec(tmp_path / "d.yaml", tiny, methods=["hash", "hash"]))
    with pytest.raises(ConfigError, match="distinct integers"):
        load_sweep(write_spec(tmp_path / "e.yaml", tiny, seeds=[1, 1]))


def test_cells_cover_the_grid_with_stable_distinct_keys(tiny: Path) -> None:
    spec = SweepSpec.from_dict({"name": "g", "methods": ["hash", {"label": "h_mod", "method": "hash", "hash_fn": "modulo"}],
                                "budgets": ["1/4", "1/16"], "models": ["dlrm", "dcn_v2"], "seeds": [0, 1, 2],
                                "overrides": {"data": {"path": str(tiny)}}})
    cells = spec.cells()
    assert len(cells) == 2 * 3 * (1 + 2 * 2)  # models x seeds x (reference + methods x budgets)
    assert len({c.key for c in cells}) == len(cells)
    assert [c.key for c in spec.cells()] == [c.key for c in cells]  # stable
    ref = [c for c in cells if c.label == "full"]
    assert len(ref) == 6 and all(c.budget is None for c in ref)


def test_every_cell_is_stored_failures_with_reason_and_reruns_skip(tmp_path: Path, tiny: Path) -> None:
    # 64 bytes cannot hold the tables: that cell fails (infeasible budget) and is recorded as failed
    spec = load_sweep(write_spec(tmp_path / "s.yaml", tiny, budgets=["1/4", 64], seeds=[0, 1]))
    lines: list[str] = []
    summary = run_sweep(spec, tmp_path / "out", log=lines.append)
    assert (summary.total, summary.ok, summary.failed, summary.errors) == (6, 4, 2, 0)
    frame = load(tmp_path / "out" / "results.sqlite")
    assert len(frame) == 6 and frame["key"].is_unique
    failed = frame[frame["status"] == "failed"]
    assert set(failed["budget"]) == {"64"}
    assert failed["failure_reason"].str.contains("infeasible budget").all()
    assert failed["test_auc"].isna().all()  # a failed run never reports an AUC
    ok = frame[frame["status"] == "ok"]
    assert ok["test_auc"].between(0.5, 1.0).all() and (ok["inference_bytes"] > 0).all()
    assert any("ETA" in line and "left" in line for line in lines)  # progress: done / left / ETA
    assert any("6/6 done" in line for line in lines)

    again = run_sweep(spec, tmp_path / "out", log=lines.append)
    assert (again.skipped, again.ok, again.failed) == (6, 0, 0)
    retried = run_sweep(spec, tmp_path / "out", retry_failed=True, log=lines.append)
    assert (retried.skipped, retried.failed) == (4, 2)
    assert len(load(tmp_path / "out" / "results.sqlite")) == 6


def test_sweep_killed_with_sigkill_loses_nothing_and_resumes(tmp_path: Path, tiny: Path) -> None:
    spec_path = write_spec(tmp_path / "s.yaml", tiny, budgets=["1/4", "1/16"],
                           overrides={"data": {"path": str(tiny)}, "train": {"max_steps": 50, "checkpoint_every": 5}})
    out = tmp_path / "out"
    store_path = out / "results.sqlite"
    cells = load_sweep(spec_path).cells()

    def rows() -> int:
        if not store_path.exists():
            return 0
        with sqlite3.connect(store_path) as conn:
            return conn.execute("SELECT count(*) FROM runs").fetchone()[0]

    proc = cli("sweep", str(spec_path), "--out", str(out), "--no-report")
    try:
        # kill it while a later cell is half-trained: at least one result stored, and a checkpoint of a
        # cell that is not stored yet on disk
        def mid_cell() -> bool:
            n = rows()
            if n < 1 or n >= len(cells):
                return False
            return (out / "runs" / cells[n].key / "checkpoint.pt").exists()

        wait_for(mid_cell, 240, "a stored result and a checkpoint of the next cell", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.stdout.close()

    with sqlite3.connect(store_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = load(store_path)
    assert 1 <= len(stored) < len(cells) and (stored["status"] == "ok").all()
    killed = [c for c in cells if c.key not in set(stored["key"]) and (out / "runs" / c.key / "checkpoint.pt").exists()]
    assert killed, "the kill came before any unfinished cell wrote a checkpoint"

    summary = run_sweep(load_sweep(spec_path), out, log=lambda line: None)
    assert summary.skipped == len(stored)  # nothing finished before the kill is trained again
    assert summary.ok == len(cells) - len(stored)
    final = load(store_path)
    assert len(final) == len(cells) and final["key"].is_unique and (final["status"] == "ok").all()
    record = json.loads(final.set_index("key").loc[killed[0].key, "record"])
    assert record["resumed_from_step"] is not None and record["resumed_from_step"] > 0  # from its checkpoint
    assert ResultStore(store_path).finished_keys("t") == {c.key for c in cells}
