"""Batches of a dataset split as TorchRec ``Batch`` objects, shuffled per epoch, with bounded memory."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .meta import SPLITS, DataPrepError, DatasetMeta, load_meta

__all__ = ["BatchLoader", "Bag", "read_block", "read_shard", "CorruptShardError"]


class CorruptShardError(DataPrepError):
    """A shard of a dataset directory is missing, unreadable, or does not match its manifest checksum."""


#: Shards whose bytes matched the manifest's sha256 in this process, as (path, size, mtime): each shard is
#: checked once, on its first read (hashing is cheap next to parquet decoding, and the bytes are read anyway).
_VERIFIED: set[tuple[str, int, int]] = set()


def _rebuild_hint(meta: DatasetMeta) -> str:
    inputs = [i["file"] for i in meta.raw.get("inputs", [])]
    how = (f"convert {', '.join(inputs)} again" if inputs else
           f"generate it again (`embtable prepare generate --out {meta.path} ...`)" if meta.source.startswith("generator")
           else "prepare it again from its source")
    return f"the dataset must be rebuilt: delete {meta.path} and {how} (source: {meta.source})"


def _shard_bytes(path: pathlib.Path, meta: DatasetMeta) -> bytes:
    """The bytes of a shard, checked against ``meta.json``'s sha256 on the first read in this process."""
    rel = path.relative_to(meta.path).as_posix() if path.is_relative_to(meta.path) else str(path)
    expected = next((s.get("sha256") for s in meta.raw["manifest"]["shards"] if s["path"] == rel), None)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as err:
        raise CorruptShardError(f"shard {path} listed in {meta.path / 'meta.json'} cannot be read ({err}); "
                                f"{_rebuild_hint(meta)}") from None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if expected and key not in _VERIFIED:
        got = hashlib.sha256(data).hexdigest()
        if got != expected:
            raise CorruptShardError(
                f"shard {path} does not match the manifest in {meta.path / 'meta.json'}: its sha256 is "
                f"{got[:16]}..., the manifest says {expected[:16]}... (the file was damaged or changed after "
                f"it was written); {_rebuild_hint(meta)}"
            )
        _VERIFIED.add(key)
    return data


def _read_table(path: pathlib.Path, meta: DatasetMeta) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """A checked shard as its Arrow table, ``labels`` float32 ``[N]`` and ``dense`` float32 ``[N, num_dense]``."""
    data = _shard_bytes(path, meta)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise CorruptShardError(f"shard {path} cannot be decoded as parquet ({type(err).__name__}: {err}); "
                                f"{_rebuild_hint(meta)}") from None
    labels = table[meta.label].to_numpy().astype(np.float32)
    dense = np.empty((table.num_rows, meta.num_dense), dtype=np.float32)
    for j, name in enumerate(meta.dense_features):
        dense[:, j] = table[name].to_numpy()
    return table, labels, dense


