"""CAFE specifics: the HotSketch, migration with the current vectors, resume equality, bytes."""

from __future__ import annotations

import io

import torch
from torchrec import KeyedJaggedTensor

import embtable
from embtable import CafeConfig, FeatureSpec

FEATS = [FeatureSpec("a", 1000, 4), FeatureSpec("b", 50, 4)]
SMALL = dict(hot_rows=8, hash_rows={"a": 16, "b": 50})  # b stays full


def _kjt(a_ids, b_ids=(), a_lengths=None):
    a_lengths = a_lengths or [len(a_ids)]
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor(list(a_ids) + list(b_ids), dtype=torch.int64),
                             lengths=torch.tensor(a_lengths + [len(b_ids)] + [0] * (len(a_lengths) - 1)))


def _build(seed=0, **kw):
    return embtable.build(FEATS, CafeConfig(**{**SMALL, **kw}), seed=seed)


def _sketch(module):
    keys, scores = module.sketch_keys.reshape(-1), module.sketch_scores.reshape(-1)
    return {int(k): float(s) for k, s in zip(keys, scores) if k >= 0}


def test_sketch_records_each_ids_gradient_norm():
    module = _build()
    module.train()
    out = module(_kjt([3, 5, 5], [7], a_lengths=[2, 1])).values()  # bags: a:[3, 5], a:[5]; b:[7] in sample 0
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    n0, n1 = upstream[0, :4].norm().item(), upstream[1, :4].norm().item()
    got = _sketch(module)
    assert set(got) == {3, 5}  # feature b is full: not tracked
    assert abs(got[3] - n0) < 1e-5 and abs(got[5] - (n0 + n1)) < 1e-5
    # eval mode records nothing
    module.eval()
    module(_kjt([9])).values().sum().backward()
    assert set(_sketch(module)) == {3, 5}


def test_space_saving_bucket_replaces_the_lowest_score():
    module = embtable.build(FEATS, CafeConfig(hot_rows=1, hash_rows={"a": 4, "b": 50},
                                              sketch_slots=2, bucket_size=2))
    assert module.sketch_keys.shape == (1, 2)
    feature = torch.zeros(2, dtype=torch.int64)
    module.update_sketch(torch.tensor([10, 11]), torch.tensor([5.0, 3.0]), feature)
    module.update_sketch(torch.tensor([12, 10]), torch.tensor([1.0, 2.0]), feature)
    # 12 evicts 11 (the lowest, 3.0) and inherits its score: 3 + 1; 10 adds 2
    assert _sketch(module) == {10: 7.0, 12: 4.0}


def test_migration_keeps_outputs_and_gives_exclusive_rows():
    module = _build(migrate_every=2)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    probe = _kjt(list(range(40)), a_lengths=[1] * 40)
    for step in range(2):
        ids = torch.randint(0, 1000, (30,), generator=g).tolist() + [1, 1, 2, 2, 2]
        opt.zero_grad()
        module(_kjt(ids)).values().square().sum().backward()
        opt.step()
        before = module(probe).values().detach()
        module.train_step_end(step)
    hot = module.hot_ids("a")
    assert hot.numel() == 8 and {1, 2} <= set(hot.tolist())
    # the 8 highest scores of the sketch are the hot ids
    sketch = _sketch(module)
    assert set(hot.tolist()) == set(sorted(sketch, key=lambda k: (-sketch[k], k))[:8])
    # migration copied each hot id's current (hashed) vector: no output changed
    assert torch.equal(module(probe).values(), before)
    feature = torch.zeros(hot.numel(), dtype=torch.int64)
    rows = module.rows(hot, feature)
    assert sorted(rows.tolist()) == list(range(8))  # each its own row in [0, H)
    cold = torch.tensor([i for i in range(1000) if i not in set(hot.tolist())][:50])
    assert (module.rows(cold, torch.zeros(50, dtype=torch.int64)) >= 8).all()
    # an update to a hot id now touches its exclusive row only
    opt.zero_grad()
    probe_before = module(probe).values().detach()
    module(_kjt([1])).values().sum().backward()
    opt.step()
    changed = (module(probe).values().detach() != probe_before).any(dim=1)
    assert changed.nonzero()[:, 0].tolist() == [1]


