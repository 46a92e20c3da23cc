"""Writing parquet shards atomically, and the per-chunk "done" records that make runs resumable.

A long job (conversion, generation) is cut into numbered chunks. Chunk ``c`` writes its shards
(``{split}/part-{c:05d}.parquet``) and then, last, a small record ``_work/chunk-{c:05d}.rec`` with the
shard row counts and checksums plus whatever statistics the job merges at the end. A rerun skips every
chunk whose record exists, so a killed run continues where it stopped and ends with the same manifest.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .meta import SPLITS, sha256_file, temp_file
from .schema import LABEL

__all__ = ["write_counts", "write_shard", "shard_path", "record_path", "write_record", "read_record", "make_table"]


def shard_path(split: str, chunk: int) -> str:
    """Relative path of chunk ``chunk``'s shard of ``split``."""
    return f"{split}/part-{chunk:05d}.parquet"


def record_path(out_dir: pathlib.Path, chunk: int) -> pathlib.Path:
    return out_dir / "_work" / f"chunk-{chunk:05d}.rec"


def make_table(
    labels: np.ndarray, dense: np.ndarray, ids: np.ndarray, dense_names: Sequence[str], cat_names: Sequence[str]
) -> pa.Table:
    """Arrow table with columns ``label`` (int8), dense (float32) and categorical ids (int64).

    Shape:
        labels ``[N]``, dense ``[N, num_dense]``, ids ``[N, num_categorical]``.
    """
    cols = [_column(labels, np.int8, pa.int8())]
    cols += [_column(dense[:, j], np.float32, pa.float32()) for j in range(len(dense_names))]
    cols += [_column(ids[:, j], np.int64, pa.int64()) for j in range(len(cat_names))]
    return pa.Table.from_arrays(cols, names=[LABEL, *dense_names, *cat_names])


def _column(values: np.ndarray, dtype, arrow_type: pa.DataType) -> pa.Array:
    """A 1-d numpy array as an Arrow array without nulls (zero-copy when contiguous).

    Built from the buffer: ``pa.array`` would import pandas (~0.2 s in every worker process).
    """
    values = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


#: Categorical columns with at most this many ids are dictionary-encoded in parquet (smaller files);
#: bigger ones are written plain (dictionary encoding would only cost time).
DICTIONARY_MAX_IDS = 1 << 16


def write_shard(out_dir: pathlib.Path, rel: str, table: pa.Table, dictionary: Sequence[str] | bool = True) -> dict:
    """Write ``table`` to ``out_dir/rel`` atomically; return its manifest entry (path, rows, sha256).

    ``dictionary``: columns to dictionary-encode (or True / False for all / none).
    """
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        # Statistics would let readers skip row groups, which nothing here does: keep them off.
        pq.write_table(table, tmp, compression="snappy", write_statistics=False,
                       use_dictionary=dictionary if isinstance(dictionary, bool) else list(dictionary))
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"path": rel, "split": rel.split("/")[0], "rows": table.num_rows, "sha256": digest}


def write_split_shards(
    out_dir: pathlib.Path,
    chunk: int,
    split_codes: np.ndarray,
    labels: np.ndarray,
    dense: np.ndarray,
    ids: np.ndarray,
    dense_names: Sequence[str],
    cat_names: Sequence[str],
    num_embeddings: Sequence[int] | None = None,
) -> list[dict]:
    """Write chunk ``chunk``'s rows into one shard per split present; return the manifest entries.

    With ``num_embeddings`` only the label, dense and small categorical columns are dictionary-encoded.
    """
    dictionary: Sequence[str] | bool = True
    if num_embeddings is not None:
        dictionary = [LABEL, *dense_names] + [c for c, n in zip(cat_names, num_embeddings) if n <= DICTIONARY_MAX_IDS]
    entries = []
    for code, split in enumerate(SPLITS):
        sel = split_codes == code
        if not sel.any():
            continue
        if sel.all():
            table = make_table(labels, dense, ids, dense_names, cat_names)
        else:
            table = make_table(labels[sel], dense[sel], ids[sel], dense_names, cat_names)
        entries.append(write_shard(out_dir, shard_path(split, chunk), table, dictionary))
    return entries


def write_record(path: pathlib.Path, **arrays: np.ndarray) -> None:
    """Atomically write named arrays (a chunk's done-record, raw rows, a vocabulary).

    The format is a plain sequence of ``.npy`` arrays (names first): unlike ``np.savez`` no zip
    checksum is computed, which matters for the raw rows of a large conversion.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.array(list(arrays), dtype=np.str_))
            for a in arrays.values():
                np.save(f, np.asarray(a), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_record(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Arrays written by :func:`write_record`, by name."""
    with open(path, "rb") as f:
        names = np.load(f, allow_pickle=False)
        return {str(name): np.load(f, allow_pickle=False) for name in names}


def entries_to_arrays(entries: list[dict]) -> dict[str, np.ndarray]:
    """Manifest entries as npz-storable arrays (for the done-record)."""
    return {
        "shard_paths": np.array([e["path"] for e in entries], dtype=np.str_),
        "shard_rows": np.array([e["rows"] for e in entries], dtype=np.int64),
        "shard_sha256": np.array([e["sha256"] for e in entries], dtype=np.str_),
    }


def arrays_to_entries(rec: dict[str, np.ndarray]) -> list[dict]:
    return [
        {"path": str(p), "split": str(p).split("/")[0], "rows": int(r), "sha256": str(h)}
        for p, r, h in zip(rec["shard_paths"], rec["shard_rows"], rec["shard_sha256"])
    ]


def write_counts(out: pathlib.Path, counts: dict[str, np.ndarray]) -> None:
    """Atomically write ``counts.npz``: one int64 array of training id frequencies per feature."""
    fd, tmp = temp_file(out / "counts.npz", prefix=".counts.")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v, dtype=np.int64) for k, v in counts.items()})
        os.replace(tmp, out / "counts.npz")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
