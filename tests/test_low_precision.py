"""low_precision: int8/int4 rows with stochastic rounding updated in train_step_end, fp16 rows, hashing."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtable
from embtable import FeatureSpec, LowPrecisionConfig
from embtable.methods.low_precision import QuantizedRows, stochastic_round

FEATURES = [FeatureSpec("a", 40, 6), FeatureSpec("b", 7, 5)]


def _kjt(batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randint(0, f.num_embeddings, (batch,), generator=g) for f in FEATURES]
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.cat(values), lengths=torch.ones(2 * batch, dtype=torch.int64))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("learned", [True, False])
def test_round_trip_error_is_within_half_a_step(bits, learned):
    q = QuantizedRows(50, 7, bits, learned)
    x = torch.randn(50, 7)
    q.init_rows_(torch.arange(50), x)
    with torch.no_grad():
        y = q.dequantize(torch.arange(50))
    step = q.log_step.weight.exp() if learned else q.scale[:, None]
    assert ((y - x).abs() <= step / 2 + 1e-6).all()
    if learned:  # the largest |value| of each row is exact (code Z - 1 or 1 = -(Z - 1) + Z)
        torch.testing.assert_close(y.abs().max(1).values, x.abs().max(1).values, rtol=1e-6, atol=1e-6)
    else:  # each row's min and max are exact (codes 0 and 2**bits - 1)
        torch.testing.assert_close(y.min(1).values, x.min(1).values)
        torch.testing.assert_close(y.max(1).values, x.max(1).values, rtol=1e-6, atol=1e-6)
    assert q.codes.shape == (50, 7 if bits == 8 else 4) and q.codes.dtype == torch.uint8


def test_int4_packing_is_exact():
    q = QuantizedRows(10, 5, 4)
    codes = torch.randint(0, 16, (10, 5))
    packed = q.pack(codes)
    assert packed.shape == (10, 3)
    assert torch.equal(q.unpack(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.1, 2.5, -1.7, 3.0])
    mean = stochastic_round(x.expand(4000, 4), g).mean(0)
    torch.testing.assert_close(mean, x, atol=0.03, rtol=0)
    # quantized rows: the mean of many stochastic write-backs is the value, to far below one step
    q = QuantizedRows(4000, 6, 8, learned=False)  # the same row written back 4000 times, independently
    row = torch.tensor([[0.0, 0.3, 0.301, 0.7, 0.95, 1.0]])
    q.quantize_(torch.arange(4000), row.expand(4000, 6), torch.Generator().manual_seed(0))
    step = 1 / 255
    assert ((q.dequantize(torch.arange(4000)).mean(0) - row[0]).abs() < 0.1 * step).all()
    q = QuantizedRows(1, 6, 8, learned=False)
    q.quantize_(torch.tensor([0]), row)  # nearest: a biased single value (0.301 is 76.755 steps)
    assert (q.dequantize(torch.tensor([0])) - row).abs().max() > 0.1 * step


@pytest.mark.parametrize("precision,optimizer,step_size", [
    ("int8", "sgd", "learned"), ("int4", "sgd", "learned"), ("int8", "rowwise_adagrad", "fit"), ("int4", "sgd", "fit"),
])
def test_training_reduces_loss_and_touches_only_looked_up_rows(precision, optimizer, step_size):
    config = LowPrecisionConfig(precision=precision, lr=0.5, optimizer=optimizer, step_size=step_size)
    m = embtable.build(FEATURES, config, seed=0)
    params = embtable.sparse_parameters(m)  # the learned steps, trained by the trainer's sparse optimizer
    assert len(params) == (2 if step_size == "learned" else 0) == len(list(m.parameters()))
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    kjt = _kjt()
    target = torch.linspace(-1, 1, 11)
    before = {n: b.clone() for n, b in m.state_dict().items()}
    losses = []
    for step in range(30):
        loss = ((m(kjt).values() - target) ** 2).sum(1).mean()
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad()
        m.train_step_end(step)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses
    used = torch.unique(kjt["a"].values())
    after = m.state_dict()
    changed = (after["rows.a.codes"] != before["rows.a.codes"]).any(1)
    for key in ("rows.a.log_step.weight", "rows.a.scale", "rows.a.bias"):
        if key in after:
            changed |= (after[key] != before[key]).reshape(40, -1).any(1)
    assert changed[used].all() and not changed[~torch.isin(torch.arange(40), used)].any()
    assert not m._pending
    # eval / no_grad records nothing
    with torch.no_grad():
        m(kjt)
    m.eval()
    m(kjt)
    assert not m._pending


def test_fp16_rows_train_with_a_sparse_optimizer():
    m = embtable.build(FEATURES, LowPrecisionConfig(precision="fp16"), seed=0)
    assert all(p.dtype == torch.float16 for p in m.parameters())
    assert embtable.memory_report(m).inference_bytes == 40 * 6 * 2 + 7 * 5 * 2 + 2 * 48
    opt = torch.optim.SGD(embtable.sparse_parameters(m), lr=2.0)
    kjt, target = _kjt(), torch.linspace(-1, 1, 11)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = m(kjt).values()
        assert out.dtype == torch.float32
        loss = ((out - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0]


def test_planner_uses_the_precision_first_then_hashes():
    feats = [FeatureSpec("u", 10_000, 16), FeatureSpec("c", 100, 16)]
    full = sum(f.full_table_bytes for f in feats)
    p = embtable.plan(feats, LowPrecisionConfig(precision="int8"), budget="1/2")  # int8 rows: 20/64 of fp32
    assert [f.rows for f in p.features] == [10_000, 100]
    assert p.total_bytes == 10_100 * 20 + 2 * 48 <= full // 2
    p = embtable.plan(feats, LowPrecisionConfig(precision="int4", step_size="fit"), budget="1/16")  # 16 B a row
    assert p.features[0].rows < 10_000 and p.total_bytes >= 0.99 * p.budget_bytes
    m = embtable.build(feats, LowPrecisionConfig(precision="int4", step_size="fit"), budget="1/16")
    assert embtable.memory_report(m).inference_bytes == p.total_bytes == sum(f.rows for f in p.features) * 16 + 96
    m = embtable.build(feats, LowPrecisionConfig(precision="int4"), budget="1/16")  # learned step: 12 B a row
    rows = sum(t.codes.shape[0] for t in m.rows.values())
    assert embtable.memory_report(m).inference_bytes == rows * 12 + 96
    with pytest.raises(embtable.BudgetError, match="one int8 row per feature"):
        embtable.plan(feats, LowPrecisionConfig(), budget=100)


def test_shard_refuses_quantized_rows():
    from embtable.sharding import shard

    m = embtable.build(FEATURES, LowPrecisionConfig(precision="int8"))
    with pytest.raises(ValueError, match="DMP cannot shard"):
        shard(m)
    assert embtable.build(FEATURES, LowPrecisionConfig(precision="fp32")).sharding_unsupported is None


@pytest.mark.parametrize("precision,step_size", [("int8", "learned"), ("int4", "fit"), ("fp16", "learned")])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_vectorised_lookup_equals_a_per_feature_reference(precision, step_size, pooling, weighted):
    """Features of interleaved dims (6, 5, 6) are looked up per dim group; each feature's pooled vector is
    exactly its own rows dequantized and pooled alone (bitwise), and train_step_end still gets every
    feature's row gradients."""
    feats = [FeatureSpec("a", 40, 6), FeatureSpec("b", 7, 5), FeatureSpec("c", 30, 6)]
    m = embtable.build(feats, LowPrecisionConfig(precision=precision, step_size=step_size), seed=0,
                       pooling=pooling, is_weighted=weighted)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([2, 0, 1, 3, 1, 1, 0, 2, 4])  # 3 features x 3 bags, empty bags included
    values = torch.cat([torch.randint(0, f.num_embeddings, (int(n),), generator=g)
                        for f, n in zip(feats, lengths.view(3, 3).sum(1))])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=values, lengths=lengths, weights=weights)
    out = m(kjt).values()
    expected, start = [], 0
    for i, f in enumerate(feats):
        n = int(lengths[3 * i:3 * i + 3].sum())
        ids = values[start:start + n]
        rows = (m.storage.embedding_bags[f.name].weight[ids].float() if precision == "fp16" else m.rows[f.name].dequantize(ids))
        w = None if weights is None else weights[start:start + n]
        offsets = torch.cumsum(lengths[3 * i:3 * i + 3], 0) - lengths[3 * i:3 * i + 3]
        expected.append(torch.nn.functional.embedding_bag(torch.arange(n), rows, offsets, mode=pooling,
                                                          per_sample_weights=w))
        start += n
    assert out.shape == (3, 17)
    assert torch.equal(out, torch.cat(expected, 1))
    if precision != "fp16":
        before = m.rows["c"].codes.clone()
        (out * torch.arange(17.0)).sum().backward()
        m.train_step_end(0)
        touched = torch.unique(values[int(lengths[:6].sum()):])
        changed = (m.rows["c"].codes != before).any(1)
        assert not changed[~torch.isin(torch.arange(30), touched)].any() and changed.any()
