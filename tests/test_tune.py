"""Optuna search with real worker processes (`embtable tune` subprocesses, real training on the tiny
preset): two workers finish exactly n_trials on journal storage and on PostgreSQL, a killed worker's
trial is failed and retried, poor trials are pruned, and the multi-objective mode returns a Pareto front.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from experiments_helpers import REPO, cli, finish, tiny_dataset, wait_for
from optuna.trial import TrialState

import embtable
from experiments.cli import main
from experiments.training.config import ConfigError
from experiments.tune.search_space import load_spaces
from experiments.tune.study_storage import StorageError, open_storage
from experiments.tune.tune import TuneSpec, counted_trials, create_study, load_tune, outcome, run_worker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory)


def spec_data(tiny: Path, name: str, **fields) -> dict:
    data = {
        "name": name,
        "overrides": {"data": {"path": str(tiny)}, "train": {"max_steps": 8, "eval_every": 4}},
        "method": "hash",
        "budget": "1/8",
        "model": "dlrm",
        "n_trials": 6,
        "seed": 0,
        "pruner": None,
        "heartbeat_interval": 1,
        "grace_period": 4,
        **fields,
    }
    return data


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def check_exactly_n(study: optuna.Study, n: int) -> None:
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n, [(t.number, t.state.name) for t in trials]
    assert [t.number for t in trials] == list(range(n))
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state.name for t in trials]
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == n, "two trials ran the same parameters"
    assert counted_trials(study) == (n, 0, 0)


def test_every_registered_method_has_a_search_space() -> None:
    spaces = load_spaces()
    missing = sorted(set(embtable.registered_methods()) - set(spaces))
    assert not missing, f"add search spaces for {missing} in experiments/configs/search/spaces.yaml"
    for method, space in spaces.items():
        assert {"train.dense_lr", "train.embedding_lr"} <= {p.path for p in space}, method


def test_spec_errors_are_actionable(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(ConfigError, match="eval_every"):  # pruning without intermediate AUC
        TuneSpec.from_dict({**spec_data(tiny, "x"), "pruner": {"n_startup_trials": 2},
                            "overrides": {"data": {"path": str(tiny)}}})
    with pytest.raises(ConfigError, match="budgets"):
        TuneSpec.from_dict({**spec_data(tiny, "x"), "multi_objective": True})
    path = write_spec(tmp_path / "s.yaml", {**spec_data(tiny, "x"), "n_trial": 3})
    with pytest.raises(ConfigError, match=r"s\.yaml:\d+: unknown key"):
        load_tune(path)


def test_sqlite_is_refused_for_several_workers(tmp_path: Path, tiny: Path, capsys) -> None:
    with pytest.raises(StorageError, match="journal"):
        open_storage(f"sqlite:///{tmp_path}/s.sqlite3", workers=2)
    path = write_spec(tmp_path / "s.yaml", spec_data(tiny, "x"))
    assert main(["tune", str(path), "--workers", "2", "--storage", f"sqlite:///{tmp_path}/s.sqlite3"]) == 2
    err = capsys.readouterr().err
    assert "SQLite" in err and "journal:" in err and "postgresql://" in err


def two_workers(spec_path: Path, storage: str) -> list[str]:
    """Run two `embtable tune` processes on one storage at once; each must have run some of the trials."""
    procs = [cli("tune", str(spec_path), "--storage", storage, "--worker-index", str(i)) for i in range(2)]
    outputs = [finish(p, timeout=240) for p in procs]
    for out in outputs:  # both took part, so the claims really raced
        assert re.search(r"worker \d: trial \d+ complete", out), out
    return outputs


def concurrent_spec(tiny: Path, name: str) -> dict:
    # trials of ~0.5-1 s: six of them outlast the difference in start-up time between the two processes
    data = spec_data(tiny, name)
    data["overrides"] = {"data": {"path": str(tiny)}, "train": {"max_steps": 40}}
    return data


def test_two_workers_on_journal_storage_finish_exactly_n_trials(tmp_path: Path, tiny: Path) -> None:
    spec_path = write_spec(tmp_path / "s.yaml", concurrent_spec(tiny, "journal2"))
    journal = tmp_path / "study.journal"
    two_workers(spec_path, f"journal:{journal}")
    storage = open_storage(f"journal:{journal}", workers=2)
    check_exactly_n(optuna.load_study(study_name="journal2", storage=storage.storage), 6)


def postgres_url() -> str | None:
    url = os.environ.get("EMBTABLE_TEST_POSTGRES_URL")
    file = REPO / ".ci" / "postgres_url"
    if not url and file.is_file():
        url = file.read_text().strip()
    return url or None


def test_two_workers_on_postgresql_finish_exactly_n_trials(tmp_path: Path, tiny: Path) -> None:
    url = postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL server: run .ci/postgres.sh (it starts one and writes .ci/postgres_url) "
                    "or set EMBTABLE_TEST_POSTGRES_URL")
    import sqlalchemy as sa

    from experiments.tune.study_storage import normalize_url

    try:
        sa.create_engine(normalize_url(url)[1]).connect().close()
    except Exception as err:  # the URL is there but nothing answers
        pytest.skip(f"PostgreSQL at {url} is not reachable ({type(err).__name__}); start it with .ci/postgres.sh")
    name = f"pg2-{uuid.uuid4().hex[:8]}"  # the database outlives the test: a fresh study each time
    spec_path = write_spec(tmp_path / "s.yaml", concurrent_spec(tiny, name))
    two_workers(spec_path, url)
    storage = open_storage(url, workers=2)
    check_exactly_n(optuna.load_study(study_name=name, storage=storage.storage), 6)


def test_a_killed_workers_trial_is_failed_and_retried(tmp_path: Path, tiny: Path) -> None:
    journal = tmp_path / "study.journal"
    url = f"journal:{journal}"
    # the first worker's trials are long (many steps), so it is surely killed mid-trial
    slow = spec_data(tiny, "killed", n_trials=3)
    slow["overrides"] = {"data": {"path": str(tiny)}, "train": {"epochs": 1000, "max_steps": 100000}}
    victim = cli("tune", str(write_spec(tmp_path / "slow.yaml", slow)), "--storage", url)
    try:
        # killed once its trial has its parameters and is training (its last parameter is in the journal)
        wait_for(lambda: journal.exists() and '"method.hash_fn"' in journal.read_text(), 120,
                 "the first trial's parameters", victim)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
    victim.stdout.close()

    storage = open_storage(url, workers=2, heartbeat_interval=1, grace_period=4)
    spec = TuneSpec.from_dict(spec_data(tiny, "killed", n_trials=3))
    study = create_study(spec, storage)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]  # left behind by the dead worker
    lines: list[str] = []
    summary = run_worker(spec, storage, worker=1, log=lines.append, poll_seconds=0.2)
    assert summary.retried_dead == [0]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL  # the dead worker's trial: failed, not running forever
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[0].params  # retried with the same parameters
    assert counted_trials(study) == (3, 0, 0) and len(trials) == 4  # 3 counted + the dead one
    assert any("retry of 0" in line for line in lines)


def test_poor_trials_are_pruned_on_intermediate_validation_auc(tmp_path: Path, tiny: Path) -> None:
    data = spec_data(tiny, "prune", n_trials=4, pruner={"n_startup_trials": 2, "n_warmup_steps": 0})
    data["overrides"]["train"] = {"max_steps": 30, "eval_every": 10}
    spec = TuneSpec.from_dict(data)
    storage = open_storage(f"sqlite:///{tmp_path}/s.sqlite3")
    study = create_study(spec, storage)
    good = {"train.dense_lr": 3e-3, "train.embedding_lr": 0.1, "method.hash_fn": "universal"}
    study.enqueue_trial(good)
    study.enqueue_trial({**good, "train.dense_lr": 2e-3})
    # learning rates so small that nothing is learned: its AUC at step 10 is far below the median
    study.enqueue_trial({"train.dense_lr": 1e-4, "train.embedding_lr": 3e-3, "method.hash_fn": "universal"})
    run_worker(spec, storage, log=lambda line: None)
    states = [t.state for t in study.get_trials()]
    assert states[:2] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert states[2] == TrialState.PRUNED, states
    pruned = study.get_trials()[2]
    assert max(pruned.intermediate_values) < 30  # stopped before the end of training
    assert counted_trials(study)[0] == 4


def test_multi_objective_returns_the_pareto_front_across_budgets(tmp_path: Path, tiny: Path) -> None:
    data = spec_data(tiny, "mo", n_trials=4, budgets=["1/4", "1/32"], multi_objective=True)
    del data["budget"]
    spec = TuneSpec.from_dict(data)
    storage = open_storage(f"sqlite:///{tmp_path}/s.sqlite3")
    run_worker(spec, storage, log=lambda line: None)
    result = outcome(spec, storage)
    assert result.best, "no Pareto-optimal trial"
    points = [(row["inference_bytes"], row["valid_auc"]) for row in result.best]
    for b, a in points:  # no front point is dominated by another trial of the study
        for t in optuna.load_study(study_name="mo", storage=storage.storage).get_trials(states=(TrialState.COMPLETE,)):
            assert not (t.values[1] <= b and t.values[0] >= a and (t.values[1] < b or t.values[0] > a))
    assert {row["budget"] for row in result.best} <= {"1/4", "1/32"}
    assert "valid_auc" in result.table()


def test_resuming_a_study_adds_only_the_missing_trials(tmp_path: Path, tiny: Path) -> None:
    spec_path = write_spec(tmp_path / "s.yaml", spec_data(tiny, "resume", n_trials=2))
    storage = f"sqlite:///{tmp_path}/s.sqlite3"
    assert main(["tune", str(spec_path), "--storage", storage]) == 0
    assert main(["tune", str(spec_path), "--storage", storage, "--n-trials", "3"]) == 0
    study = optuna.load_study(study_name="resume", storage=open_storage(storage).storage)
    assert len(study.get_trials()) == 3
    params = [tuple(sorted(t.params.items())) for t in study.get_trials()]
    assert len(set(params)) == 3, "the resumed run replayed an earlier trial's parameters"
