"""`prepare table`: parquet / CSV tables of any schema -> dataset directories (multi-hot, nulls, types)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data_prep import load_meta
from data_prep.table import MISSING_ID, OOV_ID, WEIGHT_SUFFIX, infer_columns, prepare_table


def _rows(meta) -> pd.DataFrame:
    frames = []
    for split in ("train", "valid", "test"):
        for shard in meta.shards(split):
            df = pq.read_table(shard).to_pandas()
            df["split"] = split
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _table(n: int = 600, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    user = [f"u{i}" for i in rng.integers(0, 20, n)]
    user[0] = None
    user[1] = ""
    item = rng.integers(100, 130, n).tolist()
    item[2] = None
    hist = [rng.integers(0, 15, rng.integers(0, 6)).tolist() for _ in range(n)]
    hist[3] = None
    hist[4] = []
    hist[5] = [7, None, 7]
    weights = [None if h is None else [0.5 + k for k in range(len(h))] for h in hist]
    price = [None if i % 5 == 0 else float(x) for i, x in enumerate(rng.normal(3, 2, n))]
    label = (rng.random(n) < 0.3).astype(int).tolist()
    label[6] = None
    label[9] = 2
    return pa.table({"y": pa.array(label, pa.int64()), "user": user, "item": pa.array(item, pa.int64()),
                     "hist": pa.array(hist, pa.list_(pa.int64())), "hist_w": pa.array(weights, pa.list_(pa.float32())),
                     "price": pa.array(price, pa.float64())})


def test_parquet_multi_hot_nulls_weights_and_counts(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    t = _table()
    pq.write_table(t.slice(0, 250), src / "a.parquet")  # a directory of two files, read in name order
    pq.write_table(t.slice(250), src / "b.parquet")
    out = prepare_table(src, tmp_path / "d", label="y", weights={"hist": "hist_w"}, min_count=2, rows_per_shard=128)
    printed = capsys.readouterr().out
    assert "inferred" in printed and "multi-hot    hist" in printed and "dense        price" in printed
    meta = load_meta(out)
    assert meta.source == "table" and meta.categorical_features == ["user", "item", "hist"]
    assert meta.multi_hot_features == ["hist"] and meta.weighted_features == {"hist": "hist" + WEIGHT_SUFFIX}
    assert meta.dense_features == ["price"]
    # two rows with a bad label (null, 2) are skipped and listed with their line
    mal = meta.raw["manifest"]["malformed"]
    assert mal["count"] == 2 and [r["line"] for r in mal["rows"]] == [7, 10]
    assert sum(meta.split_rows.values()) == 598
    got = _rows(meta)
    keep = [i for i in range(600) if i not in (6, 9)]
    src_rows = t.to_pandas().iloc[keep].reset_index(drop=True)
    by_pos = _by_source_position(got, meta)
    assert by_pos[0]["user"] == MISSING_ID and by_pos[1]["user"] == MISSING_ID
    assert by_pos[2]["item"] == MISSING_ID
    assert list(by_pos[3]["hist"]) == [] and list(by_pos[4]["hist"]) == []
    h5 = list(by_pos[5]["hist"])
    assert len(h5) == 3 and h5[1] == MISSING_ID and h5[0] == h5[2] >= 2
    np.testing.assert_allclose(list(by_pos[5]["hist" + WEIGHT_SUFFIX]), [0.5, 1.5, 2.5])
    # bag lengths and dense transform log(1 + max(x, 0)), missing -> 0
    lengths = [len(h) if h is not None else 0 for h in src_rows["hist"]]
    assert [len(by_pos[i]["hist"]) for i in range(598)] == lengths
    prices = src_rows["price"].to_numpy(dtype=np.float64)
    want = np.log1p(np.where(np.isnan(prices), 0, np.maximum(prices, 0))).astype(np.float32)
    np.testing.assert_allclose([by_pos[i]["price"] for i in range(598)], want, rtol=1e-6)
    # counts: training occurrences per id (OOV + missing + vocabulary), ids by decreasing count
    counts = meta.counts()
    train = got[got["split"] == "train"]
    flat = np.concatenate([np.asarray(h, dtype=np.int64) for h in train["hist"]])
    np.testing.assert_array_equal(counts["hist"], np.bincount(flat, minlength=meta.num_embeddings["hist"]))
    np.testing.assert_array_equal(counts["user"], np.bincount(train["user"], minlength=meta.num_embeddings["user"]))
    assert (np.diff(counts["item"][2:]) <= 0).all() and counts["item"][2:].min() >= 2
    assert meta.num_embeddings["user"] == 2 + 20 and meta.oov_id == OOV_ID


def _by_source_position(got: pd.DataFrame, meta) -> list:
    """Rows back in input order: the random split keeps file order within a split; merge by position."""
    from data_prep.splits import random_split

    codes = random_split(np.arange(600), meta.raw["split"]["seed"])
    codes = np.delete(codes, [6, 9])
    rows, it = [], {s: iter(got[got["split"] == s].to_dict("records")) for s in ("train", "valid", "test")}
    for c in codes:
        rows.append(next(it[("train", "valid", "test")[c]]))
    return rows


def test_csv_gz_given_kinds_standardize_and_resume(tmp_path):
    t = _table(300, seed=1)
    df = t.to_pandas()
    df["hist"] = ["" if h is None else "|".join(str(int(x)) if x == x and x is not None else "" for x in h)
                  for h in df["hist"]]
    df = df.drop(columns=["hist_w"])
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt") as f:
        df.to_csv(f, index=False)
    kw = dict(label="y", categorical="user,item", multi_hot=["hist"], dense="price", min_count=1,
              dense_transform="standardize", protocol="dlrm", rows_per_shard=64)
    out = prepare_table(path, tmp_path / "d", log=None, **kw)
    meta = load_meta(out)
    assert meta.protocol == "dlrm" and meta.categorical_features == ["user", "item", "hist"]
    got = _rows(meta)
    assert [len(h) for h in got["hist"]] == [0 if s == "" else s.count("|") + 1
                                           for i, s in enumerate(df["hist"]) if i not in (6, 9)]
    train = got[got["split"] == "train"]["price"].to_numpy()
    present = df["price"].notna().to_numpy()
    assert abs(train[present[[i for i in range(300) if i not in (6, 9)]][: len(train)]].mean()) < 0.2
    tr = meta.raw["dense_transform"]
    assert tr["name"] == "standardize" and tr["std"]["price"] > 0
    # resume: a rerun of the same job returns at once; a killed run (work files left) finishes identically
    manifest = meta.raw["manifest"]
    assert prepare_table(path, tmp_path / "d", log=None, **kw) == out
    again = tmp_path / "again"
    prepare_table(path, again, log=None, **kw)
    (again / "meta.json").unlink()
    work = again / "_work"
    work.mkdir()
    (work / "fingerprint.txt").write_text(json.loads((out / "meta.json").read_text())["fingerprint"] + "\n")
    assert load_meta(prepare_table(path, again, log=None, **kw)).raw["manifest"] == manifest
    with pytest.raises(FileExistsError):
        prepare_table(path, again, log=None, **{**kw, "min_count": 3})


def test_wrong_types_are_clear_errors(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(_table(50), path)
    with pytest.raises(ValueError, match=r"column 'user' has type string: a dense column must be numeric"):
        infer_columns(path, "y", dense="user")
    with pytest.raises(ValueError, match=r"column 'hist' has type list<.*use --multi-hot"):
        infer_columns(path, "y", categorical="hist")
    with pytest.raises(ValueError, match=r"column 'price' has type double: a multi-hot column"):
        infer_columns(path, "y", multi_hot="price")
    with pytest.raises(ValueError, match=r"'nope' is not in the table"):
        infer_columns(path, "y", categorical="nope")
    with pytest.raises(ValueError, match=r"label column 'z' is not in the table"):
        infer_columns(path, "z")
    with pytest.raises(ValueError, match="not a multi-hot column"):
        infer_columns(path, "y", weights={"user": "hist_w"})
    cols = infer_columns(path, "y", categorical="user", multi_hot="hist")
    assert cols.ignored == {"item": "not named by --categorical / --multi-hot / --dense",
                            "hist_w": "not named by --categorical / --multi-hot / --dense",
                            "price": "not named by --categorical / --multi-hot / --dense"}
    bad = tmp_path / "w.parquet"
    pq.write_table(pa.table({"y": [0, 1], "h": [[1, 2], [3]], "w": [[1.0], [2.0]]}), bad)
    with pytest.raises(ValueError, match=r"weight column 'w': row 0 has 1 weights for 2 ids of 'h'"):
        prepare_table(bad, tmp_path / "wd", label="y", weights={"h": "w"}, min_count=1, log=None)


def test_cli_prepare_table(tmp_path, capsys):
    from experiments.cli import main

    path = tmp_path / "t.csv"
    pacsv.write_csv(pa.table({"y": [0, 1] * 20, "c": ["a", "b", "c", "d"] * 10, "x": [1.5] * 40}), path)
    assert main(["prepare", "table", str(path), "--label", "y", "--out", str(tmp_path / "d"), "--min-count", "1"]) == 0
    printed = capsys.readouterr().out
    assert "categorical  c (string)" in printed and "dense        x (double)" in printed
    assert load_meta(tmp_path / "d").num_embeddings == {"c": 6}
    assert main(["prepare", "table", str(path), "--label", "y", "--dense", "c", "--out", str(tmp_path / "e")]) == 2
    assert "column 'c' has type string" in capsys.readouterr().err
