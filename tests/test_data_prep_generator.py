"""The generator: presets, determinism, calibration, recorded Bayes AUC, the TSV path, resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

import data_prep.generator as gen
from data_prep import (
    PRESETS,
    GeneratorConfig,
    Teacher,
    convert_criteo,
    generate_dataset,
    generate_tsv,
    load_meta,
)
from data_prep.schema import CRITEO_CARDINALITIES, CRITEO_CATEGORICAL, CRITEO_DENSE

SMALL = GeneratorConfig(scale=1 / 3000, num_rows=6000, rows_per_shard=1500, calibration_rows=4000)


def _frame(path, split):
    meta = load_meta(path)
    return pd.concat([pd.read_parquet(s) for s in meta.shards(split)], ignore_index=True)


def test_presets_shapes():
    assert set(PRESETS) >= {"tiny", "demo", "standard"}
    tiny, demo, std = PRESETS["tiny"], PRESETS["demo"], PRESETS["standard"]
    assert 1_000 <= max(tiny.cardinalities) <= 10_000 and 15_000 <= tiny.num_rows <= 30_000
    assert 10_000 <= max(demo.cardinalities) <= 100_000 and 150_000 <= demo.num_rows * 6 / 7 <= 250_000
    assert std.num_rows >= 1_000_000 and max(std.cardinalities) >= 500_000
    # Cardinalities follow the Kaggle ones times the scale (small fields are not shrunk below 16).
    for n, full in zip(demo.cardinalities, CRITEO_CARDINALITIES):
        assert n == max(round(full / 200), min(full, 16))
    with pytest.raises(ValueError, match="scale"):
        GeneratorConfig(scale=2.0, num_rows=100)
    with pytest.raises(ValueError, match="unknown generator preset"):
        generate_dataset("huge", "/nonexistent")


def test_deterministic_and_seeded(tmp_path):
    a = load_meta(generate_dataset(SMALL, tmp_path / "a", progress=False))
    b = load_meta(generate_dataset(SMALL, tmp_path / "b", progress=False))
    c = load_meta(generate_dataset(SMALL, tmp_path / "c", seed=1, progress=False))
    assert a.raw["manifest"] == b.raw["manifest"]
    assert a.raw["manifest"] != c.raw["manifest"]
    assert a.bayes_auc == b.bayes_auc and a.bayes_auc != c.bayes_auc
    assert a.split_rows == {"train": 5143, "valid": 428, "test": 429}
    # Chunks are independent of each other: chunk 2 alone gives the same rows.
    t = Teacher(SMALL)
    np.testing.assert_array_equal(t.chunk(2)["ids"], Teacher(SMALL).chunk(2)["ids"])


def test_calibration_skew_and_counts(tmp_path):
    meta = load_meta(generate_dataset("tiny", tmp_path / "t", progress=False))
    assert meta.source == "generator" and meta.protocol == "dlrm" and meta.num_dense == 13
    for split in ("train", "valid", "test"):
        assert abs(meta.positive_rate[split] - 0.256) < 0.03, (split, meta.positive_rate)
    train = _frame(meta.path, "train")
    counts = meta.counts()
    for name in CRITEO_CATEGORICAL:
        np.testing.assert_array_equal(counts[name], np.bincount(train[name], minlength=meta.num_embeddings[name]))
        assert train[name].max() < meta.num_embeddings[name]
    # Heavy-tailed popularity in the biggest field: a few ids take a large share, many are seen once.
    c3 = np.sort(counts["C3"])[::-1]
    seen = c3[c3 > 0]
    assert c3[:10].sum() > 0.2 * c3.sum() and (seen == 1).mean() > 0.3
    dense = train[CRITEO_DENSE].to_numpy()
    assert np.isfinite(dense).all() and (dense >= 0).all() and (dense == 0).mean() > 0.1
    specs = meta.feature_specs(16)
    assert [s.name for s in specs] == CRITEO_CATEGORICAL and specs[2].counts.sum() == meta.split_rows["train"]


def test_recorded_bayes_auc_is_the_true_auc_and_a_ceiling(tmp_path):
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    cfg = PRESETS["tiny"]
    meta = load_meta(generate_dataset(cfg, tmp_path / "t", progress=False))
    # The recorded value is the AUC of the teacher's true probabilities on the split.
    t = Teacher(cfg)
    chunks = [t.chunk(c) for c in range(cfg.num_chunks)]
    p = np.concatenate([c["p"] for c in chunks])
    y = np.concatenate([c["labels"] for c in chunks])
    test = slice(cfg.num_rows - meta.split_rows["test"], cfg.num_rows)
    assert meta.bayes_auc["test"] == pytest.approx(roc_auc_score(y[test], p[test]), abs=1e-4)
    assert 0.75 < meta.bayes_auc["test"] < 0.95
    # A logistic regression on one-hot ids + dense learns something, and stays below the ceiling.
    train, tst = _frame(meta.path, "train"), _frame(meta.path, "test")

    def design(df):
        offsets = np.cumsum([0] + [meta.num_embeddings[n] for n in CRITEO_CATEGORICAL])
        cols = df[CRITEO_CATEGORICAL].to_numpy() + offsets[:-1]
        rows = np.repeat(np.arange(len(df)), len(CRITEO_CATEGORICAL))
        onehot = sparse.csr_matrix((np.ones(cols.size), (rows, cols.ravel())), shape=(len(df), offsets[-1]))
        return sparse.hstack([onehot, sparse.csr_matrix(df[CRITEO_DENSE].to_numpy() / 5.0)]).tocsr()

    model = LogisticRegression(C=0.1, solver="liblinear").fit(design(train), train["label"])
    auc = roc_auc_score(tst["label"], model.decision_function(design(tst)))
    assert 0.68 < auc < meta.bayes_auc["test"], (auc, meta.bayes_auc)


def test_tsv_path_converts_to_the_same_rows(tmp_path):
    direct = load_meta(generate_dataset(SMALL, tmp_path / "direct", progress=False))
    tsv = generate_tsv(SMALL, tmp_path / "gen.tsv.gz", progress=False)
    assert tsv.read_bytes()[:2] == b"\x1f\x8b"
    conv = load_meta(convert_criteo(tsv, tmp_path / "conv", workers=1, chunk_bytes=200_000, progress=False))
    assert conv.split_rows == direct.split_rows and conv.raw["manifest"]["malformed"]["count"] == 0
    for split in ("train", "test"):
        a, b = _frame(direct.path, split), _frame(conv.path, split)
        assert a["label"].tolist() == b["label"].tolist()
        np.testing.assert_array_equal(a[CRITEO_DENSE].to_numpy(), b[CRITEO_DENSE].to_numpy())
        for name in ("C3", "C9", "C21"):  # ids are relabelled one to one (by frequency)
            pairs = pd.DataFrame({"g": a[name], "c": b[name]}).drop_duplicates()
            if split == "train":
                assert pairs["g"].is_unique and pairs["c"].is_unique
    for name in CRITEO_CATEGORICAL:  # same training frequencies, up to the order of ids
        da = np.sort(direct.counts()[name][direct.counts()[name] > 0])
        cb = conv.counts()[name]
        np.testing.assert_array_equal(da, np.sort(cb[cb > 0]))


def test_generate_resumes_after_interruption(tmp_path, monkeypatch):
    ref = load_meta(generate_dataset(SMALL, tmp_path / "ref", progress=False, workers=1))
    many = dataclasses.replace(SMALL, rows_per_shard=700)  # 9 chunks: generated by a pool of 2 workers
    assert many.num_chunks >= 8
    two = load_meta(generate_dataset(many, tmp_path / "two", progress=False, workers=2))
    one = load_meta(generate_dataset(many, tmp_path / "one", progress=False, workers=1))
    assert two.raw["manifest"] == one.raw["manifest"] and two.bayes_auc == one.bayes_auc
    real = gen._generate_chunk
    calls = []

    def dies_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job[1])
        return real(job)

    monkeypatch.setattr(gen, "_generate_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(SMALL, tmp_path / "x", progress=False, workers=1)
    monkeypatch.setattr(gen, "_generate_chunk", real)
    assert not (tmp_path / "x" / "meta.json").exists()
    assert len(list((tmp_path / "x" / "_work").glob("chunk-*.rec"))) == 2
    resumed = load_meta(generate_dataset(SMALL, tmp_path / "x", progress=False, workers=1))
    assert resumed.raw["manifest"] == ref.raw["manifest"] and resumed.bayes_auc == ref.bayes_auc
    with pytest.raises(FileExistsError):
        generate_dataset(dataclasses.replace(SMALL, seed=5), tmp_path / "x", progress=False)
