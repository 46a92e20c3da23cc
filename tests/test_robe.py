"""ROBE-Z specifics: offsets, circular windows, pooling from the array, bytes and the planner's floor."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtable
from embtable import FeatureSpec, RobeConfig
from embtable.hashing import hash_coefficients, universal_hash

FEATS = [FeatureSpec("a", 1000, 8), FeatureSpec("b", 50, 4)]


def _kjt(a_ids, b_ids, weights=None):
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor(a_ids + b_ids),
                             lengths=torch.tensor([len(a_ids), 0, len(b_ids), 0]),
                             weights=None if weights is None else torch.tensor(weights))


def test_embedding_reads_z_consecutive_values_per_block_with_wraparound():
    module = embtable.build(FEATS, RobeConfig(size=37, block_size=3), seed=0)
    assert module.num_blocks == 3  # ceil(8 / 3)
    w = module.array.weight.detach()[:, 0]
    ids = torch.arange(1000)
    offsets = module.offsets(ids, torch.zeros(1000, dtype=torch.int64))
    # each block's offset is the salted universal hash of (feature, block)
    for j in range(3):
        expected = universal_hash(ids, torch.tensor(hash_coefficients(0, "robe", "a", j)), 37)
        assert torch.equal(offsets[:, j], expected)
    # some window starts within Z - 1 of the end and wraps to the array's start
    wrapping = int((offsets[:, 0] > 37 - 3).nonzero()[0, 0])
    o = int(offsets[wrapping, 0])
    vec = module.embeddings(ids[wrapping:wrapping + 1], torch.zeros(1, dtype=torch.int64))[0]
    assert torch.equal(vec[:3], w[[(o + k) % 37 for k in range(3)]])
    assert (o + 2) % 37 < o  # the window really wrapped
    # pooled output: the first d values of the blocks, summed over the bag
    out = module(_kjt([wrapping, 5], [7]))
    e = module.embeddings(torch.tensor([wrapping, 5]), torch.zeros(2, dtype=torch.int64))[:, :8].sum(0)
    torch.testing.assert_close(out["a"][0], e)
    eb = module.embeddings(torch.tensor([7]), torch.ones(1, dtype=torch.int64))[0, :4]
    torch.testing.assert_close(out["b"][0], eb)
    assert torch.count_nonzero(out.values()[1]) == 0  # empty bags


def test_features_and_blocks_are_salted_apart():
    module = embtable.build(FEATS, RobeConfig(size=10_007, block_size=4), seed=0)
    ids = torch.arange(50)
    a = module.offsets(ids, torch.zeros(50, dtype=torch.int64))
    b = module.offsets(ids, torch.ones(50, dtype=torch.int64))
    assert not torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])
    other = embtable.build(FEATS, RobeConfig(size=10_007, block_size=4, seed=1), seed=0)
    assert not torch.equal(a, other.offsets(ids, torch.zeros(50, dtype=torch.int64)))


def test_weighted_and_mean_pooling():
    weighted = embtable.build(FEATS, RobeConfig(size=101), is_weighted=True, seed=0)
    out = weighted(_kjt([1, 2], [3], weights=[0.5, 2.0, 3.0]))
    e = weighted.embeddings(torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64))[:, :8]
    torch.testing.assert_close(out["a"][0], 0.5 * e[0] + 2.0 * e[1])
    mean = embtable.build(FEATS, RobeConfig(size=101), pooling="mean", seed=0)
    torch.testing.assert_close(mean(_kjt([1, 2], [3]))["a"][0], e.mean(0))


def test_bytes_formula_and_planner_floor():
    # M * 4 + 48 * F * ceil(max d / Z)
    p = embtable.plan(FEATS, RobeConfig(block_size=3), budget=10_000)
    assert p.config.size == (10_000 - 48 * 2 * 3) // 4
    assert p.total_bytes == p.config.size * 4 + 48 * 2 * 3
    module = embtable.build(FEATS, RobeConfig(block_size=3), budget=10_000)
    assert embtable.memory_report(module).inference_bytes == p.total_bytes
    # every budget down to one block is feasible; below it the error names the smallest budget
    floor = 4 * 3 + 48 * 2 * 3
    assert embtable.plan(FEATS, RobeConfig(block_size=3), budget=floor).config.size == 3
    with pytest.raises(embtable.BudgetError, match=f"give a budget of at least {floor:,} bytes"):
        embtable.plan(FEATS, RobeConfig(block_size=3), budget=floor - 1)


def test_sparse_gradient_touches_only_read_values():
    module = embtable.build(FEATS, RobeConfig(size=1000, block_size=4), seed=0)
    (table,) = embtable.sparse_parameters(module)
    module(_kjt([3], [])).values().sum().backward()
    touched = table.grad.coalesce().indices()[0]
    offsets = module.offsets(torch.tensor([3]), torch.zeros(1, dtype=torch.int64))[0]
    expected = ((offsets[:, None] + torch.arange(4)) % 1000).flatten().unique()
    assert torch.equal(touched.sort().values, expected)


def test_shard_refuses_with_the_reason():
    from embtable.sharding import shard

    module = embtable.build(FEATS, RobeConfig(size=100))
    with pytest.raises(ValueError, match="replicate"):
        shard(module)


def test_init_from_weights_recovers_a_plain_table_under_the_identity_layout():
    config = RobeConfig(size=1000 * 8 + 50 * 8, block_size=8, hash_fn="identity")
    feats = [FeatureSpec("a", 1000, 8), FeatureSpec("b", 50, 8)]
    module = embtable.build(feats, config, seed=0)
    trained = {f.name: torch.randn(f.num_embeddings, 8) for f in feats}
    for name, w in trained.items():
        module.init_from_weights(name, w)
    out = module(KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([999, 3]), lengths=torch.tensor([1, 1])))
    torch.testing.assert_close(out["a"][0], trained["a"][999])
    torch.testing.assert_close(out["b"][0], trained["b"][3])
    # hashed: each value is the mean of the trained values reading it
    hashed = embtable.build(feats[:1], RobeConfig(size=64, block_size=8), seed=0)
    hashed.init_from_weights("a", torch.ones(1000, 8))
    assert torch.equal(hashed.array.weight, torch.ones(64, 1))
