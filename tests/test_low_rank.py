"""Low-rank tables: the batched projection, planning, and compressing a trained table (SVD / second moments)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

import embtable
from embtable import FeatureSpec, LowRankConfig
from embtable.methods.low_rank import low_rank_factors


def _kjt(features, batch=6, max_len=3, seed=0, weighted=False, ids=None) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(features) * batch,), generator=g)
    per_feature = lengths.view(len(features), batch).sum(1).tolist()
    values = []
    for f, n in zip(features, per_feature):
        if ids is not None and f.name in ids:  # draw from a given popularity
            values.append(torch.multinomial(ids[f.name], n, replacement=True, generator=g))
        else:
            values.append(torch.randint(0, f.num_embeddings, (n,), generator=g))
    values = torch.cat(values)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths, weights=weights)


# ----- the module -----
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_projected_output_equals_pooled_rows_times_projection(pooling, weighted):
    # names out of alphabetical order: the layout must follow the feature order, not the names
    features = [FeatureSpec("zeta", 300, 8), FeatureSpec("b", 20, 4), FeatureSpec("alpha", 500, 4),
                FeatureSpec("d", 80, 6)]
    config = LowRankConfig(rank={"zeta": 3, "b": None, "alpha": 1, "d": 6})
    module = embtable.build(features, config, pooling=pooling, is_weighted=weighted, seed=0)
    kjt = _kjt(features, weighted=weighted)
    out = module(kjt)
    low = module.storage(kjt)
    for f in features:
        expected = low[f.name] if f.name == "b" else low[f.name] @ module.projections[f.name]
        torch.testing.assert_close(out[f.name], expected, rtol=1e-6, atol=1e-7)
    out.values().sum().backward()
    assert all(p.grad is not None for p in module.projections.values())


def test_initial_outputs_have_the_scale_of_a_full_table():
    n, d = 20_000, 16
    module = embtable.build([FeatureSpec("a", n, d)], LowRankConfig(rank=4), seed=0)
    ids = torch.randint(0, n, (4000,), generator=torch.Generator().manual_seed(0))
    out = module(KeyedJaggedTensor(keys=["a"], values=ids, lengths=torch.ones(4000, dtype=torch.int64))).values()
    assert 0.8 < float(out.var()) / ((1 / n) / 3) < 1.25


def test_ids_above_2_24_have_their_own_rows():
    features = [FeatureSpec("big", 2**24 + 5, 2), FeatureSpec("small", 10, 2)]
    module = embtable.build(features, LowRankConfig(rank={"big": 1, "small": None}), seed=0)
    ids = torch.tensor([2**24, 2**24 + 1, 2**24 + 4])
    out = module(KeyedJaggedTensor(keys=["big", "small"], values=ids, lengths=torch.tensor([1, 1, 1, 0, 0, 0])))["big"]
    table = module.storage.embedding_bags["big"].weight
    torch.testing.assert_close(out, table[ids] @ module.projections["big"])
    assert len({tuple(r.tolist()) for r in out}) == 3


# ----- planning -----
FEATURES = [FeatureSpec("user", 2_000_000, 16), FeatureSpec("item", 300_000, 16), FeatureSpec("ad", 120_000, 16),
            FeatureSpec("site", 9_000, 16), FeatureSpec("country", 200, 16)]


def test_planner_fills_the_budget_and_keeps_small_features_full():
    plan = embtable.plan(FEATURES, LowRankConfig(), "1/4")
    assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes
    by_name = {f.name: f for f in plan.features}
    assert not by_name["country"].compressed and by_name["user"].compressed
    for f in FEATURES:
        r = plan.config.rank[f.name]
        expected = f.num_embeddings * 16 * 4 if r is None else (f.num_embeddings * r + r * 16) * 4
        assert by_name[f.name].bytes == expected
    module = embtable.build(FEATURES[2:], LowRankConfig(), "1/4", device="meta")
    assert embtable.memory_report(module).inference_bytes == embtable.plan(FEATURES[2:], LowRankConfig(), "1/4").total_bytes


def test_budgets_below_one_over_dim_need_the_tail():
    with pytest.raises(embtable.BudgetError, match="about 1/d of its full table"):
        embtable.plan(FEATURES, LowRankConfig(tail="none"), "1/32")
    plan = embtable.plan(FEATURES, LowRankConfig(), "1/32")
    assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes and "user" in plan.config.tail_rows
    with pytest.raises(ValueError, match="rank is not set"):
        embtable.build(FEATURES[-1:], LowRankConfig())
    # below 2 rows per large feature: the error names the smallest budget, and that budget plans
    with pytest.raises(embtable.BudgetError, match="smallest budget it can meet") as err:
        embtable.plan(FEATURES, LowRankConfig(), 500)
    smallest = err.value.smallest_bytes
    assert embtable.plan(FEATURES, LowRankConfig(), smallest).total_bytes <= smallest
    with pytest.raises(embtable.BudgetError):
        embtable.plan(FEATURES, LowRankConfig(), smallest - 1)


# ----- the hashed tail -----
def demo_features(with_counts: bool) -> list[FeatureSpec]:
    from data_prep.generator import PRESETS

    rng = np.random.default_rng(0)
    return [FeatureSpec(f"C{i}", n, 16, counts=rng.zipf(1.2, n).clip(max=10**6) if with_counts else None)
            for i, n in enumerate(PRESETS["demo"].cardinalities)]


@pytest.mark.parametrize("with_counts", [False, True])
def test_tail_reaches_any_budget_with_95_percent_fill(with_counts):
    feats = demo_features(with_counts)
    for budget in ["1/16", "1/100", "1/1000"]:
        with pytest.raises(embtable.BudgetError):  # below what keeping every row reaches
            embtable.plan(feats, LowRankConfig(tail="none"), budget)
        plan = embtable.plan(feats, LowRankConfig(), budget)
        assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes, budget
        assert plan.config.tail_rows, budget
        for f in plan.features:  # a tail feature stores exclusive + tail rows, fewer than its ids
            if f.name in plan.config.tail_rows:
                assert f.rows == sum(plan.config.tail_rows[f.name]) < f.num_embeddings
    module = embtable.build(feats, LowRankConfig(), "1/1000", seed=0)
    assert embtable.memory_report(module).inference_bytes == embtable.plan(feats, LowRankConfig(), "1/1000").total_bytes
    assert hasattr(module.mapper, "exclusive_keys") == with_counts  # the sorted list only for unordered counts


def test_plans_that_fit_without_a_tail_are_unchanged():
    feats = demo_features(with_counts=True)
    for features, budget in [(FEATURES, "1/4"), (feats, "1/4"), (feats, "1/8")]:
        plan = embtable.plan(features, LowRankConfig(), budget)
        before = embtable.plan(features, LowRankConfig(tail="none"), budget)
        assert plan.config == before.config.replace(tail="hash") and plan.config.tail_rows is None
        assert plan.total_bytes == before.total_bytes
    module = embtable.build(FEATURES[2:], LowRankConfig(), "1/4", device="meta")
    assert module.mapper is None and not list(module.buffers())


@pytest.mark.parametrize("order", ["none", "ordered", "shuffled"])
def test_tail_mapping_is_exact_and_deterministic(order):
    from embtable.hashing import hash_coefficients, universal_hash

    n, exclusive, tail = 1000, 30, 20
    counts = np.random.default_rng(1).zipf(1.2, n).clip(max=100_000)
    counts = {"none": None, "ordered": np.sort(counts)[::-1].copy(), "shuffled": counts}[order]
    feats = [FeatureSpec("small", 40, 8), FeatureSpec("a", n, 8, counts=counts)]
    config = LowRankConfig(rank={"small": None, "a": 3}, tail_rows={"a": (exclusive, tail)})
    a, b = (embtable.build(feats, config, seed=s) for s in (0, 1))
    ids = torch.arange(n)
    rows = a.mapper.rows(ids, torch.ones_like(ids))
    assert torch.equal(rows, b.mapper.rows(ids, torch.ones_like(ids)))  # the same mapping in every build
    expected = exclusive + universal_hash(ids, torch.tensor(hash_coefficients(0, "low_rank_tail", "a")), tail)
    top = torch.arange(exclusive) if counts is None else torch.from_numpy(np.sort(np.argsort(-counts, kind="stable")[:exclusive]))
    expected[top] = torch.arange(exclusive)  # the most popular ids own the first rows, in id order
    assert torch.equal(rows, expected)
    assert len(set(expected[exclusive:].tolist())) > 1  # the tail really hashes
    # the module: pooled rows of the mapped ids times the projection; the small feature is untouched
    kjt = _kjt(feats, batch=8, seed=3)
    out = a(kjt)
    table = a.storage.embedding_bags["a"].weight
    values, lengths = kjt["a"].values(), kjt["a"].lengths()
    mapped = a.mapper.rows(values, torch.ones_like(values))
    bags = torch.repeat_interleave(torch.arange(8), lengths)
    pooled = torch.zeros(8, 3).index_add_(0, bags, table[mapped])
    torch.testing.assert_close(out["a"], pooled @ a.projections["a"])
    small_bags = torch.repeat_interleave(torch.arange(8), kjt["small"].lengths())
    small_rows = a.storage.embedding_bags["small"].weight[kjt["small"].values()]
    torch.testing.assert_close(out["small"], torch.zeros(8, 8).index_add_(0, small_bags, small_rows))
    plan = embtable.plan(feats, config)
    assert plan.total_bytes == embtable.memory_report(a).inference_bytes
    listed = 0 if order != "shuffled" else exclusive * 8
    assert plan.features[1].bytes == ((exclusive + tail) * 3 + 3 * 8) * 4 + 64 + listed
    assert plan.features[1].rows == exclusive + tail
    with pytest.raises(ValueError, match="fewer rows than its"):
        embtable.build(feats, LowRankConfig(rank=2, tail_rows={"a": (600, 400)}))
    with pytest.raises(ValueError, match="tail must be"):
        LowRankConfig(tail="bloom")


def test_compressing_into_a_tail_averages_the_shared_rows():
    w = _trained_weight(1000, 8)
    module = embtable.low_rank_from_trained(w, budget="1/32")
    exclusive, tail = module.config.tail_rows["table"]
    r = module.config.rank["table"]
    full = embtable.low_rank_from_trained(w, rank=r)  # every row kept: the rank-r SVD rows
    a_full = full.storage.embedding_bags["table"].weight
    ids = torch.arange(1000)
    rows = module.mapper.rows(ids, torch.zeros_like(ids))
    stored = module.storage.embedding_bags["table"].weight
    torch.testing.assert_close(stored[:exclusive], a_full[:exclusive])
    for row in [exclusive, exclusive + tail - 1]:
        assert int((rows == row).sum()) > 1
        torch.testing.assert_close(stored[row], a_full[rows == row].mean(0))
    torch.testing.assert_close(module.projections["table"], full.projections["table"])


# ----- compressing a trained table -----
def _trained_weight(n=400, d=8, seed=0) -> torch.Tensor:
    """A table with a decaying spectrum, like a trained one."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.logspace(0, -1.5, d) @ torch.linalg.qr(torch.randn(d, d, generator=g))[0]


