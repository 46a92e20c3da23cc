"""Batches of a dataset split as TorchRec ``Batch`` objects, shuffled per epoch, with bounded memory."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import pathlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .meta import SPLITS, DataPrepError, DatasetMeta, load_meta

__all__ = ["BatchLoader", "read_shard", "CorruptShardError"]


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


def read_shard(path: pathlib.Path, meta: DatasetMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One parquet shard as ``labels`` float32 ``[N]``, ``dense`` float32 ``[N, num_dense]``, ``ids`` int64 ``[N, F]``.

    A shard that does not match its manifest checksum or cannot be decoded raises :class:`CorruptShardError`
    naming it and how to rebuild the dataset.
    """
    path = pathlib.Path(path)
    data = _shard_bytes(path, meta)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise CorruptShardError(f"shard {path} cannot be decoded as parquet ({type(err).__name__}: {err}); "
                                f"{_rebuild_hint(meta)}") from None
    n = table.num_rows
    labels = table[meta.label].to_numpy().astype(np.float32)
    dense = np.empty((n, meta.num_dense), dtype=np.float32)
    for j, name in enumerate(meta.dense_features):
        dense[:, j] = table[name].to_numpy()
    ids = np.empty((n, len(meta.categorical_features)), dtype=np.int64)
    for j, name in enumerate(meta.categorical_features):
        ids[:, j] = table[name].to_numpy()
    return labels, dense, ids


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
        ``KeyedJaggedTensor`` with keys ``categorical_features`` (one id per bag: all lengths 1, values
        int64, feature-major), ``labels`` float32 ``[B]``.

    Example:
        >>> # loader = BatchLoader("data/demo", "train", 2048, seed=0)
        >>> # for epoch in range(2): loader.set_epoch(epoch); for batch in loader: ...
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

    def _make_batch(self, labels: np.ndarray, dense: np.ndarray, ids: np.ndarray):
        import torch
        from torchrec.datasets.utils import Batch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        b = len(labels)
        values = torch.from_numpy(np.ascontiguousarray(ids.T)).reshape(-1)  # feature-major [F * B]
        kjt = KeyedJaggedTensor(keys=self.keys, values=values,
                                lengths=torch.from_numpy(np.ones(b * len(self.keys), dtype=np.int32)), stride=b)
        return Batch(dense_features=torch.from_numpy(np.ascontiguousarray(dense)), sparse_features=kjt,
                     labels=torch.from_numpy(np.ascontiguousarray(labels)))

    def _arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Row blocks ``(labels, dense, ids)`` in final order; all but the last have a multiple of B rows."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self._shards)) if self.shuffle else np.arange(len(self._shards))
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        held = 0
        with cf.ThreadPoolExecutor(max_workers=1) as io:
            pending = io.submit(read_shard, self._shards[order[0]], self.meta) if len(order) else None
            for i in range(len(order)):
                part = pending.result()
                pending = io.submit(read_shard, self._shards[order[i + 1]], self.meta) if i + 1 < len(order) else None
                parts.append(part)
                held += len(part[0])
                if held >= self.buffer_rows:
                    block = self._mix(parts, rng)
                    keep = len(block[0]) - len(block[0]) % self.batch_size
                    yield tuple(a[:keep] for a in block)
                    parts = [tuple(a[keep:] for a in block)]
                    held = len(parts[0][0])
        if held:
            yield self._mix(parts, rng)

    def _mix(self, parts, rng):
        labels = np.concatenate([p[0] for p in parts])
        dense = np.concatenate([p[1] for p in parts])
        ids = np.concatenate([p[2] for p in parts])
        if self.shuffle:
            perm = rng.permutation(len(labels))
            labels, dense, ids = labels[perm], dense[perm], ids[perm]
        return labels, dense, ids

    def __iter__(self):
        b = self.batch_size
        for labels, dense, ids in self._arrays():
            n = len(labels)
            for s in range(0, n, b):
                e = min(s + b, n)
                if e - s < b and self.drop_last:
                    return
                yield self._make_batch(labels[s:e], dense[s:e], ids[s:e])

    def __repr__(self) -> str:
        return (f"BatchLoader({str(self.meta.path)!r}, split={self.split!r}, batch_size={self.batch_size}, "
                f"rows={self.num_rows}, shards={len(self._shards)}, shuffle={self.shuffle}, seed={self.seed})")
