"""``embtable``: the command-line tool for the whole workflow.

    embtable prepare generate --preset demo --out data/demo     # or: prepare criteo / prepare avazu FILES
    embtable prepare table logs/ --label clicked --out data/mine  # any parquet / CSV (list columns: multi-hot)
    embtable plan --preset demo --method hash --budget 1/16     # bytes and sizes, without training
    embtable train hash demo --set train.seed=1                 # one run (named configs, overrides)
    embtable sweep demo --jobs 2                                # methods x budgets x models x seeds
    embtable report runs/sweeps/demo/results.sqlite             # Pareto plot + tables (PNG, HTML, Markdown)
    embtable tune hash_tiny --storage journal:runs/tune/h.journal --workers 2
    embtable advise --dataset data/mine --budget 1/16 --time 30m  # which method for my data at my budget
    embtable demo                                               # what `make demo` runs

Every subcommand has ``--help``. :func:`main` takes ``argv`` and returns the exit code, so tests call it
directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "DEMO_SWEEP"]

DEMO_SWEEP = "demo"


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a run config field, e.g. --set train.max_steps=50 (repeatable; values are YAML)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="embtable",
        description="Compressed embedding tables sized to a memory budget: prepare data, plan, train, sweep "
                    "methods x budgets, tune with Optuna, and report which method wins at which budget.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # prepare ---------------------------------------------------------------------------------------
    prep = sub.add_parser("prepare", help="turn Criteo/Avazu files, or the generator, into a dataset directory",
                          description="Create a dataset directory (parquet shards + metadata) that training reads.")
    prep_sub = prep.add_subparsers(dest="source", required=True, metavar="SOURCE")
    gen = prep_sub.add_parser("generate", help="the calibrated Criteo-shaped generator (no download needed)")
    gen.add_argument("--preset", default="demo", help="generator preset: tiny, demo or standard (default: demo)")
    gen.add_argument("--out", required=True, help="dataset directory to write")
    gen.add_argument("--seed", type=int, default=None, help="generator seed (default: the preset's)")
    gen.add_argument("--tsv", action="store_true", help="write Criteo TSV text (OUT is a file) instead of a dataset")
    for name, what in (("criteo", "Criteo Kaggle train.txt or 1TB day_N[.gz] files"), ("avazu", "Avazu train[.gz]")):
        conv = prep_sub.add_parser(name, help=f"convert {what}")
        conv.add_argument("inputs", nargs="+", help=what)
        conv.add_argument("--out", required=True, help="dataset directory to write")
        conv.add_argument("--protocol", choices=["dlrm", "random"], default=None,
                          help="split protocol: dlrm (consecutive days) or random (8:1:1, min-count 10)")
        conv.add_argument("--min-count", type=int, default=None,
                          help="ids seen fewer times in training become the out-of-vocabulary id (default: the protocol's)")
        conv.add_argument("--strict", action="store_true", help="stop at the first malformed row (file and line)")
        conv.add_argument("--max-malformed", type=float, default=None, metavar="FRACTION",
                          help="largest fraction of malformed lines accepted, skipped and counted (default 0.01)")

    _add_prepare_table(prep_sub)

    # plan ------------------------------------------------------------------------------------------
    plan = sub.add_parser("plan", help="bytes and table sizes each method would use, without training",
                          description="Size methods for a dataset's features within a byte budget (pure: "
                                      "allocates nothing) and print the plan.")
    where = plan.add_mutually_exclusive_group()
    where.add_argument("--dataset", help="a prepared dataset directory")
    where.add_argument("--preset", default="demo", help="a generator preset (generated into --data-dir if missing)")
    plan.add_argument("--data-dir", default="data", help="where presets are generated (default: data)")
    plan.add_argument("--method", action="append", default=None,
                      help="method name or YAML mapping, e.g. hash or '{method: qr, combiner: add}' "
                           "(repeatable; default: every registered method)")
    plan.add_argument("--budget", default=None, help="bytes, '64MiB', or a fraction of the full tables ('1/16')")
    plan.add_argument("--dim", type=int, default=16, help="embedding dim of every feature (default: 16)")
    plan.add_argument("--per-feature", action="store_true", help="also print the per-feature table")

    # train -----------------------------------------------------------------------------------------
    train = sub.add_parser("train", help="train and evaluate one configuration",
                           description="Train one run: base.yaml, then the named configs in order, then --set.")
    train.add_argument("configs", nargs="*", help="config names in experiments/configs (or YAML paths)")
    _add_set(train)
    train.add_argument("--out", default=None, help="checkpoints and result.json go here (resumes if present)")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if --out has a checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    # sweep -----------------------------------------------------------------------------------------
    sweep = sub.add_parser("sweep", help="train every method x budget x model x seed of a sweep spec",
                           description="Run a sweep spec (experiments/configs/sweeps/NAME.yaml or a path). Each "
                                       "finished run is stored at once; re-running skips finished cells.")
    sweep.add_argument("spec", help="sweep name or YAML path")
    sweep.add_argument("--out", default=None, help="results + checkpoints folder (default: runs/sweeps/NAME)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default: 1)")
    sweep.add_argument("--retry-failed", action="store_true", help="re-run cells recorded as failed")
    sweep.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    _add_set(sweep)

    # tune ------------------------------------------------------------------------------------------
    tune = sub.add_parser("tune", help="Optuna search for one method, budget and model",
                          description="Run a study spec (experiments/configs/studies/NAME.yaml or a path) until "
                                      "it holds n_trials trials. Several workers (here or on other machines) may "
                                      "share a journal file or a PostgreSQL storage.")
    tune.add_argument("spec", help="study name or YAML path")
    tune.add_argument("--storage", default=None,
                      help="sqlite:///FILE (default, one worker), journal:FILE, or postgresql://USER:PASS@HOST/DB")
    tune.add_argument("--workers", type=int, default=1, help="local worker processes (default: 1)")
    tune.add_argument("--worker-index", type=int, default=0,
                      help="index of this process's first worker; seeds its sampler (give each machine its own)")
    tune.add_argument("--n-trials", type=int, default=None, help="override the spec's n_trials")
    tune.add_argument("--out", default="runs/tune", help="folder of the default SQLite storage")

    # advise ----------------------------------------------------------------------------------------
    adv = sub.add_parser("advise", help="which method (and knobs) for this dataset at this budget, in a time limit",
                         description="Successive-halving search (Optuna) over every registered method and its "
                                     "knobs at each budget, the survivors trained fully with two seeds; prints a "
                                     "ranked table and the recommendation, writes a report. Resumes when re-run.")
    adv_where = adv.add_mutually_exclusive_group(required=True)
    adv_where.add_argument("--dataset", help="a prepared dataset directory")
    adv_where.add_argument("--preset", help="a generator preset (generated into --data-dir if missing)")
    adv.add_argument("--data-dir", default="data", help="where presets are generated (default: data)")
    adv.add_argument("--budget", action="append", required=True,
                     help="bytes, '64MiB' or a fraction of the full tables ('1/16'); repeat for a Pareto answer")
    adv.add_argument("--model", default="dlrm", help="CTR model (default: dlrm)")
    adv.add_argument("--time", default="30m", help="time limit for everything, e.g. 30m, 1h, 90s (default: 30m)")
    adv.add_argument("--out", default=None, help="studies, runs and report (default: runs/advise/DATASET)")
    adv.add_argument("--seeds", type=int, default=2, help="seeds of the final runs (default: 2)")
    adv.add_argument("--finalists", type=int, default=3, help="methods trained fully (default: 3)")
    adv.add_argument("--max-trials", type=int, default=None, help="search trials per budget (default: 3 per method)")
    adv.add_argument("--method", action="append", default=None, help="restrict to these methods (repeatable)")
    _add_set(adv)

    # report ----------------------------------------------------------------------------------------
    report = sub.add_parser("report", help="Pareto plot and tables from a results store",
                            description="Write pareto.png, report.html (self-contained) and report.md.")
    report.add_argument("store", help="results file written by a sweep (results.sqlite)")
    report.add_argument("--sweep", default=None, help="which sweep (when the store holds several)")
    report.add_argument("--out", default=None, help="report folder (default: next to the store, report/)")
    report.add_argument("--export", default=None, metavar="FILE.parquet", help="also export the rows as Parquet")

    # demo ------------------------------------------------------------------------------------------
    demo = sub.add_parser("demo", help="generate the demo data, sweep every method at three budgets, report",
                          description="What `make demo` runs: the demo preset, every registered method at three "
                                      "budgets with DLRM, then the report; prints the table and the report's path.")
    demo.add_argument("--out", default="runs/demo", help="results, checkpoints and report (default: runs/demo)")
    demo.add_argument("--jobs", type=int, default=None, help="runs at once (default: number of CPU cores, max 4)")
    _add_set(demo)
    return parser


def _add_prepare_table(prep_sub: Any) -> None:
    from data_prep.table import add_table_arguments

    table = prep_sub.add_parser("table", help="parquet / CSV files of any schema (single- and multi-hot columns)",
                                description="Convert parquet or CSV files (several, a directory, .gz) into a "
                                            "dataset directory; column kinds are inferred unless given.")
    add_table_arguments(table)


def _cmd_prepare(args: argparse.Namespace) -> int:
    import data_prep

    if args.source == "table":
        from data_prep.table import prepare_table_from_args

        try:
            print(f"wrote {prepare_table_from_args(args)}")
        except ValueError as err:  # a wrong column or type: one line naming it, not a traceback
            print(f"embtable prepare table: {err}", file=sys.stderr)
            return 2
        return 0
    if args.source == "generate":
        if args.tsv:
            path = data_prep.generate_tsv(args.preset, args.out, seed=args.seed)
        else:
            path = data_prep.generate_dataset(args.preset, args.out, seed=args.seed)
        print(f"wrote {path}")
        return 0
    convert = data_prep.convert_criteo if args.source == "criteo" else data_prep.convert_avazu
    kwargs: dict[str, Any] = {"strict": args.strict, "min_count": args.min_count}
    if args.max_malformed is not None:
        kwargs["max_malformed"] = args.max_malformed
    if args.protocol is not None:
        kwargs["protocol"] = args.protocol
    if args.source == "avazu" and len(args.inputs) != 1:
        print(f"embtable prepare avazu: give one Avazu file, got {len(args.inputs)}", file=sys.stderr)
        return 2
    inputs = args.inputs if args.source == "criteo" else args.inputs[0]
    path = convert(inputs, args.out, **kwargs)
    print(f"wrote {path}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    import data_prep
    import embtable
    from experiments.training.config import DataConfig
    from experiments.training.train import dataset_path

    path = Path(args.dataset) if args.dataset else dataset_path(DataConfig(preset=args.preset, data_dir=args.data_dir))
    meta = data_prep.load_meta(path)
    features = meta.feature_specs(args.dim)
    methods = args.method or list(embtable.registered_methods())
    full = sum(f.full_table_bytes for f in features)
    print(f"dataset {path} ({meta.source}): {len(features)} features, full fp32 tables {full:,} bytes at dim {args.dim}"
          + (f"; budget {args.budget}" if args.budget else ""))
    rows = []
    for item in methods:
        data = yaml.safe_load(item) if item.strip().startswith("{") else {"method": item}
        config = embtable.method_config_from_dict(data, source=f"--method {item}")
        try:
            plan = embtable.plan(features, config, args.budget)
        except embtable.BudgetError as err:
            rows.append((config.method, "infeasible", "-", "-", str(err)))
            continue
        compressed = sum(f.compressed for f in plan.features)
        rows.append((config.method, f"{plan.total_bytes:,}", f"{plan.ratio:.4f}", f"{compressed}/{len(plan.features)}", ""))
        if args.per_feature:
            print(plan.table())
    width = max(len(r[0]) for r in rows)
    print(f"{'method':<{width}}  {'inference bytes':>16}  {'of full':>8}  {'compressed':>10}")
    for name, total, ratio, compressed, note in rows:
        print(f"{name:<{width}}  {total:>16}  {ratio:>8}  {compressed:>10}  {note}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from experiments.training.config import load_config
    from experiments.training.train import run

    config = load_config(*args.configs, overrides=args.overrides)
    result = run(config, out_dir=args.out, resume=not args.no_resume, progress=not args.quiet)
    shown = {k: v for k, v in result.to_dict().items() if k not in ("config", "history", "versions")}
    print(json.dumps(shown, indent=2, default=str))
    return 0 if result.status == "ok" else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.sweep.report import write_report
    from experiments.sweep.sweep import load_sweep, run_sweep

    spec = load_sweep(args.spec, args.overrides)
    out = Path(args.out or Path("runs") / "sweeps" / spec.name)
    summary = run_sweep(spec, out, jobs=args.jobs, retry_failed=args.retry_failed)
    if not args.no_report and summary.ok + summary.skipped > 0:
        _print_report(write_report(out / "results.sqlite", out / "report", spec.name))
    return 0 if summary.errors == 0 else 1


def _print_report(report: Any) -> None:
    print()
    print(report.markdown.read_text())
    print(f"report: {report.html.resolve()}")
    print(f"plot:   {report.png.resolve()}")


def _cmd_report(args: argparse.Namespace) -> int:
    from experiments.sweep.report import write_report
    from experiments.sweep.results import export_parquet

    store = Path(args.store)
    _print_report(write_report(store, args.out or store.parent / "report", args.sweep))
    if args.export:
        print(f"exported: {export_parquet(store, args.export, args.sweep)}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from experiments.tune.tune import load_tune, run_study

    spec = load_tune(args.spec, n_trials=args.n_trials)
    result = run_study(spec, args.storage, workers=args.workers, worker_index=args.worker_index, out_dir=args.out)
    print("Pareto front (valid AUC up, bytes down):" if spec.multi_objective else "best trial:")
    print(result.table())
    shown = result.storage[len("journal:"):] if result.storage.startswith("journal:") else result.storage
    print(f"watch it: optuna-dashboard {shown}")
    return 0


def _cmd_advise(args: argparse.Namespace) -> int:
    from experiments.tune.advise import advise

    overrides = list(args.overrides)
    if args.preset:
        overrides += [f"data.preset={args.preset}", f"data.data_dir={args.data_dir}"]
    advice = advise(args.dataset, args.budget, model=args.model, time_limit=args.time, out_dir=args.out,
                    overrides=overrides, seeds=tuple(range(args.seeds)), finalists=args.finalists,
                    max_trials=args.max_trials, methods=args.method)
    print()
    print(advice.table())
    if advice.report is not None:
        print(f"report: {advice.report.resolve()}")
    print(f"advice: {(advice.out_dir / 'advice.md').resolve()} (finished in {advice.seconds:.0f}s)")
    return 0 if advice.recommended else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from experiments.sweep.report import write_report
    from experiments.sweep.sweep import format_duration, load_sweep, run_sweep

    start = time.perf_counter()
    jobs = args.jobs or max(1, min(4, os.cpu_count() or 1))
    spec = load_sweep(DEMO_SWEEP, args.overrides)
    out = Path(args.out)
    summary = run_sweep(spec, out, jobs=jobs)
    report = write_report(out / "results.sqlite", out / "report", spec.name)
    _print_report(report)
    print(f"demo finished in {format_duration(time.perf_counter() - start)} ({summary.ok} runs trained now, "
          f"{summary.skipped} reused, {summary.failed} failed, {summary.errors} errors; {jobs} jobs)")
    return 0 if summary.errors == 0 else 1


_COMMANDS = {
    "prepare": _cmd_prepare,
    "plan": _cmd_plan,
    "train": _cmd_train,
    "sweep": _cmd_sweep,
    "tune": _cmd_tune,
    "advise": _cmd_advise,
    "report": _cmd_report,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Configuration mistakes (unknown keys, bad values, missing files, SQLite with several workers) are
    printed as one line naming the problem, with exit code 2, not as a traceback.
    """
    args = build_parser().parse_args(argv)
    from data_prep import DataPrepError
    from data_prep.meta import is_disk_full
    from embtable import BudgetError
    from experiments.training.checkpoint import CheckpointError
    from experiments.training.config import ConfigError
    from experiments.tune.study_storage import StorageError

    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, StorageError, BudgetError, DataPrepError, CheckpointError, FileNotFoundError, FileExistsError) as err:
        print(f"embtable {args.command}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not is_disk_full(err):
            raise
        print(f"embtable {args.command}: the disk is full (or a file size limit was hit) writing "
              f"{err.filename or 'a file'}: {err.strerror or err}. Every file is written whole or not at all: "
              "free some space and run the same command again, it continues where it stopped", file=sys.stderr)
        return 1



if __name__ == "__main__":
    sys.exit(main())
