"""`embtable advise` on the tiny preset: search, finals, ranking, infeasible methods, resume, time limit."""

from __future__ import annotations

import pytest

import data_prep
import embtable
from experiments.training.config import ConfigError
from experiments.tune.advise import _confidence, _feasible, advise, parse_duration

# few steps: a search trial trains 2 steps (rungs every step), a final run 4 steps
_FAST = {"train": {"max_steps": 4, "checkpoint_every": None, "eval_batch_size": 4096}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return data_prep.generate_dataset("tiny", tmp_path_factory.mktemp("adv") / "tiny", progress=False, workers=1)


def test_advise_ranks_resumes_and_reports(tiny, tmp_path):
    lines: list[str] = []
    kw = dict(time_limit="5m", out_dir=tmp_path / "a", overrides=_FAST, methods=["full", "hash", "qr"],
              finalists=2, max_trials=2, search_fraction=0.5, reduction_factor=2, log=lines.append)
    advice = advise(tiny, "1/8", **kw)
    assert set(advice.infeasible["1/8"]) == {"full"} and "budget" in advice.infeasible["1/8"]["full"]
    rows = [r for r in advice.rows if r["budget"] == "1/8"]
    assert [r["rank"] for r in rows] == [1, 2] and {r["method"] for r in rows} == {"hash", "qr"}
    assert all(r["seeds"] == 2 and r["test_std"] is not None for r in rows)
    assert rows[0]["valid_auc"] >= rows[1]["valid_auc"]  # ranked by validation, never by test
    rec = advice.recommended["1/8"]
    assert rec["method"] == rows[0]["method"] and rec["noise"] is not None
    assert rec["inference_bytes"] <= embtable.as_budget("1/8").resolve(data_prep.load_meta(tiny).feature_specs(16))
    assert advice.report is not None and advice.report.is_file()
    assert "Recommended at 1/8" in (advice.out_dir / "advice.md").read_text()
    assert sum(advice.trials["1/8"].values()) == 2  # each method once, with its default knobs
    assert any("trial 0 hash" in line for line in lines)  # progress is shown
    # a second call resumes: no new search trial, the final runs come from the results store
    again: list[str] = []
    second = advise(tiny, "1/8", **{**kw, "log": again.append})
    assert not any("] trial " in line or "] final " in line for line in again), again
    assert [(r["method"], r["test_auc"]) for r in second.rows] == [(r["method"], r["test_auc"]) for r in rows]


def test_time_limit_still_answers(tiny, tmp_path):
    advice = advise(tiny, ["1/8", "1/16"], time_limit=0.5, out_dir=tmp_path / "b", overrides=_FAST,
                    methods=["hash"], log=lambda line: None)
    assert advice.recommended == {} and advice.rows == []  # nothing fit; the answer says so
    assert "No method finished at 1/8" in advice.table()


def test_feasibility_over_registered_methods(tiny):
    features = data_prep.load_meta(tiny).feature_specs(16)
    ok, bad = _feasible(features, list(embtable.registered_methods()), "1/64")
    assert set(ok) | set(bad) == set(embtable.registered_methods()) and "full" in bad


def test_confidence_and_durations():
    rows = [{"method": "a", "valid_auc": 0.75, "valid_std": 0.001}, {"method": "b", "valid_auc": 0.74, "valid_std": 0.001}]
    assert _confidence(rows)["confidence"].startswith("clear")
    rows[1]["valid_auc"] = 0.7495
    assert _confidence(rows)["confidence"].startswith("within seed noise")
    assert parse_duration("2h5m") == 7500 and parse_duration("30") == 30
    with pytest.raises(ConfigError, match="30m"):
        parse_duration("half an hour")
