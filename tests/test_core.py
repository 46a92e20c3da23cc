"""Core pieces: features, budgets, planning, hashing, registry, single-feature modules."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import embtable
from embtable import Budget, BudgetError, FeatureSpec
from embtable.hashing import hash_coefficients, universal_hash
from experiments.checks.scale import CRITEO_1TB  # defined once, for the scale study and these tests
from experiments.checks.scale import criteo_1tb_features as criteo_1tb


def test_criteo_1tb_features_follow_the_criteo_schema():
    from data_prep.schema import CRITEO_CATEGORICAL

    features = criteo_1tb(16)
    assert [f.name for f in features] == CRITEO_CATEGORICAL  # the columns data_prep reads from Criteo files
    assert [f.num_embeddings for f in features] == list(CRITEO_1TB)
    assert sum(f.num_embeddings for f in features) == 882_774_559 and {f.embedding_dim for f in features} == {16}


def test_feature_spec_validation():
    with pytest.raises(ValueError, match="num_embeddings must be a positive integer"):
        FeatureSpec("a", 0, 4)
    with pytest.raises(ValueError, match=r"counts must have shape \(3,\)"):
        FeatureSpec("a", 3, 4, counts=np.ones(2))
    with pytest.raises(ValueError, match="unique"):
        embtable.build([FeatureSpec("a", 3, 4), FeatureSpec("a", 5, 4)], embtable.FullConfig())


@pytest.mark.parametrize("text,expected", [
    ("1/16", Budget(fraction=1 / 16)), ("25%", Budget(fraction=0.25)), ("0.5", Budget(fraction=0.5)),
    ("64MiB", Budget(bytes=64 * 2**20)), ("2GB", Budget(bytes=2 * 10**9)), (1000, Budget(bytes=1000)),
    (0.125, Budget(fraction=0.125)), ("1000000", Budget(bytes=10**6)),
])
def test_budget_parsing(text, expected):
    assert embtable.as_budget(text) == expected


@pytest.mark.parametrize("bad,explained", [
    ("lots", "cannot read budget .lots.; examples"), (1.5, "use an int for bytes"),
    (-3, "must be a positive integer, got -3"), ("0/4", r"must be in \(0, 1\]"), (True, "cannot be a bool"),
])
def test_bad_budgets_are_explained(bad, explained):
    with pytest.raises((ValueError, TypeError), match=explained):
        embtable.as_budget(bad)


ROBE_MAX_SIZE = 2**31 - 1


@pytest.mark.parametrize("method", sorted(embtable.registered_methods()))
@pytest.mark.parametrize("fraction", [1 / 10, 1 / 100, 1 / 10_000])
def test_planning_criteo_1tb_is_fast_and_allocates_nothing(method, fraction):
    if method == "full":
        pytest.skip("the full table does not compress")
    config = embtable.config_class(method)()
    features = criteo_1tb()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        plan = embtable.plan(features, config, Budget(fraction=fraction))
    except BudgetError:
        tracemalloc.stop()
        return  # a method may be unable to reach 1/10,000; it must say so, which it did
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # a guard against a pathological planner (well under 1 s on a quiet machine), not a speed goal
    assert elapsed < 5.0, f"{method}: planning took {elapsed:.2f}s"
    assert peak < 8 * 2**20, f"{method}: planning allocated {peak:,} bytes"
    assert plan.total_bytes <= plan.budget_bytes
    if method == "robe" and plan.config.size == ROBE_MAX_SIZE:
        return  # robe's one array holds at most 2**31 - 1 floats (offsets hash mod that prime): 8 GiB at most
    assert plan.total_bytes >= 0.95 * plan.budget_bytes
    assert len(plan.features) == 26


def test_hash_plan_keeps_small_features_full():
    plan = embtable.plan(criteo_1tb(), embtable.HashConfig(), "1/1000")
    by_name = {f.name: f for f in plan.features}
    assert not by_name["C6"].compressed and by_name["C6"].rows == 3
    assert by_name["C1"].compressed and by_name["C1"].rows < 227605432
    assert "C1" in plan.table()


def test_infeasible_budget_fails_before_allocating():
    with pytest.raises(BudgetError, match="raise the budget"):
        embtable.build(criteo_1tb(), embtable.HashConfig(), budget=100)
    with pytest.raises(BudgetError, match="choose a compressing method"):
        embtable.build([FeatureSpec("a", 10**12, 128)], embtable.FullConfig(), budget="1/2")


def test_explicit_size_over_budget_is_an_error():
    with pytest.raises(BudgetError, match="over the budget"):
        embtable.plan([FeatureSpec("a", 10_000, 8)], embtable.HashConfig(num_buckets=5000), budget=1000)


def test_config_is_not_mutated_and_is_serialisable():
    config = embtable.HashConfig()
    sized = embtable.plan([FeatureSpec("a", 10_000, 8)], config, budget="1/2").config
    assert config.num_buckets is None and sized.num_buckets == {"a": 4998}
    assert embtable.method_config_from_dict(sized.to_dict()) == sized


def test_registering_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        embtable.register_method(embtable.HashConfig)(type("Again", (), {}))

    @dataclasses.dataclass(frozen=True)
    class Nameless(embtable.MethodConfig):
        pass

    with pytest.raises(ValueError, match="must set the class attribute"):
        embtable.register_method(Nameless)


def test_reloading_a_method_module_registers_it_again(tmp_path, monkeypatch):
    import importlib

    import embtable.config as config

    monkeypatch.setattr(config, "_REGISTRY", dict(config._REGISTRY))  # nothing leaks into other tests
    monkeypatch.setattr(config, "_BY_NAME", dict(config._BY_NAME))
    (tmp_path / "reload_probe_method.py").write_text(
        "import dataclasses\nimport embtable\n\n"
        "@dataclasses.dataclass(frozen=True)\nclass ProbeConfig(embtable.MethodConfig):\n    method = 'reload_probe'\n\n"
        "@embtable.register_method(ProbeConfig)\nclass ProbeModule(embtable.EmbeddingModule):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reload_probe_method")
    try:
        first = module.ProbeConfig
        importlib.reload(module)  # what a notebook's autoreload does
        assert module.ProbeConfig is not first and config.registered_methods()["reload_probe"] is module.ProbeConfig
        assert config._REGISTRY[module.ProbeConfig] is module.ProbeModule and first not in config._REGISTRY
        with pytest.raises(ValueError, match="already registered"):  # another class under the name: still an error
            embtable.register_method(module.ProbeConfig)(type("OtherModule", (), {}))
    finally:
        sys.modules.pop("reload_probe_method", None)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="choose one of"):
        embtable.method_config_from_dict({"method": "bloom"})
    with pytest.raises(TypeError, match="method config"):
        embtable.build([FeatureSpec("a", 10, 4)], "hash")


def test_hash_is_stable_across_processes():
    code = (
        "import torch; from embtable.hashing import hash_coefficients, universal_hash;"
        "c = torch.tensor(hash_coefficients(7, 'hash', 'C1'));"
        "print(universal_hash(torch.tensor([0, 1, 2**40, 2**62 + 5]), c, 1009).tolist())"
    )
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    c = torch.tensor(hash_coefficients(7, "hash", "C1"))
    here = universal_hash(torch.tensor([0, 1, 2**40, 2**62 + 5]), c, 1009).tolist()
    assert outputs == {f"{here}\n"}


def test_hash_spreads_ids_evenly():
    c = torch.tensor(hash_coefficients(0, "x"))
    buckets = universal_hash(torch.arange(200_000), c, 1000)
    counts = torch.bincount(buckets, minlength=1000).float()
    assert counts.min() > 120 and counts.max() < 280  # 200 expected per bucket


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**63 - 1), st.integers(min_value=1, max_value=2**31 - 1))
def test_hash_matches_exact_integer_arithmetic(x, m):
    a0, a1, a2, b = hash_coefficients(3, "prop")
    p = 2**31 - 1
    digits = [x & p, (x >> 31) & p, x >> 62]
    expected = ((a0 * digits[0] + a1 * digits[1] + a2 * digits[2] + b) % p) % m
    got = universal_hash(torch.tensor([x]), torch.tensor([a0, a1, a2, b]), m)
    assert int(got) == expected


def _copy_into(bag: embtable.EmbeddingBag, reference: torch.nn.Module) -> None:
    next(iter(bag.collection.storage.embedding_bags.values())).weight.data.copy_(reference.weight.data)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_matches_nn_embedding_bag(mode):
    torch.manual_seed(0)
    ref = torch.nn.EmbeddingBag(100, 6, mode=mode)
    bag = embtable.EmbeddingBag(100, 6, mode=mode)
    _copy_into(bag, ref)
    ids, offsets = torch.tensor([1, 5, 7, 99, 0, 3]), torch.tensor([0, 2, 2, 5])
    torch.testing.assert_close(bag(ids, offsets), ref(ids, offsets))
    ids2d = torch.randint(0, 100, (4, 3))
    torch.testing.assert_close(bag(ids2d), ref(ids2d))
    last = torch.tensor([0, 2, 2, 5, 6])
    ref_last = torch.nn.EmbeddingBag(100, 6, mode=mode, include_last_offset=True)
    ref_last.weight.data.copy_(ref.weight.data)
    bag_last = embtable.EmbeddingBag(100, 6, mode=mode, include_last_offset=True)
    _copy_into(bag_last, ref)
    torch.testing.assert_close(bag_last(ids, last), ref_last(ids, last))
    if mode == "sum":
        w = torch.rand(6)
        torch.testing.assert_close(bag(ids, offsets, w), ref(ids, offsets, per_sample_weights=w))
    else:
        with pytest.raises(ValueError, match="mode='sum'"):
            bag(ids, offsets, torch.rand(6))


def test_embedding_matches_nn_embedding_and_compresses():
    torch.manual_seed(0)
    ref = torch.nn.Embedding(100, 4)
    emb = embtable.Embedding(100, 4)
    _copy_into(emb, ref)
    ids = torch.randint(0, 100, (3, 5))
    torch.testing.assert_close(emb(ids), ref(ids))
    small = embtable.Embedding(100_000, 4, method=embtable.HashConfig(), budget="1/100")
    assert small.memory().inference_bytes <= 100_000 * 4 * 4 // 100
    assert small(ids).shape == (3, 5, 4)


def test_import_embtable_stays_light():
    code = "import sys, embtable; print(sorted(m for m in ('ctr_models', 'data_prep', 'experiments') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_meta_device_allocates_nothing():
    module = embtable.build(criteo_1tb(), embtable.HashConfig(), "1/100", device="meta")
    report = embtable.memory_report(module)
    assert report.inference_bytes == embtable.plan(criteo_1tb(), embtable.HashConfig(), "1/100").total_bytes
