"""Optuna search for one (method, budget, model): seeded TPE, pruning, a fixed trial budget, many workers.

A study spec (``experiments/configs/studies/<name>.yaml``)::

    name: hash_demo                  # the study's name in its storage
    configs: [demo]                  # run config under every trial (base.yaml + these)
    overrides: {train: {eval_every: 200}}   # intermediate validation AUC, for pruning
    method: hash                     # or {method: qr, num_partitions: 2}: fixed knobs are not searched
    budget: 1/16                     # single objective: maximise validation AUC at this budget
    model: dlrm
    n_trials: 30                     # total trials in the study, counting those already there
    seed: 0                          # TPE seed (mixed with the worker index and the study's size)
    pruner: {n_startup_trials: 5, n_warmup_steps: 0}   # MedianPruner; null: no pruning

Multi-objective mode (``multi_objective: true`` with ``budgets: [...]`` instead of ``budget``) searches the
budget too and maximises validation AUC while minimising inference bytes; the result is the Pareto front
across budgets. The searched knobs come from ``configs/search/spaces.yaml`` (see
:mod:`experiments.tune.search_space`).

Every trial is one ``experiments.training.train.run``; its validation AUC is the objective (the test AUC is kept
as a user attribute and never used to select). A run that fails (divergence, NaN, constant predictions,
infeasible budget) is a ``FAIL`` trial with the reason in the user attribute ``failure_reason``; it counts
toward ``n_trials``. Trials of a dead worker are failed and retried (see :mod:`experiments.tune.study_storage`).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

import embtable
from experiments.sweep.specfile import read_spec, resolve_spec, where_of
from experiments.sweep.sweep import ModelChoice
from experiments.training.config import CONFIG_DIR, ConfigError, RunConfig, load_config
from experiments.tune.search_space import Param, apply_params, search_space, suggest
from experiments.tune.study_storage import FAILURE_ATTR, StorageError, StudyStorage, open_storage

__all__ = [
    "STUDY_DIR",
    "TuneSpec",
    "TuneOutcome",
    "load_tune",
    "default_storage",
    "create_study",
    "make_objective",
    "run_worker",
    "run_study",
    "counted_trials",
    "outcome",
    "StorageError",
]

STUDY_DIR = CONFIG_DIR / "studies"

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "configs": list,
    "overrides": dict,
    "method": (str, dict),
    "budget": (str, int, float),
    "budgets": list,
    "model": (str, dict),
    "n_trials": int,
    "seed": int,
    "multi_objective": bool,
    "pruner": dict,
    "heartbeat_interval": int,
    "grace_period": int,
    "max_retry": int,
}


class _RunFailedTrial(Exception):
    """The run reached a verdict of failure; the trial is FAIL with ``failure_reason`` and counts."""


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """A study: what is fixed, what is searched, how many trials, and how they are pruned.

    Args:
        name: the study name (in the storage).
        method: the method config as plain data; its fixed knobs are not searched.
        model: the CTR model.
        n_trials: trials in the study in total (already present ones included).
        budget: the byte budget (single-objective mode).
        budgets: the budgets to search over (multi-objective mode).
        multi_objective: maximise validation AUC and minimise inference bytes.
        configs: run configs under every trial.
        overrides: run config fields for every trial.
        seed: TPE seed; each trial's sampler is seeded from it, the worker index and the number of trials
            already in the study, so workers and resumed runs never replay the same random draws.
        pruner: MedianPruner arguments (``n_startup_trials``, ``n_warmup_steps``, ``interval_steps``);
            ``None`` disables pruning. Pruning needs ``train.eval_every`` (intermediate validation AUC).
        heartbeat_interval / grace_period / max_retry: dead-worker detection (seconds) and retries.
    """

    name: str
    method: dict[str, Any]
    model: ModelChoice
    n_trials: int
    budget: str | int | float | None = None
    budgets: tuple[str | int | float, ...] = ()
    multi_objective: bool = False
    configs: tuple[str, ...] = ()
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    pruner: dict[str, int] | None = dataclasses.field(default_factory=lambda: {"n_startup_trials": 5})
    heartbeat_interval: int = 10
    grace_period: int = 60
    max_retry: int = 3
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>",
                  where: Callable[[str], str] | None = None) -> TuneSpec:
        at = where or (lambda key: f"{source}: {key}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{at(unknown[0])}: unknown key(s) {unknown}; valid keys: {sorted(_FIELDS)}")
        for key in ("name", "method", "model", "n_trials"):
            if data.get(key) is None:
                raise ConfigError(f"{source}: the study needs {key!r}")
        method = {"method": data["method"]} if isinstance(data["method"], str) else dict(data["method"])
        try:
            embtable.method_config_from_dict(method, source=at("method"))
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err) if str(err).startswith(at("method")) else f"{at('method')}: {err}") from None
        multi = bool(data.get("multi_objective", False))
        budget, budgets = data.get("budget"), tuple(data.get("budgets") or ())
        if multi and (not budgets or budget is not None):
            raise ConfigError(f"{at('budgets')}: multi_objective needs `budgets: [...]` (searched) and no `budget`")
        if not multi and budgets:
            raise ConfigError(f"{at('budgets')}: `budgets` is for multi_objective: true; give one `budget`")
        for b in (*budgets, *([budget] if budget is not None else [])):
            try:
                embtable.as_budget(b)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{at('budget')}: budget {b!r}: {err}") from None
        if data["n_trials"] < 1:
            raise ConfigError(f"{at('n_trials')}: n_trials must be >= 1, got {data['n_trials']}")
        pruner = data.get("pruner", {"n_startup_trials": 5}) if "pruner" in data else {"n_startup_trials": 5}
        if pruner is not None:
            bad = sorted(set(pruner) - {"n_startup_trials", "n_warmup_steps", "interval_steps"})
            if bad:
                raise ConfigError(f"{at('pruner')}: unknown MedianPruner argument(s) {bad}")
        spec = cls(
            name=data["name"], method=method, model=ModelChoice.parse(data["model"], at("model")),
            n_trials=int(data["n_trials"]), budget=budget, budgets=budgets, multi_objective=multi,
            configs=tuple(str(c) for c in data.get("configs") or ()), overrides=dict(data.get("overrides") or {}),
            seed=int(data.get("seed", 0)), pruner=None if multi else pruner,
            heartbeat_interval=int(data.get("heartbeat_interval", 10)), grace_period=int(data.get("grace_period", 60)),
            max_retry=int(data.get("max_retry", 3)), source=source,
        )
        base = spec.base_config()
        if spec.pruner is not None and base.train.eval_every is None:
            raise ConfigError(
                f"{at('pruner')}: pruning needs intermediate validation AUC: set `overrides: {{train: {{eval_every: "
                "N}}}}` (steps between evaluations), or `pruner: null`"
            )
        search_space(method["method"])  # an actionable error now if the method has no space
        return spec

    def replace(self, **changes: Any) -> TuneSpec:
        return dataclasses.replace(self, **changes)

    def base_config(self) -> RunConfig:
        """The run config of every trial before the searched values (name, model, method, budget set)."""
        config = load_config(*self.configs, overrides=self.overrides or None)
        return config.with_overrides({"name": self.name, "model": self.model.overrides(),
                                      "embedding": {"method": self.method, "budget": self.budget}})

    def space(self) -> tuple[Param, ...]:
        """The searched parameters: the method's space minus knobs the spec fixes, plus the budget (MO)."""
        fixed = {f"method.{k}" for k in self.method if k != "method"}
        params = tuple(p for p in search_space(self.method["method"]) if p.path not in fixed)
        if self.multi_objective:
            params += (Param("budget", "categorical", choices=tuple(str(b) for b in self.budgets)),)
        return params

    def trial_config(self, params: Mapping[str, Any]) -> RunConfig:
        """The run config of a trial with suggested ``params``."""
        method, overrides = apply_params(self.method, params)
        embedding = {"method": method}
        if "budget" in params:
            embedding["budget"] = params["budget"]
        return self.base_config().with_overrides({**overrides, "embedding": embedding},
                                                 source=f"study {self.name} trial")


