"""The metadata of a dataset directory, and small file helpers (atomic writes, checksums).

A dataset directory looks like::

    out_dir/
      meta.json              schema, cardinalities, split, transform, manifest (shards + malformed rows)
      counts.npz             training-split id frequencies, one int64 array per categorical feature
      train/part-00000.parquet ...   label (int8), dense (float32), categorical ids (int64, 0..n-1)
      valid/part-00000.parquet ...
      test/part-00000.parquet ...

Everything is readable with plain pandas / pyarrow.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import re
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from embtable.features import FeatureSpec

__all__ = [
    "DataPrepError", "DatasetMeta", "load_meta", "atomic_write_bytes", "atomic_write_json", "sha256_file",
    "SPLITS", "is_disk_full", "temp_file",
]

#: The splits every dataset has, in this order.
SPLITS = ("train", "valid", "test")


class DataPrepError(ValueError):
    """Bad input data or a damaged dataset directory: the message names the file and what to do."""


def is_disk_full(err: BaseException) -> bool:
    """``err`` is a write that found the disk full, a quota or a file size limit (``RLIMIT_FSIZE``).

    Python's own writes say so with an errno; numpy's ``tofile`` and pyarrow's writers report a short
    write as a bare ``OSError("N requested and M written")``.
    """
    if not isinstance(err, OSError):
        return False
    if err.errno is not None:
        return err.errno in {getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT") if hasattr(errno, n)}
    return re.search(r"\d+ requested and \d+ written", str(err)) is not None


def _umask() -> int:
    """This process's umask (embtable's atomic writer reads it without changing it where it can)."""
    return _atomic()._umask()


def temp_file(path: pathlib.Path, prefix: str | None = None) -> tuple[int, str]:
    """``tempfile.mkstemp`` beside ``path``, with the mode a plain ``open`` would give (``0o666 & ~umask``).

    ``mkstemp`` creates its files with mode 0600, which would leave every dataset file unreadable for the
    other users of a shared machine once renamed into place.
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _atomic():
    """embtable's one atomic writer, the module :mod:`embtable.atomic` (standard library only).

    ``import embtable.atomic`` would first run ``embtable/__init__.py``, which imports torch and torchrec
    (seconds; it was most of a small conversion's time): unless embtable is already imported, the module's
    file is loaded on its own, once per process.
    """
    global _ATOMIC
    if _ATOMIC is None:
        import sys

        if "embtable" in sys.modules:
            import embtable.atomic as mod
        else:
            import importlib.util

            spec = importlib.util.find_spec("embtable")  # locates the package without importing it
            if spec is None or spec.origin is None:
                raise ImportError("data_prep writes its metadata with embtable.atomic: install embtable")
            path = pathlib.Path(spec.origin).with_name("atomic.py")
            spec = importlib.util.spec_from_file_location("_embtable_atomic", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        _ATOMIC = mod
    return _ATOMIC


_ATOMIC = None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably with embtable's one writer
    (:func:`embtable.atomic.atomic_write`, loaded without the torch-importing ``embtable`` package)."""
    _atomic().atomic_write_bytes(path, data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically and durably."""
    _atomic().atomic_write_json(path, obj, indent=1)


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a dataset directory holds (parsed ``meta.json``).

    Args:
        path: the dataset directory.
        num_dense: number of dense (float) features, columns ``dense_features``.
        dense_features: dense column names in order.
        categorical_features: categorical column names in order (the KJT keys).
        num_embeddings: per categorical feature, the number of ids (valid ids ``0 .. n-1``).
        protocol: ``"dlrm"`` (consecutive days) or ``"random"`` (8:1:1), see ``split``.
        split_rows: rows per split (``"train"``, ``"valid"``, ``"test"``).
        positive_rate: fraction of positive labels per split.
        bayes_auc: per split, the AUC of the generator's true click probabilities (``None`` for real data).
        source: where the data came from (``"generator:demo"``, ``"criteo-kaggle"``, ``"avazu"`` ...).
        oov_id: the id unknown / rare values map to (``None`` when the data has no vocabulary, e.g.
            generated data written directly).
        raw: the whole ``meta.json`` dict (split definition, dense transform, manifest, config).
    """

    path: pathlib.Path
    num_dense: int
    dense_features: list[str]
    categorical_features: list[str]
    num_embeddings: dict[str, int]
    protocol: str
    split_rows: dict[str, int]
    positive_rate: dict[str, float]
    bayes_auc: dict[str, float] | None
    source: str
    oov_id: int | None
    raw: dict = dataclasses.field(repr=False)

    @property
    def label(self) -> str:
        """Name of the label column."""
        return self.raw["label"]

    @property
    def multi_hot_features(self) -> list[str]:
        """Categorical features stored as bags of ids (list columns); the others hold one id per row."""
        return list(self.raw.get("multi_hot_features") or [])

    @property
    def weighted_features(self) -> dict[str, str]:
        """Multi-hot feature -> the shard column holding its per-id weights (empty: no weights)."""
        return dict(self.raw.get("weighted_features") or {})

    def shards(self, split: str) -> list[pathlib.Path]:
        """Parquet files of ``split``, in manifest order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [self.path / s["path"] for s in self.raw["manifest"]["shards"] if s["split"] == split]

    def shard_rows(self, split: str) -> list[int]:
        """Row counts of :meth:`shards` (same order)."""
        return [s["rows"] for s in self.raw["manifest"]["shards"] if s["split"] == split]

    def counts(self) -> dict[str, np.ndarray]:
        """Training-split id frequencies: ``counts[name][i]`` = occurrences of id ``i`` (int64, shape ``[n]``)."""
        with np.load(self.path / self.raw["counts_file"]) as z:
            return {name: z[name].astype(np.int64, copy=False) for name in self.categorical_features}

    def feature_specs(self, embedding_dim: int, with_counts: bool = True) -> list[FeatureSpec]:
        """One :class:`FeatureSpec` per categorical feature, in order, optionally with training counts.

        Example:
            >>> import tempfile
            >>> from data_prep.generator import GeneratorConfig, generate_dataset
            >>> path = generate_dataset(GeneratorConfig(scale=1 / 3000, num_rows=500), tempfile.mkdtemp(),
            ...                         progress=False)
            >>> specs = load_meta(path).feature_specs(16)
            >>> len(specs), specs[2].name, specs[2].num_embeddings, int(specs[2].counts.sum())
            (26, 'C3', 3377, 429)
        """
        from embtable.features import FeatureSpec  # lazy: embtable imports torch, workers need not

        if self.split_rows.get("train", 0) <= 0:
            raise DataPrepError(
                f"dataset {self.path} has no training rows (rows per split: "
                + ", ".join(f"{k} {v:,}" for k, v in self.split_rows.items())
                + "): nothing to size tables or train on; prepare it again from a file with data rows"
            )
        counts = self.counts() if with_counts else {}
        return [
            FeatureSpec(name, self.num_embeddings[name], embedding_dim, counts.get(name))
            for name in self.categorical_features
        ]


def load_meta(path: str | os.PathLike) -> DatasetMeta:
    """Read ``meta.json`` of a dataset directory written by ``generate_dataset`` / ``convert_*``."""
    path = pathlib.Path(path)
    file = path / "meta.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} is not a finished dataset directory "
            "(create one with `python -m data_prep generate --preset demo --out DIR` or convert-criteo)"
        )
    raw = json.loads(file.read_text())
    return DatasetMeta(
        path=path,
        num_dense=len(raw["dense_features"]),
        dense_features=list(raw["dense_features"]),
        categorical_features=list(raw["categorical_features"]),
        num_embeddings={k: int(v) for k, v in raw["num_embeddings"].items()},
        protocol=raw["protocol"],
        split_rows={k: int(v) for k, v in raw["split_rows"].items()},
        positive_rate={k: float(v) for k, v in raw["positive_rate"].items()},
        bayes_auc=None if raw.get("bayes_auc") is None else {k: float(v) for k, v in raw["bayes_auc"].items()},
        source=raw["source"],
        oov_id=raw.get("oov_id"),
        raw=raw,
    )
