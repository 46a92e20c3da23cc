"""Reports from a results store: a Pareto plot of AUC against inference bytes, and the tables behind it.

:func:`write_report` reads one sweep's rows and writes, into one folder:

- ``pareto.png``: test AUC (mean ± std over seeds, error bars) against the embedding module's inference
  bytes (log scale), one line per method and model; the uncompressed reference as a star; the data's
  Bayes AUC (the ceiling, for generated data) as a dashed line. Points on the Pareto front are ringed.
- ``report.html``: one self-contained page (the PNG embedded as base64) with the tables below.
- ``report.md``: the same tables as Markdown (what the command line prints).

Tables: the best method at each budget (with the runner-up and the gap in AUC), every cell with its
AUC, logloss and bytes, the training speed of every method, and the failed runs with their reasons.
Only runs with status ``ok`` are in the plot and the numbers; failed ones are listed apart.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments import markdown
from experiments.sweep.results import load

__all__ = ["Report", "summarize", "best_per_budget", "speed_table", "pareto_front", "write_report"]

_NO_BUDGET = "none"


@dataclasses.dataclass
class Report:
    """What :func:`write_report` wrote, and the tables it wrote (as DataFrames and Markdown)."""

    folder: Path
    png: Path
    html: Path
    markdown: Path
    summary: pd.DataFrame
    best: pd.DataFrame
    speed: pd.DataFrame
    failed: pd.DataFrame
    context: dict[str, Any]

    def best_markdown(self) -> str:
        return _markdown(self.best)


def _budget_order(budget: Any) -> tuple[int, float, str]:
    """Sort budgets from the largest to the smallest ("1/4" before "1/16"); no budget first."""
    if budget is None or budget == _NO_BUDGET or (isinstance(budget, float) and np.isnan(budget)):
        return (0, 0.0, "")
    text = str(budget)
    try:
        if "/" in text:
            num, den = text.split("/")
            return (1, -float(num) / float(den), text)
        return (1, -float(text), text)
    except ValueError:
        return (2, 0.0, text)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method label, budget) over the ``ok`` runs: seeds, mean ± std of test AUC,
    test logloss, inference bytes and train samples/s."""
    ok = frame[frame["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame(columns=["model", "label", "budget", "seeds", "inference_bytes", "auc_mean", "auc_std",
                                     "logloss_mean", "logloss_std", "samples_per_s_mean", "samples_per_s_std"])
    ok["budget"] = ok["budget"].fillna(_NO_BUDGET)
    grouped = ok.groupby(["model", "label", "budget"], sort=False)
    out = grouped.agg(
        seeds=("seed", "nunique"),
        inference_bytes=("inference_bytes", "mean"),
        auc_mean=("test_auc", "mean"),
        auc_std=("test_auc", "std"),
        logloss_mean=("test_logloss", "mean"),
        logloss_std=("test_logloss", "std"),
        samples_per_s_mean=("train_samples_per_s", "mean"),
        samples_per_s_std=("train_samples_per_s", "std"),
    ).reset_index()
    std_cols = ["auc_std", "logloss_std", "samples_per_s_std"]
    out[std_cols] = out[std_cols].fillna(0.0)  # one seed: no spread to show
    out["inference_bytes"] = out["inference_bytes"].round().astype("int64")
    out["_order"] = out["budget"].map(_budget_order)
    return out.sort_values(["model", "_order", "auc_mean"], ascending=[True, True, False]).drop(columns="_order")


def best_per_budget(summary: pd.DataFrame) -> pd.DataFrame:
    """For each model and budget, the method with the highest mean test AUC, and how far ahead it is."""
    rows = []
    for (model, budget), group in summary.groupby(["model", "budget"], sort=False):
        ranked = group.sort_values("auc_mean", ascending=False)
        best = ranked.iloc[0]
        second = ranked.iloc[1] if len(ranked) > 1 else None
        rows.append({
            "model": model,
            "budget": budget,
            "best": best["label"],
            "test_auc": _pm(best["auc_mean"], best["auc_std"], 4),
            "inference_bytes": int(best["inference_bytes"]),
            "runner_up": second["label"] if second is not None else "-",
            "gap": f"{best['auc_mean'] - second['auc_mean']:+.4f}" if second is not None else "-",
            "methods": len(ranked),
            "seeds": int(best["seeds"]),
        })
    out = pd.DataFrame(rows)
    if not out.empty:
        out["_order"] = out["budget"].map(_budget_order)
        out = out.sort_values(["model", "_order"]).drop(columns="_order").reset_index(drop=True)
    return out