def load_tune(name_or_path: str | os.PathLike, **changes: Any) -> TuneSpec:
    """Read a study spec (a shipped name or a YAML path); ``changes`` replace fields (e.g. ``n_trials``)."""
    path = resolve_spec(name_or_path, STUDY_DIR, "study")
    spec = TuneSpec.from_dict(read_spec(path, _FIELDS), source=str(path), where=where_of(path))
    changes = {k: v for k, v in changes.items() if v is not None}
    return spec.replace(**changes) if changes else spec


def default_storage(spec: TuneSpec, out_dir: str | os.PathLike = "runs/tune") -> str:
    """``sqlite:///<out_dir>/<name>.sqlite3``: the one-worker default."""
    return f"sqlite:///{Path(out_dir) / spec.name}.sqlite3"


def _sampler(spec: TuneSpec, worker: int, num_trials: int) -> optuna.samplers.BaseSampler:
    """Seeded TPE; the seed mixes the spec's seed, the worker index and how many trials exist already."""
    seed = (spec.seed * 1_000_003 + worker * 7_919 + num_trials * 104_729) % (2**32)
    return optuna.samplers.TPESampler(seed=seed)


def create_study(spec: TuneSpec, storage: StudyStorage, worker: int = 0) -> optuna.Study:
    """Create the study or load it (same name, same storage); seeded TPE, MedianPruner."""
    sampler = _sampler(spec, worker, 0)
    pruner = optuna.pruners.MedianPruner(**spec.pruner) if spec.pruner is not None else optuna.pruners.NopPruner()
    directions = ["maximize", "minimize"] if spec.multi_objective else ["maximize"]
    study = optuna.create_study(study_name=spec.name, storage=storage.storage, sampler=sampler, pruner=pruner,
                                directions=directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            f"study {spec.name!r} already exists in {storage.url} with directions "
            f"{[d.name.lower() for d in study.directions]}, not {directions}; use another study name"
        )
    study.set_user_attr("spec", json.dumps(dataclasses.asdict(spec), default=str, sort_keys=True))
    return study