def read_shard(path: pathlib.Path, meta: DatasetMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One parquet shard as ``labels`` float32 ``[N]``, ``dense`` float32 ``[N, num_dense]``, ``ids`` int64 ``[N, F]``.

    A shard that does not match its manifest checksum or cannot be decoded raises :class:`CorruptShardError`
    naming it and how to rebuild the dataset.
    One id per feature: a dataset with multi-hot features is read by :func:`read_block`.
    """
    if meta.multi_hot_features:
        raise ValueError(f"{meta.path} has multi-hot features {meta.multi_hot_features}: read it with read_block "
                         "(or BatchLoader), which keeps the bags")
    table, labels, dense = _read_table(pathlib.Path(path), meta)
    n = table.num_rows
    ids = np.empty((n, len(meta.categorical_features)), dtype=np.int64)
    for j, name in enumerate(meta.categorical_features):
        ids[:, j] = table[name].to_numpy()
    return labels, dense, ids


@dataclasses.dataclass
class Bag:
    """The ids of one multi-hot feature for ``N`` rows, jagged: row ``i`` holds ``values[offsets[i]:offsets[i+1]]``.

    Shape:
        ``offsets`` int64 ``[N + 1]``, ``values`` int64 ``[L]``, ``weights`` float32 ``[L]`` or ``None``.
    """

    offsets: np.ndarray
    values: np.ndarray
    weights: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> Bag:
        """The bags of ``rows`` (any order, vectorised: no loop over rows)."""
        lengths = self.lengths[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        index = np.repeat(self.offsets[:-1][rows] - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return Bag(offsets, self.values[index], None if self.weights is None else self.weights[index])

    def slice(self, start: int, stop: int) -> Bag:
        a, b = self.offsets[start], self.offsets[stop]
        return Bag(self.offsets[start:stop + 1] - a, self.values[a:b],
                   None if self.weights is None else self.weights[a:b])

    @staticmethod
    def concat(bags: list[Bag]) -> Bag:
        shifts = np.cumsum([0] + [len(b.values) for b in bags[:-1]])
        offsets = np.concatenate([bags[0].offsets[:1]] + [b.offsets[1:] + s for b, s in zip(bags, shifts)])
        weights = None if bags[0].weights is None else np.concatenate([b.weights for b in bags])
        return Bag(offsets.astype(np.int64), np.concatenate([b.values for b in bags]), weights)


def _list_column(table, name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    arr = table[name].combine_chunks()
    offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    values = np.asarray(arr.values.to_numpy(), dtype=dtype)[offsets[0]:offsets[-1]]
    return offsets - offsets[0], values


def read_block(path: pathlib.Path, meta: DatasetMeta) -> tuple:
    """One shard as ``(labels [N], dense [N, num_dense], ids [N, F1], bags)``.

    ``ids`` holds the one-id features (in ``categorical_features`` order, multi-hot ones left out) and
    ``bags`` one :class:`Bag` per multi-hot feature (in ``multi_hot_features`` order).
    """
    if not meta.multi_hot_features:
        return (*read_shard(path, meta), [])
    table, labels, dense = _read_table(pathlib.Path(path), meta)
    n = table.num_rows
    single = [f for f in meta.categorical_features if f not in meta.multi_hot_features]
    ids = np.empty((n, len(single)), dtype=np.int64)
    for j, name in enumerate(single):
        ids[:, j] = table[name].to_numpy()
    bags = []
    for name in meta.multi_hot_features:
        offsets, values = _list_column(table, name, np.int64)
        weights = None
        if name in meta.weighted_features:
            _, weights = _list_column(table, meta.weighted_features[name], np.float32)
        bags.append(Bag(offsets, values, weights))
    return labels, dense, ids, bags


class BatchLoader:
    """Iterate over a split of a dataset directory in TorchRec ``Batch`` es.

    Shards are visited in an order shuffled per epoch; rows are shuffled within a buffer of about
    ``buffer_rows`` rows (several shards), so memory stays bounded whatever the split size. The next
    shard is read in a background thread while the current buffer is served.

    Args:
        path: dataset directory (``generate_dataset`` / ``convert_*`` output).
        split: ``"train"``, ``"valid"`` or ``"test"``.
        batch_size: rows per batch.
        shuffle: shuffle shard order and rows (deterministic for ``seed`` and the epoch).
        seed: base seed; :meth:`set_epoch` changes the order deterministically.
        drop_last: drop the last incomplete batch.
        buffer_rows: rows held for shuffling.

    Shape:
        Each ``Batch`` has ``dense_features`` float32 ``[B, num_dense]``, ``sparse_features`` a
        ``KeyedJaggedTensor`` with keys ``categorical_features`` (values int64, feature-major; lengths 1
        for one-id features, the bag sizes (0 ..) for ``meta.multi_hot_features``; ``weights`` float32
        when the dataset has ``weighted_features``, 1.0 for every id of the other features),
        ``labels`` float32 ``[B]``.

    Example:
        >>> import tempfile
        >>> from data_prep.generator import GeneratorConfig, generate_dataset
        >>> path = generate_dataset(GeneratorConfig(scale=1 / 3000, num_rows=500), tempfile.mkdtemp(),
        ...                         progress=False)   # 429 training rows
        >>> loader = BatchLoader(path, "train", 128, seed=0)
        >>> loader.set_epoch(0)   # a new shuffle each epoch
        >>> batches = list(loader)
        >>> [len(b.labels) for b in batches], batches[0].dense_features.shape, batches[0].sparse_features.keys()[:2]
        ([128, 128, 128, 45], torch.Size([128, 13]), ['C1', 'C2'])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        buffer_rows: int = 1 << 18,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.meta = load_meta(path)
        self.split = split
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.buffer_rows = max(int(buffer_rows), self.batch_size)
        self.epoch = 0
        self._shards = self.meta.shards(split)
        self.num_rows = int(sum(self.meta.shard_rows(split)))
        self.keys = list(self.meta.categorical_features)

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of epoch ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _make_batch(self, labels: np.ndarray, dense: np.ndarray, ids: np.ndarray, bags: list[Bag] | None = None):
        import torch
        from torchrec.datasets.utils import Batch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        b = len(labels)
        if not bags:
            values = torch.from_numpy(np.ascontiguousarray(ids.T)).reshape(-1)  # feature-major [F * B]
            kjt = KeyedJaggedTensor(keys=self.keys, values=values,
                                    lengths=torch.from_numpy(np.ones(b * len(self.keys), dtype=np.int32)), stride=b)
        else:
            kjt = self._jagged(b, ids, bags)
        return Batch(dense_features=torch.from_numpy(np.ascontiguousarray(dense)), sparse_features=kjt,
                     labels=torch.from_numpy(np.ascontiguousarray(labels)))

    def _jagged(self, b: int, ids: np.ndarray, bags: list[Bag]):
        """The KJT of a batch with multi-hot features: per key, its ids column or its bags."""
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        multi = {name: bag for name, bag in zip(self.meta.multi_hot_features, bags)}
        weighted = bool(self.meta.weighted_features)
        values, lengths, weights = [], [], []
        j = 0
        for key in self.keys:
            if key in multi:
                bag = multi[key]
                values.append(bag.values)
                lengths.append(bag.lengths)
                if weighted:
                    weights.append(bag.weights if bag.weights is not None else np.ones(len(bag.values), np.float32))
            else:
                values.append(ids[:, j])
                lengths.append(np.ones(b, dtype=np.int64))
                if weighted:
                    weights.append(np.ones(b, dtype=np.float32))
                j += 1
        return KeyedJaggedTensor(
            keys=self.keys, values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)), stride=b,
            weights=torch.from_numpy(np.concatenate(weights).astype(np.float32)) if weighted else None)

    def _arrays(self) -> Iterator[tuple]:
        """Row blocks ``(labels, dense, ids, bags)`` in final order; all but the last have a multiple of B rows."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self._shards)) if self.shuffle else np.arange(len(self._shards))
        parts: list[tuple] = []
        held = 0
        with cf.ThreadPoolExecutor(max_workers=1) as io:
            pending = io.submit(read_block, self._shards[order[0]], self.meta) if len(order) else None
            for i in range(len(order)):
                part = pending.result()
                pending = io.submit(read_block, self._shards[order[i + 1]], self.meta) if i + 1 < len(order) else None
                parts.append(part)
                held += len(part[0])
                if held >= self.buffer_rows:
                    block = self._mix(parts, rng)
                    keep = len(block[0]) - len(block[0]) % self.batch_size
                    yield _rows(block, 0, keep)
                    parts = [_rows(block, keep, len(block[0]))]
                    held = len(parts[0][0])
        if held:
            yield self._mix(parts, rng)

    def _mix(self, parts, rng):
        labels = np.concatenate([p[0] for p in parts])
        dense = np.concatenate([p[1] for p in parts])
        ids = np.concatenate([p[2] for p in parts])
        bags = [Bag.concat([p[3][k] for p in parts]) for k in range(len(parts[0][3]))]
        if self.shuffle:
            perm = rng.permutation(len(labels))
            labels, dense, ids = labels[perm], dense[perm], ids[perm]
            bags = [bag.take(perm) for bag in bags]
        return labels, dense, ids, bags

    def __iter__(self):
        b = self.batch_size
        for labels, dense, ids, bags in self._arrays():
            n = len(labels)
            for s in range(0, n, b):
                e = min(s + b, n)
                if e - s < b and self.drop_last:
                    return
                yield self._make_batch(labels[s:e], dense[s:e], ids[s:e], [bag.slice(s, e) for bag in bags])

    def __repr__(self) -> str:
        return (f"BatchLoader({str(self.meta.path)!r}, split={self.split!r}, batch_size={self.batch_size}, "
                f"rows={self.num_rows}, shards={len(self._shards)}, shuffle={self.shuffle}, seed={self.seed})")


def _rows(block: tuple, start: int, stop: int) -> tuple:
    """Rows ``start:stop`` of a ``(labels, dense, ids, bags)`` block."""
    labels, dense, ids, bags = block
    return labels[start:stop], dense[start:stop], ids[start:stop], [bag.slice(start, stop) for bag in bags]