def speed_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Train samples/s (mean ± std over seeds) of every method (rows) at every budget (columns)."""
    if summary.empty:
        return pd.DataFrame()
    cells = summary.assign(
        speed=[_pm(m, s, 0) for m, s in zip(summary["samples_per_s_mean"], summary["samples_per_s_std"])]
    )
    table = cells.pivot_table(index=["model", "label"], columns="budget", values="speed", aggfunc="first")
    columns = sorted(table.columns, key=_budget_order)
    return table[columns].fillna("-").reset_index()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (fewer or equal bytes AND higher or equal AUC).

    >>> pareto_front([(100, 0.70), (200, 0.75), (150, 0.69), (400, 0.74)])
    [0, 1]
    """
    front = []
    for i, (b, a) in enumerate(points):
        dominated = any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for j, (b2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    return markdown.table([str(c) for c in frame.columns], ([_cell(v) for v in row] for row in frame.itertuples(index=False)))


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4f}"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    return value


def _context(frame: pd.DataFrame, sweep: str) -> dict[str, Any]:
    """What the comparison rests on: data, protocol, seeds, training settings."""
    ok = frame[frame["status"] == "ok"]
    seeds_per_cell = ok.groupby(["model", "label", ok["budget"].fillna(_NO_BUDGET)])["seed"].nunique()
    config = json.loads(frame["config"].iloc[0]) if len(frame) and frame["config"].iloc[0] else {}
    train = config.get("train", {})
    bayes = ok["bayes_auc_test"].dropna()
    return {
        "sweep": sweep,
        "source": ", ".join(sorted(frame["source"].dropna().unique())) or "unknown",
        "protocol": ", ".join(sorted(frame["protocol"].dropna().unique())) or "unknown",
        "seeds": sorted(int(s) for s in ok["seed"].unique()),
        "seeds_per_cell": (int(seeds_per_cell.min()), int(seeds_per_cell.max())) if len(seeds_per_cell) else (0, 0),
        "runs_ok": int(len(ok)),
        "runs_failed": int(len(frame) - len(ok)),
        "bayes_auc_test": float(bayes.iloc[0]) if len(bayes) else None,
        "embedding_dim": config.get("model", {}).get("embedding_dim"),
        "training": (
            f"{train.get('epochs')} epoch(s), max_steps {train.get('max_steps')}, batch {train.get('batch_size')}, "
            f"embeddings: {train.get('embedding_optimizer')} lr {train.get('embedding_lr')}, dense: Adam lr "
            f"{train.get('dense_lr')}"
        ) if train else "unknown",
    }


