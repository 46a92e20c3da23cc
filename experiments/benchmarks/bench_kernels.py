"""Embedding kernels side by side: every method's forward and training speed as a share of the gather ceiling.

One run measures, on the same synthetic batches (not a test):

- ``ceiling``: one ``index_select`` over one table holding all rows (training: plus one ``index_add_`` of
  the output gradient back into it) -- what any lookup of these ids must at least do;
- ``tbe``: raw FBGEMM ``SplitTableBatchedEmbeddingBagsCodegen`` (fused row-wise Adagrad in the backward),
  the kernel TorchRec's ``FusedEmbeddingBagCollection`` runs;
- every registered method at ``--budget`` (``full`` at no budget), built with :func:`embtable.build`:
  forward (no grad), and a training step = forward, ``sum()`` loss (plus ``auxiliary_loss()``), backward,
  the trainer's optimizers (:func:`experiments.training.train.make_optimizers`, row-wise Adagrad for the tables,
  Adam for dense parts) and ``train_step_end``. With ``--paths fused`` (default ``both``) the tables train
  through :func:`embtable.fuse_storage` where the trainer would (``train.fused_tables``).

With ``--compiled`` every method's forward and training step also run under ``torch.compile`` (the module
is compiled, its forward and AOTAutograd backward; loss, optimizer step and ``train_step_end`` stay eager),
on the same module and optimizers, in the same interleaved rounds; a second table gives ``eager seconds /
compiled seconds`` per round (median: > 1 is faster compiled) and the compile time (the warm-up calls,
excluded from the timings). The backend is ``--backend`` (default inductor; when inductor cannot build a
kernel here, e.g. no C++ compiler, the run falls back to ``aot_eager`` and says so).

Features: the 26 Criteo Kaggle cardinalities capped at ``--rows`` per feature, dim 16, one id per feature
and sample, ids Zipf-like (``floor((n + 1) ** u) - 1`` with ``u`` uniform: P(id) ~ 1/(id + 1)), batch 4096.
Contenders run in interleaved rounds (a shared machine slows one round alike for all); each share is the
median over rounds of ``ceiling seconds / contender seconds`` in the same round.

    python -m experiments.benchmarks.bench_kernels                      # 100k rows per feature, 2 threads, ~2 min
    python -m experiments.benchmarks.bench_kernels --rows 1000000 --threads 2 --methods full hash qr
    python -m experiments.benchmarks.bench_kernels --rows 10000 --paths unfused --compiled --methods full hash qr
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import embtable
from data_prep.schema import CRITEO_CARDINALITIES
from experiments import markdown
from experiments.benchmarks import torch_threads

__all__ = ["bench", "main", "criteo_features", "zipf_batch"]

DIM = 16


def criteo_features(rows: int, dim: int = DIM) -> list[embtable.FeatureSpec]:
    """The Criteo Kaggle categorical features with at most ``rows`` ids each."""
    return [embtable.FeatureSpec(f"C{i + 1}", min(int(c), rows), dim) for i, c in enumerate(CRITEO_CARDINALITIES)]


def zipf_batch(features: list[embtable.FeatureSpec], batch: int, generator: torch.Generator) -> KeyedJaggedTensor:
    """One id per (feature, sample), P(id) proportional to 1/(id + 1) within each feature."""
    values = []
    for f in features:
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        ids = torch.floor(torch.exp(u * torch.log(torch.tensor(f.num_embeddings + 1.0)))).to(torch.int64) - 1
        values.append(ids.clamp_(0, f.num_embeddings - 1))
    lengths = torch.ones(len(features) * batch, dtype=torch.int64)
    return KeyedJaggedTensor(keys=[f.name for f in features], values=torch.cat(values), lengths=lengths,
                             stride=batch)


def _ceiling(features, device) -> tuple[Callable[[KeyedJaggedTensor], Any], Callable[[KeyedJaggedTensor], Any]]:
    sizes = [f.num_embeddings for f in features]
    offsets = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
    weight = torch.randn(sum(sizes), DIM, device=device) * 0.01
    batch_offsets: dict[int, torch.Tensor] = {}

    def ids(kjt):
        B = kjt.stride()
        if B not in batch_offsets:
            batch_offsets[B] = offsets.repeat_interleave(B)
        return kjt.values() + batch_offsets[B]

    def forward(kjt):
        return weight.index_select(0, ids(kjt))

    def train(kjt):
        i = ids(kjt)
        out = weight.index_select(0, i)
        weight.index_add_(0, i, torch.ones_like(out), alpha=-1e-6)

    return forward, train


def _tbe(features, device):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    cuda = device.type == "cuda"
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(f.num_embeddings, DIM, EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
          ComputeDevice.CUDA if cuda else ComputeDevice.CPU) for f in features],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05, eps=1e-8,
        device=device,
    )

    def forward(kjt):
        with torch.no_grad():
            return tbe(kjt.values(), kjt.offsets())

    def train(kjt):
        tbe(kjt.values(), kjt.offsets()).sum().backward()

    return forward, train


def _method(features, name: str, budget: str | None, fused: bool, device, backend: str | None = None):
    """``(forward, train, did_fuse, compiled)``: ``compiled`` is ``(forward, train)`` over
    ``torch.compile(emb, backend=backend)`` sharing the module and optimizers, or None without a backend."""
    from experiments.training.train import make_optimizers

    config = embtable.registered_methods()[name]()
    emb = embtable.build(features, config, budget, seed=0, device=device)
    kwargs = {"fused_tables": True} if fused else {}
    opts = make_optimizers(emb, emb, "rowwise_adagrad", 0.05, 1e-3, **kwargs)
    forward, train = _steps(emb, emb, opts)
    compiled = None
    if backend is not None:
        # fullgraph: a graph break or dynamo giving up (recompile limit) is an error, never a silent eager run
        compiled = _steps(emb, torch.compile(emb, backend=backend, fullgraph=True), opts)
    return forward, train, bool(getattr(opts, "fused", None)), compiled


def _steps(emb, call, opts):
    """Forward (no grad) and training step of ``emb``, whose forward is ``call`` (``emb`` or a compiled ``emb``)."""
    step = [0]

    def forward(kjt):
        with torch.no_grad():
            return call(kjt).values()

    def train(kjt):
        opts.zero_grad()
        loss = call(kjt).values().sum()
        aux = emb.auxiliary_loss()
        if aux is not None:
            loss = loss + aux
        loss.backward()
        opts.step()
        emb.train_step_end(step[0])
        step[0] += 1

    return forward, train


def pick_backend(backend: str = "inductor") -> tuple[str, str]:
    """``(backend, note)``: ``backend`` when it compiles a tiny function here, else ``aot_eager`` and why."""
    if backend != "inductor":
        return backend, ""
    import shutil

    try:
        fn = torch.compile(lambda x: (x * 2 + 1).relu().sum(), backend="inductor", fullgraph=True)
        fn(torch.randn(8))
        return backend, ""
    except Exception as err:  # no C++ compiler, a broken toolchain: say so and measure what works
        cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        return "aot_eager", (f"inductor failed ({type(err).__name__}: {str(err).splitlines()[0][:100]}; "
                             f"C++ compiler: {cxx or 'none'}): fell back to aot_eager")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, batches, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for kjt in batches:
        fn(kjt)
    _sync(device)
    return (time.perf_counter() - start) / len(batches)


def bench(*, rows: int = 100_000, budget: str = "1/16", methods: list[str] | None = None, paths: str = "both",
          threads: int = 2, batch_size: int = 4096, iters: int = 3, rounds: int = 5, device: str = "cpu",
          compiled: bool = False, backend: str = "inductor",
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the contenders; returns ``{"rows": [...], "infeasible": {label: reason}, ...}``.

    With ``compiled``, also ``"compiled": [{"path", "forward_speedup", "train_speedup", "compile_s"...}]``
    (speedup: median over rounds of eager seconds / compiled seconds), ``"backend"`` and ``"backend_note"``.
    """
    # every method's module shares EmbeddingModule.forward's code object, hence one dynamo cache: give it room
    # for each method's forward and training graphs (the default limit of 8 runs the rest eager)
    with torch_threads(threads), torch._dynamo.config.patch(cache_size_limit=256, accumulated_cache_size_limit=4096):
        dev = torch.device(device)
        backend_note = ""
        if compiled:
            backend, backend_note = pick_backend(backend)
            if backend_note:
                log(backend_note)
        features = criteo_features(rows)
        gen = torch.Generator().manual_seed(0)
        batches = [zipf_batch(features, batch_size, gen).to(dev) for _ in range(iters)]
        contenders: dict[str, tuple[Callable, Callable]] = {"ceiling": _ceiling(features, dev), "tbe": _tbe(features, dev)}
        infeasible: dict[str, str] = {}
        compiled_of: dict[str, tuple[Callable, Callable]] = {}
        names = methods or list(embtable.registered_methods())
        variants = {"both": (False, True), "fused": (True,), "unfused": (False,)}[paths]
        for name in names:
            b = None if name == "full" else budget
            for fused in variants:
                label = f"{name}{'' if b is None else ' ' + b}{' fused' if fused else ''}"
                try:
                    fwd, train, did_fuse, comp = _method(features, name, b, fused, dev, backend if compiled else None)
                except embtable.BudgetError as err:
                    infeasible[name] = str(err).split("\n")[0]
                    break
                if fused and not did_fuse:
                    infeasible[label] = "storage not fused (fused_storage_unsupported, or dims not multiples of 4)"
                    continue
                contenders[label] = (fwd, train)
                if comp is not None:
                    compiled_of[label] = comp
        compile_s: dict[str, dict[str, float]] = {}
        for label, comp in compiled_of.items():  # compile (first calls; a recompile may follow the first)
            try:
                compile_s[label] = {kind: _time(fn, [batches[0], batches[-1]], dev) * 2 for kind, fn in
                                    zip(("forward", "train"), comp)}
            except Exception as err:  # a method that does not compile: say so, measure the others
                infeasible[f"{label} compiled"] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
                continue
            contenders[f"{label} compiled"] = comp
            log(f"compiled {label}: forward {compile_s[label]['forward']:.1f} s, "
                f"train {compile_s[label]['train']:.1f} s")
        for fwd, train in contenders.values():  # warm up: first-call allocations, optimizer state
            fwd(batches[0])
            train(batches[0])
        times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "train": []} for k in contenders}
        for r in range(rounds):
            for label, (fwd, train) in contenders.items():
                times[label]["forward"].append(_time(fwd, batches, dev))
                times[label]["train"].append(_time(train, batches, dev))
            log(f"round {r + 1}/{rounds} done")
        ceil = times["ceiling"]
        out_rows = []
        for label, t in times.items():
            row: dict[str, Any] = {"path": label}
            for kind in ("forward", "train"):
                row[f"{kind}_samples_per_s"] = batch_size / statistics.median(t[kind])
                row[f"{kind}_share"] = statistics.median(c / x for c, x in zip(ceil[kind], t[kind]))
            out_rows.append(row)
        comp_rows = []
        for label in compile_s:
            row = {"path": label, **{f"{kind}_compile_s": s for kind, s in compile_s[label].items()}}
            for kind in ("forward", "train"):
                eager, comp = times[label][kind], times[f"{label} compiled"][kind]
                row[f"{kind}_speedup"] = statistics.median(e / c for e, c in zip(eager, comp))
            comp_rows.append(row)
        result = {"rows": out_rows, "infeasible": infeasible, "rows_per_feature": rows, "budget": budget,
                  "threads": threads, "batch_size": batch_size, "device": device,
                  "table_rows": sum(f.num_embeddings for f in features)}
        if compiled:
            result.update(compiled=comp_rows, backend=backend, backend_note=backend_note)
        return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['table_rows']:,} rows (<= {result['rows_per_feature']:,} per feature) x dim {DIM}, "
             f"batch {result['batch_size']}, {result['threads']} threads, {result['device']}"]
    rows = [[r["path"], f"{r['forward_share']:.2f}", f"{r['forward_samples_per_s']:,.0f}",
             f"{r['train_share']:.2f}", f"{r['train_samples_per_s']:,.0f}"] for r in result["rows"]]
    rows += [[label, f"not run: {why}"] for label, why in result["infeasible"].items()]
    lines.append(markdown.table(["path", "forward share", "forward samples/s", "training share", "training samples/s"],
                                rows, align="lrrrr"))
    if "compiled" in result:
        lines.append("")
        lines.append(f"torch.compile (backend {result['backend']}) vs eager, same module and rounds: "
                     "eager s / compiled s (> 1: compiled faster); compile s = the two warm-up calls")
        if result["backend_note"]:
            lines.append(result["backend_note"])
        rows = [[r["path"], f"{r['forward_speedup']:.2f}", f"{r['train_speedup']:.2f}",
                 f"{r['forward_compile_s']:.1f}", f"{r['train_compile_s']:.1f}"] for r in result["compiled"]]
        lines.append(markdown.table(["path", "forward speedup", "training speedup", "forward compile s",
                                     "training compile s"], rows, align="lrrrr"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.bench_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="cap on rows per feature (issue: 1000000)")
    parser.add_argument("--budget", default="1/16", help="every method's budget (full: none)")
    parser.add_argument("--methods", nargs="+", help="registered method names (default: all)")
    parser.add_argument("--paths", choices=["both", "fused", "unfused"], default="both",
                        help="train the tables unfused (sparse grads + Python optimizer), fused, or both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=3, help="batches per contender per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compiled", action="store_true",
                        help="also time every method under torch.compile (compiled / eager ratios, compile time)")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend with --compiled (inductor falls back to aot_eager when it "
                             "cannot build here)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = bench(rows=args.rows, budget=args.budget, methods=args.methods, paths=args.paths, threads=args.threads,
                   batch_size=args.batch_size, iters=args.iters, rounds=args.rounds, device=args.device,
                   compiled=args.compiled, backend=args.backend)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
