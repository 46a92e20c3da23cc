"""Budget sweeps: every (method x budget x model x seed) cell of one YAML spec, trained fairly and resumably.

A spec (``experiments/configs/sweeps/<name>.yaml``)::

    name: demo
    configs: [demo]                  # run configs under every cell (base.yaml + these), e.g. the data
    overrides: {train: {epochs: 1}}  # then these fields, for every cell
    methods: registered              # every registered method, or a list: [hash, {method: qr, ...}]
                                     # an entry may name a multi-stage runner (experiments.runners.sweep_runners):
                                     # {label: optembed_search, method: optembed, runner: optembed,
                                     #  runner_options: {population: 10}}
    reference: [full]                # run once per model and seed WITHOUT a budget (the uncompressed point)
    budgets: ["1/4", "1/16", "1/64"] # fractions of the full tables, bytes, or "64MiB"
    models: [dlrm]                   # names, or {name: dcn_v2, options: {...}, embedding_dim: 16}
    seeds: [0, 1, 2]

Every cell differs from the others only in what the spec varies, so the comparison is fair: same data,
same training settings, same seeds. A cell's key is a hash of its whole run config, so a re-run skips
exactly the cells already in the results store (status ``ok`` or ``failed``), and a cell killed half-way
resumes from its own checkpoint in ``<out>/runs/<key>``.

Example:
    >>> spec = SweepSpec.from_dict({"name": "t", "methods": ["hash"], "budgets": ["1/8", "1/32"],
    ...                             "models": ["dlrm"], "seeds": [0, 1]})
    >>> [(c.label, c.budget, c.seed) for c in spec.cells()][:3]
    [('full', None, 0), ('full', None, 1), ('hash', '1/8', 0)]
    >>> len(spec.cells())
    6
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import embtable
from experiments.runners.sweep_runners import check_runner
from experiments.sweep.results import ResultStore
from experiments.sweep.specfile import read_spec, resolve_spec, where_of
from experiments.training.config import CONFIG_DIR, ConfigError, RunConfig, load_config

__all__ = [
    "SWEEP_DIR",
    "MethodChoice",
    "ModelChoice",
    "Cell",
    "SweepSpec",
    "SweepSummary",
    "load_sweep",
    "cell_key",
    "run_sweep",
    "format_duration",
]

SWEEP_DIR = CONFIG_DIR / "sweeps"

#: Config fields that change nothing a run computes; they are left out of a cell's key.
_KEY_IGNORES = (("name",), ("train", "log_every"), ("train", "checkpoint_every"), ("data", "data_dir"))

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "configs": list,
    "overrides": dict,
    "methods": (list, str),
    "reference": list,
    "budgets": list,
    "models": list,
    "seeds": list,
}


@dataclasses.dataclass(frozen=True)
class MethodChoice:
    """One method of a sweep: ``label`` (its name in tables and plots) and its config as plain data.

    ``runner`` names a multi-stage pipeline of :mod:`experiments.runners.sweep_runners` (``None``: one training
    run of the method's module); ``runner_options`` are its settings.
    """

    label: str
    method: dict[str, Any]
    runner: str | None = None
    runner_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, item: Any, where: str) -> MethodChoice:
        """``"hash"``, or ``{method: qr, combiner: concat}``, or ``{label: qr_cat, method: qr, ...}``, or
        ``{label: optembed_search, method: optembed, runner: optembed, runner_options: {...}}``."""
        if isinstance(item, str):
            item = {"method": item}
        if not isinstance(item, Mapping) or "method" not in item:
            raise ConfigError(f"{where}: a method is a name or a mapping with a 'method' key, got {item!r}")
        data = dict(item)
        label = data.pop("label", None)
        runner = data.pop("runner", None)
        options = data.pop("runner_options", None)
        if runner is None and options is not None:
            raise ConfigError(f"{where}: runner_options without a runner in {dict(item)!r}")
        try:
            embtable.method_config_from_dict(data, source=where)
            if runner is not None:
                check_runner(str(runner), data, options if options is not None else {})
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
        if label is None:
            knobs = ",".join(f"{k}={v}" for k, v in data.items() if k != "method")
            label = data["method"] + (f"({knobs})" if knobs else "") + (f"[{runner}]" if runner else "")
        return cls(str(label), data, None if runner is None else str(runner), dict(options or {}))


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """One model of a sweep; ``options``/``embedding_dim`` of ``None`` keep the run config's."""

    name: str
    options: dict[str, Any] | None = None
    embedding_dim: int | None = None

    @classmethod
    def parse(cls, item: Any, where: str) -> ModelChoice:
        if isinstance(item, str):
            return cls(item)
        if isinstance(item, Mapping) and "name" in item and set(item) <= {"name", "options", "embedding_dim"}:
            return cls(item["name"], item.get("options"), item.get("embedding_dim"))
        raise ConfigError(f"{where}: a model is a name or {{name, options, embedding_dim}}, got {item!r}")

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.options is not None:
            out["options"] = self.options
        if self.embedding_dim is not None:
            out["embedding_dim"] = self.embedding_dim
        return out


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: what varies, the complete run config, and its key."""

    label: str
    method: str
    budget: str | int | float | None
    model: str
    seed: int
    config: RunConfig
    key: str
    runner: str | None = None
    runner_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        budget = "no budget" if self.budget is None else f"@ {self.budget}"
        return f"{self.label} {budget} · {self.model} · seed {self.seed}"

    def fields(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "budget": self.budget, "model": self.model,
                "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A sweep: the grid of cells, and the run configs they share.

    Args:
        name: the sweep's name (results are grouped under it).
        methods: methods trained at every budget.
        budgets: byte budgets (fractions such as ``"1/8"``, bytes, ``"64MiB"``).
        models: CTR models.
        seeds: training seeds.
        configs: run config names or YAML paths applied on top of ``base.yaml`` for every cell.
        overrides: run config fields applied after ``configs`` for every cell.
        reference: methods trained once per model and seed without a budget (default: ``full``).
        source: where the spec came from (for messages).
    """

    name: str
    methods: tuple[MethodChoice, ...]
    budgets: tuple[str | int | float, ...]
    models: tuple[ModelChoice, ...]
    seeds: tuple[int, ...]
    configs: tuple[str, ...] = ()
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference: tuple[MethodChoice, ...] = (MethodChoice("full", {"method": "full"}),)
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>",
                  where: Callable[[str], str] | None = None) -> SweepSpec:
        """Build and check a spec from plain data (what the YAML file holds)."""
        at = where or (lambda key: f"{source}: {key}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{at(unknown[0])}: unknown key(s) {unknown}; valid keys: {sorted(_FIELDS)}")
        for key in ("name", "methods", "budgets", "models", "seeds"):
            if not data.get(key):
                raise ConfigError(f"{at(key) if key in data else source}: the sweep needs a non-empty {key!r}")
        reference = tuple(MethodChoice.parse(m, at("reference")) for m in (data.get("reference") or []))
        if "reference" not in data:
            reference = cls.reference
        for ref in reference:
            if ref.runner is not None:
                raise ConfigError(f"{at('reference')}: {ref.label!r} names runner {ref.runner!r}; runners compress to "
                                  "a budget, so they belong in 'methods', not in 'reference' (run without a budget)")
        methods_data = data["methods"]
        if isinstance(methods_data, str):
            if methods_data != "registered":
                raise ConfigError(f"{at('methods')}: methods is a list or the word 'registered', got {methods_data!r}")
            ref_names = {m.method["method"] for m in reference}
            methods_data = [name for name in embtable.registered_methods() if name not in ref_names]
        methods = tuple(MethodChoice.parse(m, at("methods")) for m in methods_data)
        labels = [m.label for m in (*reference, *methods)]
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise ConfigError(f"{at('methods')}: method label(s) {duplicates} appear twice; give each a distinct 'label'")
        budgets = tuple(data["budgets"])
        for b in budgets:
            try:
                embtable.as_budget(b)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{at('budgets')}: budget {b!r}: {err}") from None
        seeds = tuple(data["seeds"])
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"{at('seeds')}: seeds must be distinct integers, got {list(seeds)}")
        spec = cls(
            name=str(data["name"]),
            methods=methods,
            budgets=budgets,
            models=tuple(ModelChoice.parse(m, at("models")) for m in data["models"]),
            seeds=seeds,
            configs=tuple(str(c) for c in data.get("configs") or ()),
            overrides=dict(data.get("overrides") or {}),
            reference=reference,
            source=source,
        )
        spec.base_config()  # config names, overrides and models are checked now, not mid-sweep
        for model in spec.models:
            spec.base_config().with_overrides({"model": model.overrides()}, source=at("models"))
        return spec

    def base_config(self) -> RunConfig:
        """The run config every cell starts from (``base.yaml`` + ``configs`` + ``overrides``)."""
        return load_config(*self.configs, overrides=self.overrides or None)

    def cells(self) -> list[Cell]:
        """Every cell, reference runs first, in a stable order."""
        base = self.base_config()
        out: list[Cell] = []
        grid: list[tuple[MethodChoice, Any]] = [(m, None) for m in self.reference]
        grid += [(m, b) for m in self.methods for b in self.budgets]
        for model in self.models:
            for method, budget in grid:
                for seed in self.seeds:
                    name = f"{self.name}/{method.label}/{budget if budget is not None else 'nobudget'}/{model.name}/s{seed}"
                    config = base.with_overrides({
                        "name": name,
                        "model": model.overrides(),
                        "embedding": {"method": method.method, "budget": budget},
                        "train": {"seed": seed},
                    }, source=self.source)
                    out.append(Cell(method.label, method.method["method"], budget, model.name, seed, config,
                                    cell_key(config, method.runner, method.runner_options),
                                    method.runner, method.runner_options))
        return out


