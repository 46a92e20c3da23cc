"""DHE: hash encodings, bytes, planning, pooling against decode-then-pool by hand, batch independence."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtable
from embtable import DHEConfig, FeatureSpec
from embtable.hashing import hash_coefficients
from embtable.methods.dhe import decoder_bytes, dhe_encoding


def _coefficients(k):
    return torch.tensor([hash_coefficients(0, "dhe", i) for i in range(k)])


def test_encodings_have_the_papers_distributions():
    ids = torch.arange(20_000) * 7919 + 2**33  # ids above 2**33
    uniform = dhe_encoding(ids, _coefficients(32), "uniform")
    assert uniform.abs().max() <= 1 and abs(float(uniform.mean())) < 0.02
    assert abs(float(uniform.var()) - 1 / 3) < 0.02  # U(-1, 1)
    gaussian = dhe_encoding(ids, _coefficients(32), "gaussian")
    assert torch.isfinite(gaussian).all()
    assert abs(float(gaussian.mean())) < 0.02 and abs(float(gaussian.var()) - 1) < 0.03
    # neighbouring huge ids get different encodings (exact int64 hashing, no float rounding)
    pair = dhe_encoding(torch.tensor([2**33 + 6, 2**33 + 7]), _coefficients(8), "uniform")
    assert not torch.equal(pair[0], pair[1])


def test_bytes_follow_the_formula():
    feats = [FeatureSpec("u", 100_000, 16), FeatureSpec("s", 30, 16)]
    config = DHEConfig(hidden={"u": 24, "s": 0}, num_layers=3, num_hashes=32)
    plan = embtable.plan(feats, config)
    assert plan.features[0].bytes == (32 * 24 + 24 + 2 * (24 * 24 + 24) + 24 * 16 + 16) * 4
    assert plan.features[0].bytes == decoder_bytes(32, 24, 3, 16)
    assert plan.shared_bytes == {"dhe_hashes": 32 * 4 * 8}
    assert plan.features[1].bytes == 30 * 16 * 4
    module = embtable.build(feats, config)
    assert embtable.memory_report(module).inference_bytes == plan.total_bytes
    assert embtable.plan(feats, DHEConfig(hidden={"u": 0, "s": 0})).shared_bytes == {}


@pytest.mark.parametrize("budget", ["1/10", "1/100", "1/1000", "1/10000"])
def test_planner_fills_the_budget(budget):
    feats = [FeatureSpec("a", 2_000_000, 16), FeatureSpec("b", 300_000, 16), FeatureSpec("c", 5_000, 16),
             FeatureSpec("d", 40, 16)]
    plan = embtable.plan(feats, DHEConfig(), budget)
    assert plan.budget_bytes * 0.95 <= plan.total_bytes <= plan.budget_bytes
    assert plan.config.hidden["d"] == 0 and plan.config.hidden["a"] >= 1


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_pooling_equals_decode_then_pool_and_gradients_flow(pooling, weighted):
    feats = [FeatureSpec("a", 1000, 8), FeatureSpec("b", 10, 8)]
    module = embtable.build(feats, DHEConfig(hidden={"a": 6, "b": 0}, num_hashes=8, encoding="gaussian"),
                            pooling=pooling, is_weighted=weighted, seed=0)
    values = torch.tensor([3, 999, 3, 5, 1, 2])
    weights = torch.rand(6) if weighted else None
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=values, lengths=torch.tensor([2, 0, 2, 1, 0, 1]),
                            weights=weights)
    out = module(kjt)["a"]
    rows = module.decoders[0](dhe_encoding(values[:4], module.hash_coefficients, "gaussian"))
    if weighted:
        rows = rows * weights[:4, None]
    expected = torch.stack([rows[0] + rows[1], torch.zeros(8), rows[2] + rows[3]])
    if pooling == "mean":
        expected = expected / torch.tensor([2.0, 1.0, 2.0])[:, None]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.decoders.parameters())


def test_an_ids_embedding_does_not_depend_on_the_batch():
    feats = [FeatureSpec("a", 10**9, 8)]
    module = embtable.build(feats, DHEConfig(), budget="1/100000", seed=0)
    alone = module(KeyedJaggedTensor(keys=["a"], values=torch.tensor([42]), lengths=torch.tensor([1])))
    batch = module(KeyedJaggedTensor(keys=["a"], values=torch.tensor([7, 42, 10**9 - 1]),
                                     lengths=torch.tensor([1, 1, 1])))
    torch.testing.assert_close(alone.values()[0], batch.values()[1])
