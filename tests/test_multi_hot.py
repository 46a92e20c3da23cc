"""Multi-hot end to end: generated histories, the loader's jagged batches, every method and model training."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ctr_models
import data_prep
import embtable
from data_prep.loader import Bag


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    return data_prep.generate_dataset("tiny_multihot", tmp_path_factory.mktemp("mh") / "d", progress=False, workers=1)


def test_generated_histories_and_loader(histories):
    meta = data_prep.load_meta(histories)
    assert meta.multi_hot_features == ["H1", "H2"] and meta.categorical_features[-2:] == ["H1", "H2"]
    assert 0.8 < meta.bayes_auc["test"] < 0.95  # the Bayes AUC of the teacher with histories
    assert meta.num_embeddings["H1"] == meta.num_embeddings[meta.raw["history_sources"]["H1"]]
    counts = meta.counts()
    assert counts["H1"].sum() > 20 * meta.split_rows["train"]  # 1..50 ids per row, about 25 on average
    loader = data_prep.BatchLoader(histories, "valid", 512, shuffle=False)
    batch = next(iter(loader))
    kjt = batch.sparse_features
    assert kjt.keys() == meta.categorical_features and kjt.weights_or_none() is None
    lengths = kjt.length_per_key()
    jt = kjt.to_dict()
    h1 = jt["H1"].lengths()
    assert h1.min() >= 1 and h1.max() <= 50 and h1.float().mean() > 10
    assert (jt["C1"].lengths() == 1).all() and lengths[0] == 512
    # the first rows of the first valid shard, unshuffled, are the batch's bags
    table = pq.read_table(meta.shards("valid")[0])
    want = table["H2"].to_pylist()[:3]
    got = jt["H2"].to_dense()[:3]
    assert [g.tolist() for g in got] == want
    assert (jt["H1"].values() < meta.num_embeddings["H1"]).all()
    # shuffling keeps each row's bag with its label: one epoch shuffled = the same multiset of rows

    def rows(loader):
        out = []
        for b in loader:
            bags = b.sparse_features["H1"].to_dense()
            out += [(float(y), tuple(bag.tolist())) for y, bag in zip(b.labels, bags)]
        return sorted(out)

    seen = rows(data_prep.BatchLoader(histories, "valid", 300, shuffle=True, seed=3, buffer_rows=600))
    plain = rows(data_prep.BatchLoader(histories, "valid", 300, shuffle=False))
    assert seen == plain


def test_bag_take_slice_concat():
    bag = Bag(np.array([0, 2, 2, 5]), np.arange(5), np.arange(5, dtype=np.float32))
    t = bag.take(np.array([2, 0, 1]))
    assert t.offsets.tolist() == [0, 3, 5, 5] and t.values.tolist() == [2, 3, 4, 0, 1]
    s = Bag.concat([bag.slice(0, 1), bag.slice(1, 3)])
    assert s.offsets.tolist() == bag.offsets.tolist() and s.weights.tolist() == bag.weights.tolist()


def _train(path, method: str, model: str = "dlrm", pooling: str = "sum", steps: int = 4, budget="1/4",
           batch_size: int = 256):
    meta = data_prep.load_meta(path)
    features = meta.feature_specs(8)
    torch.manual_seed(0)
    config = embtable.method_config_from_dict({"method": method})
    emb = embtable.build(features, config, None if method == "full" else budget, pooling=pooling, seed=0,
                         is_weighted=bool(meta.weighted_features))
    net = ctr_models.build_model(model, emb, meta.num_dense)
    opt = torch.optim.Adagrad(net.parameters(), lr=0.05)
    losses = []
    for step, batch in enumerate(data_prep.BatchLoader(path, "train", batch_size, seed=0)):
        if step == steps:
            break
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net(batch.dense_features, batch.sparse_features), batch.labels)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and len(losses) == steps
    return losses


@pytest.mark.parametrize("method", sorted(embtable.registered_methods()))
def test_every_method_trains_on_bags(histories, method):
    try:
        _train(histories, method)
    except embtable.BudgetError:
        pytest.skip(f"{method} cannot meet 1/4 of the full tables here")


@pytest.mark.parametrize("model", ctr_models.model_names())
def test_every_model_trains_on_bags_with_mean_pooling(histories, model):
    _train(histories, "hash", model=model, pooling="mean", steps=3)


def test_weighted_bags_from_a_table(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    hist = [rng.integers(0, 40, rng.integers(0, 8)).tolist() for _ in range(n)]
    w = [rng.random(len(h)).tolist() for h in hist]
    y = [int(sum(x < 10 for x in h) > 1) for h in hist]
    pq.write_table(pa.table({"y": y, "user": rng.integers(0, 30, n), "hist": hist, "hist_w": w}), tmp_path / "t.parquet")
    path = data_prep.prepare_table(tmp_path / "t.parquet", tmp_path / "d", label="y",
                                   weights={"hist": "hist_w"}, min_count=1, log=None)
    batch = next(iter(data_prep.BatchLoader(path, "train", 64, shuffle=False)))
    kjt = batch.sparse_features
    weights = kjt.weights()
    assert weights.shape == kjt.values().shape
    assert (kjt.to_dict()["user"].weights() == 1).all() and (kjt.to_dict()["hist"].weights() < 1).all()
    losses = _train(path, "hash", steps=30, budget="1/2", batch_size=64)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    with pytest.raises(ValueError, match="pooling='sum'"):
        _train(path, "hash", pooling="mean")
