"""Where a method's training step spends its time: mapper, storage, combine, and the rest (not a test).

For each (method, budget) the DLRM of ``experiments.training.train.run`` is built over ``embtable.build`` on the
same in-memory batches (so the data loader is not timed) with the optimizers ``run`` uses, one thread.
A *step* is what ``run`` times: forward, loss, backward, both optimizer steps and every embedding
module's ``train_step_end``. The embedding module's
forward is split into:

- ``mapper``: the id-mapping leaf (the child named ``mapper``: hash, qr digits, unified slots, remaps);
- ``storage``: every TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection`` lookup inside (forward hooks);
- ``combine``: what ``pooled`` does after the lookup (products, projections, concatenation) = the
  module's whole forward minus mapper and storage.

Methods are timed in interleaved rounds and each number is the median round (a busy, shared machine
slows all methods of a round alike). ``rel_full`` is samples/s relative to the full table's in the
same round.

    python -m experiments.benchmarks.bench_methods_speed --budgets 1/4 1/16 --methods full hash qr unified low_rank
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection

import ctr_models
import data_prep
import embtable
from experiments.benchmarks import torch_threads
from experiments.training.config import DataConfig
from experiments.training.train import batch_loss, dataset_path, embedding_modules, make_optimizers

__all__ = ["main", "bench"]


def _setup(features, num_dense: int, method: dict[str, Any], budget: str | None, seed: int):
    torch.manual_seed(seed)
    config = embtable.method_config_from_dict(dict(method), source="bench")
    emb = embtable.build(features, config, budget, pooling="sum", seed=seed)
    model = ctr_models.build_model("dlrm", emb, num_dense)
    opts = make_optimizers(model, emb, "rowwise_adagrad", 0.05, 1e-3)
    return model, emb, opts


def _round(model, emb, opts, batches: list, parts: bool) -> dict[str, float]:
    """Seconds per batch of one pass over ``batches``: the step and (optionally) forward parts."""
    out: dict[str, float] = {}
    modules = embedding_modules(model)
    start = time.perf_counter()
    for step, b in enumerate(batches):
        opts.zero_grad()
        loss = batch_loss(model, b, modules)
        loss.backward()
        opts.step()
        for module in modules:  # as the trainer does (low_precision writes its rows back here)
            module.train_step_end(step)
    out["step"] = (time.perf_counter() - start) / len(batches)
    if not parts:
        return out
    with torch.no_grad():
        kjts = [emb.id_policy(emb._select(b.sparse_features)) for b in batches]
        spent = {"mapper": 0.0, "storage": 0.0}
        handles = []
        for name, child in emb.named_modules():
            kind = "mapper" if name.split(".")[-1] == "mapper" else (
                "storage" if type(child) in (EmbeddingBagCollection, EmbeddingCollection) else None)
            if kind is None:
                continue
            began: list[float] = []
            handles.append(child.register_forward_pre_hook(lambda m, a, began=began: began.append(time.perf_counter())))
            handles.append(child.register_forward_hook(
                lambda m, a, o, began=began, kind=kind: spent.__setitem__(kind, spent[kind] + time.perf_counter() - began.pop())))
        try:
            start = time.perf_counter()
            for k in kjts:
                emb.pooled(k)
            total = time.perf_counter() - start
        finally:
            for h in handles:
                h.remove()
        n = len(kjts)
        out["embedding_forward"] = total / n
        out["mapper"] = spent["mapper"] / n
        out["storage"] = spent["storage"] / n
        out["combine"] = (total - spent["mapper"] - spent["storage"]) / n
    return out


def bench(methods: list[dict[str, Any]], budgets: list[str], *, preset: str = "demo", data_dir: str = "data",
          batch_size: int = 256, steps: int = 60, rounds: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Median per-round timings of every (method, budget); see the module docstring."""
    with torch_threads(1):  # the caller's thread count comes back after
        path = dataset_path(DataConfig(preset=preset, path=None, data_dir=data_dir))
        meta = data_prep.load_meta(path)
        features = meta.feature_specs(16)
        loader = data_prep.BatchLoader(path, "train", batch_size, shuffle=True, seed=seed)
        batches = list(islice(iter(loader), steps))
        cells: list[tuple[str, dict[str, Any], str | None]] = []
        for m in methods:
            if m["method"] == "full":
                cells.append(("full", m, None))
                continue
            for b in budgets:
                cells.append((m.get("label", m["method"]), {k: v for k, v in m.items() if k != "label"}, b))
        built = {}
        for label, m, b in cells:
            try:
                built[(label, b)] = _setup(features, meta.num_dense, m, b, seed)
            except embtable.BudgetError as err:
                print(f"{label} @ {b}: infeasible ({err})", flush=True)
        for model, emb, opts in built.values():  # warm up (first-call allocations, lazy inits)
            _round(model, emb, opts, batches[:5], parts=True)
        times: dict[tuple[str, str | None], list[dict[str, float]]] = {k: [] for k in built}
        for r in range(rounds):
            for key, (model, emb, opts) in built.items():
                times[key].append(_round(model, emb, opts, batches, parts=True))
            print(f"round {r + 1}/{rounds} done", flush=True)
        rows = []
        full_rounds = times.get(("full", None))
        for (label, b), per_round in times.items():
            row: dict[str, Any] = {"method": label, "budget": b}
            for part in per_round[0]:
                row[f"{part}_ms"] = 1e3 * statistics.median(t[part] for t in per_round)
            row["samples_per_s"] = batch_size / statistics.median(t["step"] for t in per_round)
            if full_rounds is not None:
                row["rel_full"] = statistics.median(f["step"] / t["step"] for f, t in zip(full_rounds, per_round))
            rows.append(row)
        return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.bench_methods_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="method names or YAML mappings, e.g. '{method: unified, num_probes: 2}' "
                             "(default: every registered method)")
    parser.add_argument("--budgets", nargs="+", default=["1/4", "1/16", "1/64"])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    import yaml

    names = args.methods or list(embtable.registered_methods())
    methods = [yaml.safe_load(m) if m.strip().startswith("{") else {"method": m} for m in names]
    rows = bench(methods, args.budgets, preset=args.preset, data_dir=args.data_dir, batch_size=args.batch_size,
                 steps=args.steps, rounds=args.rounds)
    cols = ["method", "budget", "rel_full", "samples_per_s", "step_ms", "embedding_forward_ms", "mapper_ms",
            "storage_ms", "combine_ms"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row.get(c):.3f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in cols))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