def test_hot_set_follows_importance_and_frees_rows():
    module = _build(migrate_every=1, decay=0.5)
    module.train()
    module(_kjt(list(range(100, 108)))).values().sum().backward()
    module.train_step_end(0)
    assert module.hot_ids("a").tolist() == list(range(100, 108))
    for _ in range(3):  # a new set of ids with much larger gradients
        (module(_kjt(list(range(200, 204)))).values().sum() * 100).backward()
        module.train_step_end(0)
    hot = set(module.hot_ids("a").tolist())
    assert set(range(200, 204)) <= hot and len(hot) == 8
    left = [i for i in range(100, 108) if i not in hot]
    assert len(left) == 4
    assert (module.rows(torch.tensor(left), torch.zeros(4, dtype=torch.int64)) >= 8).all()
    slots = module.hot_slots[: 8]
    assert sorted(slots.tolist()) == list(range(8))  # freed rows were reused, none duplicated


def _train(module, opt, steps, start):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + step)  # the same batches whether resumed or not
        ids = (torch.randint(0, 1000, (24,), generator=g) ** 2 // 1000).tolist()  # skewed
        opt.zero_grad()
        module(_kjt(ids, [3], a_lengths=[12, 12])).values().square().sum().backward()
        opt.step()
        module.train_step_end(step)


def test_resumed_run_equals_uninterrupted():
    uninterrupted = _build(migrate_every=3, decay=0.9)
    uninterrupted.train()
    opt = torch.optim.Adagrad(uninterrupted.parameters(), lr=0.1)
    _train(uninterrupted, opt, 10, 0)

    first = _build(migrate_every=3, decay=0.9)
    first.train()
    opt1 = torch.optim.Adagrad(first.parameters(), lr=0.1)
    _train(first, opt1, 5, 0)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = _build(seed=7, migrate_every=3, decay=0.9)  # other initial weights: all comes from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed.train()
    opt2 = torch.optim.Adagrad(resumed.parameters(), lr=0.1)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 5, 5)

    assert "sketch_keys" in saved["model"] and "sketch_scores" in saved["model"]
    assert uninterrupted.hot_ids("a").numel() > 0
    a, b = uninterrupted.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bytes_formula_inference_and_training():
    module = _build(sketch_slots=3, bucket_size=4)
    # per feature m * d * 4 + 64 (b is full: m = n = 50), the pool H * (d * 4 + 16)
    inference = (8 + 16) * 4 * 4 + 16 * 8 + 64 + 50 * 4 * 4 + 64
    assert embtable.memory_report(module).inference_bytes == inference
    assert embtable.plan(FEATS, CafeConfig(**SMALL, sketch_slots=3)).total_bytes == inference
    # the sketch is training only: ceil(3 * 8 / 4) = 6 buckets x 4 slots x 12 bytes + 48 per feature
    assert embtable.training_bytes(module, "sgd") == inference + 6 * 4 * 12 + 2 * 48
    assert "sketch_keys" not in embtable.memory_report(module).tensors


def test_planner_splits_bytes_by_hot_fraction():
    feats = [FeatureSpec("big", 100_000, 16), FeatureSpec("small", 100, 16)]
    for fraction in (0.0, 0.25, 0.5):
        p = embtable.plan(feats, CafeConfig(hot_fraction=fraction), "1/100")
        hot, hashed = p.config.hot_rows, p.config.hash_rows["big"]
        assert p.config.hash_rows["small"] == 100
        hot_bytes = hot * (16 * 4 + 16)
        assert abs(hot_bytes / (hot_bytes + hashed * 64) - fraction) < 0.01
        assert 0.99 * p.budget_bytes <= p.total_bytes <= p.budget_bytes


