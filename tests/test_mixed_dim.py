"""Mixed-dimension embeddings: popularity blocks, the power rule, the budget planner, exact pooling."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

import embtable
from embtable import BudgetError, FeatureSpec, MixedDimConfig
from embtable.methods.mixed_dim import (
    MixedDimIdMapper,
    mixed_dim_bytes,
    popularity_blocks,
    power_rule_dims,
    solve_block_dims,
)
from experiments.checks.scale import criteo_1tb_features as criteo  # Criteo-1TB cardinalities, defined once


def zipf_counts(n: int, seed: int, ordered: bool = False) -> np.ndarray:
    counts = np.random.default_rng(seed).zipf(1.2, size=n).clip(max=100_000)
    return np.sort(counts)[::-1].copy() if ordered else counts


# ----- popularity blocks ------------------------------------------------------------------------------
def test_blocks_from_counts_have_equal_mass_and_rank_by_count():
    counts = zipf_counts(5000, seed=1)
    blocks = popularity_blocks(FeatureSpec("a", 5000, 8, counts=counts), 4)
    assert blocks.bounds[0] == 0 and blocks.bounds[-1] == 5000
    # heavy tail: few ids lie outside the coldest block, so their sorted list is cheaper than a rank per id
    hot = blocks.bounds[-2]
    assert blocks.remap == "hot" and blocks.remap_bytes == hot * 8 < 5000 * 4
    mild = popularity_blocks(FeatureSpec("m", 5000, 8, counts=np.random.default_rng(0).integers(1, 4, 5000)), 4)
    assert mild.remap == "dense" and mild.remap_bytes == 5000 * 4
    assert list(blocks.bounds) == sorted(set(blocks.bounds))
    ranked = np.sort(counts)[::-1]
    mass = [ranked[s:e].sum() / counts.sum() for s, e in zip(blocks.bounds[:-1], blocks.bounds[1:])]
    np.testing.assert_allclose(mass, blocks.shares)
    # each cut is the first rank at which the cumulative mass reaches b / 4
    for b, cut in enumerate(blocks.bounds[1:-1], start=1):
        assert ranked[:cut].sum() * 4 >= b * counts.sum() > ranked[:cut - 1].sum() * 4
    pops = blocks.popularity
    assert all(p1 >= p2 for p1, p2 in zip(pops, pops[1:])), "hotter blocks have more lookups per row"
    # ids already in decreasing-count order need no remap
    assert popularity_blocks(FeatureSpec("a", 5000, 8, counts=ranked), 4).remap is None


def test_blocks_without_counts_are_log_uniform_and_never_per_id():
    n = 2**33 + 7
    start = time.perf_counter()
    blocks = popularity_blocks(FeatureSpec("big", n, 8), 4)
    assert time.perf_counter() - start < 0.01
    assert blocks.bounds == (0, round(n**0.25), round(n**0.5), round(n**0.75), n)
    assert blocks.remap is None
    assert sum(blocks.shares) == pytest.approx(1.0)
    assert blocks.shares == pytest.approx([0.25] * 4, abs=0.02)  # equal mass under Zipf(1)
    # more blocks than ids: one block per id; all-zero counts carry no popularity (id order is used)
    assert popularity_blocks(FeatureSpec("t", 3, 8), 10).bounds == (0, 1, 2, 3)
    assert popularity_blocks(FeatureSpec("z", 50, 8, counts=np.zeros(50)), 3).remap is None


# ----- the power rule and the planner -----------------------------------------------------------------
def _dims_of(dims: dict) -> list[int]:
    return [d for ds in dims.values() for d in ds]


def test_alpha_zero_gives_equal_dims():
    feats = [FeatureSpec(f"f{i}", n, 32) for i, n in enumerate([10_000, 50_000, 300_000])]
    for num_blocks in (1, 4):
        blocks = [popularity_blocks(f, num_blocks) for f in feats]
        # a block so small that 8 dims + its 8x32 projection would not be smaller than its full rows stays full
        expected = {f.name: tuple(8 if (r + 32) * 8 < r * 32 else 32 for r in b.rows) for f, b in zip(feats, blocks)}
        dims = power_rule_dims(feats, alpha=0.0, scale=0.25, num_blocks=num_blocks)
        assert dims == expected and set(_dims_of(dims)) == ({8} if num_blocks == 1 else {8, 32})
        # with a budget the scale is solved: the equal dims when they fill it exactly, else the floored
        # rule rounded up (largest remainder, then hottest first) by at most one step per block
        exact = sum(mixed_dim_bytes(f, b, ds) for f, b, ds in zip(feats, blocks, dims.values()))
        assert solve_block_dims(feats, exact, alpha=0.0, num_blocks=num_blocks)[0] == dims
        solved, _ = solve_block_dims(feats, exact + 50_000 * 4, alpha=0.0, num_blocks=num_blocks)
        compressible = [d for d in _dims_of(solved) if d < 32]
        assert max(compressible) - min(compressible) <= 1
    # anchored at the most popular block (no budget): alpha = 0 keeps every table full
    assert power_rule_dims(feats, alpha=0.0) == {f.name: (32,) for f in feats}


def test_larger_alpha_shrinks_rare_features_and_blocks_more():
    feats = [FeatureSpec(f"f{i}", n, 64) for i, n in enumerate([1_000, 10_000, 100_000, 1_000_000])]
    budget = embtable.Budget(fraction=1 / 8).resolve(feats)
    low, _ = solve_block_dims(feats, budget, alpha=0.1)
    high, _ = solve_block_dims(feats, budget, alpha=0.8)
    assert high["f3"][0] < low["f3"][0], "the largest (rarest per row) table shrinks more"
    assert high["f0"][0] > low["f0"][0] and high["f1"][0] > low["f1"][0], "popular tables keep more"
    for dims in (low, high):  # rarer tables never get more dims
        assert [dims[f.name][0] for f in feats] == sorted((dims[f.name][0] for f in feats), reverse=True)
    # within a table: blocks get colder, dims never grow, and larger alpha shrinks the cold blocks more
    low_b, _ = solve_block_dims(feats, budget, alpha=0.1, num_blocks=4)
    high_b, _ = solve_block_dims(feats, budget, alpha=0.8, num_blocks=4)
    for dims in (low_b["f3"], high_b["f3"]):
        assert list(dims) == sorted(dims, reverse=True)
    assert high_b["f3"][-1] < low_b["f3"][-1] and high_b["f3"][1] > low_b["f3"][1]
    # the rule itself: d ~ p ** alpha, so a 16x rarer feature gets 16 ** -0.5 = 1/4 of the dims
    rule = power_rule_dims([FeatureSpec("p", 1000, 64), FeatureSpec("r", 16_000, 64)], alpha=0.5)
    assert rule == {"p": (64,), "r": (16,)}


@pytest.mark.parametrize("alpha", [None, 0.2])
@pytest.mark.parametrize("num_blocks", [1, 4])
@pytest.mark.parametrize("fraction", [1 / 4, 1 / 16])
def test_budget_fit_at_least_95_percent(alpha, num_blocks, fraction):
    feats = criteo(64)
    config = MixedDimConfig(alpha=alpha, num_blocks=num_blocks)
    plan = embtable.plan(feats, config, fraction)
    assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes
    assert plan.total_bytes == sum(
        mixed_dim_bytes(f, popularity_blocks(f, num_blocks), plan.config.block_dims[f.name]) for f in feats
    )
    if alpha is None:  # alpha solved: the most popular block (the 3-id table) stays at the base dim
        assert plan.config.alpha > 0 and plan.config.block_dims["C6"] == (64,)
    # small features stay full (compressing 3 rows would cost more in projection than it saves)
    assert plan.config.block_dims["C17"] == (64,)


def test_dim_multiple_and_counts_with_remap_fit_budget():
    feats = [FeatureSpec("u", 20_000, 32, counts=zipf_counts(20_000, 2)),
             FeatureSpec("i", 5_000, 32, counts=zipf_counts(5_000, 3, ordered=True)),
             FeatureSpec("s", 30, 32)]
    plan = embtable.plan(feats, MixedDimConfig(alpha=0.3, num_blocks=4, dim_multiple=4), "1/4")
    assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes
    for f in feats:
        assert all(d % 4 == 0 or d == f.embedding_dim for d in plan.config.block_dims[f.name])
    module = embtable.build(feats, plan.config, seed=0)
    assert embtable.memory_report(module).inference_bytes == plan.total_bytes
    buffers = dict(module.mapper.named_buffers())
    hot = popularity_blocks(feats[0], 4).bounds[-2]
    assert buffers["hot_ids_0"].dtype == buffers["hot_rank_0"].dtype == torch.int32
    assert buffers["hot_ids_0"].numel() == hot < 20_000 // 2
    assert not any(k.endswith("_1") and k != "bounds_1" for k in buffers), "ids in frequency order: no remap"


def test_infeasible_budgets_raise_before_allocating():
    feats = [FeatureSpec("big", 2**33 + 7, 8), FeatureSpec("small", 100, 8)]
    start = time.perf_counter()
    with pytest.raises(BudgetError, match=r"smallest dims .* need [\d,]+ bytes, over the budget of 1,048,576"):
        embtable.plan(feats, MixedDimConfig(alpha=0.3, num_blocks=4, tail="none"), 2**20)
    with pytest.raises(BudgetError, match="keep every row"):  # no alpha can fit: the message does not suggest one
        embtable.plan(feats, MixedDimConfig(num_blocks=4, tail="none"), 2**20)
    with pytest.raises(BudgetError, match="num_blocks=1 or ids in frequency order"):
        embtable.plan([FeatureSpec("u", 1000, 4, counts=zipf_counts(1000, 0))],
                      MixedDimConfig(alpha=0.3, num_blocks=4, tail="none"), "1/16")
    assert time.perf_counter() - start < 0.5
    # with the hashed tail (the default) the same budgets plan, rarest ids sharing rows
    for config in (MixedDimConfig(alpha=0.3, num_blocks=4), MixedDimConfig(num_blocks=4)):
        plan = embtable.plan(feats, config, 2**20)
        assert 0.95 * 2**20 <= plan.total_bytes <= 2**20 and "big" in plan.config.tail_rows
    with pytest.raises(BudgetError, match="smallest budget it can meet here is .* hashed tails"):
        embtable.plan(feats, MixedDimConfig(num_blocks=4), 64)
    # the same huge feature plans fine at a budget that can hold it
    plan = embtable.plan(feats, MixedDimConfig(num_blocks=4), "1/4")
    assert plan.total_bytes <= plan.budget_bytes


def test_criteo_1tb_planning_is_fast():
    feats = criteo(128)
    for config in (MixedDimConfig(), MixedDimConfig(alpha=0.3), MixedDimConfig(num_blocks=8),
                   MixedDimConfig(alpha=0.2, num_blocks=8, dim_multiple=4)):
        start = time.perf_counter()
        plan = embtable.plan(feats, config, "1/8")
        elapsed = time.perf_counter() - start
        # a guard against a pathological planner (well under 1 s on a quiet machine), not a speed goal
        assert elapsed < 5.0, f"{config}: planning took {elapsed:.2f}s"
        assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes


def test_config_round_trip_and_validation():
    plan = embtable.plan([FeatureSpec("a", 1000, 8), FeatureSpec("b", 10, 8)], MixedDimConfig(num_blocks=2), "1/2")
    data = plan.config.to_dict()
    assert data["method"] == "mixed_dim" and isinstance(data["block_dims"]["a"], tuple | list)
    assert embtable.method_config_from_dict(data) == plan.config
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        MixedDimConfig(alpha=float("inf"))
    with pytest.raises(ValueError, match="give a byte budget"):
        embtable.build([FeatureSpec("a", 10, 4)], MixedDimConfig())
    with pytest.raises(ValueError, match=r"feature 'a' has 2 popularity block\(s\)"):
        embtable.build([FeatureSpec("a", 1000, 4)], MixedDimConfig(num_blocks=2, block_dims={"a": (4, 2, 1)}))
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        embtable.build([FeatureSpec("a", 10, 4), FeatureSpec("b", 10, 4)], MixedDimConfig(block_dims={"a": (2,)}))


# ----- the module -------------------------------------------------------------------------------------
def test_mapper_is_exact_for_ids_above_2_pow_32():
    f = FeatureSpec("big", 2**33 + 7, 8)
    blocks = popularity_blocks(f, 4)
    mapper = MixedDimIdMapper([f], [blocks], [f"big__block{j}" for j in range(4)])
    assert sum(b.numel() for b in mapper.buffers()) == 5, "only the bounds: no per-id buffer without counts"
    ids = [2**24, 2**24 + 1, 2**31 + 3, 2**33 + 6, 5, blocks.bounds[2], blocks.bounds[2] - 1]
    out = mapper(KeyedJaggedTensor(keys=["big"], values=torch.tensor(ids), lengths=torch.tensor([len(ids)])))
    got = {key: jt.values().tolist() for key, jt in out.to_dict().items()}
    want: dict[str, list[int]] = {f"big__block{j}": [] for j in range(4)}
    for i in ids:  # Python integers: exact
        j = max(b for b in range(4) if blocks.bounds[b] <= i)
        want[f"big__block{j}"].append(i - blocks.bounds[j])
    assert got == want


def _effective_table(module, i: int, feature: FeatureSpec) -> torch.Tensor:
    """Feature i's logical [n, D] table built id by id (project each row first), differentiably."""
    dims = module.block_dims[i]
    D = feature.embedding_dim
    if len(dims) == 1:
        w = module.block_weight(feature.name, 0)
        return w @ module.projections[feature.name] if feature.name in module.projections else w
    bounds = popularity_blocks(feature, module.config.num_blocks).bounds
    if feature.counts is not None and feature.counts.sum() > 0:
        order = sorted(range(feature.num_embeddings), key=lambda k: (-int(feature.counts[k]), k))
    else:
        order = list(range(feature.num_embeddings))
    if popularity_blocks(feature, module.config.num_blocks).remap == "hot":  # cold ids keep id order
        order = order[:bounds[-2]] + sorted(order[bounds[-2]:])
    table = torch.zeros(feature.num_embeddings, D)
    for j in range(len(dims)):
        key = f"{feature.name}__block{j}"
        w = module.block_weight(feature.name, j)
        rows = w @ module.projections[key] if key in module.projections else w
        table = table.index_put((torch.tensor(order[bounds[j]:bounds[j + 1]]),), rows)
    return table


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_pooling_equals_project_then_pool_reference(pooling, weighted):
    feats = [FeatureSpec("u", 400, 8, counts=zipf_counts(400, 4)),  # "hot" remap
             FeatureSpec("m", 300, 8, counts=np.random.default_rng(6).integers(1, 4, 300)),  # "dense" remap
             FeatureSpec("i", 300, 8, counts=zipf_counts(300, 5, ordered=True)),  # ordered: no remap
             FeatureSpec("n", 500, 8),  # no counts: id order, log-uniform blocks
             FeatureSpec("p", 200, 8),  # one projected table
             FeatureSpec("s", 20, 8)]  # one plain table
    nb = {f.name: len(popularity_blocks(f, 3).rows) for f in feats}
    assert nb["u"] == nb["m"] == nb["i"] == nb["n"] == 3
    assert [popularity_blocks(f, 3).remap for f in feats[:4]] == ["hot", "dense", None, None]
    config = MixedDimConfig(num_blocks=3, block_dims={"u": (8, 4, 2), "m": (2, 8, 7), "i": (6, 8, 1),
                                                      "n": (8, 3, 3), "p": (5,), "s": (8,)})
    module = embtable.build(feats, config, pooling=pooling, is_weighted=weighted, seed=0)
    assert {k: tuple(p.shape) for k, p in module.projections.items()} == {
        "u__block1": (4, 8), "u__block2": (2, 8), "m__block0": (2, 8), "m__block2": (7, 8), "i__block0": (6, 8), "i__block2": (1, 8),
        "n__block1": (3, 8), "n__block2": (3, 8), "p": (5, 8)}
    g = torch.Generator().manual_seed(0)
    batch = 16
    lengths = torch.randint(0, 5, (len(feats) * batch,), generator=g)
    values = torch.cat([torch.randint(0, f.num_embeddings, (int(ls.sum()),), generator=g)
                        for f, ls in zip(feats, lengths.view(len(feats), batch))])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    kjt = KeyedJaggedTensor(keys=[f.name for f in feats], values=values, lengths=lengths, weights=weights)

    out = module(kjt)
    ref = []
    for i, f in enumerate(feats):
        jt = kjt[f.name]
        ref.append(F.embedding_bag(jt.values(), _effective_table(module, i, f), jt.offsets()[:-1],
                                   mode=pooling, per_sample_weights=jt.weights_or_none()))
    ref = torch.cat(ref, dim=1)
    torch.testing.assert_close(out.values(), ref, rtol=1e-5, atol=1e-6)

    upstream = torch.randn_like(ref)
    params = list(module.parameters())
    got = torch.autograd.grad((out.values() * upstream).sum(), params)
    want = torch.autograd.grad((ref * upstream).sum(), params)
    for (name, _), a, b in zip(module.named_parameters(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_projections_are_dense_parameters_and_tables_sparse():
    feats = [FeatureSpec("u", 10_000, 16), FeatureSpec("s", 10, 16)]
    module = embtable.build(feats, MixedDimConfig(alpha=0.3, num_blocks=3), "1/4", seed=0)
    dense = {id(p) for p in embtable.dense_parameters(module)}
    assert dense == {id(p) for p in module.projections.values()} and dense
    assert len(embtable.sparse_parameters(module)) == len(module.storage.embedding_bag_configs())
    # a compressed block's projected rows start at the scale of its stored rows (variance-preserving init)
    key = next(iter(module.projections))
    feature, block = key.split("__block")
    w = module.block_weight(feature, int(block)).detach()
    ratio = (w @ module.projections[key].detach()).var() / w.var()
    assert 0.5 < float(ratio) < 2.0


@pytest.mark.parametrize("counts", ["hot", "dense", "ordered", "none"])
def test_mapper_sends_every_id_to_its_block_once(counts):
    n = 600
    made = {"hot": zipf_counts(n, 7), "dense": np.random.default_rng(7).integers(1, 4, n),
            "ordered": zipf_counts(n, 7, ordered=True), "none": None}[counts]
    f = FeatureSpec("f", n, 8, counts=made)
    blocks = popularity_blocks(f, 4)
    assert blocks.remap == {"hot": "hot", "dense": "dense"}.get(counts)
    keys = [f"f__block{j}" for j in range(len(blocks.rows))]
    mapper = MixedDimIdMapper([f], [blocks], keys)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    out = mapper(KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.tensor([n])))
    ranked = sorted(range(n), key=lambda k: (-int(made[k]), k)) if made is not None else list(range(n))
    if blocks.remap == "hot":  # the coldest block's ids keep their id order
        ranked = ranked[:blocks.bounds[-2]] + sorted(ranked[blocks.bounds[-2]:])
    rank_of = {i: r for r, i in enumerate(ranked)}
    for j, key in enumerate(keys):
        rows = out[key].values().tolist()
        assert sorted(rows) == list(range(blocks.rows[j])), "a block's rows are used exactly once"
        # block j gets the ids of rank bounds[j] .. bounds[j+1] - 1, in arrival order, at row rank - bounds[j]
        mine = set(ranked[blocks.bounds[j]:blocks.bounds[j + 1]])
        assert rows == [rank_of[i] - blocks.bounds[j] for i in ids.tolist() if i in mine]
    assert embtable.memory_report(mapper).inference_bytes == 8 * len(blocks.bounds) + blocks.remap_bytes


def test_storage_is_one_stacked_table_per_dim():
    feats = [FeatureSpec("u", 400, 8, counts=zipf_counts(400, 4)), FeatureSpec("n", 500, 8),
             FeatureSpec("p", 200, 8), FeatureSpec("s", 20, 8)]
    config = MixedDimConfig(num_blocks=3, block_dims={"u": (8, 4, 2), "n": (8, 3, 4), "p": (4,), "s": (8,)})
    module = embtable.build(feats, config, seed=0)
    tables = {c.name: (c.num_embeddings, c.embedding_dim) for c in module.storage.embedding_bag_configs()}
    rows = {f.name: popularity_blocks(f, 3).rows if len(config.block_dims[f.name]) > 1 else (f.num_embeddings,)
            for f in feats}
    want: dict[int, int] = {}
    for f in feats:
        for n, d in zip(rows[f.name], config.block_dims[f.name]):
            want[d] = want.get(d, 0) + n
    assert tables == {f"d{d}": (n, d) for d, n in want.items()}, "one table per distinct block dim"
    assert len(embtable.sparse_parameters(module)) == 4
    # the blocks tile their tables exactly, each a view of its stacked weight
    spans: dict[str, list[tuple[int, int]]] = {}
    for f in feats:
        for j, d in enumerate(config.block_dims[f.name]):
            table, start, end = module.block_location(f.name, j)
            assert table == f"d{d}" and end - start == rows[f.name][j]
            assert module.block_weight(f.name, j)._base is module.storage.embedding_bags[table].weight
            spans.setdefault(table, []).append((start, end))
    for table, s in spans.items():
        s.sort()
        assert s[0][0] == 0 and s[-1][1] == tables[table][0] and all(a[1] == b[0] for a, b in zip(s, s[1:]))
    with pytest.raises(ValueError, match="has 3 block"):
        module.block_weight("u", 3)
    # a lookup's gradient lands only on the rows of its own block: n's coldest id, s's id 3
    kjt = KeyedJaggedTensor(keys=["u", "n", "p", "s"], values=torch.tensor([499, 3]),
                            lengths=torch.tensor([0, 0, 1, 0, 0, 0, 0, 1]))
    module(kjt).values().sum().backward()
    table, start, _ = module.block_location("n", 2)
    grad = module.storage.embedding_bags[table].weight.grad.to_dense()
    rank = 499 - popularity_blocks(feats[1], 3).bounds[2]
    assert grad.abs().sum(1).nonzero().flatten().tolist() == [start + rank]
    table, start, _ = module.block_location("s")
    grad = module.storage.embedding_bags[table].weight.grad.to_dense()
    assert grad.abs().sum(1).nonzero().flatten().tolist() == [start + 3]


def test_mapper_over_many_features_matches_one_feature_at_a_time():
    # two "hot" remaps (searched together in one global array), a "dense" one, a plain and an id-order feature
    feats = [FeatureSpec("h1", 700, 8, counts=zipf_counts(700, 3)), FeatureSpec("pl", 50, 8),
             FeatureSpec("d", 300, 8, counts=np.random.default_rng(2).integers(1, 4, 300)),
             FeatureSpec("h2", 900, 8, counts=zipf_counts(900, 9)), FeatureSpec("n", 400, 8)]
    blocks = [popularity_blocks(f, 3) if f.name != "pl" else None for f in feats]
    assert [b and b.remap for b in blocks] == ["hot", None, "dense", "hot", None]
    keys = [k for f, b in zip(feats, blocks) for k in ([f.name] if b is None else
                                                       [f"{f.name}__block{j}" for j in range(len(b.rows))])]
    mapper = MixedDimIdMapper(feats, blocks, keys)
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 6, (len(feats) * 8,), generator=g)
    values = torch.cat([torch.randint(0, f.num_embeddings, (int(ls.sum()),), generator=g)
                        for f, ls in zip(feats, lengths.view(len(feats), 8))])
    kjt = KeyedJaggedTensor(keys=[f.name for f in feats], values=values, lengths=lengths)
    out = mapper(kjt)
    for f, b in zip(feats, blocks):
        own = [f.name] if b is None else [f"{f.name}__block{j}" for j in range(len(b.rows))]
        alone = MixedDimIdMapper([f], [b], own)(KeyedJaggedTensor(keys=[f.name], values=kjt[f.name].values(),
                                                                  lengths=kjt[f.name].lengths()))
        for key in own:
            assert out[key].values().tolist() == alone[key].values().tolist(), key
            assert out[key].lengths().tolist() == alone[key].lengths().tolist(), key


