"""Compositional (quotient-remainder) embeddings: digits, both bag modes against a reference, planning."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingCollection, KeyedJaggedTensor

import embtable
from embtable import FeatureSpec, QRConfig
from embtable.methods.qr import partition_dims, partition_rows, qr_digits


# ----- the id split -----
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), m=st.integers(2, 200), k=st.integers(1, 4))
def test_every_id_gets_a_unique_tuple_inside_the_tables(n, m, k):
    digits = qr_digits(torch.arange(n), m, k)  # [k, n]
    rows = partition_rows(n, m, k)
    assert digits.shape == (k, n)
    for i in range(k):
        assert int(digits[i].min()) >= 0 and int(digits[i].max()) < rows[i]
    assert len(set(map(tuple, digits.T.tolist()))) == n


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 2**62), min_size=1, max_size=20), m=st.integers(2, 2**31), k=st.integers(1, 4))
def test_digits_are_exact_integer_arithmetic(ids, m, k):
    digits = qr_digits(torch.tensor(ids, dtype=torch.int64), m, k).T.tolist()
    for x, ds in zip(ids, digits):
        expected, rest = [], x
        for _ in range(k - 1):
            expected.append(rest % m)
            rest //= m
        expected.append(rest)
        assert ds == expected
        assert sum(d * m**i for i, d in enumerate(ds)) == x


def test_two_partitions_split_huge_ids_exactly():
    features = [FeatureSpec("big", 2**33 + 7, 8), FeatureSpec("small", 100, 8)]
    module = embtable.build(features, QRConfig(), budget=8 * 2**20, seed=0)
    m = module.config.num_collisions["big"]
    assert m < 2**33 and module.config.num_collisions["small"] == 100
    ids = torch.tensor([2**24, 2**24 + 1, 2**32, 2**32 + 1, 2**33 + 6])
    kjt = KeyedJaggedTensor(keys=["big", "small"], values=ids, lengths=torch.tensor([1] * 5 + [0] * 5))
    full, (stacked,) = module.mapper(kjt)
    assert full.keys() == ["small"] and stacked.keys() == ["p0", "p1"]
    by_key = stacked.to_dict()  # one compressed feature: its rows start at 0 of each stacked table
    assert by_key["p0"].values().tolist() == [x % m for x in ids.tolist()]
    assert by_key["p1"].values().tolist() == [x // m for x in ids.tolist()]
    out = module(kjt)["big"]
    assert len({tuple(row.tolist()) for row in out}) == 5


def test_partition_dims_for_concat_add_up():
    for d in range(3, 20):
        for k in range(1, 4):
            dims = partition_dims(d, k, "concat")
            assert sum(dims) == d and max(dims) - min(dims) <= 1


# ----- the module against a per-id reference -----
# b stays full (m >= n); a and c share a dim (stacked tables), d has its own
FEATURES = [FeatureSpec("a", 500, 6), FeatureSpec("b", 7, 6), FeatureSpec("d", 300, 4), FeatureSpec("c", 2000, 6)]
CONFIG = {"a": 9, "b": 100, "d": 20, "c": 13}


def _kjt(weighted: bool, max_len: int, seed: int = 0, batch: int = 5) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(FEATURES) * batch,), generator=g)
    per_feature = lengths.view(len(FEATURES), batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, f.num_embeddings, (n,), generator=g) for f, n in zip(FEATURES, per_feature)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=[f.name for f in FEATURES], values=values, lengths=lengths, weights=weights)


def _reference(module, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Per-bag, per-id Python reference of both bag modes (the definition, written out)."""
    cfg, k = module.config, module.config.num_partitions
    exact = cfg.bag_mode == "combine_then_pool"
    out = []
    for f, jt in zip(FEATURES, kjt.to_dict().values()):
        m = cfg.num_collisions[f.name]
        bags = []
        for b, ids in enumerate(jt.to_dense()):
            ws = jt.to_dense_weights()[b] if jt.weights_or_none() is not None else torch.ones(len(ids))
            if m >= f.num_embeddings:
                parts = [[module.partition_weight(f.name, 0)[int(x)] for x in ids]]
            else:
                parts = []
                for i in range(k):
                    digit = [(int(x) // m**i) % m if i < k - 1 else int(x) // m**i for x in ids]
                    parts.append([module.partition_weight(f.name, i)[d] for d in digit])

            def combine(vectors):
                if cfg.combiner == "multiply":
                    return math.prod(vectors[1:], start=vectors[0])
                return sum(vectors[1:], vectors[0]) if cfg.combiner == "add" else torch.cat(vectors)

            if not len(ids):
                bags.append(torch.zeros(f.embedding_dim))
                continue
            scale = 1 / len(ids) if module.pooling.value == "mean" else 1.0
            if exact or len(parts) == 1:
                per_id = [combine([p[j] for p in parts]) * ws[j] for j in range(len(ids))]
                bags.append(sum(per_id) * scale)
            else:  # pool each partition, then combine; multiply weights partition 0 only
                pooled = [sum(p[j] * (ws[j] if i == 0 or cfg.combiner != "multiply" else 1) for j in range(len(ids)))
                          * scale for i, p in enumerate(parts)]
                bags.append(combine(pooled))
        out.append(torch.stack(bags))
    return torch.cat(out, dim=1)


# add and concat commute with pooling (both bag modes run the pooled lookups): one exact-mode case each
REFERENCE_CASES = [(c, mode, k) for c in ["multiply", "add", "concat"] for k in [2, 3] for mode in
                   (["pool_then_combine", "combine_then_pool"] if c == "multiply" else ["pool_then_combine"])]
REFERENCE_CASES += [("add", "combine_then_pool", 2), ("concat", "combine_then_pool", 3)]


@pytest.mark.parametrize("combiner,bag_mode,k", REFERENCE_CASES)
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_outputs_and_gradients_match_the_reference(combiner, bag_mode, k, pooling, weighted):
    config = QRConfig(num_collisions=CONFIG, num_partitions=k, combiner=combiner, bag_mode=bag_mode)
    module = embtable.build(FEATURES, config, pooling=pooling, is_weighted=weighted, seed=0)
    kjt = _kjt(weighted, max_len=3)
    out, ref = module(kjt).values(), _reference(module, kjt)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out)
    params = list(module.parameters())
    grads = torch.autograd.grad((out * upstream).sum(), params)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_bag_modes_agree_on_one_id_bags_and_differ_on_longer_bags_with_multiply():
    kwargs = dict(is_weighted=True, seed=3)
    pooled = embtable.build(FEATURES, QRConfig(num_collisions=CONFIG), **kwargs)
    exact = embtable.build(FEATURES, QRConfig(num_collisions=CONFIG, bag_mode="combine_then_pool"), **kwargs)
    assert isinstance(exact.stacked["d6"], EmbeddingCollection)
    exact.load_state_dict({k.replace("stacked.d6.embedding_bags", "stacked.d6.embeddings")
                          .replace("stacked.d4.embedding_bags", "stacked.d4.embeddings"): v
                           for k, v in pooled.state_dict().items()})
    single = _kjt(weighted=True, max_len=1)
    torch.testing.assert_close(pooled(single).values(), exact(single).values())
    several = _kjt(weighted=True, max_len=4, seed=1)
    assert not torch.allclose(pooled(several)["a"], exact(several)["a"])


def test_compressed_features_of_one_dim_share_stacked_tables():
    module = embtable.build(FEATURES, QRConfig(num_collisions=CONFIG), seed=0)
    assert module.storage.embedding_bags.keys() == {"b"}
    assert set(module.stacked) == {"d6", "d4"}
    p0 = module.stacked["d6"].embedding_bags["p0"].weight
    assert p0.shape == (9 + 13, 6)  # the remainder tables of a (m=9) and c (m=13)
    assert module.partition_weight("c", 0).data_ptr() == p0[9:].data_ptr()
    tables = sum(len(c.embedding_bag_configs()) for c in [module.storage, *module.stacked.values()])
    assert tables == 1 + 2 * 2  # b, and two partitions per dim group


@pytest.mark.parametrize("combiner", ["multiply", "add", "concat"])
def test_initial_vectors_have_the_scale_of_a_full_table(combiner):
    n, d = 40_000, 16
    module = embtable.build([FeatureSpec("a", n, d)], QRConfig(num_collisions=200, combiner=combiner), seed=0)
    ids = torch.randint(0, n, (4000,), generator=torch.Generator().manual_seed(0))
    out = module(KeyedJaggedTensor(keys=["a"], values=ids, lengths=torch.ones(4000, dtype=torch.int64))).values()
    full_variance = (1 / n) / 3  # U(-s, s), s = sqrt(1/n)
    assert 0.8 < float(out.var()) / full_variance < 1.25
    assert len({tuple(r) for r in out[:200].tolist()}) == len(set(ids[:200].tolist()))


# ----- planning -----
@pytest.mark.parametrize("combiner", ["multiply", "add", "concat"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("budget", ["1/4", "1/16", "1/64"])
def test_planner_fills_the_budget_exactly_and_keeps_small_features_full(combiner, k, budget):
    features = [FeatureSpec("user", 2_000_000, 16), FeatureSpec("item", 300_000, 16),
                FeatureSpec("site", 9_000, 16), FeatureSpec("country", 200, 16)]
    plan = embtable.plan(features, QRConfig(num_partitions=k, combiner=combiner), budget)
    assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes
    by_name = {f.name: f for f in plan.features}
    assert not by_name["country"].compressed and by_name["user"].compressed
    for f in features:
        m = plan.config.num_collisions[f.name]
        if by_name[f.name].compressed:
            rows = partition_rows(f.num_embeddings, m, k)
            dims = partition_dims(16, k, combiner)
            assert by_name[f.name].bytes == sum(r * d for r, d in zip(rows, dims)) * 4
        else:
            assert by_name[f.name].bytes == f.num_embeddings * 16 * 4


def test_planned_bytes_equal_the_built_module():
    features = [FeatureSpec("user", 50_000, 8), FeatureSpec("item", 3_000, 8), FeatureSpec("tiny", 5, 8)]
    for config in [QRConfig(), QRConfig(num_partitions=3, combiner="concat"), QRConfig(bag_mode="combine_then_pool")]:
        plan = embtable.plan(features, config, "1/16")
        module = embtable.build(features, config, "1/16", device="meta")
        assert embtable.memory_report(module).inference_bytes == plan.total_bytes
        # the formula of the docstring, k = 2 multiply: (m + ceil(n / m)) * d * 4
        if config == QRConfig():
            m = plan.config.num_collisions["user"]
            assert plan.features[0].bytes == (m + math.ceil(50_000 / m)) * 8 * 4


def test_unreachable_budgets_and_one_partition_say_what_to_do():
    features = [FeatureSpec("user", 1_000_000, 16)]
    with pytest.raises(embtable.BudgetError, match="more num_partitions"):
        embtable.plan(features, QRConfig(num_partitions=2), budget=10_000)
    assert embtable.plan(features, QRConfig(num_partitions=4), budget=10_000).total_bytes <= 10_000
    with pytest.raises(embtable.BudgetError, match="num_partitions >= 2"):
        embtable.plan(features, QRConfig(num_partitions=1), budget="1/2")
    with pytest.raises(ValueError, match="num_collisions is not set"):
        embtable.build(features, QRConfig())


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 10**7), st.sampled_from([4, 8, 16])), min_size=1, max_size=6),
       fraction=st.floats(0.005, 1.0), k=st.integers(2, 3), combiner=st.sampled_from(["multiply", "concat"]))
