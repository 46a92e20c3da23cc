"""Unified embedding (feature multiplexing): layout, exactness, planning and collision rates.

The reference here recomputes every row with Python integers from the hash salts and pools by hand, so it
shares no code with the module's vectorised mapper.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

import embtable
from embtable import FeatureSpec, UnifiedConfig
from embtable.hashing import PRIME, hash_coefficients
from embtable.methods.unified import unified_layout

FEATURES = [FeatureSpec("a", 40, 8), FeatureSpec("b", 2**33 + 7, 16), FeatureSpec("tiny", 5, 8),
            FeatureSpec("c", 300, 16)]
PROBES = {"a": 1, "b": 2, "tiny": 1, "c": 2}  # chunk dim 8 for all


def reference_rows(features, config: UnifiedConfig) -> dict[tuple[str, int], callable]:
    """(feature, probe) -> function id -> global row, from the documented layout, in plain Python ints."""
    probes = config.num_probes if isinstance(config.num_probes, dict) else {f.name: config.num_probes for f in features}
    full = sum(f.num_embeddings * probes[f.name] for f in features)
    own = {f.name: config.num_rows == full or f.num_embeddings < config.keep_full_below for f in features}
    exclusive = sum(f.num_embeddings * probes[f.name] for f in features if own[f.name])
    hashed = config.num_rows - exclusive
    out, offset = {}, 0
    for f in features:
        for p in range(probes[f.name]):
            if own[f.name]:
                out[f.name, p] = (lambda x, o=offset: o + x)
                offset += f.num_embeddings
            else:
                a0, a1, a2, b = hash_coefficients(config.seed, "unified", f.name, p)

                def row(x, a0=a0, a1=a1, a2=a2, b=b):
                    x0, x1, x2 = x & (2**31 - 1), (x >> 31) & (2**31 - 1), x >> 62
                    return exclusive + ((a0 * x0 + a1 * x1 + a2 * x2 + b) % PRIME) % hashed

                out[f.name, p] = row
    return out


def logical_table(module) -> torch.Tensor:
    """The rows of the one logical table, gathered back from the round-robin tables: row r = table r % T."""
    tables = [module.storage.embedding_bags[k].weight.detach() for k in module.mapper.storage_keys]
    out = torch.empty(module.config.num_rows, module.chunk_dim)
    for t, w in enumerate(tables):
        out[t :: len(tables)] = w
    return out


def load_logical_table(module, logical: torch.Tensor) -> None:
    T = module.layout.num_tables
    with torch.no_grad():
        for t, key in enumerate(module.mapper.storage_keys):
            module.storage.embedding_bags[key].weight.copy_(logical[t::T])


def random_kjt(features, batch, seed, weighted=False, big=None) -> KeyedJaggedTensor:
    rng = np.random.default_rng(seed)
    lengths, values = [], []
    for f in features:
        ls = rng.integers(0, 4, batch)
        ids = rng.integers(0, min(f.num_embeddings, 2**62), ls.sum())
        if big and f.name in big and ids.size:
            ids[0] = f.num_embeddings - 1  # the largest id, far above 2**32
        lengths.append(ls)
        values.append(ids)
    values = torch.tensor(np.concatenate(values), dtype=torch.int64)
    weights = torch.tensor(rng.random(values.numel()), dtype=torch.float32) if weighted else None
    return KeyedJaggedTensor(keys=[f.name for f in features], values=values,
                             lengths=torch.tensor(np.concatenate(lengths)), weights=weights)


def reference_pooled(module, features, kjt, pooling) -> torch.Tensor:
    rows = reference_rows(features, module.config)
    table = logical_table(module)
    batch = kjt.stride()
    out = []
    jt = kjt.to_dict()
    for b in range(batch):
        per_sample = []
        for f in features:
            k = module.layout.probes[[g.name for g in features].index(f.name)]
            offsets = jt[f.name].offsets()
            ids = jt[f.name].values()[offsets[b]:offsets[b + 1]].tolist()
            weights = (jt[f.name].weights()[offsets[b]:offsets[b + 1]].tolist()
                       if kjt.weights_or_none() is not None else [1.0] * len(ids))
            vec = torch.zeros(f.embedding_dim, dtype=torch.float64)
            for x, w in zip(ids, weights):
                vec += w * torch.cat([table[rows[f.name, p](x)] for p in range(k)]).double()
            if pooling == "mean" and ids:
                vec /= len(ids)
            per_sample.append(vec)
        out.append(torch.cat(per_sample))
    return torch.stack(out).float()


@pytest.mark.parametrize("pooling,weighted,num_tables,keep_full_below",
                         [("sum", False, 1, 0), ("mean", False, 3, 0), ("sum", True, 2, 10), ("mean", False, 1, 50)])
def test_output_equals_hand_computed_concatenated_probes(pooling, weighted, num_tables, keep_full_below):
    config = UnifiedConfig(num_rows=97, num_probes=PROBES, num_tables=num_tables, keep_full_below=keep_full_below,
                           seed=3)
    module = embtable.build(FEATURES, config, pooling=pooling, is_weighted=weighted, seed=0)
    assert module.chunk_dim == 8
    assert [c.num_embeddings for c in module.storage.embedding_bag_configs()] == module.layout.table_rows()
    assert sum(module.layout.table_rows()) == 97
    kjt = random_kjt(FEATURES, batch=5, seed=1, weighted=weighted, big={"b"})
    out = module(kjt)
    assert out.keys() == [f.name for f in FEATURES] and out.length_per_key() == [8, 16, 8, 16]
    torch.testing.assert_close(out.values(), reference_pooled(module, FEATURES, kjt, pooling), rtol=1e-5, atol=1e-6)


def test_number_of_tables_does_not_change_the_function():
    """Round-robin tables are row shards of one logical table: same logical rows, same outputs."""
    one = embtable.build(FEATURES, UnifiedConfig(num_rows=101, num_probes=PROBES), seed=0)
    four = embtable.build(FEATURES, UnifiedConfig(num_rows=101, num_probes=PROBES, num_tables=4), seed=1)
    assert four.layout.table_rows() == [26, 25, 25, 25]
    load_logical_table(four, logical_table(one))
    torch.testing.assert_close(logical_table(four), logical_table(one))
    kjt = random_kjt(FEATURES, batch=16, seed=2, big={"b"})
    torch.testing.assert_close(four(kjt).values(), one(kjt).values(), rtol=1e-6, atol=1e-6)


def test_mapper_output_is_one_key_per_table_with_a_bag_per_sample_and_probe():
    module = embtable.build(FEATURES, UnifiedConfig(num_rows=64, num_probes=PROBES, num_tables=2))
    kjt = random_kjt(FEATURES, batch=3, seed=4)
    mapped = module.mapper(kjt)
    K = sum(PROBES.values())
    assert mapped.keys() == ["unified_0", "unified_1"] and mapped.stride() == 3 * K
    lengths = mapped.lengths().view(2, K, 3).sum(0)  # [K, B]: ids per (slot, sample), tables together
    per_bag = kjt.lengths().view(len(FEATURES), 3)  # [F, B]
    slot_feature = [i for i, f in enumerate(FEATURES) for _ in range(PROBES[f.name])]
    assert torch.equal(lengths, per_bag[slot_feature])
    for t, rows in enumerate(module.layout.table_rows()):
        local = mapped[f"unified_{t}"].values()
        assert bool(((local >= 0) & (local < rows)).all())


def test_identity_layout_gives_each_feature_its_own_rows():
    features = [FeatureSpec("x", 30, 8), FeatureSpec("y", 20, 8)]
    module = embtable.build(features, UnifiedConfig(num_rows=50, num_probes=1))  # = sum n: every feature owns its rows
    assert module.layout.own_rows == (True, True) and module.layout.hashed_rows == 0
    plan = embtable.plan(features, UnifiedConfig(num_rows=50, num_probes=1))
    assert [p.compressed for p in plan.features] == [False, False] and plan.shared_bytes == {}
    mapped = module.mapper(KeyedJaggedTensor.from_lengths_sync(["x", "y"], torch.tensor([29, 0, 19]),
                                                               torch.tensor([1, 1, 1, 0])))
    # storage bags are slot-major (x:b0, x:b1, y:b0, y:b1) like the input; y's rows start after x's 30
    assert mapped.lengths().tolist() == [1, 1, 1, 0] and mapped.values().tolist() == [29, 0, 30 + 19]


def test_planner_rows_from_budget_and_memory_formula():
    features = [FeatureSpec("user", 1_000_000, 32), FeatureSpec("item", 20_000, 32), FeatureSpec("ctry", 200, 32)]
    for probes, c in [(1, 32), (4, 8)]:
        budget = 1_000_003
        plan = embtable.plan(features, UnifiedConfig(num_probes=probes), budget)
        K = 3 * probes
        rows = (budget - 48 * K) // (c * 4)
        assert plan.config.num_rows == rows
        assert plan.total_bytes == rows * c * 4 + 48 * K <= budget
        assert plan.total_bytes >= 0.95 * budget
    # a budget that holds the unshared layout caps the rows there: every feature is identity-mapped
    plan = embtable.plan(features, UnifiedConfig(num_probes=1), 10**9)
    assert plan.config.num_rows == 1_020_200 and not any(p.compressed for p in plan.features)
    # keep_full_below: small features own their rows, the rest share what is left
    plan = embtable.plan(features, UnifiedConfig(keep_full_below=1000, num_probes=1), "1/100")
    assert [p.compressed for p in plan.features] == [True, True, False]
    assert plan.features[2].bytes == 200 * 32 * 4 + 48
    module = embtable.build(features, UnifiedConfig(keep_full_below=1000, num_probes=1), "1/100", device="meta")
    assert embtable.memory_report(module).inference_bytes == plan.total_bytes


def test_planner_is_pure_and_fast_at_criteo_1tb_scale():
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 40_000_000, 26).tolist()
    sizes[0] = 882_774_559 - sum(sizes[1:])
    features = [FeatureSpec(f"C{i + 1}", n, 128) for i, n in enumerate(sizes)]
    plan = embtable.plan(features, UnifiedConfig(num_probes=4, num_tables=8), "1/1000")
    assert plan.total_bytes <= embtable.Budget(fraction=1 / 1000).resolve(features)
    assert plan.config.num_rows == (plan.budget_bytes - 48 * 26 * 4) // (32 * 4)


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"feature 'b' has embedding_dim 16, not divisible by its num_probes 3"):
        embtable.build([FeatureSpec("b", 10, 16)], UnifiedConfig(num_rows=5, num_probes=3))
    with pytest.raises(ValueError, match=r"chunk dim 8: \['a'\]; chunk dim 16: \['b'\].*more probes"):
        embtable.build([FeatureSpec("a", 10, 8), FeatureSpec("b", 10, 16)], UnifiedConfig(num_rows=5, num_probes=1))
    with pytest.raises(ValueError, match="num_rows=31 is more than the 30 rows"):
        embtable.build([FeatureSpec("a", 10, 8), FeatureSpec("b", 20, 8)], UnifiedConfig(num_rows=31, num_probes=1))
    with pytest.raises(ValueError, match="leaves no shared rows"):
        embtable.build([FeatureSpec("a", 10, 8), FeatureSpec("b", 20, 8)], UnifiedConfig(num_rows=10,
                                                                                            keep_full_below=15, num_probes=1))
    with pytest.raises(ValueError, match="num_rows is not set"):
        embtable.build([FeatureSpec("a", 10, 8)], UnifiedConfig())
    with pytest.raises(ValueError, match="cannot fill num_tables=4"):
        embtable.build([FeatureSpec("a", 10, 8)], UnifiedConfig(num_rows=3, num_tables=4, num_probes=1))
    with pytest.raises(embtable.BudgetError, match="holds 1 rows of dim 8 .* needs at least 2 rows"):
        embtable.build([FeatureSpec("a", 10, 8)], UnifiedConfig(num_tables=2, num_probes=1), budget=48 + 32 + 10)
    with pytest.raises(ValueError, match="num_probes must give a value for every feature"):
        embtable.build([FeatureSpec("a", 10, 8)], UnifiedConfig(num_rows=3, num_probes={"z": 1}))
    for bad in [dict(num_tables=0), dict(num_probes=True), dict(keep_full_below=-1), dict(num_rows=2.5)]:
        with pytest.raises(ValueError, match="UnifiedConfig"):
            UnifiedConfig(**bad)
    config = embtable.method_config_from_dict({"method": "unified", "num_probes": {"a": 2}, "num_tables": 2})
    assert config == UnifiedConfig(num_probes={"a": 2}, num_tables=2)


def brute_force_collision_rates(module, features, ids_per_feature) -> dict[str, float]:
    rows = reference_rows(features, module.config)
    probes = dict(zip([f.name for f in features], module.layout.probes))
    owners: dict[int, set] = {}
    for name, ids in ids_per_feature.items():
        for x in set(np.asarray(ids).reshape(-1).tolist()):
            for p in range(probes[name]):
                owners.setdefault(rows[name, p](x), set()).add((name, x))
    rates = {}
    for name, ids in ids_per_feature.items():
        distinct = set(np.asarray(ids).reshape(-1).tolist())
        hit = [x for x in distinct if any(len(owners[rows[name, p](x)]) > 1 for p in range(probes[name]))]
        rates[name] = len(hit) / len(distinct) if distinct else float("nan")
    return rates


@pytest.mark.parametrize("num_rows,keep_full_below", [(23, 0), (200, 0), (61, 10), (1000, 0)])
def test_collision_rates_match_a_brute_force_count(num_rows, keep_full_below):
    config = UnifiedConfig(num_rows=num_rows, num_probes=PROBES, num_tables=2, keep_full_below=keep_full_below)
    module = embtable.build(FEATURES, config)
    rng = np.random.default_rng(num_rows)
    data = {
        "a": rng.integers(0, 40, (6, 5)),  # duplicates, 2-d
        "b": torch.tensor([0, 2**32 + 1, 2**33 + 6, 2**33 + 6, 17]),
        "tiny": np.array([4, 4, 0], dtype=np.int32),
        "c": torch.tensor(rng.integers(0, 300, 80)),
    }
    rates = module.collision_rates(data)
    expected = brute_force_collision_rates(module, FEATURES, data)
    assert rates.keys() == expected.keys()
    for name in data:
        assert rates[name] == pytest.approx(expected[name]), name
    if keep_full_below:
        assert rates["tiny"] == 0.0  # own identity rows never collide
    assert module.collision_rates({"a": np.array([], dtype=np.int64)}) == {"a": pytest.approx(float("nan"),
                                                                                              nan_ok=True)}
    with pytest.raises(ValueError, match=r"feature 'tiny': id 5 is outside the table's range \[0, 5\)"):
        module.collision_rates({"tiny": [5]})
    with pytest.raises(KeyError, match="no feature 'zz'"):
        module.collision_rates({"zz": [1]})


def test_collision_rate_falls_with_more_rows_and_is_zero_unshared():
    features = [FeatureSpec("u", 5000, 8), FeatureSpec("v", 3000, 8)]
    data = {"u": np.arange(5000), "v": np.arange(3000)}
    low = embtable.build(features, UnifiedConfig(num_rows=2000, num_probes=1)).collision_rates(data)
    high = embtable.build(features, UnifiedConfig(num_rows=7999, num_probes=1)).collision_rates(data)
    assert low["u"] > 0.95 and 0 < high["u"] < low["u"]
    assert embtable.build(features, UnifiedConfig(num_rows=8000, num_probes=1)).collision_rates(data) == {"u": 0.0, "v": 0.0}


def test_storage_is_a_plain_embedding_bag_collection_for_torchrec_sharding():
    module = embtable.build(FEATURES, UnifiedConfig(num_rows=64, num_probes=PROBES, num_tables=2))
    assert type(module.storage) is EmbeddingBagCollection
    configs = module.storage.embedding_bag_configs()
    assert [(c.name, c.feature_names, c.embedding_dim) for c in configs] == [
        ("unified_0", ["unified_0"], 8), ("unified_1", ["unified_1"], 8)]
    assert [name for name, _ in module.named_buffers()] == ["mapper.slot_params"]


def test_default_is_multi_probe():
    same = [FeatureSpec("a", 1000, 16), FeatureSpec("b", 500, 16)]
    layout = unified_layout(same, embtable.plan(same, UnifiedConfig(), "1/4").config)
    assert layout.probes == (2, 2) and layout.chunk_dim == 8
    mixed = [FeatureSpec("a", 1000, 16), FeatureSpec("b", 500, 32)]
    layout = unified_layout(mixed, embtable.plan(mixed, UnifiedConfig(), "1/4").config)
    assert layout.probes == (2, 4) and layout.chunk_dim == 8
    assert embtable.plan([FeatureSpec("a", 1000, 4)], UnifiedConfig(), "1/4").features[0].detail.startswith("1 ")
    with pytest.raises(ValueError, match="embedding_dim / num_probes must be the same"):
        embtable.plan([FeatureSpec("a", 1000, 4), FeatureSpec("b", 500, 6)], UnifiedConfig(), "1/4")
