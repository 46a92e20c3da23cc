"""Reports from a real tiny sweep: the numbers are the means ± std over seeds of the stored runs, failed
runs are listed and never plotted, and the page says how many seeds, which protocol and which data."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pandas as pd
import pytest
from experiments_helpers import tiny_dataset

from experiments.sweep.report import pareto_front, write_report
from experiments.sweep.results import export_parquet, load
from experiments.sweep.sweep import SweepSpec, run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = tiny_dataset(tmp_path_factory)
    spec = SweepSpec.from_dict({
        "name": "rep",
        "overrides": {"data": {"path": str(tiny)}, "train": {"max_steps": 20, "checkpoint_every": 20}},
        "methods": ["hash", "qr"],
        "budgets": ["1/4", "1/16", 64],  # 64 bytes: infeasible, recorded as failed
        "models": ["dlrm"],
        "seeds": [0, 1],
    })
    out = tmp_path_factory.mktemp("sweep")
    summary = run_sweep(spec, out, log=lambda line: None)
    assert summary.errors == 0 and summary.failed == 4 and summary.ok == 2 + 2 * 2 * 2
    return out / "results.sqlite"


def test_report_numbers_are_means_and_stds_over_seeds(swept: Path, tmp_path: Path) -> None:
    report = write_report(swept, tmp_path / "report")
    frame = load(swept)
    ok = frame[frame["status"] == "ok"].fillna({"budget": "none"})
    expected = ok.groupby(["label", "budget"])["test_auc"].agg(["mean", "std", "count"])
    got = report.summary.set_index(["label", "budget"])
    assert set(got.index) == set(expected.index)  # every ok cell, and nothing else
    for key, row in expected.iterrows():
        assert got.loc[key, "auc_mean"] == pytest.approx(row["mean"], abs=1e-12)
        assert got.loc[key, "auc_std"] == pytest.approx(row["std"], abs=1e-12)
        assert got.loc[key, "seeds"] == row["count"] == 2
    # the failed cells are listed with their reason and are nowhere in the numbers
    assert len(report.failed) == 4 and set(report.failed["budget"]) == {"64"}
    assert report.failed["failure_reason"].str.contains("infeasible budget").all()
    assert "64" not in set(report.summary["budget"])
    # best method per budget: the label with the highest mean AUC at that budget
    for row in report.best.itertuples(index=False):
        at_budget = report.summary[report.summary["budget"] == row.budget]
        assert row.best == at_budget.sort_values("auc_mean").iloc[-1]["label"]
    assert list(report.best["budget"]) == ["none", "1/4", "1/16"]  # reference first, then largest budget first
    assert set(report.speed.columns) >= {"label", "1/4", "1/16"}


def test_report_files_are_self_contained_and_say_seeds_protocol_and_data(swept: Path, tmp_path: Path) -> None:
    report = write_report(swept, tmp_path / "report")
    assert report.png.read_bytes().startswith(PNG_MAGIC)
    page = report.html.read_text()
    embedded = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert embedded and base64.b64decode(embedded.group(1)) == report.png.read_bytes()
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "the page must not load anything"
    for text in ("2 seed(s)", "protocol <b>dlrm</b>", "generator:tiny", "Bayes AUC", "test AUC",
                 "Failed runs (not plotted)", "infeasible budget"):
        assert text in page, text
    md = report.markdown.read_text()
    assert "| dlrm | none | full |" in md and "## Best method per budget" in md
    assert report.context["seeds_per_cell"] == (2, 2) and report.context["protocol"] == "dlrm"


def test_report_leaves_the_callers_matplotlib_backend_alone(swept: Path, tmp_path: Path) -> None:
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # e.g. a notebook's backend: the report must not switch it
    try:
        write_report(swept, tmp_path / "report")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "report" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_parquet_round_trips(swept: Path, tmp_path: Path) -> None:
    out = export_parquet(swept, tmp_path / "runs.parquet")
    assert pd.read_parquet(out).shape == load(swept).shape


def test_report_refuses_ambiguous_or_empty_input(tmp_path: Path, swept: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results store"):
        write_report(tmp_path / "missing.sqlite", tmp_path / "r")
    with pytest.raises(ValueError, match="no runs of sweep 'nope'"):
        write_report(swept, tmp_path / "r", sweep="nope")


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(10, 0.70), (10, 0.72), (20, 0.72), (40, 0.80), (5, 0.60)]
    assert pareto_front(points) == [1, 3, 4]
