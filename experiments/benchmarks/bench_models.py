"""Training throughput of every model with full tables, beside TorchRec's own DLRM (not a test).

Every model gets a fresh ``torchrec.EmbeddingBagCollection`` over the same features (and DLRM once more
over ``embtable.build(..., FullConfig())``, our drop-in full table), the same batches
(held in memory, so the data loader is not timed) and the optimizers ``run`` uses (row-wise Adagrad on
sparse table gradients, Adam on the rest). A step is forward, backward and both optimizer steps.

The embedding share is measured by timing the embedding part alone on the same batches (lookup,
its backward from a fixed upstream gradient, and the row-wise Adagrad update) and dividing by the
whole step; the rest of the step is the dense part (MLPs, interaction, loss, Adam). Models are timed in
interleaved rounds and the median round is reported, which keeps the comparison fair on a busy machine.

    python -m experiments.benchmarks.bench_models --preset demo --batch-size 1024 --steps 40 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM as TorchRecDLRM

import ctr_models
import data_prep
import embtable
from experiments import markdown
from experiments.benchmarks import torch_threads
from experiments.training.config import DataConfig
from experiments.training.train import dataset_path, make_optimizers

__all__ = ["main", "bench"]

DENSE_HIDDEN = [64]
OVER_HIDDEN = [64, 32]


def _ebc(features: list[embtable.FeatureSpec], seed: int) -> EmbeddingBagCollection:
    torch.manual_seed(seed)
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{f.name}", num_embeddings=f.num_embeddings, embedding_dim=f.embedding_dim,
                feature_names=[f.name],
            )
            for f in features
        ]
    )


class _TorchRecDLRM(nn.Module):
    """TorchRec's DLRM with the same layer sizes as ours, returning logits ``[B]``."""

    def __init__(self, embedding: EmbeddingBagCollection, num_dense: int, dim: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.dlrm = TorchRecDLRM(embedding, num_dense, [*DENSE_HIDDEN, dim], [*OVER_HIDDEN, 1])

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        return self.dlrm(dense_features, sparse_features).squeeze(1)


def _builders(num_dense: int, dim: int) -> dict[str, Callable[[EmbeddingBagCollection], nn.Module]]:
    ours = {
        "dlrm": {"dense_hidden_sizes": DENSE_HIDDEN, "over_hidden_sizes": OVER_HIDDEN},
        "deepfm": {"hidden_sizes": OVER_HIDDEN},
        "dcn_v2": {"hidden_sizes": OVER_HIDDEN},
        "wide_deep": {"hidden_sizes": OVER_HIDDEN},
    }
    out: dict[str, Callable[[EmbeddingBagCollection], nn.Module]] = {
        "torchrec DLRM": lambda ebc: _TorchRecDLRM(ebc, num_dense, dim)
    }
    for name, kwargs in ours.items():
        out[name] = lambda ebc, name=name, kwargs=kwargs: ctr_models.build_model(name, ebc, num_dense, **kwargs)
    return out


def _embtable_full(features: list[embtable.FeatureSpec], seed: int) -> nn.Module:
    """``embtable.build(..., FullConfig())``: our drop-in full table, to show what the wrapper costs."""
    return embtable.build(features, embtable.FullConfig(), seed=seed)


def _time_steps(model: nn.Module, batches: list, lr: float = 0.05) -> tuple[float, float]:
    """Seconds per training step, and seconds per step of the embedding part alone."""
    opts = make_optimizers(model, model.embedding, "rowwise_adagrad", lr, 1e-3)
    loss_fn = nn.functional.binary_cross_entropy_with_logits

    def step(batch) -> None:
        opts.zero_grad()
        loss_fn(model(batch.dense_features, batch.sparse_features), batch.labels.float()).backward()
        opts.step()

    for batch in batches[:3]:  # warm-up: allocator, optimizer state
        step(batch)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    whole = (time.perf_counter() - start) / len(batches)

    upstream = torch.randn(batches[0].labels.shape[0], model.embedding_width)  # a fixed gradient
    start = time.perf_counter()
    for batch in batches:
        opts.sparse.zero_grad(set_to_none=True)
        model.embedding(batch.sparse_features).values().backward(upstream)
        opts.sparse.step()
    embedding = (time.perf_counter() - start) / len(batches)
    return whole, embedding


def bench(path: Path, batch_size: int, steps: int, rounds: int, dim: int, threads: int) -> list[dict]:
    """Median samples/s and embedding share per model; see the module docstring."""
    with torch_threads(threads):  # the caller's thread count comes back after
        meta = data_prep.load_meta(path)
        features = meta.feature_specs(dim, with_counts=False)
        loader = data_prep.BatchLoader(path, "train", batch_size, shuffle=True, seed=0)
        batches = [b for b in islice(iter(loader), steps) if b.labels.shape[0] == batch_size]
        if len(batches) < 5:
            raise ValueError(f"only {len(batches)} full batches of {batch_size} in {path}; lower --batch-size")
        builders = _builders(meta.num_dense, dim)
        builders["dlrm, embtable full"] = builders["dlrm"]
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in builders}
        for r in range(rounds):
            for name, make in builders.items():
                table = _embtable_full(features, r) if name.endswith("embtable full") else _ebc(features, seed=r)
                model = make(table)
                model.embedding_width = sum(f.embedding_dim for f in features)
                times[name].append(_time_steps(model, batches))
                print(f"round {r + 1}/{rounds} {name:<14} {batch_size / times[name][-1][0]:>10,.0f} samples/s", flush=True)
        rows = []
        for name, measured in times.items():
            whole = statistics.median(t for t, _ in measured)
            emb = statistics.median(e for _, e in measured)
            rows.append({
                "model": name, "samples_per_s": batch_size / whole, "ms_per_step": 1e3 * whole,
                "embedding_share": emb / whole, "dense_share": 1 - emb / whole,
            })
        return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    return markdown.table(
        ["model", "train samples/s", "ms/step", "embedding share", "dense share"],
        ([r["model"], f"{r['samples_per_s']:,.0f}", f"{r['ms_per_step']:.2f}", f"{100 * r['embedding_share']:.0f}%",
          f"{100 * r['dense_share']:.0f}%"] for r in rows), align="lrrrr")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", help="data_prep generator preset (default: demo)")
    parser.add_argument("--path", default=None, help="a prepared dataset directory instead of a preset")
    parser.add_argument("--data-dir", default="data", help="where presets are generated")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    path = dataset_path(DataConfig(preset=args.preset, path=args.path, data_dir=args.data_dir))
    rows = bench(path, args.batch_size, args.steps, args.rounds, args.embedding_dim, args.threads)
    print(f"\n{path} · batch {args.batch_size} · dim {args.embedding_dim} · {args.threads} thread(s) · "
          f"torch {torch.__version__} · median of {args.rounds} rounds of {args.steps} steps\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