def make_objective(spec: TuneSpec) -> Callable[[optuna.Trial], Any]:
    """The objective: one training run with the suggested values; reports validation AUC for pruning."""
    from experiments.training.train import RunHooks, run

    space = spec.space()

    def objective(trial: optuna.Trial) -> Any:
        params = suggest(space, trial)
        config = spec.trial_config(params)

        def on_eval(entry: Mapping[str, Any]) -> None:
            if spec.multi_objective:
                return  # Optuna does not prune multi-objective studies
            trial.report(entry["valid_auc"], entry["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"valid AUC {entry['valid_auc']:.4f} at step {entry['step']}")

        result = run(config, out_dir=None, progress=False, hooks=RunHooks(on_eval=on_eval))
        for key in ("test_auc", "valid_logloss", "test_logloss", "inference_bytes", "training_bytes",
                    "train_samples_per_s", "wall_seconds", "steps"):
            trial.set_user_attr(key, getattr(result, key))
        trial.set_user_attr("method_config", json.dumps(config.embedding.method, sort_keys=True))
        if result.status != "ok":
            raise _RunFailedTrial(result.failure_reason)
        if spec.multi_objective:
            return result.valid_auc, float(result.inference_bytes)
        return result.valid_auc

    return objective


def counted_trials(study: optuna.Study) -> tuple[int, int, int]:
    """``(done, running, waiting)``: trials that count toward the budget, running ones, queued retries.

    Done = complete, pruned, or failed with a ``failure_reason`` (the run itself failed). A trial failed
    because its worker died has no reason; its retry (waiting or running) counts instead.
    """
    done = running = waiting = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                t.state == TrialState.FAIL and FAILURE_ATTR in t.user_attrs):
            done += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return done, running, waiting


@dataclasses.dataclass
class WorkerSummary:
    """What one worker did."""

    worker: int
    trials: list[int] = dataclasses.field(default_factory=list)
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    retried_dead: list[int] = dataclasses.field(default_factory=list)


def run_worker(
    spec: TuneSpec,
    storage: StudyStorage,
    *,
    worker: int = 0,
    objective: Callable[[optuna.Trial], Any] | None = None,
    poll_seconds: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> WorkerSummary:
    """Run trials of ``spec``'s study until it holds ``n_trials`` finished ones.

    Under the storage's claim lock, the worker fails the trials of dead workers (re-queueing them),
    counts, and asks for a trial only while done + running + queued < ``n_trials`` (or pops a queued
    retry). With nothing left to claim but trials still running elsewhere, it waits: one of them may
    belong to a dead worker and come back as a retry. So N workers finish exactly ``n_trials``.
    """
    log = log or (lambda line: print(line, flush=True))
    study = create_study(spec, storage, worker)
    objective = objective or make_objective(spec)
    summary = WorkerSummary(worker)
    while True:
        with storage.claim_lock(spec.name):
            summary.retried_dead += storage.fail_stale_trials(study)
            done, running, waiting = counted_trials(study)
            # A fresh seeded sampler per trial, its seed a function of the study's size: a resumed study or
            # a restarted worker never replays the random draws it made before (same seed, same history,
            # same proposal; different history, new proposal).
            study.sampler = _sampler(spec, worker, len(study.get_trials(deepcopy=False)))
            trial = _quiet(study.ask) if (done + running + waiting < spec.n_trials or waiting) else None
        if trial is None:
            if running == 0:
                break
            time.sleep(poll_seconds)
            continue
        retry_of = storage.storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        state, values, reason = TrialState.COMPLETE, None, None
        start = time.perf_counter()
        with storage.heartbeat(trial._trial_id):
            try:
                values = objective(trial)
            except optuna.TrialPruned as pruned:
                state, reason = TrialState.PRUNED, str(pruned)
            except _RunFailedTrial as failed:
                state, reason = TrialState.FAIL, str(failed)
                trial.set_user_attr(FAILURE_ATTR, reason)
            except BaseException as err:  # a bug, or Ctrl-C: record it, then stop this worker
                trial.set_user_attr(FAILURE_ATTR, f"error: {type(err).__name__}: {err}")
                _quiet(study.tell, trial, state=TrialState.FAIL)
                raise
        try:
            _quiet(study.tell, trial, values if state == TrialState.COMPLETE else None, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            log(f"[tune {spec.name}] worker {worker}: trial {trial.number} was declared dead by another worker "
                "(no heartbeat within the grace period); its result is discarded, the retry counts")
            continue
        summary.trials.append(trial.number)
        summary.states[state.name] = summary.states.get(state.name, 0) + 1
        shown = _format_values(values) if values is not None else reason
        log(f"[tune {spec.name}] worker {worker}: trial {trial.number}"
            + (f" (retry of {retry_of})" if retry_of is not None else "")
            + f" {state.name.lower()} in {time.perf_counter() - start:.1f}s: {shown} · "
            f"{counted_trials(study)[0]}/{spec.n_trials} done")
    return summary


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` without Optuna's warning that heartbeats are meant for ``Study.optimize``: this loop
    is the ask-and-tell equivalent of ``optimize``, and it runs the heartbeat itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return fn(*args, **kwargs)


def _format_values(values: Any) -> str:
    if isinstance(values, Sequence):
        return f"valid AUC {values[0]:.4f}, {int(values[1]):,} B"
    return f"valid AUC {values:.4f}"


@dataclasses.dataclass
class TuneOutcome:
    """The study after the workers finished: counts and the best trial(s)."""

    study_name: str
    storage: str
    states: dict[str, int]
    best: list[dict[str, Any]]

    def table(self) -> str:
        """The best trial, or the Pareto front (multi-objective), as Markdown."""
        if not self.best:
            return "(no complete trial)"
        keys = list(self.best[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
        for row in self.best:
            lines.append("| " + " | ".join(_fmt(row[k]) for k in keys) + " |")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def outcome(spec: TuneSpec, storage: StudyStorage) -> TuneOutcome:
    """Counts of trial states and the best trial (single objective) or the Pareto front."""
    study = optuna.load_study(study_name=spec.name, storage=storage.storage)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        best_trials = []
    elif spec.multi_objective:
        best_trials = sorted(study.best_trials, key=lambda t: t.values[1])
    else:
        best_trials = [study.best_trial]
    best = []
    for t in best_trials:
        row: dict[str, Any] = {"trial": t.number, "valid_auc": t.values[0],
                               "test_auc": t.user_attrs.get("test_auc"),
                               "inference_bytes": t.user_attrs.get("inference_bytes")}
        row.update({k: v for k, v in t.params.items()})
        best.append(row)
    return TuneOutcome(spec.name, storage.url, states, best)


def _worker_process(spec: TuneSpec, url: str, worker: int) -> None:
    storage = open_storage(url, workers=2, heartbeat_interval=spec.heartbeat_interval,
                           grace_period=spec.grace_period, max_retry=spec.max_retry)
    run_worker(spec, storage, worker=worker)


def run_study(
    spec: TuneSpec,
    storage_url: str | None = None,
    *,
    workers: int = 1,
    worker_index: int = 0,
    out_dir: str | os.PathLike = "runs/tune",
    log: Callable[[str], None] | None = None,
) -> TuneOutcome:
    """Run ``spec``'s study to ``n_trials`` with ``workers`` local processes; return its outcome.

    Args:
        spec: the study.
        storage_url: see :mod:`experiments.tune.study_storage`; ``None``: SQLite under ``out_dir``.
        workers: local worker processes (more workers on other machines may join the same storage).
        worker_index: index of this process's first worker (seeds its sampler; give each machine its own).
        out_dir: where the default SQLite storage goes.

    Raises:
        StorageError: SQLite with several workers, or an unsupported URL.
    """
    log = log or (lambda line: print(line, flush=True))
    url = storage_url or default_storage(spec, out_dir)
    storage = open_storage(url, workers=workers, heartbeat_interval=spec.heartbeat_interval,
                           grace_period=spec.grace_period, max_retry=spec.max_retry)
    done, running, waiting = counted_trials(create_study(spec, storage, worker_index))
    log(f"[tune {spec.name}] storage {storage.url}: {done} of {spec.n_trials} trials done, {running} running, "
        f"{waiting} queued; {workers} worker(s); searching {[p.path for p in spec.space()]}")
    if workers == 1:
        run_worker(spec, storage, worker=worker_index, log=log)
    else:
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_worker_process, args=(spec, storage.url, worker_index + i))
                 for i in range(workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except BaseException:
            for p in procs:
                p.terminate()
            raise
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} tune worker(s) exited with codes {bad}; see their output above")
    result = outcome(spec, storage)
    log(f"[tune {spec.name}] trials by state: {result.states}")
    return result

