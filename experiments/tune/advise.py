"""``embtable advise``: which method, with which knobs, for *this* dataset at *this* budget, within a time limit.

For every budget, two phases:

1. **Search** (multi-fidelity, one Optuna study per budget): the candidates are every registered method
   that the planner can fit at the budget (the others are listed as infeasible, with the planner's
   reason), each with its knobs from ``configs/search/spaces.yaml`` (a method without an entry gets the
   learning rates only). One trial per method with its default knobs comes first, then TPE proposes
   methods and knobs. A trial trains on a fraction of the data (``search_fraction`` of the full run's
   steps) and reports its validation AUC at rungs ``r, r*eta, r*eta^2 = search steps``; Optuna's
   ``SuccessiveHalvingPruner`` stops the trials outside the top ``1/eta`` of their rung, so most of the
   time goes to the promising ones.
2. **Final**: the best configuration of each of the ``finalists`` best methods (by search validation AUC)
   is trained fully (the run config's epochs / max_steps) with ``seeds`` seeds.

The answer ranks the finalists by mean validation AUC (selection never looks at the test split) and shows
test AUC ± std over seeds, inference bytes and training samples/s; it names the recommended method with its
config and says how sure it is: the margin over the runner-up against the seed noise
(``sqrt(std_1^2 + std_2^2)``): "clear" above twice the noise, "likely" above it, else "within seed noise".
With several budgets it also gives the Pareto front of bytes against AUC.

Time: trials are launched only while the time left (minus what the final phase is expected to take) fits
one more, and a running trial is stopped at the deadline; the final runs that fit are trained, and an
answer is printed from whatever finished (a finalist without final runs is ranked by its search AUC).
Resume: the studies (SQLite, ``advise.sqlite3``), the final runs (``results.sqlite``, the results store of
sweeps, and their checkpoints) live in the output folder; running the same command again continues.
The report page (``report/``) is :func:`experiments.sweep.report.write_report` over the final runs.

Example (not run as a doctest: it searches for minutes; tests/test_advise.py runs a small one)::

    advice = advise("data/mine", ["1/16"], time_limit="20m", out_dir="runs/advise/mine")
    print(advice.table()); advice.recommended["1/16"]["method"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

import data_prep
import embtable
from experiments import markdown
from experiments.sweep.results import ResultStore
from experiments.sweep.sweep import cell_key, format_duration
from experiments.training.config import ConfigError, RunConfig, load_config
from experiments.tune.search_space import Param, load_spaces, suggest

__all__ = ["Advice", "advise", "parse_duration", "SWEEP_NAME"]

#: The results-store sweep name of the final runs (what the report shows).
SWEEP_NAME = "advise"


class _OutOfTime(Exception):
    """Raised from a run's step hook at the deadline: the trial stops."""


def parse_duration(text: str | float | int) -> float:
    """Seconds of ``"30m"``, ``"1h30m"``, ``"90s"``, ``"45"`` (seconds) or a number.

    Example:
        >>> parse_duration("1h30m"), parse_duration("90s"), parse_duration(12)
        (5400.0, 90.0, 12.0)
    """
    if isinstance(text, int | float):
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", s)
    if not parts or "".join(n + u for n, u in parts) != s.replace(" ", ""):
        raise ConfigError(f"time limit {text!r}: write e.g. 30m, 1h30m, 90s or seconds")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@dataclasses.dataclass
