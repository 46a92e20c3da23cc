"""managed_collision: TorchRec's MCH modules sized by a budget, warm-started, with honest bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtable
from embtable import FeatureSpec, ManagedCollisionConfig
from embtable.methods.managed_collision import REMAP_BYTES_PER_ROW


def _kjt(name: str, ids: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=[name], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64))


def _rows(module, name: str, ids: list[int]) -> torch.Tensor:
    """Rows the feature's remap gives ``ids`` (eval: the fixed mapping)."""
    mc = module.mc_module(name)
    was = mc.training
    mc.eval()
    from torchrec.sparse.jagged_tensor import JaggedTensor

    out = mc({name: JaggedTensor(values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64))})
    mc.train(was)
    return out[name].values()


def test_warm_start_admits_most_frequent_ids_and_misses_share_the_last_row():
    counts = np.zeros(1000, dtype=np.int64)
    counts[[7, 500, 3, 999]] = [50, 40, 30, 20]
    m = embtable.build([FeatureSpec("a", 1000, 4, counts=counts)], ManagedCollisionConfig(zch_size=4), seed=0)
    # z - 1 = 3 owners: the three most frequent ids, rows in sorted-id order; every other id reads row 3
    assert _rows(m, "a", [3, 7, 500, 999, 0, 1]).tolist() == [0, 1, 2, 3, 3, 3]
    cold = embtable.build([FeatureSpec("a", 1000, 4)], ManagedCollisionConfig(zch_size=4, warm_start=False), seed=0)
    assert _rows(cold, "a", [0, 1, 2]).tolist() == [3, 3, 3]  # TorchRec's empty start


@pytest.mark.parametrize("policy", ["lfu", "lru", "distance_lfu"])
def test_training_admits_new_ids_and_eval_keeps_the_mapping(policy):
    m = embtable.build([FeatureSpec("a", 10**6, 4)], ManagedCollisionConfig(zch_size=3, eviction_policy=policy,
                                                                          warm_start=False), seed=0)
    m.train()
    for _ in range(3):
        m(_kjt("a", [123_456, 123_456, 999_999]))  # eviction_interval=1: admitted at the first step
    rows = _rows(m, "a", [123_456, 999_999, 5])
    assert sorted(rows[:2].tolist()) == [0, 1] and rows[2].item() == 2
    m.eval()
    before = m(_kjt("a", [5, 7, 123_456])).values().clone()
    assert torch.equal(m(_kjt("a", [5, 7, 123_456])).values(), before)
    assert _rows(m, "a", [123_456]).item() == rows[0].item()  # eval read only, nothing evicted


def test_bytes_inference_vs_training_only():
    feats = [FeatureSpec("big", 50_000, 8), FeatureSpec("small", 20, 8)]
    m = embtable.build(feats, ManagedCollisionConfig(zch_size={"big": 1000, "small": None}), seed=0)
    report = embtable.memory_report(m)
    assert report.inference_bytes == 1000 * (8 * 4 + REMAP_BYTES_PER_ROW) + 20 * 8 * 4
    assert embtable.plan(feats, m.config).total_bytes == report.inference_bytes
    names = set(report.tensors)
    assert any(n.endswith("_mch_sorted_raw_ids") for n in names)
    assert any(n.endswith("_mch_remapped_ids_mapping") for n in names)
    assert not any(n.endswith(("_mch_counts", "_output_segments_tensor")) for n in names)
    # training adds TorchRec's counters and bookkeeping: LFU counts (1000 int64), segments (1025 int64),
    # iteration (1), slots (1), delimiter (1)
    extra = (1000 + 1025 + 3) * 8
    assert embtable.training_bytes(m, "sgd") == report.inference_bytes + extra


def test_planner_fills_the_budget_with_the_remap_counted():
    rng = np.random.default_rng(0)
    feats = [FeatureSpec(f"C{i}", int(n), 16) for i, n in enumerate(rng.integers(10, 2_000_000, size=26))]
    for budget in ["1/4", "1/16", "1/100", "1/1000"]:
        p = embtable.plan(feats, ManagedCollisionConfig(), budget)
        assert 0.95 * p.budget_bytes <= p.total_bytes <= p.budget_bytes, budget
        for f in p.features:
            if f.compressed:
                assert f.bytes == f.rows * (16 * 4 + REMAP_BYTES_PER_ROW)
    with pytest.raises(embtable.BudgetError, match="two rows"):
        embtable.plan(feats, ManagedCollisionConfig(), 1000)


def test_state_dict_round_trip_keeps_the_remap():
    feats = [FeatureSpec("a", 10_000, 4)]
    a = embtable.build(feats, ManagedCollisionConfig(zch_size=50, warm_start=False), seed=0)
    a.train()
    a(_kjt("a", [9_000, 9_001, 17]))
    b = embtable.build(feats, ManagedCollisionConfig(zch_size=50, warm_start=False), seed=1)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    kjt = _kjt("a", [9_000, 9_001, 17, 4])
    assert torch.equal(a(kjt).values(), b(kjt).values())


def test_shard_refuses_with_the_reason():
    from embtable.sharding import shard

    m = embtable.build([FeatureSpec("a", 1000, 4)], ManagedCollisionConfig(), budget="1/4")
    with pytest.raises(ValueError, match="cannot be sharded by shard.*ManagedCollisionEmbeddingBagCollectionSharder"):
        shard(m)