def test_initial_hot_set_from_counts():
    import numpy as np

    counts = np.zeros(1000, dtype=np.int64)
    counts[[5, 900, 17]] = [50, 40, 30]
    feats = [FeatureSpec("a", 1000, 4, counts=counts), FeatureSpec("b", 50, 4)]
    module = embtable.build(feats, CafeConfig(hot_rows=2, hash_rows={"a": 16, "b": 50}))
    assert module.hot_ids("a").tolist() == [5, 900]
    assert sorted(module.rows(torch.tensor([5, 900]), torch.zeros(2, dtype=torch.int64)).tolist()) == [0, 1]
    assert module.rows(torch.tensor([17]), torch.zeros(1, dtype=torch.int64)).item() >= 2
    cold = embtable.build(feats, CafeConfig(hot_rows=2, hash_rows={"a": 16, "b": 50},
                                            hot_from_counts=False))
    assert cold.hot_ids("a").numel() == 0


def test_init_from_weights_copies_hot_rows_and_averages_hashed_ones():
    import numpy as np

    counts = np.zeros(1000, dtype=np.int64)
    counts[[5, 900]] = [50, 40]
    feats = [FeatureSpec("a", 1000, 4, counts=counts), FeatureSpec("b", 50, 4)]
    module = embtable.build(feats, CafeConfig(hot_rows=2, hash_rows={"a": 16, "b": 50}))
    trained = {"a": torch.randn(1000, 4), "b": torch.randn(50, 4)}
    for name, w in trained.items():
        module.init_from_weights(name, w)
    out = module(KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([5, 900, 7]), lengths=torch.tensor([1, 1, 1, 0])))
    torch.testing.assert_close(out["a"], trained["a"][[5, 900]])  # hot ids: their own trained rows
    torch.testing.assert_close(out["b"][0], trained["b"][7])  # full feature: copied
    cold = torch.tensor([i for i in range(1000) if i not in (5, 900)])
    rows = module.rows(cold, torch.zeros(cold.numel(), dtype=torch.int64))
    r = int(rows[0])
    expected = trained["a"][cold[rows == r]].mean(0)
    torch.testing.assert_close(module.storage.embedding_bags[module.table_names[0]].weight[r].detach(), expected)


def test_migration_with_fused_storage_keeps_outputs():
    # the trainer fuses the storage into FBGEMM's TBE by default: migration writes the kernel's rows
    from embtable.fused import fuse_storage

    module = _build(migrate_every=1)
    assert fuse_storage(module, "sgd", lr=0.1) > 0
    module.train()
    probe = _kjt(list(range(40)), a_lengths=[1] * 40)
    module(_kjt([1, 1, 2, 2, 2, 3])).values().square().sum().backward()  # the kernel updates in backward
    before = module(probe).values().detach()
    module.train_step_end(0)
    assert {1, 2} <= set(module.hot_ids("a").tolist())
    assert torch.equal(module(probe).values(), before)


def test_one_hot_pool_shared_by_features_ranked_together():
    feats = [FeatureSpec("a", 1000, 4), FeatureSpec("c", 500, 4), FeatureSpec("b", 50, 4)]
    module = embtable.build(feats, CafeConfig(hot_rows=4, hash_rows={"a": 16, "c": 8, "b": 50},
                                              migrate_every=1, multiplex=False))
    # a and c share one table: 4 hot rows, then a's 16 and c's 8 hashed rows; b keeps its own
    assert [c.num_embeddings for c in module.storage.embedding_bag_configs()] == [28, 50]
    module.train()
    kjt = KeyedJaggedTensor(keys=["a", "c", "b"], values=torch.tensor([1, 2, 3, 7, 8, 9]),
                            lengths=torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0]))  # 3 samples: a, a, a | c, c, c
    upstream = torch.zeros(3, 12)
    upstream[:, 4:8] = torch.tensor([[5.0], [4.0], [3.0]])  # c's ids get the large gradients
    upstream[:, 0:4] = torch.tensor([[2.0], [0.5], [0.1]])
    (module(kjt).values() * upstream).sum().backward()
    module.train_step_end(0)
    assert module.hot_ids("c").tolist() == [7, 8, 9] and module.hot_ids("a").tolist() == [1]
    rows = module.rows(torch.tensor([7, 8, 9, 1, 2]), torch.tensor([1, 1, 1, 0, 0]))
    assert sorted(rows[:4].tolist()) == [0, 1, 2, 3] and 4 <= rows[4] < 20  # a's hashed segment: rows 4..19
    assert (module.rows(torch.arange(500), torch.ones(500, dtype=torch.int64)) < 28).all()