def _plot(summary: pd.DataFrame, context: dict[str, Any]) -> bytes:
    # A Figure of its own, drawn by the Agg renderer savefig picks for PNG: no pyplot, so the caller's
    # backend (a notebook's, a GUI's) and pyplot's figure list are left as they were.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(summary["model"])) or ["-"]
    fig = Figure(figsize=(9.0 * len(models), 5.2))
    axes = fig.subplots(1, len(models), squeeze=False)
    labels = sorted(set(summary["label"]))
    colors = {label: colormaps["tab10"](i % 10) for i, label in enumerate(labels)}
    for ax, model in zip(axes[0], models):
        part = summary[summary["model"] == model]
        front = set(pareto_front(list(zip(part["inference_bytes"], part["auc_mean"]))))
        for label in labels:
            rows = part[part["label"] == label].sort_values("inference_bytes")
            if rows.empty:
                continue
            reference = (rows["budget"] == _NO_BUDGET).all()
            ax.errorbar(rows["inference_bytes"], rows["auc_mean"], yerr=rows["auc_std"], label=label,
                        color=colors[label], marker="*" if reference else "o", markersize=12 if reference else 6,
                        linestyle="none" if reference else "-", capsize=3, linewidth=1.5)
        for i, row in enumerate(part.itertuples(index=False)):
            if i in front:
                ax.scatter([row.inference_bytes], [row.auc_mean], s=160, facecolors="none", edgecolors="black",
                           linewidths=1.0, zorder=5)
        bayes = context.get("bayes_auc_test")
        if bayes:
            lo_auc = float((part["auc_mean"] - part["auc_std"]).min())
            hi_auc = float((part["auc_mean"] + part["auc_std"]).max())
            if bayes - hi_auc <= 0.5 * (hi_auc - lo_auc) + 0.005:
                ax.axhline(bayes, color="gray", linestyle="--", linewidth=1, label=f"Bayes AUC {bayes:.4f}")
            else:  # drawing it would squash the differences between methods into a thin band
                ax.plot([], [], " ", label=f"Bayes AUC {bayes:.4f} (above the plot)")
        ax.set_xscale("log")
        ax.set_xlabel("inference bytes of the embedding tables (log scale)")
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(f"{model}: AUC vs memory (ringed: Pareto front)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    lo, hi = context["seeds_per_cell"]
    fig.suptitle(f"sweep {context['sweep']} · data {context['source']} · protocol {context['protocol']} · "
                 f"{lo if lo == hi else f'{lo}-{hi}'} seed(s) per point", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _html(context: dict[str, Any], png: bytes, tables: dict[str, pd.DataFrame]) -> str:
    lo, hi = context["seeds_per_cell"]
    seeds = f"{lo}" if lo == hi else f"{lo} to {hi}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>embtable sweep {html.escape(context['sweep'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%}.note{color:#555}</style></head><body>",
        f"<h1>Which embedding method at which memory budget? — sweep <code>{html.escape(context['sweep'])}</code></h1>",
        "<p class='note'>",
        f"Data: <b>{html.escape(context['source'])}</b>, split protocol <b>{html.escape(context['protocol'])}</b>. "
        f"Every number is the mean ± standard deviation of the <b>test AUC</b> over <b>{seeds} seed(s)</b> "
        f"(seeds {html.escape(str(context['seeds']))}); {context['runs_ok']} runs succeeded, "
        f"{context['runs_failed']} failed (listed at the end, never plotted). "
        f"Training: {html.escape(context['training'])}; embedding dim {context['embedding_dim']}. "
        "Bytes are the exact inference bytes of the embedding module (every parameter and buffer).",
    ]
    if context.get("bayes_auc_test"):
        parts.append(f" The data's Bayes AUC on the test split (no model can beat it) is "
                     f"{context['bayes_auc_test']:.4f}.")
    parts.append("</p>")
    parts.append(f"<img alt='AUC against inference bytes' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    for title, frame in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(frame.to_html(index=False, escape=True, na_rep="-", float_format=lambda x: f"{x:.4f}")
                     if not frame.empty else "<p>(none)</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(store: str | os.PathLike, out_dir: str | os.PathLike, sweep: str | None = None) -> Report:
    """Write ``pareto.png``, ``report.html`` and ``report.md`` for one sweep of a results store.

    Args:
        store: the results file (``results.sqlite``).
        out_dir: folder of the report (created).
        sweep: the sweep to report on; may be omitted when the store holds only one.

    Raises:
        ValueError: the store holds several sweeps and none was named, or the sweep has no successful run.
    """
    from embtable.atomic import atomic_write_bytes  # here: summarising a store needs no torch

    frame = load(store)
    names = sorted(frame["sweep"].unique())
    if sweep is None:
        if len(names) != 1:
            raise ValueError(f"{store} holds the sweeps {names}; name the one to report on (--sweep)")
        sweep = names[0]
    frame = frame[frame["sweep"] == sweep]
    if frame.empty:
        raise ValueError(f"{store} has no runs of sweep {sweep!r}; it holds {names}")
    summary = summarize(frame)
    if summary.empty:
        reasons = frame["failure_reason"].dropna().unique()[:3]
        raise ValueError(f"sweep {sweep!r} has no successful run to report on ({len(frame)} failed; e.g. {list(reasons)})")
    context = _context(frame, sweep)
    best = best_per_budget(summary)
    speed = speed_table(summary)
    failed = frame[frame["status"] != "ok"][["label", "budget", "model", "seed", "status", "failure_reason"]]
    failed = failed.fillna({"budget": _NO_BUDGET}).reset_index(drop=True)
    cells = summary.assign(
        test_auc=[_pm(m, s, 4) for m, s in zip(summary["auc_mean"], summary["auc_std"])],
        test_logloss=[_pm(m, s, 4) for m, s in zip(summary["logloss_mean"], summary["logloss_std"])],
    )[["model", "label", "budget", "inference_bytes", "test_auc", "test_logloss", "seeds"]]

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    png = _plot(summary, context)
    tables = {"Best method per budget": best, "Every method and budget": cells,
              "Training speed (train samples/s of the training steps, mean ± std; runs of a sweep may share "
              "the CPU, so compare within this table only)": speed,
              "Failed runs (not plotted)": failed}
    paths = {"png": folder / "pareto.png", "html": folder / "report.html", "md": folder / "report.md"}
    atomic_write_bytes(paths["png"], png)
    atomic_write_bytes(paths["html"], _html(context, png, tables).encode())
    lo, hi = context["seeds_per_cell"]
    md = [f"# sweep {sweep}", "",
          f"Data {context['source']}, protocol {context['protocol']}; test AUC mean ± std over "
          f"{lo if lo == hi else f'{lo}-{hi}'} seed(s) {context['seeds']}; {context['runs_ok']} runs ok, "
          f"{context['runs_failed']} failed. Training: {context['training']}."]
    if context.get("bayes_auc_test"):
        md.append(f"Bayes AUC (test): {context['bayes_auc_test']:.4f}.")
    for title, table in tables.items():
        md += ["", f"## {title}", "", _markdown(table)]
    atomic_write_bytes(paths["md"], ("\n".join(md) + "\n").encode())
    return Report(folder, paths["png"], paths["html"], paths["md"], summary, best, speed, failed, context)
