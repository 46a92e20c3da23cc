"""PEP: the target sparsity from the budget, learned pruning that reaches it, freezing the mask, bucketed sparse
storage equal to the masked dense table."""

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
def _set_s(m, name, s):
    group, row, _, _ = m._slots[name]  # the feature's row of its dim's [features, dim] thresholds
    m.thresholds[group.key][row].fill_(s / m.config.threshold_lr_scale)  # the parameter is s / threshold_lr_scale


def _prune(m):
    m.threshold_offset.zero_()
    # thresholds that keep about 7% of a (|v| <= 1/sqrt(60)) and 25% of b (|v| <= 1/3): under the 1/3 target
    _set_s(m, "a", -2.0)  # sigmoid = 0.119
    _set_s(m, "b", -1.1)  # sigmoid = 0.250


def _build(budget="1/3", **kwargs):
    return embtable.build(FEATURES, PEPConfig(**{"check_every": 1, **kwargs}), budget=budget, seed=0)


def test_budget_sets_the_target_and_bytes_are_the_sparse_storage():
    m = _build()
    budget = embtable.as_budget("1/3").resolve(FEATURES)
    nnz = m.config.target_nnz
    assert nnz == (budget - (1 + 1) * 4) // 6  # one bucket (516 weights < 2**16): two int32 pointers
    assert embtable.memory_report(m).inference_bytes == (1 + 1) * 4 + nnz * 6 == embtable.plan(
        FEATURES, PEPConfig(), "1/3").total_bytes
    assert m.sparse_bucket_ptr.dtype == torch.int32 and m.sparse_keys.dtype == torch.int16
    # the dense tables, thresholds, masks and pressure are training bytes only
    assert embtable.training_bytes(m, "sgd") >= embtable.memory_report(m).inference_bytes + ENTRIES * 4
    with pytest.raises(embtable.BudgetError, match="give a budget of at least 14 bytes"):
        embtable.plan(FEATURES, PEPConfig(), budget=13)


