"""PEP: the target sparsity from the budget, freezing the mask, CSR storage equal to the masked dense table."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtable
from embtable import FeatureSpec, PEPConfig

FEATURES = [FeatureSpec("a", 60, 8), FeatureSpec("b", 9, 4)]
ENTRIES = 60 * 8 + 9 * 4


def _kjt(batch=16, seed=0, weighted=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (2 * batch,), generator=g)
    counts = lengths.view(2, -1).sum(1).tolist()
    values = torch.cat([torch.randint(0, f.num_embeddings, (c,), generator=g) for f, c in zip(FEATURES, counts)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=["a", "b"], values=values, lengths=lengths, weights=weights)


@torch.no_grad()
def _prune(m):
    # thresholds that keep about 7% of a (|v| <= 1/sqrt(60)) and 25% of b (|v| <= 1/3): under the 1/3 target
    m.thresholds["a"].fill_(-2.0)  # sigmoid = 0.119
    m.thresholds["b"].fill_(-1.1)  # sigmoid = 0.250


def _build(budget="1/3", **kwargs):
    return embtable.build(FEATURES, PEPConfig(check_every=1, **kwargs), budget=budget, seed=0)


def test_budget_sets_the_target_and_bytes_are_the_csr_storage():
    m = _build()
    budget = embtable.as_budget("1/3").resolve(FEATURES)
    nnz = m.config.target_nnz
    assert nnz == (budget - (69 + 1) * 4) // 5
    assert embtable.memory_report(m).inference_bytes == (69 + 1) * 4 + nnz * 5 == embtable.plan(
        FEATURES, PEPConfig(), "1/3").total_bytes
    assert m.csr_row_ptr.dtype == torch.int32 and m.csr_columns.dtype == torch.uint8
    # the dense tables, thresholds and masks are training bytes only
    assert embtable.training_bytes(m, "sgd") >= embtable.memory_report(m).inference_bytes + ENTRIES * 4
    with pytest.raises(embtable.BudgetError, match="give a budget of at least 285 bytes"):
        embtable.plan(FEATURES, PEPConfig(), budget=284)


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_target_reached_freezes_the_mask_and_csr_serves_the_masked_table(pooling, weighted):
    m = embtable.build(FEATURES, PEPConfig(check_every=2), budget="1/3", pooling=pooling, is_weighted=weighted, seed=0)
    kjt = _kjt(weighted=weighted)
    m.train_step_end(1)
    assert not bool(m.frozen), "nothing is pruned at threshold_init = -15"
    _prune(m)
    assert m.nnz() <= m.config.target_nnz
    m.train_step_end(2)  # not a check step (every 2nd: steps 1, 3, ...)
    assert not bool(m.frozen)
    before = m(kjt).values().detach()
    m.train_step_end(3)
    assert bool(m.frozen)
    assert not any(s.requires_grad for s in m.thresholds.values())
    # no output jump at the freeze ("continue" keeps the pruned values)
    torch.testing.assert_close(m(kjt).values(), before)
    kept = sum(int(m.masks.get_buffer(n).sum()) for n in ("a", "b"))
    assert kept == m.nnz() == int(m.csr_row_ptr[-1]) <= m.config.target_nnz
    # rows keep training under the mask: pruned weights stay zero
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    (m(kjt).values() ** 2).sum().backward()
    opt.step()
    assert not any(s.grad is not None and s.grad.abs().sum() > 0 for s in m.thresholds.values())
    m.train_step_end(5)
    assert m.nnz() <= kept
    serve = m.inference_module()
    assert embtable.memory_report(serve).inference_bytes == embtable.memory_report(m).inference_bytes
    assert set(dict(serve.named_buffers())) == {"csr_values", "csr_columns", "csr_row_ptr"}
    assert not list(serve.parameters())
    torch.testing.assert_close(serve(kjt).values(), m(kjt).values(), rtol=0, atol=0)


def test_rewind_resets_kept_weights_to_their_initial_values():
    m = _build(retrain="rewind")
    init = m.tables["a"].weight.detach().clone()
    with torch.no_grad():
        m.tables["a"].weight.add_(0.01)
    _prune(m)
    m.train_step_end(0)
    assert bool(m.frozen)
    mask = m.masks.get_buffer("a")
    assert torch.equal(m.tables["a"].weight, init * mask)


def test_eval_fills_csr_keeping_the_largest_weights_before_the_target():
    m = _build()
    kjt = _kjt()
    m.eval()  # not frozen, nothing pruned: the CSR keeps the target_nnz largest |weights|
    assert int(m.csr_row_ptr[-1]) == m.config.target_nnz
    w = torch.cat([m.effective_weight(n).flatten() for n in ("a", "b")]).abs()
    smallest_kept = m.csr_values.abs().min()
    assert int((w > smallest_kept).sum()) < m.config.target_nnz
    out = m.inference_module()(kjt).values()
    assert out.shape == (16, 12) and torch.isfinite(out).all()


def test_thresholds_learn_and_prune_a_toy_problem():
    """Trained by the loss alone, with a threshold init high enough to move, the thresholds prune weights."""
    m = embtable.build(FEATURES, PEPConfig(check_every=1, threshold_init=-4.0), budget="1/2", seed=0)
    opt = torch.optim.Adam(m.parameters(), lr=0.2)
    kjt = _kjt(batch=32)
    target = torch.zeros(32, 12)  # zero targets: pruning helps
    for step in range(60):
        opt.zero_grad()
        ((m(kjt).values() - target) ** 2).sum().backward()
        opt.step()
        m.train_step_end(step)
        if bool(m.frozen):
            break
    assert bool(m.frozen) and m.nnz() <= m.config.target_nnz
