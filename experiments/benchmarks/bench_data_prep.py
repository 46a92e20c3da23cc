"""Benchmark of data_prep (not a timed test): TSV -> dataset conversion next to a plain pyarrow read.

On one generated Criteo TSV file, in one run: rows/s and MB/s of ``convert_criteo`` (both cores) and of
``pyarrow.csv.read_csv`` simply reading the same file (both cores), the ``BatchLoader``'s samples/s, peak
memory, and the generator presets' sizes, positive rates and Bayes AUCs.

    python -m experiments.benchmarks.bench_data_prep --rows 1000000 --out runs/bench_data_prep.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import sys
import time

import numpy as np

from data_prep import (
    PRESETS,
    BatchLoader,
    GeneratorConfig,
    Teacher,
    convert_criteo,
    generate_dataset,
    generate_tsv,
    load_meta,
)
from data_prep.splits import AUCHistogram, dlrm_split


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _stop_fork_server() -> None:
    """Stop this process's multiprocessing fork server (the conversion's workers are its children).

    Only then is their CPU time (reaped by the server) counted in this process's ``RUSAGE_CHILDREN``.
    """
    import multiprocessing.forkserver as mpf

    server = getattr(mpf, "_forkserver", None)
    if server is not None and hasattr(server, "_stop"):
        server._stop()


def _pyarrow_read(path: pathlib.Path) -> tuple[float, int, float]:
    """Wall seconds, rows and CPU seconds of ``pyarrow.csv.read_csv`` (all threads) on ``path``."""
    import pyarrow.csv as pacsv

    c, t = _cpu(), time.perf_counter()
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(autogenerate_column_names=True),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
    )
    return time.perf_counter() - t, table.num_rows, _cpu() - c


def _teacher_stats(name: str) -> dict:
    """Rows, positive rate and Bayes AUC per split of a preset, from the teacher (nothing written)."""
    cfg = PRESETS[name]
    teacher = Teacher(cfg)
    hist = [AUCHistogram() for _ in range(3)]
    for c in range(cfg.num_chunks):
        ch = teacher.chunk(c)
        codes = dlrm_split(ch["rows"], cfg.num_rows, cfg.days)
        for i in range(3):
            hist[i].add(ch["p"][codes == i], ch["labels"][codes == i])
    splits = ("train", "valid", "test")
    rows = {s: int(h.pos.sum() + h.neg.sum()) for s, h in zip(splits, hist)}
    return {
        "rows": rows,
        "positive_rate": {s: float(h.pos.sum() / rows[s]) for s, h in zip(splits, hist)},
        "bayes_auc": {s: h.auc() for s, h in zip(splits, hist)},
    }


def _preset_summary(name: str, workdir: pathlib.Path, write: bool) -> dict:
    cfg = PRESETS[name]
    t = time.perf_counter()
    if write:
        meta = load_meta(generate_dataset(name, workdir / f"preset_{name}", progress=False))
        stats = {"rows": meta.split_rows, "positive_rate": meta.positive_rate, "bayes_auc": meta.bayes_auc}
        counts = meta.counts()["C3"]
        seen = counts[counts > 0]
        stats["C3_seen_ids"] = int(len(seen))
        stats["C3_singleton_fraction"] = float((seen == 1).mean())
    else:
        stats = _teacher_stats(name)
    stats["seconds"] = round(time.perf_counter() - t, 2)
    stats["scale"] = cfg.scale
    stats["max_num_embeddings"] = max(cfg.cardinalities)
    stats["total_num_embeddings"] = sum(cfg.cardinalities)
    stats["written"] = write
    return stats


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and prints) the result record."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated TSV (~265 bytes each)")
    p.add_argument("--scale", type=float, default=1 / 50, help="generator scale of the TSV's cardinalities")
    p.add_argument("--workdir", default="runs/bench_data_prep")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--presets", nargs="*", default=["tiny", "demo", "standard"])
    p.add_argument("--out", default=None, help="write the result record (JSON) here")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    a = p.parse_args(argv)
    work = pathlib.Path(a.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    result: dict = {"host": {"python": sys.version.split()[0], "machine": platform.machine(),
                             "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}}
    try:
        # 1. the TSV file
        tsv = work / "criteo.tsv"
        t = time.perf_counter()
        generate_tsv(GeneratorConfig(scale=a.scale, num_rows=a.rows, rows_per_shard=100_000), tsv, progress=False)
        mb = tsv.stat().st_size / 2**20
        result["tsv"] = {"rows": a.rows, "MB": round(mb, 1), "generate_seconds": round(time.perf_counter() - t, 2)}
        # 2. our conversion (CPU: this process and its worker processes). It runs before pyarrow's read so
        # that the workers' peak memory is not inflated by a fork of a process holding a whole table.
        c, t = _cpu(), time.perf_counter()
        out = convert_criteo(tsv, work / "dataset", workers=a.workers, progress=False)
        conv = time.perf_counter() - t
        _stop_fork_server()
        conv_cpu = _cpu() - c
        result["peak_rss_MB_after_conversion"] = {
            "self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        }
        # 3. pyarrow simply reading the same file (warm page cache, both cores), twice, the best counts
        raw_times, raw_cpu = [], []
        for _ in range(2):
            dt, n, cpu = _pyarrow_read(tsv)
            assert n == a.rows
            raw_times.append(dt)
            raw_cpu.append(cpu)
        raw = min(raw_times)
        meta = load_meta(out)
        result["pyarrow_read_csv"] = {"seconds": round(raw, 3), "rows_per_s": round(a.rows / raw),
                                      "MB_per_s": round(mb / raw, 1), "all_seconds": [round(x, 3) for x in raw_times],
                                      "cpu_seconds": [round(x, 3) for x in raw_cpu]}
        result["convert_criteo"] = {"seconds": round(conv, 3), "rows_per_s": round(a.rows / conv),
                                    "MB_per_s": round(mb / conv, 1), "fraction_of_pyarrow": round(raw / conv, 3),
                                    "cpu_seconds": round(conv_cpu, 3),
                                    "cpu_fraction_of_pyarrow": round(min(raw_cpu) / conv_cpu, 3),
                                    "workers": a.workers, "split_rows": meta.split_rows,
                                    "shards": len(meta.raw["manifest"]["shards"]),
                                    "malformed": meta.raw["manifest"]["malformed"]["count"]}
        # 4. the loader, two epochs over the training split (torchrec imported before the clock starts)
        import torchrec  # noqa: F401

        loader = BatchLoader(out, "train", a.batch_size, seed=0)
        speeds = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            t = time.perf_counter()
            seen = sum(len(b.labels) for b in loader)
            speeds.append(seen / (time.perf_counter() - t))
        result["batch_loader"] = {"batch_size": a.batch_size, "rows": loader.num_rows,
                                  "samples_per_s_epoch0": round(speeds[0]), "samples_per_s_epoch1": round(speeds[1])}
        # 5. presets
        result["presets"] = {name: _preset_summary(name, work, write=name != "standard") for name in a.presets}
    finally:
        result["peak_rss_MB_end"] = {  # includes pyarrow's whole-table read of the TSV
            "self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        result["host"]["load_avg_end"] = os.getloadavg()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
    print(text)
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