def test_planner_never_exceeds_the_budget(sizes, fraction, k, combiner):
    features = [FeatureSpec(f"f{i}", n, d) for i, (n, d) in enumerate(sizes)]
    config = QRConfig(num_partitions=k, combiner=combiner)
    try:
        plan = embtable.plan(features, config, fraction)
    except embtable.BudgetError as err:
        assert "budget" in str(err)
        return
    assert plan.total_bytes <= plan.budget_bytes
    module = embtable.build(features, config, fraction, device="meta")
    assert embtable.memory_report(module).inference_bytes == plan.total_bytes


def test_the_planner_picks_the_number_of_partitions():
    features = [FeatureSpec("user", 1_000_000, 16), FeatureSpec("item", 50_000, 16), FeatureSpec("tiny", 5, 16)]
    # k = 2 whenever it fits (the quotient-remainder trick): the same plan as an explicit k = 2
    auto, two = embtable.plan(features, QRConfig(), "1/16"), embtable.plan(features, QRConfig(num_partitions=2), "1/16")
    assert auto.config.num_partitions == 2 and auto.config.num_collisions == two.config.num_collisions
    # 1/1000 and 1/10000: k = 2 cannot fit; the smallest k that can is chosen, and the plan fits
    for budget in ["1/1000", "1/10000"]:
        with pytest.raises(embtable.BudgetError):
            embtable.plan(features, QRConfig(num_partitions=2), budget)
        plan = embtable.plan(features, QRConfig(), budget)
        k = plan.config.num_partitions
        assert k > 2 and plan.total_bytes <= plan.budget_bytes
        with pytest.raises(embtable.BudgetError):
            embtable.plan(features, QRConfig(num_partitions=k - 1), budget)
        module = embtable.build(features, QRConfig(), budget, device="meta")
        assert module.config.num_partitions == k and embtable.memory_report(module).inference_bytes == plan.total_bytes
    # without a budget, given num_collisions: k = 2
    assert embtable.plan(features, QRConfig(num_collisions=1000)).config.num_partitions == 2