def test_rank_equal_to_dim_reproduces_the_trained_outputs():
    features = [FeatureSpec("a", 400, 8), FeatureSpec("b", 30, 8)]
    full = embtable.build(features, embtable.FullConfig(), pooling="mean", out_of_range="reserved", seed=0)
    with torch.no_grad():
        full.storage.embedding_bags["a"].weight.copy_(_trained_weight(401))
    compressed = embtable.low_rank_from_trained(full, rank={"a": 8, "b": None})
    assert compressed.pooling.value == "mean" and compressed.out_of_range.value == "reserved"
    kjt = _kjt(features, batch=16)
    torch.testing.assert_close(compressed(kjt).values(), full(kjt).values(), rtol=1e-5, atol=1e-6)


def test_lower_rank_error_is_the_truncated_svd_optimum():
    w = _trained_weight()
    singular = torch.linalg.svd(w.double()).S
    for r in [1, 3, 6]:
        module = embtable.low_rank_from_trained(w, rank=r)
        approx = module.storage.embedding_bags["table"].weight @ module.projections["table"]
        error = torch.linalg.matrix_norm(w - approx).item()
        assert error == pytest.approx(singular[r:].square().sum().sqrt().item(), rel=1e-4)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(approx, (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-4, atol=1e-5)


def test_second_moments_from_data_lower_the_error_on_that_data():
    n, d, r = 400, 8, 2
    features = [FeatureSpec("a", n, d)]
    popularity = torch.tensor(np.random.default_rng(0).zipf(1.3, n).clip(max=10_000), dtype=torch.float)
    w = _trained_weight(n, d)
    # the popular ids live in the table's weak directions: what the data needs is not what SVD keeps
    popular = popularity.argsort(descending=True)[:20]
    basis = torch.linalg.svd(w, full_matrices=False).Vh[-2:]  # [2, d]
    w[popular] = torch.randn(20, 2, generator=torch.Generator().manual_seed(1)) @ basis * 2.0
    full = embtable.build(features, embtable.FullConfig(), seed=0)
    with torch.no_grad():
        full.storage.embedding_bags["a"].weight.copy_(w)
    batches = [_kjt(features, batch=128, max_len=3, seed=s, ids={"a": popularity}) for s in range(8)]
    moments = embtable.output_second_moments(full, batches)
    plain = embtable.low_rank_from_trained(full, rank=r)
    fitted = embtable.low_rank_from_trained(full, rank=r, second_moments=moments)

    def data_error(module):
        return sum(float((module(b).values() - full(b).values()).square().sum()) for b in batches)

    assert data_error(fitted) < 0.5 * data_error(plain)
    # the id-frequency version (one-id bags): lower error on frequency-weighted rows
    counts = {"a": popularity.numpy().astype(np.int64)}
    by_counts = embtable.low_rank_from_trained(full, rank=r, second_moments=embtable.count_second_moments(full, counts))

    def weighted_error(module):
        approx = module.storage.embedding_bags["a"].weight @ module.projections["a"]
        return float(((w - approx).square().sum(1) * popularity).sum())

    assert weighted_error(by_counts) < 0.5 * weighted_error(plain)
    # and on the plain Frobenius error, the SVD stays the best
    assert weighted_error(by_counts) / weighted_error(plain) < 1
    frob = {k: float((w - m.storage.embedding_bags["a"].weight @ m.projections["a"]).square().sum())
            for k, m in [("plain", plain), ("counts", by_counts)]}
    assert frob["plain"] <= frob["counts"]


def test_sources_torchrec_collection_and_nn_embedding():
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{x}", num_embeddings=200, embedding_dim=8, feature_names=[x],
                           pooling=PoolingType.SUM) for x in ["x", "y"]], is_weighted=True)
    module = embtable.low_rank_from_trained(ebc, rank={"x": 8, "y": 2})
    assert module.is_weighted() and module.feature_names == ["x", "y"]
    kjt = _kjt([FeatureSpec("x", 200, 8), FeatureSpec("y", 200, 8)], weighted=True)
    torch.testing.assert_close(module(kjt)["x"], ebc(kjt)["x"], rtol=1e-5, atol=1e-6)
    bag = torch.nn.EmbeddingBag(100, 8)
    assert embtable.low_rank_from_trained(bag, budget="1/2").config.rank == {"table": 3}
    shared = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4,
                                                               feature_names=["x", "y"])])
    with pytest.raises(ValueError, match="one feature per table"):
        embtable.low_rank_from_trained(shared, rank=2)
    with pytest.raises(TypeError, match="weight tensor"):
        embtable.low_rank_from_trained("table.pt", rank=2)
    with pytest.raises(ValueError, match=r"must be \[8, 8\]"):
        low_rank_factors(torch.randn(10, 8), 2, torch.eye(4))


def test_compressed_table_fine_tunes_towards_the_full_outputs():
    features = [FeatureSpec("a", 300, 8)]
    full = embtable.build(features, embtable.FullConfig(), seed=0)
    with torch.no_grad():
        full.storage.embedding_bags["a"].weight.copy_(_trained_weight(300, 8))
    module = embtable.low_rank_from_trained(full, rank=3)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    kjt = _kjt(features, batch=32, max_len=1, seed=1)
    target = full(kjt).values().detach()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (module(kjt).values() - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # the rows and the shared projection adapt


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 10**7), st.sampled_from([4, 8, 16])), min_size=1, max_size=6),
       fraction=st.floats(0.05, 1.0))
def test_planner_never_exceeds_the_budget(sizes, fraction):
    features = [FeatureSpec(f"f{i}", n, d) for i, (n, d) in enumerate(sizes)]
    try:
        plan = embtable.plan(features, LowRankConfig(), fraction)
    except embtable.BudgetError as err:
        assert "budget" in str(err)
        return
    assert plan.total_bytes <= plan.budget_bytes
    module = embtable.build(features, LowRankConfig(), fraction, device="meta")
    assert embtable.memory_report(module).inference_bytes == plan.total_bytes