class Advice:
    """What :func:`advise` found.

    Args:
        rows: one row per (budget, finalist): method, config, valid/test AUC mean and std, bytes,
            samples/s, seeds trained fully, rank within its budget.
        recommended: per budget, the first-ranked row plus ``confidence`` and ``margin`` / ``noise``.
        infeasible: per budget, method -> the planner's reason.
        trials: per budget, trial counts by state.
        pareto: (budget, method) of the rows on the Pareto front of inference bytes against test AUC.
        seconds: wall time of this call; out_dir / report: where everything is.
    """

    rows: list[dict[str, Any]]
    recommended: dict[str, dict[str, Any]]
    infeasible: dict[str, dict[str, str]]
    trials: dict[str, dict[str, int]]
    pareto: list[tuple[str, str]]
    seconds: float
    out_dir: Path
    report: Path | None = None

    def table(self) -> str:
        """The ranked table per budget, the recommendation and the infeasible methods, as Markdown."""
        lines = []
        for budget in self.recommended.keys() | self.infeasible.keys():
            rows = [r for r in self.rows if r["budget"] == budget]
            lines += [f"## budget {budget}", "", markdown.table(
                ["rank", "method", "valid AUC", "test AUC", "inference bytes", "samples/s", "seeds", "knobs"],
                ([r["rank"], r["method"], _pm(r["valid_auc"], r["valid_std"]), _pm(r["test_auc"], r["test_std"]),
                  _int(r["inference_bytes"]), _int(r["samples_per_s"]), r["seeds"] or "search only", _knobs(r)]
                 for r in rows))]
            rec = self.recommended.get(budget)
            if rec:
                lines += ["", f"**Recommended at {budget}: {rec['method']}** {json.dumps(rec['config'])} "
                              f"(training: {json.dumps(rec['train'])}) — {rec['confidence']}."]
            else:
                lines += ["", f"No method finished at {budget}."]
            for method, why in self.infeasible.get(budget, {}).items():
                lines.append(f"- infeasible: {method}: {why}")
            counts = self.trials.get(budget, {})
            if counts:
                lines.append(f"- search trials: {', '.join(f'{k.lower()} {v}' for k, v in sorted(counts.items()))}")
            lines.append("")
        if len(self.recommended) > 1 and self.pareto:
            lines += ["## Pareto front (inference bytes vs test AUC)", ""]
            lines += [f"- {m} at {b}" for b, m in self.pareto]
        return "\n".join(lines)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _knobs(row: Mapping[str, Any]) -> str:
    knobs = {k: v for k, v in row["config"].items() if k != "method"}
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "defaults"


# ---- the search space over methods ---------------------------------------------------------------
def _spaces(methods: Sequence[str]) -> dict[str, tuple[Param, ...]]:
    """Each method's searched params; a method without an entry gets the learning rates (the common part)."""
    spaces = load_spaces()
    if spaces:
        sets = [{p.path for p in ps} for ps in spaces.values()]
        shared = set.intersection(*sets)
        common = tuple(p for p in next(iter(spaces.values())) if p.path in shared and not p.path.startswith("method."))
    else:
        common = ()
    return {m: tuple(spaces.get(m, common)) for m in methods}


def _named(method: str, param: Param) -> Param:
    """Method knobs get the method's name in front (one study holds every method; names must not clash)."""
    if param.path.startswith("method."):
        return dataclasses.replace(param, path=f"{method}:{param.path}")
    return param


def _suggest(trial: optuna.Trial, methods: Sequence[str], spaces: Mapping[str, Sequence[Param]]) -> tuple[str, dict]:
    method = trial.suggest_categorical("method", list(methods))
    values = suggest([_named(method, p) for p in spaces[method]], trial)
    return method, {k.split(":", 1)[-1]: v for k, v in values.items()}


def _trial_config(base: RunConfig, method: str, params: Mapping[str, Any], budget: Any, *, seed: int,
                  max_steps: int | None, eval_every: int | None, name: str) -> RunConfig:
    method_cfg = {"method": method}
    overrides: dict[str, dict[str, Any]] = {}
    for path, value in params.items():
        section, _, field = path.partition(".")
        if section == "method":
            method_cfg[field] = value
        else:
            overrides.setdefault(section, {})[field] = value
    train = {**overrides.pop("train", {}), "seed": seed, "max_steps": max_steps, "eval_every": eval_every}
    return base.with_overrides({**overrides, "name": name, "train": train,
                                "embedding": {"method": method_cfg, "budget": budget}}, source=f"advise {name}")


# ---- one budget ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Clock:
    start: float
    limit: float

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.start)


def _feasible(features, methods: Sequence[str], budget: Any) -> tuple[list[str], dict[str, str]]:
    ok, bad = [], {}
    for m in methods:
        try:
            embtable.plan(features, embtable.method_config_from_dict({"method": m}), budget)
            ok.append(m)
        except embtable.BudgetError as err:
            bad[m] = str(err)
        except (ValueError, TypeError) as err:  # a method that cannot serve these features at all
            bad[m] = f"{type(err).__name__}: {err}"
    return ok, bad