def test_normalized_scores_average_one_per_feature_and_batch():
    module = _build(normalize_scores=True)
    module.train()
    out = module(_kjt([3, 5, 5, 9], a_lengths=[2, 2])).values()
    (out * torch.randn_like(out) * 1000).sum().backward()
    got = _sketch(module)
    assert abs(sum(got.values()) - 4.0) < 1e-4  # 4 ids of feature a: their scores sum to 4


def test_migration_copies_the_fused_optimizer_state():
    from embtable.fused import fuse_storage

    for state, expect in (("copy", "source"), ("reset", "zero"), ("keep", "old")):
        module = _build(migrate_every=1, optimizer_state=state)
        fuse_storage(module, "rowwise_adagrad", lr=0.1)
        module.train()
        accumulator = module.storage.optimizer_states()[module.table_names[0] + ".momentum_1"]
        module(_kjt([1, 1, 2, 2, 2])).values().square().sum().backward()  # a's hashed rows of 1 and 2 update
        source = module.rows(torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64))
        with torch.no_grad():
            accumulator[:8] = 7.0  # what the hot rows' previous holders left
        expected = {"source": accumulator[source].clone(), "zero": torch.zeros(2), "old": torch.full((2,), 7.0)}
        assert (expected["source"] > 0).all()
        module.train_step_end(0)
        hot = module.rows(torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64))
        assert (hot < 8).all()
        torch.testing.assert_close(accumulator[hot], expected[expect])


def test_planner_hashed_rows_in_proportion_and_pools_per_dim():
    feats = [FeatureSpec("x", 40_000, 8), FeatureSpec("y", 10_000, 8), FeatureSpec("z", 20_000, 16),
             FeatureSpec("tiny", 10, 8)]
    p = embtable.plan(feats, CafeConfig(), "1/50")
    m = p.config.hash_rows
    assert m["tiny"] == 10 and abs(m["x"] / m["y"] - 4) < 0.1
    assert set(p.config.hot_rows) == {8, 16} and min(p.config.hot_rows.values()) > 0  # one pool per dim
    assert 0.95 * p.budget_bytes <= p.total_bytes <= p.budget_bytes
    module = embtable.build(feats, CafeConfig(), "1/50")
    assert embtable.memory_report(module).inference_bytes == p.total_bytes
    uniform = embtable.plan(feats, CafeConfig(hash_split="uniform"), "1/50").config.hash_rows
    assert abs(uniform["x"] - uniform["y"]) <= 1


def test_multiplex_hashes_every_feature_into_all_hashed_rows_at_the_same_bytes():
    feats = [FeatureSpec("a", 1000, 4), FeatureSpec("c", 500, 4), FeatureSpec("b", 50, 4)]
    sizes = dict(hot_rows=4, hash_rows={"a": 16, "c": 8, "b": 50})
    own, mux = (embtable.build(feats, CafeConfig(**sizes, multiplex=m, hot_from_counts=False)) for m in (False, True))
    a, c = torch.arange(1000), torch.arange(500)
    zeros, ones = torch.zeros(1000, dtype=torch.int64), torch.ones(500, dtype=torch.int64)
    assert set(own.rows(a, zeros).tolist()) == set(range(4, 20)) and set(own.rows(c, ones).tolist()) == set(range(20, 28))
    assert set(mux.rows(a, zeros).tolist()) == set(range(4, 28)) == set(mux.rows(c, ones).tolist())
    assert embtable.memory_report(mux).inference_bytes == embtable.memory_report(own).inference_bytes
    assert embtable.plan(feats, CafeConfig(**sizes, multiplex=True)).total_bytes == embtable.memory_report(mux).inference_bytes


