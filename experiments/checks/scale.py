"""Planning at real scale, on paper: bytes per method and budget, and a TorchRec sharding plan per host.

Nothing is allocated: modules are built on the meta device, and TorchRec's planner places their storage
tables on ``hosts`` ranks of ``memory_per_host`` bytes each.

    python -m experiments.checks.scale --hosts 8 --memory-per-host 64GiB
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

import embtable
from embtable.sharding import plan_sharding
from experiments import markdown

__all__ = ["CRITEO_1TB", "criteo_1tb_features", "ScaleRow", "plan_at_scale", "format_table", "main"]

#: Criteo Terabyte (days 0-23) categorical cardinalities: 882,774,559 ids over 26 features.
CRITEO_1TB = (
    227605432, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 130229467, 3067956, 405282, 10, 2209, 11938,
    155, 4, 976, 14, 292775614, 40790948, 187188510, 590152, 12973, 108, 36,
)
BUDGETS = ("1/10", "1/100", "1/1000", "1/10000")


def criteo_1tb_features(embedding_dim: int = 128) -> list[embtable.FeatureSpec]:
    return [embtable.FeatureSpec(f"C{i + 1}", n, embedding_dim) for i, n in enumerate(CRITEO_1TB)]


@dataclasses.dataclass(frozen=True)
class ScaleRow:
    method: str
    budget: str
    total_bytes: int | None
    largest_table_bytes: int | None
    num_tables: int | None
    max_rank_bytes: int | None  # the fullest host's share of the storage, per the sharding plan
    sharding: str  # sharding types used, e.g. "table_wise x20, row_wise x2"
    note: str = ""


def _rank_bytes(plan) -> dict[int, int]:
    out: dict[int, int] = {}
    for specs in plan.plan.values():
        for spec in specs.values():
            for shard in spec.sharding_spec.shards if spec.sharding_spec else []:
                rows, cols = shard.shard_sizes
                rank = shard.placement.rank()
                out[rank] = out.get(rank, 0) + rows * cols * 4
    return out


def plan_at_scale(
    methods: Sequence[str] | None = None,
    budgets: Sequence[str] = BUDGETS,
    *,
    hosts: int = 8,
    memory_per_host: int = 64 * 2**30,
    embedding_dim: int = 128,
) -> list[ScaleRow]:
    """For each method and budget: exact bytes, and where TorchRec's planner puts the tables."""
    features = criteo_1tb_features(embedding_dim)
    rows: list[ScaleRow] = []
    for method in methods or [m for m in embtable.registered_methods()]:
        config = embtable.config_class(method)()
        for budget in (["none"] if method == "full" else budgets):
            try:
                plan = embtable.plan(features, config, None if budget == "none" else budget)
            except embtable.BudgetError as err:
                rows.append(ScaleRow(method, budget, None, None, None, None, "", f"infeasible: {str(err)[:80]}"))
                continue
            module = embtable.build(features, plan.config, device="meta")
            tables = [(c.name, c.num_embeddings * c.embedding_dim * 4)
                      for _, m in embtable.sharding.storage_modules(module)
                      for c in (m.embedding_bag_configs() if hasattr(m, "embedding_bag_configs") else m.embedding_configs())]
            try:
                sharding = plan_sharding(module, world_size=hosts, memory_per_rank=memory_per_host)
                kinds: dict[str, int] = {}
                for specs in sharding.plan.values():
                    for spec in specs.values():
                        kinds[spec.sharding_type] = kinds.get(spec.sharding_type, 0) + 1
                per_rank = _rank_bytes(sharding)
                rows.append(ScaleRow(method, budget, plan.total_bytes, max(b for _, b in tables), len(tables),
                                     max(per_rank.values()) if per_rank else 0,
                                     ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))))
            except Exception as err:  # the planner's own "does not fit" errors
                rows.append(ScaleRow(method, budget, plan.total_bytes, max(b for _, b in tables), len(tables),
                                     None, "", f"no sharding plan: {type(err).__name__}: {str(err)[:100]}"))
    return rows


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:,.2f}"


def format_table(rows: Sequence[ScaleRow], hosts: int, memory_per_host: int) -> str:
    return markdown.table(
        ["method", "budget", "total GiB", "largest table GiB", "tables",
         f"fullest host GiB (of {memory_per_host / 2**30:g})", f"sharding over {hosts} hosts"],
        ([r.method, r.budget, _gib(r.total_bytes), _gib(r.largest_table_bytes),
          r.num_tables if r.num_tables is not None else "-", _gib(r.max_rank_bytes), r.sharding or r.note]
         for r in rows), align="llrrrrl")


def main(argv: Sequence[str] | None = None) -> list[ScaleRow]:
    parser = argparse.ArgumentParser(prog="python -m experiments.checks.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--memory-per-host", default="64GiB", help="bytes per host, e.g. 64GiB")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--budgets", nargs="*", default=list(BUDGETS))
    args = parser.parse_args(argv)
    memory = embtable.as_budget(args.memory_per_host).bytes
    start = time.perf_counter()
    rows = plan_at_scale(args.methods, args.budgets, hosts=args.hosts, memory_per_host=memory, embedding_dim=args.dim)
    print(format_table(rows, args.hosts, memory))
    print(f"\n{len(rows)} plans in {time.perf_counter() - start:.1f} s (nothing allocated: meta device)")
    return rows


if __name__ == "__main__":
    main()
