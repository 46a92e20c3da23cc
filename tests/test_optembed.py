"""OptEmbed: the compact table, the supernet, the budget-constrained search and the three-stage runner."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_contract import make_features, make_kjt, storage_bytes
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

import embtable
from embtable import FeatureSpec, OptEmbedConfig
from embtable.methods.optembed import remap_layout
from embtable.methods.optembed_search import (
    OptEmbedSupernet,
    OptEmbedSupernetConfig,
    SearchConfig,
    SearchState,
    compact_config,
    compact_from_supernet,
    evolutionary_search,
    field_cost,
    fit_rows,
)

# ----- the compact table -----

def test_remap_is_the_smaller_of_dense_and_sorted_and_the_narrowest_int():
    assert remap_layout(1000, 1000, 8, 0).kind == "identity"
    small = remap_layout(1000, 10, 8, 0)
    assert (small.kind, small.remap_dtype, small.remap_bytes) == ("sorted", torch.int32, 40)
    forced = remap_layout(1000, 10, 8, 0, remap="dense")
    assert (forced.kind, forced.remap_bytes) == ("dense", 4000)
    huge = remap_layout(2**33, 1000, 8, 1)
    assert (huge.kind, huge.remap_dtype, huge.remap_bytes, huge.rows) == ("sorted", torch.int64, 8000, 1001)
    # a dense remap wins when ids need int64 but rows fit int32 and most ids are kept
    dense = remap_layout(2**31 + 10, 2**31 - 5, 1, 0)
    assert (dense.kind, dense.remap_dtype) == ("dense", torch.int32)


@pytest.mark.parametrize("config", [
    OptEmbedConfig(num_kept=40, dims={"a": 3, "b": 8, "c": 5}),
    OptEmbedConfig(num_kept=40, dims=4, oov_buckets=1, remap="dense"),
    OptEmbedConfig(num_kept={"a": 1000, "b": 7, "c": 300}, oov_buckets=5),
])
def test_bytes_equal_storage_and_plan(config):
    features = make_features()
    module = embtable.build(features, config, seed=0)
    report = embtable.memory_report(module)
    assert report.inference_bytes == storage_bytes(module) == embtable.plan(features, config).total_bytes


def test_planner_keeps_the_most_frequent_ids_and_uses_the_budget():
    features = make_features()
    plan = embtable.plan(features, OptEmbedConfig(), "1/8")
    assert 0.95 * plan.budget_bytes <= plan.total_bytes <= plan.budget_bytes
    kept = plan.config.num_kept
    assert kept["b"] == 50  # 50 rows fit whole: not worth a remap
    module = embtable.build(features, OptEmbedConfig(), "1/8")
    for f in features:
        ids = module.kept_ids()[f.name].numpy()
        assert len(ids) == kept[f.name]
        if len(ids) < f.num_embeddings:  # every kept id is at least as frequent as every pruned one
            pruned = np.setdiff1d(np.arange(f.num_embeddings), ids)
            assert f.counts[ids].min() >= f.counts[pruned].max()


def _reference(module, kjt, pooling):
    """Pooled output computed by hand from the compact table: kept ids read their row, pruned ids zero."""
    out = []
    batch = kjt.stride()
    kept = module.kept_ids()
    for f, d in zip(module.features, module.dims):
        jt = kjt[f.name]
        weight = module.storage.embedding_bags[f.name].weight.detach()
        rows = torch.zeros(batch, f.embedding_dim)
        ws = jt.weights() if module.is_weighted() else torch.ones(jt.values().numel())
        for b, (start, length) in enumerate(zip(jt.offsets()[:-1].tolist(), jt.lengths().tolist())):
            for j in range(start, start + length):
                pos = torch.searchsorted(kept[f.name], jt.values()[j])
                if pos < len(kept[f.name]) and kept[f.name][pos] == jt.values()[j]:
                    rows[b, :d] += ws[j] * weight[pos]
            if pooling == "mean" and length:
                rows[b] /= length
        out.append(rows)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("pooling,weighted,remap", [("sum", False, "auto"), ("mean", False, "dense"),
                                                     ("sum", True, "sorted")])
def test_pruned_ids_read_zero_and_count_in_the_mean(pooling, weighted, remap):
    features = make_features()
    config = OptEmbedConfig(num_kept={"a": 100, "b": 10, "c": 200}, dims={"a": 3, "b": 8, "c": 6}, remap=remap)
    module = embtable.build(features, config, pooling=pooling, is_weighted=weighted, seed=0)
    kjt = make_kjt(features, batch=16, weighted=weighted, max_len=5)
    torch.testing.assert_close(module(kjt).values(), _reference(module, kjt, pooling))
    kjt32 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths().int(),
                              weights=kjt.weights_or_none())
    torch.testing.assert_close(module(kjt32).values(), _reference(module, kjt, pooling))


def test_oov_rows_and_searched_kept_ids():
    features = [FeatureSpec("a", 100, 4)]
    module = embtable.build(features, OptEmbedConfig(num_kept=3, oov_buckets=1), seed=0)
    module.set_kept_ids({"a": np.array([5, 17, 90])})
    weight = module.storage.embedding_bags["a"].weight
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([17, 4, 99]), torch.tensor([1, 1, 1]))
    out = module(kjt).values()
    torch.testing.assert_close(out, torch.stack([weight[1], weight[3], weight[3]]))
    with pytest.raises(ValueError, match="sorted, unique"):
        module.set_kept_ids({"a": np.array([17, 5, 90])})
    with pytest.raises(ValueError, match="2 kept ids given"):
        module.set_kept_ids({"a": np.array([5, 17])})


def test_huge_feature_keeps_a_sorted_int64_id_list():
    features = [FeatureSpec("big", 2**33 + 7, 8), FeatureSpec("small", 100, 8)]
    module = embtable.build(features, OptEmbedConfig(), budget=2**20, seed=0)
    assert module.mapper.remap_0.dtype == torch.int64
    assert embtable.memory_report(module).inference_bytes <= 2**20
    kept = module.kept_ids()["big"]
    module.set_kept_ids({"big": torch.cat([kept[:-1], torch.tensor([2**33 + 5])])})
    weight = module.storage.embedding_bags["big"].weight
    kjt = KeyedJaggedTensor(keys=["big", "small"], values=torch.tensor([2**33 + 5, 2**33 + 6, 3, 0]),
                            lengths=torch.tensor([1, 1, 1, 1, 0, 0]))
    out = module(kjt)["big"]
    torch.testing.assert_close(out[0], weight[len(kept) - 1])
    assert torch.count_nonzero(out[1]) == 0  # pruned
    torch.testing.assert_close(out[2], weight[3])


def test_state_dict_carries_the_kept_ids():
    features = make_features()
    config = OptEmbedConfig(num_kept=20, dims=5)
    a, b = embtable.build(features, config, seed=0), embtable.build(features, config, seed=1)
    a.set_kept_ids({f.name: np.arange(0, 40, 2) for f in features})
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    kjt = make_kjt(features)
    assert torch.equal(a(kjt).values(), b(kjt).values())


# ----- the supernet -----

def _ebc(features, pooling, weighted):
    return EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f.name, num_embeddings=f.num_embeddings, embedding_dim=f.embedding_dim,
                                   feature_names=[f.name], pooling=PoolingType[pooling.upper()]) for f in features],
        is_weighted=weighted,
    )


@pytest.mark.parametrize("pooling,weighted,mixed", [("sum", False, False), ("mean", False, True),
                                                     ("sum", True, True)])
def test_supernet_degenerates_to_a_plain_table(pooling, weighted, mixed):
    """Thresholds far below every norm and full dims: output and gradients of an EmbeddingBagCollection."""
    features = make_features()
    if mixed:  # features of different dims live in different EmbeddingCollections
        features = [features[0], features[1].with_dim(4), features[2]]
    torch.manual_seed(0)
    ebc = _ebc(features, pooling, weighted)
    net = OptEmbedSupernet(features, OptEmbedSupernetConfig(threshold_init=-10.0, sample_dims=False),
                           pooling=pooling, is_weighted=weighted)
    tables = net.tables()
    with torch.no_grad():
        for name, bag in ebc.embedding_bags.items():
            tables[name].copy_(bag.weight)
    kjt = make_kjt(features, batch=32, weighted=weighted)
    out, ref = net(kjt), ebc(kjt)
    assert out.keys() == ref.keys() and out.length_per_key() == ref.length_per_key()
    torch.testing.assert_close(out.values(), ref.values(), rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(ref.values())
    (out.values() * upstream).sum().backward()
    (ref.values() * upstream).sum().backward()
    for name, bag in ebc.embedding_bags.items():
        torch.testing.assert_close(tables[name].grad.to_dense() if tables[name].grad.is_sparse else tables[name].grad,
                                   bag.weight.grad, rtol=1e-5, atol=1e-6)


def test_supernet_contract_basics():
    features = make_features()
    net = OptEmbedSupernet(features, OptEmbedSupernetConfig(threshold_init=0.05))
    # bytes: full tables + one threshold per field, equal to the pure description
    plans, shared = OptEmbedSupernet.describe(features, net.config)
    assert embtable.memory_report(net).inference_bytes == storage_bytes(net) == sum(p.bytes for p in plans)
    # gradients reach the tables (sparse rows) and the thresholds (surrogate gradient + regulariser)
    tables = embtable.sparse_parameters(net)
    kjt = make_kjt(features, batch=64, max_len=4)
    out = net(kjt).values()
    ((out * torch.randn_like(out)).sum() + net.auxiliary_loss()).backward()
    assert all(t.grad is not None and t.grad.is_sparse for t in tables)
    assert torch.count_nonzero(net.thresholds.grad) == len(features)
    # the regulariser alone pushes every threshold up
    net.zero_grad()
    net.auxiliary_loss().backward()
    assert (net.thresholds.grad < 0).all()
    # empty batch
    empty = KeyedJaggedTensor(keys=[f.name for f in features], values=torch.empty(0, dtype=torch.int64),
                              lengths=torch.zeros(3 * len(features), dtype=torch.int64))
    assert torch.count_nonzero(net(empty).values()) == 0
    # training samples a dim prefix per field: trailing dims are zero, and vary across batches
    nonzero_dims = set()
    for _ in range(10):
        pooled = net(make_kjt(features, batch=64, max_len=4, empty_bags=False)).values().view(64, 3, 8)
        nonzero_dims.add(tuple(int((pooled[:, i].abs().sum(0) > 0).sum()) for i in range(3)))
    assert len(nonzero_dims) > 1


def test_compact_from_supernet_equals_the_supernet_it_was_searched_on():
    features = make_features()
    torch.manual_seed(0)
    for pooling, weighted in [("sum", False), ("mean", False), ("sum", True)]:
        net = OptEmbedSupernet(features, OptEmbedSupernetConfig(threshold_init=0.02), pooling=pooling,
                               is_weighted=weighted)
        dims = [3, 8, 5]
        margins = net.row_margins()
        budget = 4000
        fit = fit_rows(features, margins, dims, budget)
        assert fit is not None and fit.cut > 0 and fit.total_bytes <= budget
        # the smallest cut: one margin level lower would not fit
        levels = np.unique(np.concatenate([m[m > 0] for m in margins.values()] + [np.zeros(1)]))
        lower = levels[np.searchsorted(levels, fit.cut) - 1]
        assert sum(field_cost(f, max(1, int((margins[f.name] > lower).sum())), d, 0, "auto")[1]
                   for f, d in zip(features, dims)) > budget
        config = compact_config(features, fit, dims)
        compact = compact_from_supernet(net, config, fit.kept_ids, pooling=pooling, is_weighted=weighted)
        assert embtable.memory_report(compact).inference_bytes == fit.total_bytes
        keep = [torch.from_numpy(np.isin(np.arange(f.num_embeddings), fit.kept_ids[f.name])) for f in features]
        net.eval()
        net.set_eval(dims, keep)
        kjt = make_kjt(features, batch=32, weighted=weighted, max_len=5)
        torch.testing.assert_close(compact(kjt).values(), net(kjt).values(), rtol=1e-6, atol=1e-6)


def test_fit_rows_gives_up_when_one_row_per_field_does_not_fit():
    features = make_features()
    net = OptEmbedSupernet(features, OptEmbedSupernetConfig())
    assert fit_rows(features, net.row_margins(), [8, 8, 8], budget_bytes=50) is None


# ----- the search -----

def test_search_resumes_to_the_same_result():
    target = [5, 2, 7, 1]

    def fitness(d):
        return -float(sum((a - b) ** 2 for a, b in zip(d, target)))

    def feasible(d):
        return sum(d) <= 14

    config = SearchConfig(population=8, generations=5, parents=4, mutation_prob=0.3, seed=3)
    full = evolutionary_search(fitness, feasible, [8] * 4, config)
    assert feasible(full.best[0]) and len(full.history) == 5

    class Killed(Exception):
        pass

    saved = {}

    def kill_after(n):
        def on_progress(state):
            saved["state"] = json.dumps(state.to_dict())
            if len(state.fitness) >= n:
                raise Killed
        return on_progress

    with pytest.raises(Killed):
        evolutionary_search(fitness, feasible, [8] * 4, config, on_progress=kill_after(11))
    with pytest.raises(Killed):  # killed again, later, from the resumed state
        evolutionary_search(fitness, feasible, [8] * 4, config, on_progress=kill_after(23),
                            state=SearchState.from_dict(json.loads(saved["state"])))
    resumed = evolutionary_search(fitness, feasible, [8] * 4, config,
                                  state=SearchState.from_dict(json.loads(saved["state"])))
    assert resumed.to_dict() == full.to_dict()


# ----- the three stages through the trainer -----

def synthetic_source(seed: int = 0, rows: int = 3072, batch: int = 256):
    """Ids with zipf popularity; clicks from per-id effects, so that frequent rows matter most."""
    from torchrec.datasets.utils import Batch

    from experiments.training.stages import DataSource

    rng = np.random.default_rng(seed)
    sizes = {"u": 300, "i": 120, "c": 30, "s": 8}
    effects = {k: rng.normal(0, 1.0, n) for k, n in sizes.items()}

    def split(n: int, split_seed: int):
        r = np.random.default_rng([seed, split_seed])
        ids = {k: np.minimum(r.zipf(1.4, n) - 1, sizes[k] - 1) for k in sizes}
        dense = r.normal(size=(n, 3)).astype(np.float32)
        logit = sum(effects[k][ids[k]] for k in sizes) + dense[:, 0] - 1.0
        labels = (r.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        return ids, dense, labels

    def batches(data, size):
        ids, dense, labels = data
        out = []
        for s in range(0, len(labels), size):
            e = min(s + size, len(labels))
            values = torch.from_numpy(np.concatenate([ids[k][s:e] for k in sizes]))
            lengths = torch.ones(len(sizes) * (e - s), dtype=torch.int32)  # int32, as data_prep's loader
            kjt = KeyedJaggedTensor(keys=list(sizes), values=values, lengths=lengths)
            out.append(Batch(dense_features=torch.from_numpy(dense[s:e]), sparse_features=kjt,
                             labels=torch.from_numpy(labels[s:e])))
        return out

    train = split(rows, 1)
    counts = {k: np.bincount(train[0][k], minlength=n) for k, n in sizes.items()}
    train_epochs = {}

    def train_batches(epoch):
        if epoch not in train_epochs:
            order = np.random.default_rng([seed, 100 + epoch]).permutation(rows)
            train_epochs[epoch] = batches(tuple(({k: v[order] for k, v in train[0].items()}, train[1][order],
                                                 train[2][order])), batch)
        return iter(train_epochs[epoch])

    valid, test = batches(split(1024, 2), 512), batches(split(1024, 3), 512)
    return DataSource(
        name="synthetic", features=[FeatureSpec(k, n, 8, counts=counts[k]) for k, n in sizes.items()], num_dense=3,
        train_batches=train_batches, steps_per_epoch=rows // batch, valid_batches=lambda: iter(valid),
        test_batches=lambda: iter(test),
    )


def _run_config(budget="1/4"):
    from experiments.training.config import load_config

    return load_config(overrides={
        "model": {"name": "dlrm", "embedding_dim": 8, "options": {"dense_hidden_sizes": [16], "over_hidden_sizes": [16]}},
        "embedding": {"budget": budget},
        "train": {"batch_size": 256, "embedding_lr": 0.1, "dense_lr": 0.01, "seed": 7, "checkpoint_every": 5},
    })


STAGES = dict(supernet_epochs=1, retrain_epochs=1, population=6, generations=3, parents=3, mutation_prob=0.3,
              threshold_reg=1e-3)


KILLED_SEARCH = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_optembed import STAGES, _run_config, synthetic_source
from experiments.training.stages import StageHooks, run_stages

def kill(stage, progress):
    if stage == "search" and len(progress["fitness"]) == 9:
        os.kill(os.getpid(), signal.SIGKILL)

run_stages(_run_config(), "optembed", STAGES, sys.argv[2], source=synthetic_source(), progress=False,
           hooks=StageHooks(on_progress=kill))
"""


