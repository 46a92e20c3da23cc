"""Serving speed: the exported ``torch.export`` program against the eager model, per method (not a test).

For each method, a DLRM (``ctr_models``) over ``embtable.build`` on the demo preset's 26 feature
cardinalities (``data_prep.generator.PRESETS["demo"]``: no data is generated) is exported with
``embtable.export.export(..., format="pt2")`` and loaded back with ``torch.export.load`` (as a server
would, here in the same process). Ids are uniform random, one per feature and sample (Criteo layout).

- ``lat1_ms``: median latency of one batch of 1 (eager model vs the loaded program);
- ``qps512``: samples/s at batch 512 (median of the timed calls);
- ``ratio``: program / eager (latency: < 1 is faster; throughput: > 1 is faster), measured in one run,
  eager and program calls interleaved so that a busy machine slows both alike;
- ``export_s``: seconds to trace and save the program.

With ``--aoti`` the saved program is also compiled ahead of time with AOTInductor
(``torch._inductor.aoti_compile_and_package``: C++ and a shared library, for CPU serving without Python),
loaded with ``torch._inductor.aoti_load_package`` and timed in the same interleaved calls; a second table
gives its latency, throughput, ratios to eager, build seconds and package size.

    python -m experiments.benchmarks.bench_serving --methods full hash qr --dtype fp32
    python -m experiments.benchmarks.bench_serving --methods hash --preset tiny --aoti
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor

import ctr_models
import embtable
from data_prep.generator import PRESETS
from embtable import export as E
from experiments import markdown

__all__ = ["main", "bench"]

NUM_DENSE = 13
DIM = 16
BUDGET = "1/4"


def _features(preset: str) -> list[embtable.FeatureSpec]:
    return [embtable.FeatureSpec(f"C{i + 1}", n, DIM) for i, n in enumerate(PRESETS[preset].cardinalities)]


def _batch(features, batch: int, gen: torch.Generator):
    values = torch.cat([torch.randint(0, f.num_embeddings, (batch,), generator=gen) for f in features])
    lengths = torch.ones(len(features) * batch, dtype=torch.int64)
    dense = torch.randn(batch, NUM_DENSE, generator=gen)
    return dense, KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _metadata(path) -> str:
    extra = {E.PT2_METADATA: ""}
    torch.export.load(path, extra_files=extra)
    return extra[E.PT2_METADATA]


def _aoti(path: Path, row: dict):
    """Package the saved program with AOTInductor and load it back; its build seconds and bytes go in ``row``."""
    start = time.perf_counter()
    package = torch._inductor.aoti_compile_and_package(torch.export.load(path),
                                                       package_path=str(path.with_suffix(".aoti.pt2")))
    row["aoti_build_s"], row["aoti_bytes"] = time.perf_counter() - start, Path(package).stat().st_size
    return torch._inductor.aoti_load_package(package)


def bench(method: str, features, dtype: str, folder: Path, repeats: int, seed: int = 0, aoti: bool = False) -> dict:
    torch.manual_seed(seed)
    config = embtable.method_config_from_dict({"method": method}, source="bench_serving")
    budget = None if method == "full" else BUDGET
    model = ctr_models.build_model("dlrm", embtable.build(features, config, budget, seed=seed), NUM_DENSE).eval()
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    path = folder / f"{method}.pt2"
    E.export(model, path, dtype, format="pt2", example_inputs=_batch(features, 4, gen))
    export_s = time.perf_counter() - start
    program = torch.export.load(path).module()
    eager = E.inference_model(model, dtype)
    row: dict = {"method": method, "export_s": export_s}
    compiled = _aoti(path, row) if aoti else None
    with torch.no_grad():
        min_batch = json.loads(_metadata(path))["min_batch"]
        for batch, reps in ((1, repeats * 10), (512, repeats)):
            dense, kjt = _batch(features, max(batch, min_batch), gen)  # a program with min_batch 2: batch 2
            args = (dense, kjt.values(), kjt.lengths())
            torch.testing.assert_close(program(*args), eager(dense, kjt), atol=1e-4, rtol=1e-4)
            if compiled is not None:
                torch.testing.assert_close(compiled(*args), eager(dense, kjt), atol=1e-4, rtol=1e-4)
            for _ in range(2):  # warm-up
                program(*args)
                eager(dense, kjt)
                if compiled is not None:
                    compiled(*args)
            t_eager, t_prog, t_aoti = [], [], []
            for _ in range(reps):  # interleaved
                t_eager.append(_median_seconds(lambda: eager(dense, kjt), 1))  # noqa: B023
                t_prog.append(_median_seconds(lambda: program(*args), 1))  # noqa: B023
                if compiled is not None:
                    t_aoti.append(_median_seconds(lambda: compiled(*args), 1))  # noqa: B023
            row[f"eager_{batch}"], row[f"program_{batch}"] = statistics.median(t_eager), statistics.median(t_prog)
            if t_aoti:
                row[f"aoti_{batch}"] = statistics.median(t_aoti)
    return row


def table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["method"], f"failed: {r['error']}"])
            continue
        qe, qp = 512 / r["eager_512"], 512 / r["program_512"]
        cells.append([r["method"], f"{1e3 * r['eager_1']:.2f}", f"{1e3 * r['program_1']:.2f}",
                      f"{r['program_1'] / r['eager_1']:.2f}", f"{qe:,.0f}", f"{qp:,.0f}", f"{qp / qe:.2f}",
                      f"{r['export_s']:.1f}"])
    return markdown.table(["method", "eager lat1 ms", "program lat1 ms", "ratio", "eager qps512", "program qps512",
                           "ratio", "export s"], cells, align="lrrrrrrr")


def aoti_table(rows: list[dict]) -> str:
    cells = [[r["method"], f"{1e3 * r['aoti_1']:.2f}", f"{r['aoti_1'] / r['eager_1']:.2f}", f"{512 / r['aoti_512']:,.0f}",
              f"{r['eager_512'] / r['aoti_512']:.2f}", f"{r['aoti_build_s']:.1f}", f"{r['aoti_bytes'] / 2**20:.1f}"]
             for r in rows if "aoti_512" in r]
    return markdown.table(["method", "aoti lat1 ms", "ratio to eager", "aoti qps512", "ratio to eager", "build s",
                           "package MiB"], cells, align="lrrrrrr")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--dtype", default="fp32", choices=E.DTYPES)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls at batch 512 (x10 at batch 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aoti", action="store_true", help="also build and time an AOTInductor package (slow: C++ build)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    features = _features(args.preset)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods or sorted(embtable.registered_methods()):
            try:
                rows.append(bench(method, features, args.dtype, Path(folder), args.repeats, aoti=args.aoti))
            except Exception as err:  # a method that does not export: say so in the table, go on
                rows.append({"method": method, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{args.preset} preset, {len(features)} features, dim {DIM}, {args.dtype} rows, {args.threads} thread(s)")
    print(table(rows))
    if args.aoti:
        print("\nAOTInductor package (same calls, interleaved)")
        print(aoti_table(rows))
    return rows


if __name__ == "__main__":
    main()
