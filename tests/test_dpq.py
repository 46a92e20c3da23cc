"""dpq and mgqe beyond the contract suite: packed codes, exact bytes, the serving form, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtable
from embtable import FeatureSpec
from embtable.methods.dpq import code_bits, pack_codes, packed_bytes, unpack_codes
from embtable.methods.mgqe import head_split


def kjt_for(features, batch=16, seed=0, max_len=3) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(features), batch), generator=g)
    values = [torch.randint(0, f.num_embeddings, (int(lengths[i].sum()),), generator=g) for i, f in enumerate(features)]
    return KeyedJaggedTensor(keys=[f.name for f in features], values=torch.cat(values), lengths=lengths.reshape(-1))


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_round_trip_every_bit_width(bits):
    g = torch.Generator().manual_seed(bits)
    rows, groups = 8 * 1024 + 37, 3  # several pack chunks, and a tail that is not a whole byte
    codes = torch.randint(0, 2**bits, (rows, groups), generator=g)
    codes[0] = 2**bits - 1  # all ones next to ...
    codes[1] = 0  # ... all zeros
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(rows, groups, bits)
    assert packed.numel() == -(-rows * groups * bits // 8)  # exactly packed: no padding but the last byte
    order = torch.randperm(rows, generator=g)
    assert torch.equal(unpack_codes(packed, order, groups, bits), codes[order])
    with pytest.raises(ValueError, match="bits"):
        pack_codes(codes, 17)


def test_code_bits():
    assert [code_bits(k) for k in (2, 3, 4, 5, 255, 256, 257, 65536)] == [1, 2, 2, 3, 8, 8, 9, 16]


def features(counts=True):
    rng = np.random.default_rng(0)
    out = []
    for name, n in [("a", 2000), ("b", 30), ("c", 600)]:
        out.append(FeatureSpec(name, n, 8, counts=rng.zipf(1.3, size=n) if counts else None))
    return out


@pytest.mark.parametrize("method", ["dpq", "mgqe"])
def test_bytes_formula_is_exact(method):
    feats = features()
    config = embtable.config_class(method)(num_groups={"a": 4, "c": 2}, num_centroids={"a": 100, "c": 16})
    module = embtable.build(feats, config, seed=0)
    if method == "dpq":  # ceil(n D ceil(log2 K) / 8) + K d 4; b keeps a full table
        expected = (-(-2000 * 4 * 7 // 8) + 100 * 8 * 4) + (-(-600 * 2 * 4 // 8) + 16 * 8 * 4) + 30 * 8 * 4
    else:  # head 10% at ceil(log2 K) bits, tail at ceil(log2 (K // 4)) bits, sorted head ids as int32
        expected = (-(-200 * 4 * 7 // 8) + -(-1800 * 4 * 5 // 8) + 100 * 8 * 4 + 200 * 4
                    + -(-60 * 2 * 4 // 8) + -(-540 * 2 * 2 // 8) + 16 * 8 * 4 + 60 * 4 + 30 * 8 * 4)
    assert embtable.memory_report(module).inference_bytes == expected
    assert embtable.plan(feats, config).total_bytes == expected
    # the query tables are training bytes only
    query = 2000 * 8 * 4 + 600 * 8 * 4
    assert embtable.training_bytes(module, "sgd") == expected + query


@pytest.mark.parametrize("method", ["dpq", "mgqe"])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_inference_module_equals_eval_output(method, pooling, weighted):
    feats = features()
    module = embtable.build(feats, embtable.config_class(method)(), "1/8", seed=0, pooling=pooling,
                            is_weighted=weighted)
    kjt = kjt_for(feats)
    if weighted:
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                weights=torch.rand(kjt.values().numel()))
    served = module.inference_module()
    assert not any("query" in name for name, _ in served.named_parameters())
    assert embtable.memory_report(served).inference_bytes == embtable.memory_report(module).inference_bytes
    assert embtable.training_bytes(served, "sgd") == embtable.memory_report(served).inference_bytes
    torch.testing.assert_close(served(kjt).values(), module.eval()(kjt).values(), rtol=0, atol=0)
    # and the training forward outputs the same vectors (the straight-through term adds zero)
    torch.testing.assert_close(module.train()(kjt).values(), served(kjt).values(), rtol=1e-6, atol=1e-7)


def test_codes_follow_the_query_table():
    feats = features()
    module = embtable.build(feats, embtable.DPQConfig(), "1/8", seed=0)
    q = module.quantizers[0]
    before = q.codes0.clone()
    with torch.no_grad():
        module.query_weight(q.name).copy_(q.codebook[:, 3].reshape(1, -1).expand(q.num_embeddings, -1))
    module.eval()  # the query table changed: eval() refreshes the packed codes
    assert module._codes_current()
    assert not torch.equal(q.codes0, before)
    ids = torch.arange(q.num_embeddings)
    assert (q.codes(ids) == 3).all()  # every query row is centroid 3 of every group
    packed = q.codes0.clone()
    module.train().eval()  # nothing changed: no refresh needed, codes unchanged
    assert torch.equal(q.codes0, packed)
    # a change after eval(): the eval forward quantizes the query rows instead of reading stale codes
    kjt = kjt_for(feats)
    before = module(kjt).values()
    with torch.no_grad():
        module.query_weight(q.name).copy_(q.codebook[:, 5].reshape(1, -1).expand(q.num_embeddings, -1))
    assert not module._codes_current()
    after = module(kjt).values()
    assert not torch.equal(before, after)
    assert torch.equal(module.eval()(kjt).values(), after) and module._codes_current()


@pytest.mark.parametrize("method", ["dpq", "mgqe"])
def test_training_reduces_a_toy_loss(method):
    torch.manual_seed(0)
    feats = features(counts=False)
    module = embtable.build(feats, embtable.config_class(method)(), "1/8", seed=0)
    kjt = kjt_for(feats, batch=64, seed=1)
    target = torch.randn(64, 24, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((module(kjt).values() - target) ** 2).mean()
        (loss + module.auxiliary_loss()).backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    served = module.inference_module()  # the served module gives what training reached
    assert float(((served(kjt).values() - target) ** 2).mean()) == pytest.approx(losses[-1], rel=0.2)


def test_mgqe_tail_uses_fewer_bits_and_only_its_centroids():
    feats = features()
    module = embtable.build(feats, embtable.MGQEConfig(num_groups=4, num_centroids=64), seed=0)
    q = next(q for q in module.quantizers if q.name == "a")
    (head_rows, k_head), (tail_rows, k_tail) = q.blocks
    assert (head_rows, k_head, tail_rows, k_tail) == (200, 64, 1800, 16)
    assert q.bits == (6, 4) and q.codes1.numel() == packed_bytes(1800, 4, 4)
    # the head is the 200 most counted ids (not ids 0..199: a remap is kept and counted)
    h, head_ids = head_split(feats[0], 0.1)
    top = set(np.argsort(-feats[0].counts, kind="stable")[:200].tolist())
    assert h == 200 and set(head_ids.tolist()) == top and torch.equal(q.head_ids, torch.as_tensor(head_ids))
    is_head, row, limit = q.locate(torch.arange(2000))
    assert set(torch.nonzero(is_head).squeeze(1).tolist()) == top
    assert sorted(row[is_head].tolist()) == list(range(200)) and sorted(row[~is_head].tolist()) == list(range(1800))
    codes = q.codes(torch.arange(2000))
    assert (codes[~is_head] < 16).all() and (limit[~is_head] == 16).all()
    assert (codes[is_head] >= 16).any()  # the head uses the other centroids too
    # without counts, id order is the popularity proxy: no remap
    plain = embtable.build(features(counts=False), embtable.MGQEConfig(num_groups=4, num_centroids=64), seed=0)
    assert plain.quantizers[0].head_ids is None


@pytest.mark.parametrize("budget", ["1/4", "1/8", "1/32", "1/48"])
def test_planner_fills_the_budget(budget):
    # code bits come in steps of D bits per id, so some budgets leave more than 5% (dpq at 1/16 here: 94%)
    for method in ("dpq", "mgqe"):
        plan = embtable.plan(features(), embtable.config_class(method)(), budget)
        assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes, (method, plan.table())
    minimum = embtable.plan(features(), embtable.DPQConfig(), "1/48")  # 1-bit codes: the least dpq needs
    with pytest.raises(embtable.BudgetError, match="at least"):
        embtable.plan(features(), embtable.DPQConfig(), minimum.total_bytes // 4)


def test_compress_initialises_from_the_trained_table():
    torch.manual_seed(0)
    weight = torch.randn(3000, 8)
    feats = [FeatureSpec("a", 3000, 8)]
    module = embtable.build(feats, embtable.DPQConfig(), "1/4", seed=0)
    note = module.init_from_weights("a", weight)
    assert "k-means" in note
    assert torch.equal(module.query_weight("a"), weight)
    ids = torch.arange(3000)
    q = module.quantizers[0]
    from embtable.methods.dpq import decode

    error = float(((decode(q.codes(ids), q.codebook) - weight) ** 2).mean())
    assert error < 0.5 * float(weight.pow(2).mean())  # far better than zeros