# ----- the hashed tail and single tables -----
def demo_features(with_counts: bool) -> list[FeatureSpec]:
    from data_prep.generator import PRESETS

    rng = np.random.default_rng(0)
    return [FeatureSpec(f"C{i}", n, 16, counts=rng.zipf(1.2, n).clip(max=10**6) if with_counts else None)
            for i, n in enumerate(PRESETS["demo"].cardinalities)]


@pytest.mark.parametrize("with_counts", [False, True])
def test_tail_reaches_any_budget_with_95_percent_fill(with_counts):
    feats = demo_features(with_counts)
    for budget in ["1/16", "1/100", "1/1000"]:
        with pytest.raises(BudgetError):  # below what mixed dims alone reach
            embtable.plan(feats, MixedDimConfig(tail="none"), budget)
        plan = embtable.plan(feats, MixedDimConfig(), budget)
        assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes, budget
        assert plan.config.tail_rows, budget
    # budgets that fit without a tail plan exactly as before
    assert embtable.plan(feats, MixedDimConfig(), "1/4").config == \
        embtable.plan(feats, MixedDimConfig(tail="none"), "1/4").config.replace(tail="hash")
    module = embtable.build(feats, MixedDimConfig(), "1/100", seed=0)
    assert embtable.memory_report(module).inference_bytes == embtable.plan(feats, MixedDimConfig(), "1/100").total_bytes


