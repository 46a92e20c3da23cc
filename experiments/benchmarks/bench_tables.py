"""Markdown tables of a benchmark: a sweep's results store, OptEmbed pipeline results beside it, and the
interleaved speed measurements of :mod:`experiments.benchmarks.bench_methods_speed` (not a test).

One row per (method, budget): inference bytes (fraction of the full tables), test AUC and logloss as
mean ± sample std over seeds, the seeds, the in-run train samples/s relative to the full table of the same seed
(``train_samples_per_s`` of the run / that of ``full``), and, when a speed JSON is given, the median
interleaved step speed relative to full. Failed cells (infeasible budgets) are listed with their reason.

    python -m experiments.benchmarks.bench_tables runs/sweeps/bench_methods_ii/results.sqlite \\
        --optembed 'runs/optembed/s*_*/stages_result.json' --speed runs/speed/bench_ii.json
"""

from __future__ import annotations

import argparse
import glob
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from experiments import markdown
from experiments.sweep.results import load

__all__ = ["bench_table", "main"]


def _fraction(budget: Any) -> float:
    if budget is None or budget == "none" or (isinstance(budget, float) and np.isnan(budget)):
        return 1.0
    num, _, den = str(budget).partition("/")
    return float(num) / float(den) if den else float("nan")


def _optembed_rows(pattern: str, full_bytes: int) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(glob.glob(pattern)):
        r = json.load(open(path))
        frac = (r.get("budget_bytes") or full_bytes) / full_bytes
        budget = next((b for b in ("1/2", "1/4", "1/8", "1/16", "1/32", "1/64") if abs(_fraction(b) - frac) < 1e-3),
                      f"{frac:.4f}")
        stages = r.get("stage_seconds", {})
        rows.append({"label": "optembed (3 stages)", "budget": budget, "seed": r["seed"], "status": r["status"],
                     "failure_reason": r.get("failure_reason"), "inference_bytes": r.get("inference_bytes"),
                     "test_auc": r.get("test_auc"), "test_logloss": r.get("test_logloss"),
                     "train_samples_per_s": r.get("train_samples_per_s"),
                     "stages": " / ".join(f"{stages.get(s, float('nan')):.0f}"
                                          for s in ("supernet", "search", "retrain"))})
    return rows


def bench_table(store: str, optembed: str | None = None, speed: str | None = None) -> tuple[str, str]:
    """(results table, failed table) as Markdown."""
    frame = load(store)
    full_bytes = int(frame["full_table_bytes"].dropna().iloc[0])
    frame = frame[["label", "budget", "seed", "status", "failure_reason", "inference_bytes", "test_auc",
                   "test_logloss", "train_samples_per_s"]].copy()
    frame["budget"] = ["none" if b is None or (isinstance(b, float) and np.isnan(b)) else str(b) for b in frame.budget]
    if optembed:
        frame = pd.concat([frame, pd.DataFrame(_optembed_rows(optembed, full_bytes))], ignore_index=True)
    full_speed = frame[(frame.label == "full") & (frame.status == "ok")].set_index("seed")["train_samples_per_s"]
    frame["rel"] = [s / full_speed.get(seed, np.nan) for s, seed in zip(frame.train_samples_per_s, frame.seed)]
    interleaved = {}
    if speed:
        for row in json.load(open(speed)):
            interleaved[(row["method"], row["budget"])] = row.get("rel_full")
    ok = frame[frame.status == "ok"]
    lines = []
    budgets = sorted({b for b in ok.budget}, key=lambda b: -_fraction(b))
    for b in budgets:
        cell = ok[[x == b for x in ok.budget]]
        groups = []
        for label, g in cell.groupby("label"):
            groups.append((g.test_auc.mean(), label, g))
        for auc, label, g in sorted(groups, key=lambda t: -t[0]):
            nbytes = int(g.inference_bytes.mean())
            ddof = 1 if len(g) > 1 else 0  # sample std over seeds, as the report tool
            std = g.test_auc.std(ddof=ddof)
            inter = interleaved.get((label, None if b == "none" else b))
            stages = "; ".join(f"s{seed}: {st}" for seed, st in zip(g.seed, g["stages"]) if isinstance(st, str)) \
                if "stages" in g else ""
            lines.append([
                b, label, f"{nbytes:,} ({nbytes / full_bytes:.3f})", f"{auc:.4f} ± {std:.4f}",
                f"{g.test_logloss.mean():.4f} ± {g.test_logloss.std(ddof=ddof):.4f}", len(g),
                f"{g.rel.mean():.2f} ± {g.rel.std(ddof=ddof):.2f}", "-" if inter is None else f"{inter:.2f}",
                stages or "-"])
    failed = frame[frame.status != "ok"].drop_duplicates(["label", "budget"])
    flines = [[r.label, r.budget, r.failure_reason] for _, r in failed.sort_values(["label", "budget"]).iterrows()]
    return (markdown.table(["budget", "method", "inference bytes (of full)", "test AUC", "test logloss", "seeds",
                            "samples/s vs full (in run)", "step speed vs full (interleaved)",
                            "OptEmbed stages s (supernet / search / retrain)"], lines),
            markdown.table(["method", "budget", "reason"], flines))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.bench_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--optembed", help="glob of the optembed pipeline's stages_result.json files to add")
    parser.add_argument("--speed", help="JSON rows written by experiments.benchmarks.bench_methods_speed --out")
    args = parser.parse_args(argv)
    table, failed = bench_table(args.store, args.optembed, args.speed)
    print(table)
    print()
    print(failed)


if __name__ == "__main__":
    main()
