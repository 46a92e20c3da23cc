"""TT-Rec: digit split, contraction against the explicit tensor train, initial variance, bytes, planning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtable
from embtable import FeatureSpec, TTRecConfig
from embtable.methods.tt_rec import TTCores, tt_bytes, tt_digits, tt_dim_factors, tt_row_factors


def test_digit_split_is_exact_above_2_to_the_33():
    n = 2**35 + 12345
    rows = tt_row_factors(n)
    assert math.prod(rows) >= n and max(rows) - min(rows) <= 2
    rng = np.random.default_rng(0)
    ids = [int(x) for x in rng.integers(2**33, n, size=200)] + [n - 1, 2**33, 2**33 + 1]
    i1, i2, i3 = tt_digits(torch.tensor(ids), rows)
    for x, a, b, c in zip(ids, i1.tolist(), i2.tolist(), i3.tolist()):
        assert (a * rows[1] + b) * rows[2] + c == x
        assert a < rows[0] and b < rows[1] and c < rows[2]


@pytest.mark.parametrize("d", [1, 4, 7, 8, 12, 16, 32])
def test_dim_factors_multiply_to_d(d):
    assert math.prod(tt_dim_factors(d)) == d
    assert tt_dim_factors(16) == (2, 2, 4)


def test_rows_are_the_contracted_tensor_train():
    torch.manual_seed(0)
    cores = TTCores(50, (4, 4, 4), (2, 1, 3), 3)
    ids = torch.arange(50)
    # the explicit tensor train: T[i1, i2, i3, j1, j2, j3]
    full = torch.einsum("aipr,brqs,csuz->abcpqu", cores.core1, cores.core2, cores.core3)  # (i, p) shapes
    table = full.reshape(64, 6)[:50]
    torch.testing.assert_close(cores(ids), table)


def test_initial_rows_have_the_variance_of_a_plain_table():
    n, rank = 20_000, 8
    rows = tt_row_factors(n)
    second = []
    for seed in range(6):
        torch.manual_seed(seed)
        cores = TTCores(n, rows, (2, 2, 4), rank)
        with torch.no_grad():
            second.append(float(cores(torch.arange(n)).pow(2).mean()))
    target = 1.0 / (3 * n)  # U(-sqrt(1/n), sqrt(1/n))
    assert abs(np.mean(second) / target - 1) < 0.25, (np.mean(second), target)


def test_bytes_follow_the_formula_and_the_built_module():
    feats = [FeatureSpec("u", 100_000, 16), FeatureSpec("s", 30, 16)]
    config = TTRecConfig(rank={"u": 5, "s": 0}, cache_rows={"u": 7, "s": 0})
    plan = embtable.plan(feats, config)
    n1, n2, n3 = tt_row_factors(100_000)
    expected = (n1 * 2 * 5 + n2 * 5 * 2 * 5 + n3 * 5 * 4) * 4 + 7 * (16 * 4 + 8)
    assert plan.features[0].bytes == expected == tt_bytes((n1, n2, n3), (2, 2, 4), 5) + 7 * 72
    assert plan.features[1].bytes == 30 * 16 * 4
    module = embtable.build(feats, config, device="meta")
    assert embtable.memory_report(module).inference_bytes == plan.total_bytes


@pytest.mark.parametrize("budget", ["1/10", "1/100", "1/1000", "1/10000"])
def test_planner_fills_the_budget(budget):
    feats = [FeatureSpec("a", 2_000_000, 16), FeatureSpec("b", 300_000, 16), FeatureSpec("c", 5_000, 16),
             FeatureSpec("d", 40, 16)]
    plan = embtable.plan(feats, TTRecConfig(), budget)
    assert plan.budget_bytes * 0.95 <= plan.total_bytes <= plan.budget_bytes
    assert plan.config.rank["d"] == 0  # the small feature keeps its table
    assert plan.config.rank["a"] >= 1


def test_cache_starts_equal_to_the_cores_and_gets_gradients():
    counts = np.arange(1000)[::-1].copy()  # id 0 is the hottest
    feats = [FeatureSpec("a", 1000, 8, counts=counts)]
    cached = embtable.build(feats, TTRecConfig(rank=3, cache_rows=10), seed=0)
    plain = embtable.build(feats, TTRecConfig(rank=3, cache_rows=0), seed=0)
    assert cached.cores[0].hot_ids.tolist() == list(range(10))
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([0, 5, 9, 10, 999]), lengths=torch.tensor([2, 3]))
    torch.testing.assert_close(cached(kjt).values(), plain(kjt).values())
    cached(kjt).values().sum().backward()
    g = cached.cores[0].hot_rows.grad
    assert g[[0, 5, 9]].abs().sum() > 0 and g[[1, 2, 3, 4, 6, 7, 8]].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cached.cores[0].parameters())