def test_one_table_with_counts_splits_into_blocks_by_default():
    counts = zipf_counts(100_000, 0)
    bag = embtable.EmbeddingBag(100_000, 16, method=MixedDimConfig(), budget="1/4", counts=counts, seed=0)
    config = bag.collection.config
    assert config.num_blocks == 4 and len(config.block_dims["feature"]) == 4 and not config.tail_rows
    out = bag(torch.tensor([0, 5, 99_999]), torch.tensor([0, 2]))
    assert out.shape == (2, 16)
    # several features keep the paper's one block per feature
    assert embtable.plan([FeatureSpec("a", 1000, 8), FeatureSpec("b", 1000, 8)], MixedDimConfig(alpha=0.3),
                         "1/2").config.num_blocks == 1


@pytest.mark.parametrize("ordered", [False, True])
def test_tail_mapping_is_exact_and_deterministic(ordered):
    from embtable.hashing import hash_coefficients, universal_hash

    n, exclusive, tail = 1000, 30, 20
    counts = zipf_counts(n, 1, ordered=ordered)
    feats = [FeatureSpec("a", n, 8, counts=counts)]
    config = MixedDimConfig(num_blocks=2, tail_rows={"a": (exclusive, tail)}, block_dims={"a": (8, 2)})
    a, b = (embtable.build(feats, config, seed=s) for s in (0, 1))
    ids = torch.arange(n)
    kjt = KeyedJaggedTensor(keys=["a"], values=ids, lengths=torch.ones(n, dtype=torch.int64))
    ranks_a = a.mapper._tail_rank(0, ids)
    assert torch.equal(ranks_a, b.mapper._tail_rank(0, ids))  # same mapping in every build
    order = np.argsort(-counts, kind="stable")
    expected = exclusive + universal_hash(ids, torch.tensor(hash_coefficients(0, "mixed_dim_tail", "a")), tail)
    expected[torch.from_numpy(order[:exclusive])] = torch.arange(exclusive)
    assert torch.equal(ranks_a, expected)
    # the tail rows are the last rows of the coldest block: every id lands in its block's rows
    out = a.mapper(kjt)
    assert int(out.values().max()) < sum(a.member_rows)
    plan = embtable.plan(feats, config)
    assert plan.total_bytes == embtable.memory_report(a).inference_bytes
    assert plan.features[0].rows == exclusive + tail