def test_stages_fit_the_budget_and_a_killed_run_resumes_to_the_same_result(tmp_path):
    from embtable.methods.optembed_search import OptEmbedStages
    from experiments.training.stages import RESULT_NAME, StageHooks, run_stages

    config, stages = _run_config(), OptEmbedStages(**STAGES)
    source = synthetic_source()
    full = run_stages(config, "optembed", STAGES, tmp_path / "full", source=source, progress=False)
    assert full["status"] == "ok", full["failure_reason"]
    assert full["inference_bytes"] <= full["budget_bytes"] == sum(f.full_table_bytes for f in source.features) // 4
    assert set(full["stage_seconds"]) == {"supernet", "search", "retrain"}
    assert full["candidates_evaluated"] > stages.population and len(full["history"]) == stages.generations
    assert full["valid_auc"] > 0.6 and full["search_valid_auc"] > 0.6
    assert json.loads((tmp_path / "full" / RESULT_NAME).read_text())["dims"] == full["dims"]

    class Killed(Exception):
        pass

    def kill_supernet(stage, state):
        if stage == "supernet" and state.step == 8:
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_stages(config, "optembed", STAGES, out, source=source, progress=False,
                   hooks=StageHooks(on_step=kill_supernet))
    # resume in another process, which dies by SIGKILL (no cleanup runs) in the middle of the search
    child = subprocess.run([sys.executable, "-c", KILLED_SEARCH, str(Path(__file__).parent), str(out)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert torch.load(out / "search.pt", weights_only=True)["progress"]["fitness"]
    resumed = run_stages(config, "optembed", STAGES, out, source=source, progress=False)
    for key in ("dims", "num_kept", "history", "threshold_cut", "supernet_valid_auc", "valid_auc", "test_auc",
                "test_logloss", "inference_bytes"):
        assert resumed[key] == full[key], key
    a = torch.load(tmp_path / "full" / "compact.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "compact.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another run"):
        run_stages(config, "optembed", {**STAGES, "generations": 4}, out, source=source, progress=False)


def test_retrain_from_the_supernet_starts_where_the_search_left_off():
    from experiments.training.stages import run_stages

    stages = {**STAGES, "retrain_init": "supernet", "retrain_max_steps": 1, "generations": 1}
    result = run_stages(_run_config(budget="1/2"), "optembed", stages, source=synthetic_source(), progress=False)
    assert result["status"] == "ok"
    assert result["inference_bytes"] <= result["budget_bytes"]
    # one retraining step from the searched supernet keeps (about) the searched candidate's AUC
    assert abs(result["valid_auc"] - result["search_valid_auc"]) < 0.03


def test_an_unreachable_budget_fails_before_training():
    from experiments.training.stages import StageHooks, run_stages

    def no_training(stage, state):
        raise AssertionError("trained despite an unreachable budget")

    result = run_stages(_run_config(budget=20), "optembed", STAGES, source=synthetic_source(),
                        progress=False, hooks=StageHooks(on_step=no_training))
    assert result["status"] == "failed" and "budget" in result["failure_reason"]


def test_command_line_on_the_tiny_preset(tmp_path):
    import data_prep
    from experiments.training.stages import RESULT_NAME, main

    tiny = data_prep.generate_dataset("tiny", tmp_path / "tiny", progress=False)
    result = main(["optembed", "--budget", "1/8", "--set", f"data.path={tiny}", "--out", str(tmp_path / "run"),
                   "--option", "supernet_max_steps=20", "--option", "retrain_max_steps=20", "--option", "population=4",
                   "--option", "generations=2", "--option", "parents=2", "--no-progress"])
    assert result["status"] == "ok", result["failure_reason"]
    assert result["inference_bytes"] <= result["budget_bytes"] and result["valid_auc"] > 0.55
    assert result["supernet_steps"] == result["retrain_steps"] == 20
    saved = json.loads((tmp_path / "run" / RESULT_NAME).read_text())
    assert saved["dims"] == result["dims"] and set(saved["stage_seconds"]) == {"supernet", "search", "retrain"}
    compact = torch.load(tmp_path / "run" / "compact.pt", weights_only=True)
    module = embtable.OptEmbedEmbeddingBagCollection(
        data_prep.load_meta(tiny).feature_specs(16), embtable.method_config_from_dict(compact["config"]))
    module.load_state_dict(compact["state_dict"])  # the artifact a server loads
    assert embtable.memory_report(module).inference_bytes == result["inference_bytes"]