def _search(study: optuna.Study, base: RunConfig, methods: list[str], spaces, budget, *, search_steps: int,
            rung: int, max_trials: int, clock: _Clock, reserve: Callable[[], float], log) -> None:
    from experiments.training.train import RunHooks, run

    if not study.get_trials(deepcopy=False):  # every method once with its default knobs first
        for m in methods:
            study.enqueue_trial(_defaults(base, m, spaces[m]))
    evals = search_steps // rung + 2  # rungs, then the run's own valid and test evaluations
    while True:
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        if len(finished) >= max_trials and not waiting:
            log(f"[advise {budget}] search: {len(finished)} trials, the maximum")
            return
        step_s, eval_s = _costs(study)
        estimate = search_steps * step_s + evals * eval_s
        if clock.left() - reserve() < max(estimate, 1.0):
            log(f"[advise {budget}] search stopped: {format_duration(max(clock.left(), 0))} left, the final "
                f"runs need about {format_duration(reserve())} and a trial about {format_duration(estimate)}")
            return
        trial = study.ask()
        method, params = _suggest(trial, methods, spaces)
        config = _trial_config(base, method, params, budget, seed=0, max_steps=search_steps, eval_every=rung,
                               name=f"advise-{method}-t{trial.number}")
        def on_eval(entry: Mapping[str, Any], trial=trial) -> None:
            trial.report(entry["valid_auc"], entry["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"valid AUC {entry['valid_auc']:.4f} at step {entry['step']}")

        def on_step(_state: Any, deadline: float = clock.start + clock.limit) -> None:
            if time.perf_counter() > deadline:
                raise _OutOfTime()

        began = time.perf_counter()
        state, value, note = TrialState.COMPLETE, None, ""
        try:
            result = run(config, out_dir=None, progress=False, hooks=RunHooks(on_step=on_step, on_eval=on_eval))
            for key in ("inference_bytes", "train_samples_per_s", "test_auc"):
                trial.set_user_attr(key, getattr(result, key))
            if result.steps:  # what a step and an evaluation cost: the time estimates of later runs
                trial.set_user_attr("step_seconds", result.train_seconds / result.steps)
                trial.set_user_attr("eval_seconds", max(result.wall_seconds - result.train_seconds, 0)
                                    / (len(result.history) + 2))
            if result.status == "ok":
                value, note = result.valid_auc, f"valid AUC {result.valid_auc:.4f}"
            else:
                state, note = TrialState.FAIL, result.failure_reason
                trial.set_user_attr("failure_reason", note)
        except optuna.TrialPruned as pruned:
            state, note = TrialState.PRUNED, f"pruned ({pruned})"
        except _OutOfTime:
            state, note = TrialState.FAIL, "stopped at the time limit"
            trial.set_user_attr("failure_reason", note)
        seconds = time.perf_counter() - began
        trial.set_user_attr("method_config", json.dumps({"method": method, **{
            k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("method.")}}))
        study.tell(trial, value, state=state)
        log(f"[advise {budget}] trial {trial.number} {method} {_short(params)}: {note} "
            f"({seconds:.1f}s; {format_duration(max(clock.left(), 0))} left)")
        if state == TrialState.FAIL and note == "stopped at the time limit":
            return


def _defaults(base: RunConfig, method: str, space: Sequence[Param]) -> dict[str, Any]:
    """The first trial of ``method``: the run config's learning rates and the method's default knobs
    (where the space holds them; the others are sampled)."""
    config = embtable.config_class(method)()
    fixed: dict[str, Any] = {"method": method}
    for p in space:
        section, _, field = p.path.partition(".")
        source = base.train if section == "train" else base.model if section == "model" else config
        value = getattr(source, field, None)
        inside = (value in p.choices) if p.kind == "categorical" else (
            isinstance(value, int | float) and p.low <= value <= p.high)
        if inside:
            fixed[_named(method, p).path] = value
    return fixed


def _costs(study: optuna.Study) -> tuple[float, float]:
    """Mean seconds of a training step and of one evaluation over the finished trials (0 before any)."""
    attrs = [t.user_attrs for t in study.get_trials(deepcopy=False) if "step_seconds" in t.user_attrs]
    if not attrs:
        return 0.0, 0.0
    return (sum(a["step_seconds"] for a in attrs) / len(attrs), sum(a["eval_seconds"] for a in attrs) / len(attrs))


def _short(params: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                           for k, v in params.items()) + "}"


def _best_per_method(study: optuna.Study) -> list[tuple[str, optuna.trial.FrozenTrial]]:
    """The best complete trial of each method, best first (pruned trials rank by their last rung)."""
    best: dict[str, optuna.trial.FrozenTrial] = {}

    def score(t):
        if t.state == TrialState.COMPLETE:
            return (1, t.value)
        return (0, max(t.intermediate_values.values()) if t.intermediate_values else -1.0)

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        m = t.params["method"]
        if m not in best or score(t) > score(best[m]):
            best[m] = t
    return sorted(best.items(), key=lambda kv: score(kv[1]), reverse=True)


def _params_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {k.split(":", 1)[-1]: v for k, v in trial.params.items() if k != "method"}


def _finals(finalists, base: RunConfig, budget, seeds: Sequence[int], full_steps: int, store: ResultStore,
            out: Path, clock: _Clock, run_seconds: float, dataset_meta: dict[str, Any], log) -> list[dict[str, Any]]:
    """Train each finalist fully with every seed that fits in the time left; return the ranked rows."""
    from experiments.training.train import RunHooks, run

    rows = []
    done = {k: None for k in store.finished_keys(SWEEP_NAME, ("ok", "failed"))}
    records = _stored_records(store)
    deadline = clock.start + clock.limit
    for method, trial in finalists:
        params = _params_of(trial)
        results = []
        for seed in seeds:
            config = _trial_config(base, method, params, budget, seed=seed, max_steps=full_steps, eval_every=None,
                                   name=f"advise-{method}-{budget}-s{seed}")
            key = cell_key(config)
            if key in done and key in records:
                results.append(records[key])
                continue
            if clock.left() < run_seconds:
                log(f"[advise {budget}] final {method} seed {seed}: skipped, it does not fit in the "
                    f"{format_duration(max(clock.left(), 0))} left")
                continue

            def on_step(_state: Any) -> None:
                if time.perf_counter() > deadline:
                    raise _OutOfTime()

            try:
                result = run(config, out_dir=out / "runs" / key, progress=False, hooks=RunHooks(on_step=on_step))
            except _OutOfTime:
                log(f"[advise {budget}] final {method} seed {seed}: stopped at the time limit (resumes next time)")
                continue
            record = {**result.to_dict(), "dataset_meta": dataset_meta}
            store.record(SWEEP_NAME, key, {"label": method, "method": method, "budget": str(budget),
                                           "model": config.model.name, "seed": seed}, record)
            log(f"[advise {budget}] final {method} seed {seed}: "
                + (f"valid AUC {result.valid_auc:.4f}, test AUC {result.test_auc:.4f}" if result.status == "ok"
                   else f"failed: {result.failure_reason}"))
            results.append(record)
        ok = [r for r in results if r["status"] == "ok"]
        row = {"budget": str(budget), "method": method, "config": {"method": method, **{
            k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("method.")}},
            "train": {k.split(".", 1)[1]: v for k, v in params.items() if not k.startswith("method.")},
            "seeds": len(ok)}
        if ok:
            row.update(_stats(ok))
        else:  # nothing trained fully: the search result stands in
            row.update(valid_auc=trial.value if trial.state == TrialState.COMPLETE else None, valid_std=None,
                       test_auc=None, test_std=None, inference_bytes=trial.user_attrs.get("inference_bytes"),
                       samples_per_s=trial.user_attrs.get("train_samples_per_s"))
        rows.append(row)
    rows.sort(key=lambda r: (r["seeds"] > 0, r["valid_auc"] if r["valid_auc"] is not None else -1), reverse=True)
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows


def _stored_records(store: ResultStore) -> dict[str, dict[str, Any]]:
    from experiments.sweep.results import load

    try:
        frame = load(store.path)
    except Exception:  # an empty store
        return {}
    frame = frame[frame["sweep"] == SWEEP_NAME] if "sweep" in frame else frame
    return {k: json.loads(r) for k, r in zip(frame["key"], frame["record"])}


def _stats(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    def ms(key):
        vals = [r[key] for r in results if r.get(key) is not None]
        if not vals:
            return None, None
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        return mean, std

    valid, valid_std = ms("valid_auc")
    test, test_std = ms("test_auc")
    speed, _ = ms("train_samples_per_s")
    return {"valid_auc": valid, "valid_std": valid_std, "test_auc": test, "test_std": test_std,
            "inference_bytes": results[0]["inference_bytes"], "samples_per_s": speed}


def _confidence(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The margin of the first row over the second against the seed noise, in words."""
    first = rows[0]
    if len(rows) < 2 or rows[1]["valid_auc"] is None or first["valid_auc"] is None:
        return {"confidence": "the only method that finished", "margin": None, "noise": None}
    margin = first["valid_auc"] - rows[1]["valid_auc"]
    stds = [r["valid_std"] for r in rows[:2] if r.get("valid_std") is not None]
    if len(stds) < 2:
        return {"confidence": f"margin {margin:.4f} valid AUC over {rows[1]['method']}; seed noise unknown "
                              "(fewer than two seeds finished)", "margin": margin, "noise": None}
    noise = math.sqrt(stds[0] ** 2 + stds[1] ** 2)
    if margin > 2 * noise:
        word = "clear"
    elif margin > noise:
        word = "likely"
    else:
        word = "within seed noise (a tie)"
    return {"confidence": f"{word}: margin {margin:.4f} valid AUC over {rows[1]['method']}, seed noise {noise:.4f}",
            "margin": margin, "noise": noise}


# ---- the entry point ---------------------------------------------------------------------------------
def advise(
    dataset: str | os.PathLike | None,
    budgets: Sequence[str | int | float] | str | int | float,
    *,
    model: str = "dlrm",
    time_limit: str | float = "30m",
    out_dir: str | os.PathLike | None = None,
    configs: Sequence[str] = (),
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1),
    finalists: int = 3,
    search_fraction: float = 1 / 3,
    reduction_factor: int = 3,
    max_trials: int | None = None,
    methods: Sequence[str] | None = None,
    report: bool = True,
    log: Callable[[str], None] | None = None,
) -> Advice:
    """Search every registered method (and its knobs) at each budget and recommend one; see the module doc.

    Args:
        dataset: a prepared dataset directory (``None``: the run config's data, e.g. a preset).
        budgets: one budget or several (bytes, ``"64MiB"``, or a fraction of the full tables ``"1/16"``).
        model: the CTR model.
        time_limit: wall time for everything (``"30m"``, ``"1h"``, seconds), split evenly over the budgets.
        out_dir: studies, final runs and the report (default ``runs/advise/<dataset name>``).
        configs / overrides: run configs and fields under every run (e.g. ``{"train": {"epochs": 2}}``).
        seeds: seeds of the final runs.
        finalists: methods trained fully.
        search_fraction: search trials train this fraction of the full run's steps.
        reduction_factor: successive halving's eta (rungs at ``s/eta^2, s/eta, s`` search steps).
        max_trials: search trials per budget (default: 3 per feasible method).
        methods: restrict the candidates (default: every registered method).
        report: write the report page over the final runs.
        log: progress lines (default: stdout).
    """
    log = log or (lambda line: print(line, flush=True))
    started = time.perf_counter()
    budgets = [budgets] if isinstance(budgets, str | int | float) else list(budgets)
    if not budgets:
        raise ConfigError("advise needs at least one budget")
    for b in budgets:
        try:
            embtable.as_budget(b)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"budget {b!r}: {err}") from None
    limit = parse_duration(time_limit)
    base = load_config(*configs, overrides=overrides or None)
    data = {"path": str(dataset), "preset": None} if dataset is not None else {}
    base = base.with_overrides({"data": data, "model": {"name": model}}, source="advise")
    from experiments.training.train import dataset_path

    path = dataset_path(base.data)
    meta = data_prep.load_meta(path)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "advise" / path.name
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'advise.sqlite3'}"
    store = ResultStore(out / "results.sqlite")
    features = meta.feature_specs(base.model.embedding_dim)
    dataset_meta = {"source": meta.source, "protocol": meta.protocol, "path": str(path),
                    "split_rows": dict(meta.split_rows)}
    registered = list(embtable.registered_methods())
    candidates = list(methods) if methods is not None else registered
    unknown = sorted(set(candidates) - set(registered))
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; registered: {registered}")
    steps_per_epoch = math.ceil(meta.split_rows["train"] / base.train.batch_size)
    full_steps = steps_per_epoch * base.train.epochs
    if base.train.max_steps is not None:
        full_steps = min(full_steps, base.train.max_steps)
    search_steps = max(1, math.ceil(full_steps * search_fraction))
    rung = max(1, search_steps // reduction_factor**2)
    log(f"[advise] {path} ({meta.source}): {len(features)} features, {meta.split_rows['train']:,} training rows; "
        f"model {model}; budgets {budgets}; time limit {format_duration(limit)}; search trials {search_steps} "
        f"steps (rungs every {rung}), final runs {full_steps} steps x {len(seeds)} seeds; output {out}")
    rows: list[dict[str, Any]] = []
    recommended: dict[str, dict[str, Any]] = {}
    infeasible: dict[str, dict[str, str]] = {}
    trial_counts: dict[str, dict[str, int]] = {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for i, budget in enumerate(budgets):
        key = str(budget)
        clock = _Clock(time.perf_counter(), (limit - (time.perf_counter() - started)) / (len(budgets) - i))
        ok, bad = _feasible(features, candidates, budget)
        infeasible[key] = bad
        for m, why in bad.items():
            log(f"[advise {key}] infeasible: {m}: {why}")
        if not ok:
            continue
        study = optuna.create_study(
            study_name=f"advise-{key}-{model}", storage=storage, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=len(ok)),
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=rung, reduction_factor=reduction_factor))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # an interrupted run's
            study.tell(t.number, state=TrialState.FAIL)
        spaces = _spaces(ok)
        n_final = min(finalists, len(ok))

        def final_seconds(study=study) -> float:
            step_s, eval_s = _costs(study)
            return full_steps * step_s + 3 * eval_s  # build + valid + test evaluations ~ 3 evaluations

        def reserve(final_seconds=final_seconds, n_final=n_final) -> float:
            return final_seconds() * n_final * len(seeds)

        _search(study, base, ok, spaces, key, search_steps=search_steps, rung=rung,
                max_trials=max_trials or 3 * len(ok), clock=clock, reserve=reserve, log=log)
        best = _best_per_method(study)[:n_final]
        trial_counts[key] = {}
        for t in study.get_trials(deepcopy=False):
            trial_counts[key][t.state.name] = trial_counts[key].get(t.state.name, 0) + 1
        if not best:
            continue
        log(f"[advise {key}] finalists: {[m for m, _ in best]}")
        budget_rows = _finals(best, base, budget, seeds, full_steps, store, out, clock, final_seconds(), dataset_meta,
                              log)
        rows += budget_rows
        if budget_rows:
            recommended[key] = {**budget_rows[0], **_confidence(budget_rows)}
    pareto = _pareto(rows)
    report_path = None
    if report and rows and any(r["seeds"] for r in rows):
        from experiments.sweep.report import write_report

        try:
            report_path = write_report(store.path, out / "report", SWEEP_NAME).html
        except ValueError as err:
            log(f"[advise] no report: {err}")
    advice = Advice(rows, recommended, infeasible, trial_counts, pareto, time.perf_counter() - started, out,
                    report_path)
    (out / "advice.md").write_text(advice.table() + "\n")
    (out / "advice.json").write_text(json.dumps(dataclasses.asdict(advice), indent=1, default=str) + "\n")
    return advice


def _pareto(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    from experiments.sweep.report import pareto_front

    done = [r for r in rows if r.get("test_auc") is not None and r.get("inference_bytes") is not None]
    front = pareto_front([(float(r["inference_bytes"]), float(r["test_auc"])) for r in done])
    return [(done[i]["budget"], done[i]["method"]) for i in front]