def test_per_row_cost_is_tiny_so_small_budgets_fit_millions_of_rows():
    # 3.4M rows of dim 16 (the standard preset's size): 831 buckets, 3,328 bytes of pointers, 1/1000 fits
    features = [FeatureSpec(f"f{i}", 340_000, 16) for i in range(10)]
    plan = embtable.plan(features, PEPConfig(), "1/1000")
    assert plan.shared_bytes["sparse_bucket_ptr"] == (-(-3_400_000 * 16 // 65536) + 1) * 4 == 3_328
    assert plan.config.target_nnz == (plan.budget_bytes - 3_328) // 6
    with pytest.raises(embtable.BudgetError, match="give a budget of at least 3,334 bytes"):
        embtable.plan(features, PEPConfig(), budget=3_000)


def test_lookup_decodes_exactly_across_buckets():
    # 5000 x 16 = 80,000 weights: two buckets; a random half of them kept
    features = [FeatureSpec("a", 3, 4), FeatureSpec("big", 5000, 16), FeatureSpec("c", 7, 8)]
    m = embtable.build(features, PEPConfig(check_every=1), budget="1/2", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for f in features:
            m.table_weight(f.name).mul_(torch.rand(f.num_embeddings, f.embedding_dim, generator=g) < 0.3)
    m.eval()
    assert int(m.sparse_bucket_ptr[-1]) == m.nnz() <= m.config.target_nnz and m.layout.buckets == 2
    for i, f in enumerate(features):
        ids = torch.arange(f.num_embeddings)
        torch.testing.assert_close(m.sparse_rows(i, ids), m.effective_weight(f.name), rtol=0, atol=0)


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_target_reached_freezes_the_mask_and_the_sparse_buffers_serve_the_masked_table(pooling, weighted):
    m = embtable.build(FEATURES, PEPConfig(check_every=2, prune_steps=4), budget="1/3", pooling=pooling,
                       is_weighted=weighted, seed=0)
    kjt = _kjt(weighted=weighted)
    assert m.nnz() == ENTRIES, "nothing is pruned at threshold_init = -15"
    m.train_step_end(1)  # a check: the offset prunes to the schedule, 1/2 of the way: (1 - 2/4)^3 of the rest
    assert not bool(m.frozen) and m.config.target_nnz < m.nnz() <= m.scheduled_nnz(1) + 1 < ENTRIES
    m.train_step_end(2)  # not a check step (every 2nd: steps 1, 3, ...)
    assert not bool(m.frozen)
    m._set_offset(m.config.target_nnz)  # the offset the next check sets
    before = m(kjt).values().detach()
    m.train_step_end(3)
    assert bool(m.frozen)
    assert not any(s.requires_grad for s in m.thresholds.values())
    # no output jump at the freeze ("continue" keeps the pruned values)
    torch.testing.assert_close(m(kjt).values(), before)
    kept = sum(int(m.mask(n).sum()) for n in ("a", "b"))
    assert kept == m.nnz() == int(m.sparse_bucket_ptr[-1]) <= m.config.target_nnz
    # rows keep training under the mask: pruned weights stay zero
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    (m(kjt).values() ** 2).sum().backward()
    opt.step()
    assert not any(s.grad is not None and s.grad.abs().sum() > 0 for s in m.thresholds.values())
    m.train_step_end(5)
    assert m.nnz() <= kept
    serve = m.inference_module()
    assert embtable.memory_report(serve).inference_bytes == embtable.memory_report(m).inference_bytes
    assert set(dict(serve.named_buffers())) == {"sparse_values", "sparse_keys", "sparse_bucket_ptr"}
    assert not list(serve.parameters())
    torch.testing.assert_close(serve(kjt).values(), m(kjt).values(), rtol=0, atol=0)


def test_rewind_resets_kept_weights_to_their_initial_values():
    m = _build(retrain="rewind", prune_steps=0)
    init = m.table_weight("a").detach().clone()
    with torch.no_grad():
        m.table_weight("a").add_(0.01)
    m.train_step_end(0)  # prune_steps=0: the first check prunes to the target
    assert bool(m.frozen)
    mask = m.mask("a")
    assert torch.equal(m.table_weight("a"), init * mask)


def test_eval_fills_the_sparse_buffers_keeping_the_largest_weights_before_the_target():
    m = _build()
    kjt = _kjt()
    m.eval()  # not frozen, nothing pruned: the buffers keep the target_nnz largest |weights|
    assert int(m.sparse_bucket_ptr[-1]) == m.config.target_nnz
    w = torch.cat([m.effective_weight(n).flatten() for n in ("a", "b")]).abs()
    smallest_kept = m.sparse_values.abs().min()
    assert int((w > smallest_kept).sum()) < m.config.target_nnz
    out = m.inference_module()(kjt).values()
    assert out.shape == (16, 12) and torch.isfinite(out).all()


def _train(m, steps, seed=0):
    """Adam at the trainer's dense lr (1e-3) on the thresholds, SGD on the rows, a regression task."""
    torch.manual_seed(seed)
    kjt = _kjt(batch=32, seed=seed)
    target = torch.randn(32, 12)
    tables = [t.weight for t in m.tables.values()]
    sgd, adam = torch.optim.SGD(tables, lr=0.5), torch.optim.Adam(m.thresholds.parameters(), lr=1e-3)
    m.train()
    nnz = []
    for step in range(steps):
        sgd.zero_grad(), adam.zero_grad()
        ((m(kjt).values() - target) ** 2).mean().backward()
        sgd.step(), adam.step()
        m.train_step_end(step)
        nnz.append(m.nnz())
        if bool(m.frozen):
            break
    return nnz


def test_offset_follows_the_schedule_and_the_learned_thresholds_choose_what_is_pruned():
    m = _build(budget="1/8", prune_steps=40, check_every=5)
    s0 = torch.cat([m.threshold(n) for n in ("a", "b")]).detach()
    nnz = _train(m, 100)
    # frozen at the first check where the schedule is at the target (here at 35 of the 40 steps)
    assert bool(m.frozen) and 30 < len(nnz) <= 40 and nnz[-1] <= m.config.target_nnz
    for step in (4, 9, 19, 29):  # each check prunes to the schedule (ties aside), from all weights down
        assert m.scheduled_nnz(step) - 3 <= nnz[step] <= m.scheduled_nnz(step) + 1
    assert nnz[4] > nnz[9] > nnz[19] > nnz[29] > nnz[-1]
    # the task loss moved the thresholds, differently per feature and dim (threshold_lr_scale: 30x Adam's step)
    moved = (torch.cat([m.threshold(n) for n in ("a", "b")]).detach() - s0).abs()
    assert moved.max() > 0.3 and moved.max() - moved.min() > 0.1, moved
    assert not any(s.requires_grad for s in m.thresholds.values())


def test_features_of_one_dim_train_as_one_flat_table_and_match_a_per_feature_forward():
    # dims interleaved (8, 4, 8): two flat tables, the pooled columns back in feature order
    features = [FeatureSpec("a", 30, 8), FeatureSpec("b", 9, 4), FeatureSpec("c", 20, 8)]
    m = embtable.build(features, PEPConfig(check_every=1), budget="1/3", is_weighted=True, seed=0)
    assert {k: tuple(t.weight.shape) for k, t in m.tables.items()} == {"dim8": (50, 8), "dim4": (9, 4)}
    assert {k: tuple(p.shape) for k, p in m.thresholds.items()} == {"dim8": (2, 8), "dim4": (1, 4)}
    with torch.no_grad():
        for i, f in enumerate(features):
            g, row, _, _ = m._slots[f.name]
            m.thresholds[g.key][row].copy_((torch.linspace(-3.0, -2.0, f.embedding_dim) + 0.5 * i) / 30)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (3 * 8,), generator=g)
    counts = lengths.view(3, -1).sum(1).tolist()
    values = torch.cat([torch.randint(0, f.num_embeddings, (c,), generator=g) for f, c in zip(features, counts)])
    weights = torch.rand(values.numel(), generator=g)
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=values, lengths=lengths, weights=weights)
    ref = []
    for f, ids, w, lens in zip(features, values.split(counts), weights.split(counts), lengths.view(3, -1)):
        rows = m.effective_weight(f.name)[ids]
        ref.append(torch.nn.functional.embedding_bag(torch.arange(len(ids)), rows, torch.cumsum(lens, 0) - lens,
                                                     mode="sum", per_sample_weights=w))
    out = m(kjt).values()
    torch.testing.assert_close(out, torch.cat(ref, dim=1), rtol=1e-6, atol=1e-7)
    out.sum().backward()  # the thresholds of every feature learn from their own ids' rows only
    assert all(p.grad.abs().sum(1).gt(0).all() for p in m.thresholds.values())
    assert m.tables["dim8"].weight.grad.shape == (50, 8)


@pytest.mark.parametrize("k", [1, 2, 111_000, 299_999, 300_000])
def test_bracketed_selection_equals_kthvalue(k):
    from embtable.methods.pep import _kth_smallest_pair

    g = torch.Generator().manual_seed(k)
    x = torch.randn(300_000, generator=g).round(decimals=2)  # many ties; two pieces of the passes
    x[torch.randint(0, x.numel(), (500,), generator=g)] = -float("inf")  # pruned-to-zero weights: logit(0)
    low, high = _kth_smallest_pair(x, k)
    assert low == torch.kthvalue(x, k).values and high == torch.kthvalue(x, min(k + 1, x.numel())).values
    ordered = torch.sort(x).values  # the sample brackets: a pattern sorted by position selects the same
    assert _kth_smallest_pair(ordered, k)[0] == ordered[k - 1]