def load_sweep(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep spec: a shipped name (``"demo"``) or a YAML path, plus ``section.key=value`` overrides
    of the run config (e.g. ``"data.preset=tiny"``) applied to every cell."""
    path = resolve_spec(name_or_path, SWEEP_DIR, "sweep")
    data = read_spec(path, _FIELDS)
    if overrides:
        merged = {k: dict(v) for k, v in (data.get("overrides") or {}).items()}
        for item in overrides:
            section, field, value = _assignment(item)
            merged.setdefault(section, {})[field] = value
        data["overrides"] = merged
    return SweepSpec.from_dict(data, source=str(path), where=where_of(path))


def _assignment(item: str) -> tuple[str, str, Any]:
    key, sep, raw = item.partition("=")
    section, dot, field = key.strip().partition(".")
    if not sep or not dot or not section or not field:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=50")
    return section, field, yaml.safe_load(raw) if raw.strip() else None


def cell_key(config: RunConfig, runner: str | None = None, runner_options: Mapping[str, Any] | None = None) -> str:
    """A stable 16-hex-digit hash of what a run computes (its config, minus names and logging; plus the
    runner and its options for a runner cell, so it never shares a key with the single-stage cell)."""
    data = config.to_dict()
    if runner is not None:
        data["runner"] = {"name": runner, "options": dict(runner_options or {})}
    for path in _KEY_IGNORES:
        node = data
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclasses.dataclass
class SweepSummary:
    """What one :func:`run_sweep` call did."""

    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    errors: int = 0
    seconds: float = 0.0
    store: Path | None = None


def format_duration(seconds: float) -> str:
    """``"1h02m"``, ``"3m05s"``, ``"12s"``.

    >>> format_duration(3725), format_duration(185), format_duration(12.4)
    ('1h02m', '3m05s', '12s')
    """
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _execute(config_dict: dict[str, Any], out_dir: str, progress: bool = False, runner: str | None = None,
             runner_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one cell (in this process or a worker): one training run, or ``runner``'s stages; an exception
    becomes an ``error`` record."""
    from experiments.runners.sweep_runners import run_runner
    from experiments.training.train import (
        run,  # imported here: workers import torch only when they run a cell
    )

    try:
        config = RunConfig.from_dict(config_dict, source="sweep cell")
        if runner is not None:
            return run_runner(runner, config, runner_options or {}, out_dir, progress=progress)
        return run(config, out_dir=out_dir, resume=True, progress=progress).to_dict()
    except Exception as err:  # recorded and shown; the sweep goes on with the other cells
        return {"status": "error", "failure_reason": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(), "config": config_dict,
                **({"runner": runner} if runner is not None else {})}


def _source_name(meta: Any, presets: Mapping[str, Any]) -> str:
    """``"generator:demo"`` when a generated dataset matches a preset's config, else the meta's source."""
    generated = (meta.raw.get("generator") or {}).get("config")
    if generated:
        for name, config in presets.items():
            if config.to_dict() == generated:  # to_dict: what the metadata records
                return f"{meta.source}:{name}"
    return meta.source


def _dataset_meta(cells: Sequence[Cell], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Prepare (generate if needed) every dataset the cells use, once, before any cell runs."""
    import data_prep
    from experiments.training.train import dataset_path

    metas: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for cell in cells:
        data = cell.config.data
        ident = json.dumps(dataclasses.asdict(data), sort_keys=True)
        if ident in seen:
            continue
        seen.add(ident)
        if data.path is None and not (Path(data.data_dir) / str(data.preset) / "meta.json").is_file():
            log(f"generating the {data.preset!r} preset into {Path(data.data_dir) / str(data.preset)} ...")
        path = dataset_path(data)
        meta = data_prep.load_meta(path)
        metas[ident] = {"source": _source_name(meta, data_prep.PRESETS), "protocol": meta.protocol,
                        "path": str(path), "split_rows": dict(meta.split_rows)}
    return metas


def _share_threads(config: dict[str, Any], jobs: int) -> dict[str, Any]:
    """A cell left at ``train.num_threads: null`` gets its worker's share of the default thread count (the
    cores, or ``OMP_NUM_THREADS`` where set; at least one)."""
    if config.get("train", {}).get("num_threads") is not None:
        return config
    from experiments.training.train import resolve_threads

    return {**config, "train": {**config["train"], "num_threads": max(1, resolve_threads(None) // jobs)}}


def run_sweep(
    spec: SweepSpec,
    out_dir: str | os.PathLike,
    *,
    jobs: int = 1,
    retry_failed: bool = False,
    log: Callable[[str], None] | None = None,
) -> SweepSummary:
    """Run every cell of ``spec`` that the results store does not have yet.

    Args:
        spec: the sweep.
        out_dir: ``results.sqlite`` (the store) and ``runs/<key>/`` (checkpoints) go here.
        jobs: cells trained at once, each in its own process (each run uses ``train.num_threads``
            threads); 1 runs them in this process.
        retry_failed: also re-run cells recorded as ``failed`` (``error`` cells are always re-run).
        log: where progress lines go (default: stdout).

    Returns:
        Counts of what was run, skipped, failed.
    """
    log = log or (lambda line: print(line, flush=True))
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = Path(out_dir)
    store = ResultStore(out / "results.sqlite")
    cells = spec.cells()
    done = store.finished_keys(spec.name, ("ok",) if retry_failed else ("ok", "failed"))
    todo = [c for c in cells if c.key not in done]
    summary = SweepSummary(total=len(cells), skipped=len(cells) - len(todo), store=store.path)
    log(f"[sweep {spec.name}] {len(cells)} cells: {summary.skipped} already in {store.path}, "
        f"{len(todo)} to run" + (f" on {jobs} workers" if jobs > 1 and todo else ""))
    if not todo:
        return summary
    metas = _dataset_meta(todo, log)
    start = time.perf_counter()
    finished = 0

    def record(cell: Cell, result: dict[str, Any]) -> None:
        nonlocal finished
        ident = json.dumps(dataclasses.asdict(cell.config.data), sort_keys=True)
        result = {**result, "dataset_meta": metas.get(ident)}
        store.record(spec.name, cell.key, cell.fields(), result)
        finished += 1
        status = result["status"]
        if status == "ok":
            summary.ok += 1
            what = f"ok: test AUC {result['test_auc']:.4f}, {result['inference_bytes']:,} B"
        else:
            summary.failed += status == "failed"
            summary.errors += status == "error"
            what = f"{status.upper()}: {result.get('failure_reason')}"
        elapsed = time.perf_counter() - start
        left = len(todo) - finished
        eta = elapsed / finished * left
        log(f"[sweep {spec.name}] {summary.skipped + finished}/{len(cells)} done · {left} left · "
            f"ETA {format_duration(eta)} · {cell.describe()}: {what}")

    if jobs == 1:
        bar = sys.stderr.isatty()  # the run's own progress bar (batches/s, loss) on a terminal
        for cell in todo:
            record(cell, _execute(cell.config.to_dict(), str(out / "runs" / cell.key), bar, cell.runner,
                                  cell.runner_options))
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(_execute, _share_threads(c.config.to_dict(), jobs), str(out / "runs" / c.key),
                                   False, c.runner, c.runner_options): c for c in todo}
            try:
                for future in cf.as_completed(futures):
                    record(futures[future], future.result())
            except cf.process.BrokenProcessPool as err:
                pool.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError(
                    f"a sweep worker process died (killed, or out of memory) after {finished} of {len(todo)} "
                    f"cells; every finished cell is stored in {store.path}: run the sweep again to continue "
                    "(with fewer --jobs if memory is short)"
                ) from err
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    summary.seconds = time.perf_counter() - start
    log(f"[sweep {spec.name}] finished in {format_duration(summary.seconds)}: {summary.ok} ok, "
        f"{summary.failed} failed, {summary.errors} errors, {summary.skipped} skipped; results: {store.path}")
    if summary.errors:
        print(f"[sweep {spec.name}] {summary.errors} cell(s) raised an error; they are re-run when the "
              "sweep runs again (see the failure_reason column)", file=sys.stderr)
    return summary