def test_vectorised_tail_ranks_equal_the_per_feature_mapping():
    """The mapper ranks every tail feature's ids in one pass (one hash over all ids): it must give each
    feature exactly the ranks of its own per-feature mapping (``_tail_rank``), leave the other features'
    ids alone, and cover a hot list (counts out of id order), ids in popularity order and no ids."""
    n = 500
    feats = [FeatureSpec("hot", n, 8, counts=zipf_counts(n, 1, ordered=False)), FeatureSpec("plain", 40, 8),
             FeatureSpec("ordered", n, 8, counts=zipf_counts(n, 2, ordered=True)), FeatureSpec("empty", n, 8)]
    config = MixedDimConfig(num_blocks=1, block_dims={f.name: (8,) for f in feats},
                            tail_rows={"hot": (30, 20), "ordered": (25, 10), "empty": (40, 9)})
    m = embtable.build(feats, config, seed=0)
    g = torch.Generator().manual_seed(0)
    sizes = [300, 50, 200, 0]
    values = torch.cat([torch.randint(0, f.num_embeddings, (k,), generator=g) for f, k in zip(feats, sizes)])
    lengths = torch.tensor([k // 2 for k in sizes for _ in range(2)])
    kjt = KeyedJaggedTensor(keys=[f.name for f in feats], values=values, lengths=lengths)
    consts = m.mapper._constants(values.device)
    feature = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    got = m.mapper._tail_ranks(values, feature, kjt.offset_per_key(), consts["tail"])
    expected = values.clone()
    for i, (s, e) in enumerate(zip(kjt.offset_per_key()[:-1], kjt.offset_per_key()[1:])):
        if m.mapper.tails[i] is not None and e > s:
            expected[s:e] = m.mapper._tail_rank(i, values[s:e])
    assert m.mapper.tails[0][2] and not m.mapper.tails[2][2]  # one hot list, one popularity-ordered tail
    assert torch.equal(got, expected) and not torch.equal(expected, values)
