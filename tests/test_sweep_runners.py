"""Sweep cells that run a multi-stage runner (OptEmbed's supernet -> search -> retrain, SVD + fine-tune):
spec checks, one ordinary row per cell in the results store, re-runs skip it, failures carry a reason;
and the shipped sweep specs label the methods honestly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from experiments_helpers import tiny_dataset

import embtable
from experiments.sweep.results import load
from experiments.sweep.sweep import SweepSpec, load_sweep, run_sweep
from experiments.training.config import ConfigError

# Short stages: a few steps of supernet and retrain, a small search.
OPTEMBED = {"label": "optembed_search", "method": "optembed", "runner": "optembed",
            "runner_options": {"supernet_max_steps": 6, "retrain_max_steps": 6, "population": 4,
                               "generations": 2, "parents": 2}}
SVD = {"label": "low_rank_svd", "method": "low_rank", "runner": "svd", "runner_options": {"finetune_steps": 4}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory)


def spec_dict(tiny: Path, **fields) -> dict:
    return {
        "name": "r",
        "overrides": {"data": {"path": str(tiny)},
                      "train": {"max_steps": 6, "checkpoint_every": 3, "eval_batch_size": 4096}},
        "methods": [OPTEMBED],
        "reference": [],
        "budgets": ["1/4"],
        "models": ["dlrm"],
        "seeds": [0],
        **fields,
    }


def test_runner_entries_are_checked_and_keyed_apart_from_the_single_stage_method(tiny: Path) -> None:
    spec = SweepSpec.from_dict(spec_dict(tiny, methods=["optembed", OPTEMBED, SVD]))
    cells = {c.label: c for c in spec.cells()}
    assert cells["optembed_search"].runner == "optembed" and cells["optembed"].runner is None
    assert cells["optembed_search"].config.embedding.method == {"method": "optembed"}  # no runner key in it
    assert cells["optembed_search"].key != cells["optembed"].key  # same run config, different pipeline
    shorter = {**OPTEMBED, "runner_options": {**OPTEMBED["runner_options"], "population": 6}}
    assert SweepSpec.from_dict(spec_dict(tiny, methods=[shorter])).cells()[0].key != cells["optembed_search"].key
    assert SweepSpec.from_dict(spec_dict(tiny, methods=[{"method": "optembed", "runner": "optembed"}])).methods[0].label \
        == "optembed[optembed]"

    bad = [
        ({**OPTEMBED, "runner": "nope"}, "unknown runner 'nope'"),
        ({**SVD, "method": "hash"}, "produces 'low_rank' tables, but the entry's method is 'hash'"),
        ({**OPTEMBED, "oov_buckets": 2}, r"method settings \['oov_buckets'\] are not used.*runner_options"),
        ({**OPTEMBED, "runner_options": {"populaton": 4}}, r"bad runner_options.*valid: \[.*'population'"),
        ({**OPTEMBED, "runner_options": {"retrain_init": "warm"}}, "retrain_init must be"),
        ({**SVD, "runner_options": {"moments": "both"}}, "moments must be 'table' or 'data'"),
        ({"method": "hash", "runner_options": {"x": 1}}, "runner_options without a runner"),
    ]
    for entry, message in bad:
        with pytest.raises(ConfigError, match=message):
            SweepSpec.from_dict(spec_dict(tiny, methods=[entry]))
    with pytest.raises(ConfigError, match="belong in 'methods', not in 'reference'"):
        SweepSpec.from_dict(spec_dict(tiny, reference=[SVD]))


def test_optembed_runner_cell_records_one_ok_row_within_budget_and_reruns_skip(tmp_path: Path, tiny: Path) -> None:
    # 64 bytes cannot hold one row per feature: that runner cell is recorded as failed, with the reason
    spec = SweepSpec.from_dict(spec_dict(tiny, budgets=["1/4", 64]))
    summary = run_sweep(spec, tmp_path / "out", log=lambda line: None)
    assert (summary.total, summary.ok, summary.failed, summary.errors) == (2, 1, 1, 0)
    frame = load(tmp_path / "out" / "results.sqlite")
    assert len(frame) == 2 and set(frame["label"]) == {"optembed_search"} and set(frame["method"]) == {"optembed"}
    row = frame[frame["status"] == "ok"].iloc[0]
    record = json.loads(row["record"])
    features = __import__("data_prep").load_meta(tiny).feature_specs(16)
    budget_bytes = embtable.as_budget("1/4").resolve(features)
    assert record["runner_record"]["budget_bytes"] == budget_bytes
    assert 0 < row["inference_bytes"] <= budget_bytes and row["training_bytes"] > row["inference_bytes"]
    assert row["full_table_bytes"] == sum(f.full_table_bytes for f in features)
    assert 0.0 < row["test_auc"] < 1.0 and 0.0 < row["valid_auc"] < 1.0
    assert row["test_logloss"] > 0 and row["valid_logloss"] > 0
    assert row["train_samples_per_s"] > 0 and row["wall_seconds"] > 0 and row["steps"] == 6
    assert set(record["stage_seconds"]) == {"supernet", "search", "retrain"}
    assert record["runner"] == "optembed" and record["runner_record"]["candidates_evaluated"] > 0
    run_dir = tmp_path / "out" / "runs" / row["key"]
    assert {"supernet.pt", "search.pt", "retrain.pt", "compact.pt"} <= {p.name for p in run_dir.iterdir()}
    failed = frame[frame["status"] == "failed"].iloc[0]
    assert failed["budget"] == "64" and "infeasible budget" in failed["failure_reason"]
    assert failed["test_auc"] is None or failed["test_auc"] != failed["test_auc"]  # no AUC for a failed cell

    again = run_sweep(spec, tmp_path / "out", log=lambda line: None)
    assert (again.skipped, again.ok, again.failed, again.errors) == (2, 0, 0, 0)
    assert len(load(tmp_path / "out" / "results.sqlite")) == 2


def test_svd_runner_cell_records_finetuned_metrics(tmp_path: Path, tiny: Path) -> None:
    spec = SweepSpec.from_dict(spec_dict(tiny, methods=[SVD], budgets=["1/4"]))
    summary = run_sweep(spec, tmp_path / "out", log=lambda line: None)
    assert (summary.ok, summary.failed, summary.errors) == (1, 0, 0)
    row = load(tmp_path / "out" / "results.sqlite").iloc[0]
    record = json.loads(row["record"])
    assert row["label"] == "low_rank_svd" and row["method"] == "low_rank"
    assert 0 < row["inference_bytes"] <= row["full_table_bytes"] // 4
    assert row["training_bytes"] > row["inference_bytes"]
    assert row["test_auc"] == record["runner_record"]["test_auc"] and row["steps"] == 4
    assert record["runner_record"]["finetune_steps"] == 4
    assert row["train_samples_per_s"] > 0
    assert set(record["stage_seconds"]) == {"full", "compress", "finetune"}


def test_shipped_sweeps_label_methods_honestly() -> None:
    demo = load_sweep("demo")
    labels = {m.label: m for m in demo.methods}
    registered = set(embtable.registered_methods()) - {m.method["method"] for m in demo.reference}
    assert {m.method["method"] for m in demo.methods} == registered  # every registered method is in the demo
    assert "optembed" not in labels and labels["optembed_freq"].method == {"method": "optembed"}
    assert all(m.runner is None for m in demo.methods)  # the three-stage runners are too slow for `make demo`
    bench = {m.label: m for m in load_sweep("bench_methods_ii").methods}
    assert bench["optembed_search"].runner == "optembed" and bench["optembed_freq"].runner is None


class _Killed(BaseException):
    """Stands for SIGKILL: not an ``Exception``, so no row is recorded for the cell."""


def test_killed_runner_cell_resumes_from_its_stage_checkpoints(tmp_path: Path, tiny: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import experiments.training.stages as stages

    spec = SweepSpec.from_dict(spec_dict(tiny))
    real_stage = stages._train_stage

    def killed_at_retrain(stage, *args, **kwargs):
        if stage.name == "retrain":
            raise _Killed
        return real_stage(stage, *args, **kwargs)

    monkeypatch.setattr(stages, "_train_stage", killed_at_retrain)
    with pytest.raises(_Killed):
        run_sweep(spec, tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out" / "results.sqlite").is_file() or len(load(tmp_path / "out" / "results.sqlite")) == 0
    run_dir = tmp_path / "out" / "runs" / spec.cells()[0].key
    done = {name: (run_dir / name).stat().st_mtime_ns for name in ("supernet.pt", "search.pt")}
    monkeypatch.setattr(stages, "_train_stage", real_stage)

    resumed = run_sweep(spec, tmp_path / "out", log=lambda line: None)
    assert (resumed.skipped, resumed.ok) == (0, 1)
    assert {name: (run_dir / name).stat().st_mtime_ns for name in done} == done  # supernet and search not redone
    fresh = run_sweep(spec, tmp_path / "fresh", log=lambda line: None)
    assert fresh.ok == 1
    row, ref = load(tmp_path / "out" / "results.sqlite").iloc[0], load(tmp_path / "fresh" / "results.sqlite").iloc[0]
    for column in ("inference_bytes", "valid_auc", "test_auc", "test_logloss", "steps"):
        assert row[column] == ref[column], column  # the resumed cell ends as an uninterrupted one
