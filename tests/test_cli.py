"""The `embtable` command line: every subcommand has --help, and the workflow runs end to end through
``main(argv)`` (prepare -> plan -> train -> sweep -> report), with one-line errors for bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from experiments_helpers import tiny_dataset

import embtable
from experiments.cli import build_parser, main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory)


@pytest.mark.parametrize("command", ["", "prepare", "prepare generate", "prepare criteo", "prepare avazu", "plan",
                                     "train", "sweep", "tune", "report", "demo"])
def test_every_subcommand_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage: embtable" in capsys.readouterr().out


def test_console_script_is_declared() -> None:
    import importlib
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["embtable"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main  # the script runs this CLI's main
    assert build_parser().prog == "embtable"


def test_plan_prints_every_method_within_the_budget(tiny: Path, capsys) -> None:
    assert main(["plan", "--dataset", str(tiny), "--budget", "1/16"]) == 0
    out = capsys.readouterr().out
    full = int(re.search(r"full fp32 tables ([\d,]+) bytes", out).group(1).replace(",", ""))
    for method in embtable.registered_methods():
        line = next(ln for ln in out.splitlines() if ln.startswith(method + " "))
        if line.split()[1] == "infeasible":  # said so, with the planner's reason
            assert f"{method}:" in line and "budget" in line, line
        else:
            assert int(line.split()[1].replace(",", "")) <= full / 16, line
    assert "infeasible" in next(ln for ln in out.splitlines() if ln.startswith("full "))  # full needs 16x
    assert "infeasible" not in next(ln for ln in out.splitlines() if ln.startswith("hash "))


def test_train_runs_one_configuration(tiny: Path, tmp_path: Path, capsys) -> None:
    code = main(["train", "smoke", "hash", "--set", f"data.path={tiny}", "--set", "train.max_steps=6",
                 "--out", str(tmp_path / "run"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)
    assert result["status"] == "ok" and result["steps"] == 6 and 0 < result["test_auc"] <= 1
    assert (tmp_path / "run" / "result.json").is_file()


def test_sweep_then_report(tiny: Path, tmp_path: Path, capsys) -> None:
    spec = {"name": "cli", "overrides": {"data": {"path": str(tiny)}, "train": {"max_steps": 6}},
            "methods": ["hash"], "budgets": ["1/8"], "models": ["dlrm"], "seeds": [0]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2/2 done" in out and "## Best method per budget" in out and "report.html" in out
    assert main(["report", str(tmp_path / "out" / "results.sqlite"), "--out", str(tmp_path / "rep"),
                 "--export", str(tmp_path / "rows.parquet")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rows.parquet").is_file()


def test_prepare_converts_the_real_samples_and_generates(tmp_path: Path, capsys) -> None:
    assert main(["prepare", "criteo", str(SHARED / "criteo_kaggle_sample.txt"), "--out", str(tmp_path / "c"),
                 "--protocol", "random", "--min-count", "1"]) == 0
    assert main(["prepare", "avazu", str(SHARED / "avazu_sample.csv"), "--out", str(tmp_path / "a"),
                 "--min-count", "1"]) == 0
    import data_prep

    assert data_prep.load_meta(tmp_path / "c").protocol == "random"
    assert data_prep.load_meta(tmp_path / "a").source.startswith("avazu")
    assert main(["prepare", "avazu", "x.csv", "y.csv", "--out", str(tmp_path / "z")]) == 2
    assert main(["prepare", "generate", "--preset", "tiny", "--out", str(tmp_path / "g")]) == 0
    assert data_prep.load_meta(tmp_path / "g").bayes_auc is not None


def test_bad_input_is_one_line_naming_the_problem(tmp_path: Path, capsys) -> None:
    assert main(["train", "no_such_config"]) == 2
    assert "no config named 'no_such_config'" in capsys.readouterr().err
    assert main(["sweep", "no_such_sweep"]) == 2
    assert "no sweep spec 'no_such_sweep'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none.sqlite")]) == 2
    assert "no results store" in capsys.readouterr().err

