"""BatchLoader: TorchRec batches, shapes, coverage, per-epoch shuffling, bounded buffer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_prep import BatchLoader, GeneratorConfig, generate_dataset, load_meta

CFG = GeneratorConfig(scale=1 / 3000, num_rows=7000, rows_per_shard=1000, calibration_rows=2000)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(CFG, tmp_path_factory.mktemp("loader") / "d", progress=False)


def _rows(batches) -> np.ndarray:
    """Each row as (label, dense..., ids...) so batches can be compared as sets of rows."""
    out = []
    for b in batches:
        kjt = b.sparse_features
        ids = kjt.values().reshape(len(kjt.keys()), -1).t()  # feature-major -> [B, F]
        out.append(torch.cat([b.labels[:, None].double(), b.dense_features.double(), ids.double()], 1).numpy())
    return np.concatenate(out)


def test_batches_are_torchrec_batches(dataset):
    meta = load_meta(dataset)
    loader = BatchLoader(dataset, "train", 512, seed=0)
    assert loader.num_rows == meta.split_rows["train"] == 6000
    batches = list(loader)
    assert len(batches) == len(loader) == 12  # 11 full + 1 of 384
    b = batches[0]
    assert isinstance(b, Batch) and isinstance(b.sparse_features, KeyedJaggedTensor)
    assert b.dense_features.dtype == torch.float32 and b.dense_features.shape == (512, 13)
    assert b.labels.dtype == torch.float32 and b.labels.shape == (512,)
    kjt = b.sparse_features
    assert kjt.keys() == meta.categorical_features and kjt.stride() == 512
    assert kjt.values().dtype == torch.int64 and torch.all(kjt.lengths() == 1)
    # Feature-major: the values of key C3 are the batch's C3 ids.
    ids = kjt.values().reshape(26, 512)
    torch.testing.assert_close(kjt["C3"].values(), ids[2])
    assert batches[-1].labels.shape == (6000 - 11 * 512,)
    # Every row exactly once: same multiset of rows as the parquet files.
    frame = pd.concat([pd.read_parquet(s) for s in meta.shards("train")])
    want = frame[[meta.label, *meta.dense_features, *meta.categorical_features]].to_numpy(np.float64)
    got = _rows(batches)
    np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


def test_shuffle_is_deterministic_per_epoch(dataset):
    a = BatchLoader(dataset, "train", 1000, seed=3, buffer_rows=2500)
    b = BatchLoader(dataset, "train", 1000, seed=3, buffer_rows=2500)
    first = _rows(a)
    np.testing.assert_array_equal(first, _rows(b))
    a.set_epoch(1)
    second = _rows(a)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.sort(first, axis=0), np.sort(second, axis=0))
    a.set_epoch(0)
    np.testing.assert_array_equal(first, _rows(a))
    # Shuffling mixes shards: the first batch holds rows from several of them.
    assert len(np.unique(first[:1000, 0:3], axis=0)) > 1


def test_no_shuffle_keeps_file_order_and_drop_last(dataset):
    meta = load_meta(dataset)
    loader = BatchLoader(dataset, "test", 128, shuffle=False, drop_last=True)
    frame = pd.concat([pd.read_parquet(s) for s in meta.shards("test")], ignore_index=True)
    batches = list(loader)
    assert len(batches) == len(loader) == len(frame) // 128
    np.testing.assert_array_equal(batches[0].labels.numpy(), frame["label"].to_numpy()[:128].astype(np.float32))
    with pytest.raises(ValueError, match="split"):
        BatchLoader(dataset, "dev", 10)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(dataset, "train", 0)