MEDIUM = dict(hot_rows=2, medium_ids=3, hash_rows={"a": 16, "b": 50}, hot_from_counts=False, migrate_every=1)


def _migrate_to(module, scores):
    module.update_sketch(torch.tensor(list(scores)), torch.tensor(list(scores.values()), dtype=torch.float32),
                         torch.zeros(len(scores), dtype=torch.int64))
    module.migrate()


def test_medium_ids_read_the_sum_of_two_hashed_rows_at_exact_bytes():
    module = embtable.build(FEATS, CafeConfig(**MEDIUM))
    _migrate_to(module, {10: 5.0, 11: 4.0, 12: 3.0, 13: 2.0, 14: 1.0})
    assert module.hot_ids("a").tolist() == [10, 11] and module.medium_keys.tolist() == [12, 13, 14]
    ids = torch.tensor([10, 12, 13, 14, 20])
    feature = torch.zeros(5, dtype=torch.int64)
    first, second = module.rows(ids, feature), module.second_rows(ids, feature)
    hashed = range(2, 2 + 16)  # H = 2 hot rows, then the 16 hashed rows, then the zero row (18)
    assert first[0] < 2 and all(r in hashed for r in first[1:].tolist())
    assert all(r in hashed for r in second[1:4].tolist()) and second[[0, 4]].tolist() == [18, 18]
    weight = module.storage.embedding_bags[module.table_names[0]].weight.detach()
    with torch.no_grad():
        weight[2:18] = torch.randn(16, 4)
    out = module(_kjt(ids.tolist(), a_lengths=[1] * 5)).values()[:, :4]
    assert torch.allclose(out[1:4], weight[first[1:4]] + weight[second[1:4]])
    assert torch.equal(out[[0, 4]], weight[first[[0, 4]]])
    # bytes: per feature m * d * 4 + 64, the hot pool H * (d * 4 + 16), the medium index K * 8 + zero row d * 4
    inference = 16 * 16 + 64 + 50 * 16 + 64 + 2 * (16 + 16) + 3 * 8 + 16
    assert embtable.memory_report(module).inference_bytes == inference
    assert embtable.plan(FEATS, CafeConfig(**MEDIUM)).total_bytes == inference
    feats = [FeatureSpec("big", 100_000, 16), FeatureSpec("c", 5000, 16)]
    p = embtable.plan(feats, CafeConfig(medium_ratio=2.0), "1/100")
    assert p.config.medium_ids == 2 * p.config.hot_rows > 0 and 0.95 * p.budget_bytes <= p.total_bytes
    big = embtable.build(feats, p.config)
    assert embtable.memory_report(big).inference_bytes == p.total_bytes <= p.budget_bytes


def test_medium_level_training_keeps_the_zero_row_and_promotion_keeps_outputs():
    module = embtable.build(FEATS, CafeConfig(**MEDIUM))
    _migrate_to(module, {10: 5.0, 11: 4.0, 12: 3.0, 13: 2.0, 14: 1.0})
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    opt.zero_grad()
    module(_kjt([12, 20, 30])).values().square().sum().backward()
    opt.step()
    weight = module.storage.embedding_bags[module.table_names[0]].weight
    assert weight[18].abs().sum() > 0  # the non-medium ids' second lookups moved it ...
    module.train_step_end(1)  # ... and the step end zeroes it again (migrate_every=1: migrates too)
    assert weight[18].abs().sum() == 0
    probe = _kjt([12, 13, 20], a_lengths=[1, 1, 1])
    before = module(probe).values().detach()
    # 12 (medium) becomes hot: its exclusive row starts as the sum of its two rows
    _migrate_to(module, {12: 100.0})
    assert 12 in module.hot_ids("a").tolist() and 12 not in module.medium_keys.tolist()
    assert torch.allclose(module(probe).values()[0], before[0])
