"""The results store: one row per finished run, committed the moment the run ends.

The store is one SQLite file (the standard library's ``sqlite3``; no server). Each finished cell of a
sweep is one ``INSERT`` in its own transaction, so a process killed at any moment (even with SIGKILL)
leaves every earlier result intact and never a half-written one: SQLite's rollback journal makes each
commit atomic and durable. Several processes may write to the same file (SQLite serialises them).

A row keeps the searchable columns (method, budget, model, seed, bytes, AUC, throughput, status) next to
the complete :class:`experiments.training.train.RunResult` record as JSON, so nothing a run reported is lost.

    >>> import tempfile, pathlib
    >>> store = ResultStore(pathlib.Path(tempfile.mkdtemp()) / "results.sqlite")
    >>> store.record("demo", "k1", {"label": "hash", "method": "hash", "budget": "1/8", "model": "dlrm",
    ...              "seed": 0}, {"status": "ok", "test_auc": 0.75, "inference_bytes": 1000})
    >>> store.finished_keys("demo")
    {'k1'}
    >>> load(store.path)[["method", "budget", "test_auc"]].values.tolist()
    [['hash', '1/8', 0.75]]
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["STATUSES", "COLUMNS", "ResultStore", "load", "export_parquet"]

#: ``ok``: trained and evaluated. ``failed``: the run itself failed (divergence, NaN, constant predictions,
#: infeasible budget): deterministic, so a re-run skips it. ``error``: an exception outside the run's
#: own checks (a bug, a missing file): retried when the sweep is run again.
STATUSES = ("ok", "failed", "error")

#: Columns kept outside the JSON record, for queries and for pandas. ``record`` holds everything.
COLUMNS: dict[str, str] = {
    "sweep": "TEXT NOT NULL",
    "key": "TEXT NOT NULL",
    "label": "TEXT",          # the method's name in tables and plots (e.g. qr or qr_concat)
    "method": "TEXT",         # the registered method name
    "budget": "TEXT",         # as written in the sweep ("1/8", "64MiB", bytes); NULL: no budget
    "model": "TEXT",
    "seed": "INTEGER",
    "status": "TEXT NOT NULL",
    "failure_reason": "TEXT",
    "inference_bytes": "INTEGER",
    "training_bytes": "INTEGER",
    "full_table_bytes": "INTEGER",
    "valid_auc": "REAL",
    "valid_logloss": "REAL",
    "test_auc": "REAL",
    "test_logloss": "REAL",
    "bayes_auc_test": "REAL",
    "train_samples_per_s": "REAL",
    "wall_seconds": "REAL",
    "steps": "INTEGER",
    "dataset": "TEXT",
    "source": "TEXT",          # where the dataset came from ("generator:demo", "criteo-kaggle", ...)
    "protocol": "TEXT",        # the dataset's split protocol ("dlrm" or "random")
    "finished_at": "TEXT",     # UTC, ISO 8601
    "config": "TEXT",          # the run config, JSON
    "versions": "TEXT",        # torch / torchrec / embtable versions, JSON
    "record": "TEXT",          # the whole RunResult (or the error), JSON
}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs ("
    + ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
    + ", PRIMARY KEY (sweep, key))"
)
_CELL_FIELDS = ("label", "method", "budget", "model", "seed")
_RESULT_FIELDS = (
    "status", "failure_reason", "inference_bytes", "training_bytes", "full_table_bytes", "valid_auc",
    "valid_logloss", "test_auc", "test_logloss", "train_samples_per_s", "wall_seconds", "steps", "dataset",
)


class ResultStore:
    """A results file (SQLite). Opening creates it; every write is its own committed transaction.

    Args:
        path: the ``.sqlite`` file (created with its parent directory if missing).
        timeout: seconds a writer waits for another process's write lock before giving up.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.timeout)
        try:
            conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before record() returns
            with conn:  # one transaction: committed on success, rolled back on any exception
                yield conn
        finally:
            conn.close()

    def finished_keys(self, sweep: str, statuses: tuple[str, ...] = ("ok", "failed")) -> set[str]:
        """Keys of the cells of ``sweep`` whose status is one of ``statuses`` (the ones a re-run skips)."""
        marks = ",".join("?" * len(statuses))
        with self._connect() as conn:
            rows = conn.execute(f"SELECT key FROM runs WHERE sweep = ? AND status IN ({marks})", (sweep, *statuses))
            return {key for (key,) in rows}

    def record(self, sweep: str, key: str, cell: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """Write the result of one cell (replacing an earlier ``error`` row of the same cell).

        Args:
            sweep: the sweep's name.
            key: the cell's key (stable hash of its run config).
            cell: ``label``, ``method``, ``budget``, ``model``, ``seed`` of the cell.
            result: a ``RunResult.to_dict()``, or at least ``status`` (and ``failure_reason``).

        Raises:
            ValueError: ``result["status"]`` is not one of :data:`STATUSES`, or an ``ok`` result has no AUC.
        """
        status = result.get("status")
        if status not in STATUSES:
            raise ValueError(f"result status must be one of {STATUSES}, got {status!r}")
        if status == "ok" and result.get("test_auc") is None:
            raise ValueError(f"cell {key} of sweep {sweep!r}: an 'ok' result must carry test_auc")
        row: dict[str, Any] = {"sweep": sweep, "key": key}
        row.update({f: cell.get(f) for f in _CELL_FIELDS})
        if row["budget"] is not None:
            row["budget"] = str(row["budget"])
        row.update({f: result.get(f) for f in _RESULT_FIELDS})
        bayes = result.get("bayes_auc") or {}
        row["bayes_auc_test"] = bayes.get("test")
        dataset_meta = result.get("dataset_meta") or {}
        row["source"] = dataset_meta.get("source")
        row["protocol"] = dataset_meta.get("protocol")
        row["finished_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        row["config"] = json.dumps(result.get("config"), sort_keys=True)
        row["versions"] = json.dumps(result.get("versions"), sort_keys=True)
        row["record"] = json.dumps(dict(result), sort_keys=True, default=str)
        names = ",".join(row)
        marks = ",".join("?" * len(row))
        with self._connect() as conn:
            conn.execute(f"INSERT OR REPLACE INTO runs ({names}) VALUES ({marks})", tuple(row.values()))

    def sweeps(self) -> list[str]:
        """Names of the sweeps with at least one row."""
        with self._connect() as conn:
            return [s for (s,) in conn.execute("SELECT DISTINCT sweep FROM runs ORDER BY sweep")]


def load(path: str | os.PathLike, sweep: str | None = None) -> pd.DataFrame:
    """The store at ``path`` as a DataFrame, one row per run (``config``/``record`` stay JSON strings).

    Args:
        path: a results file written by :class:`ResultStore`.
        sweep: only this sweep's rows (``None``: all).

    Raises:
        FileNotFoundError: there is no results file at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results store there (a sweep writes one: `embtable sweep ...`)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        query, params = "SELECT * FROM runs", ()
        if sweep is not None:
            query, params = query + " WHERE sweep = ?", (sweep,)
        frame = pd.read_sql_query(query + " ORDER BY sweep, label, model, budget, seed", conn, params=params)
    finally:
        conn.close()
    return frame


def export_parquet(path: str | os.PathLike, out: str | os.PathLike, sweep: str | None = None) -> Path:
    """Write the store (or one sweep) as a Parquet file, atomically; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame = load(path, sweep)
    from embtable.atomic import atomic_write  # here: reading a store needs no torch

    with atomic_write(out) as f:
        frame.to_parquet(f, index=False)
    return out
