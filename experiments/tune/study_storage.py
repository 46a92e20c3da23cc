"""Where an Optuna study lives, and how several workers share it safely.

Storages, by URL:

- ``sqlite:///path/study.sqlite3`` (the default, one worker): a file, no server. SQLite locks the whole
  file on every write, so it is refused for more than one worker.
- ``journal:path/study.journal`` (or any path ending in ``.journal``/``.log``): Optuna's
  ``JournalStorage`` over ``JournalFileBackend``, an append-only file that several processes (also on
  several machines sharing a filesystem) write safely.
- ``postgresql://user:pass@host:port/db``: Optuna's ``RDBStorage`` on a PostgreSQL server.

Two things Optuna alone does not give several workers, added here:

- **Dead workers.** Every running trial sends a heartbeat; a trial whose heartbeat is older than the
  grace period belonged to a worker that died (killed, preempted): it is marked ``FAIL`` and re-queued
  with the same parameters (``RetryHeartbeatStaleTrialCallback``). RDB storages use Optuna's own
  heartbeat (``heartbeat_interval``, ``grace_period``); the journal storage has none, so the heartbeat is
  the trial's system attribute ``heartbeat`` (a timestamp written every interval).
- **An exact trial budget.** ``MaxTrialsCallback`` stops a worker *after* a trial ends, so two workers
  can both start the last trial. Instead, a worker claims a trial under a lock held across the count and
  the ``ask`` (a file lock next to the file storages, a PostgreSQL advisory lock on the server).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

__all__ = ["StorageError", "StudyStorage", "open_storage", "normalize_url", "STALE_ATTR", "FAILURE_ATTR"]

#: system attribute holding the time of a journal trial's last heartbeat
STALE_ATTR = "heartbeat"
#: user attribute of a trial whose run reached a verdict of failure (divergence...): it counts as done
FAILURE_ATTR = "failure_reason"


class StorageError(ValueError):
    """A storage URL that cannot be used as asked; the message says what to use instead."""


def normalize_url(url: str) -> tuple[str, str]:
    """``(kind, url)`` with kind ``"sqlite"``, ``"journal"`` or ``"postgresql"``.

    >>> normalize_url("runs/s.journal")
    ('journal', 'runs/s.journal')
    >>> normalize_url("postgresql://u:p@127.0.0.1:5432/db")[1]
    'postgresql+psycopg2://u:p@127.0.0.1:5432/db'
    """
    if url.startswith("journal:"):
        return "journal", url[len("journal:"):]
    if url.endswith((".journal", ".log")) and "://" not in url:
        return "journal", url
    if url.startswith("sqlite:///"):
        return "sqlite", url
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy's default PostgreSQL driver is psycopg 3; we ship psycopg2 (psycopg2-binary)
        return "postgresql", "postgresql+psycopg2://" + url.split("://", 1)[1]
    if url.startswith("postgresql+"):
        return "postgresql", url
    raise StorageError(
        f"unsupported study storage {url!r}: use sqlite:///FILE (one worker), journal:FILE (several workers "
        "sharing a filesystem) or postgresql://USER:PASS@HOST:PORT/DB (several workers, any machines)"
    )


@dataclasses.dataclass
class StudyStorage:
    """An Optuna storage plus the heartbeat and claim lock that several workers need."""

    kind: str
    url: str
    storage: Any
    heartbeat_interval: int
    grace_period: int
    max_retry: int
    _lock_path: Path | None = None

    # -- claiming trials ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def claim_lock(self, study_name: str) -> Iterator[None]:
        """Held while a worker counts the study's trials and asks for a new one (one worker at a time)."""
        if self.kind == "postgresql":
            import sqlalchemy as sa

            key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
            with self.storage.engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            return
        assert self._lock_path is not None
        with open(self._lock_path, "a") as handle:  # released by the OS if the worker dies holding it
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- heartbeats ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def heartbeat(self, trial_id: int) -> Iterator[None]:
        """Beat for ``trial_id`` every ``heartbeat_interval`` seconds while the block runs."""
        stop = threading.Event()

        def beat() -> None:
            while True:
                try:
                    self._record(trial_id)
                except Exception as err:  # a missed beat is not fatal; staleness needs many in a row
                    warnings.warn(f"heartbeat of trial {trial_id} failed: {err}", stacklevel=1)
                if stop.wait(self.heartbeat_interval):
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _record(self, trial_id: int) -> None:
        if self.kind == "journal":
            self.storage.set_trial_system_attr(trial_id, STALE_ATTR, time.time())
        else:
            self.storage.record_heartbeat(trial_id)

    def fail_stale_trials(self, study: optuna.Study) -> list[int]:
        """Mark the trials of dead workers failed and re-queue them; returns their numbers."""
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        if self.kind != "journal":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        else:
            now = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                last = trial.system_attrs.get(STALE_ATTR)
                if last is None and trial.datetime_start is not None:
                    last = trial.datetime_start.timestamp()
                if last is None or now - float(last) <= self.grace_period:
                    continue
                try:
                    self.storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # it finished (or another worker failed it) meanwhile
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    retry(study, self.storage.get_trial(trial._trial_id))
        after = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return sorted(t.number for t in after if t.number not in before)


def _serialized(url: str, make: Any) -> Any:
    """Run ``make`` under a server-wide advisory lock: RDBStorage creates its tables on first use, and two
    workers creating them at once on a fresh database collide ("type studydirection already exists")."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK})
            conn.commit()
            try:
                return make()
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK})
                conn.commit()
    finally:
        engine.dispose()


_SCHEMA_LOCK = 0x656D627461626C65  # "embtable"
_JOURNAL_LOCK_GRACE = 5


def open_storage(
    url: str,
    *,
    workers: int = 1,
    heartbeat_interval: int = 10,
    grace_period: int = 60,
    max_retry: int = 3,
) -> StudyStorage:
    """Open (creating if needed) the storage at ``url`` for ``workers`` local workers.

    Args:
        url: see the module docstring.
        workers: number of worker processes that will share it (SQLite is refused for more than one).
        heartbeat_interval: seconds between heartbeats of a running trial.
        grace_period: a running trial without a heartbeat for this long belongs to a dead worker.
        max_retry: how many times one trial's parameters are re-queued after its worker died.

    Raises:
        StorageError: unsupported URL, or SQLite with several workers (the message says what to use).
    """
    kind, url = normalize_url(url)
    if heartbeat_interval < 1 or grace_period <= heartbeat_interval:
        raise StorageError(
            f"need heartbeat_interval >= 1 and grace_period > heartbeat_interval, got {heartbeat_interval}, "
            f"{grace_period}"
        )
    if kind == "sqlite" and workers > 1:
        raise StorageError(
            f"SQLite storage ({url}) with {workers} workers: SQLite locks the whole file on every write, so "
            "workers would fail with 'database is locked'. Use journal storage "
            "(--storage journal:runs/tune/STUDY.journal) or a PostgreSQL server "
            "(--storage postgresql://USER:PASS@HOST:PORT/DB), or run one worker."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    if kind == "journal":
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The journal's own write lock is a symlink; a worker killed while appending (a few milliseconds)
        # leaves it behind, and other workers break it after this many seconds (Optuna's default: 30).
        lock_obj = JournalFileSymlinkLock(str(path), grace_period=_JOURNAL_LOCK_GRACE)
        storage: Any = JournalStorage(JournalFileBackend(str(path), lock_obj=lock_obj))
        lock = path.with_name(path.name + ".claim.lock")
    else:
        if kind == "sqlite":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        def make() -> RDBStorage:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                  heartbeat_stale_trial_callback=retry,
                                  engine_kwargs={"pool_pre_ping": True} if kind == "postgresql" else None)

        if kind == "postgresql":
            storage = _serialized(url, make)
        else:
            storage = make()
        lock = Path(url[len("sqlite:///"):] + ".claim.lock") if kind == "sqlite" else None
    return StudyStorage(kind, url, storage, heartbeat_interval, grace_period, max_retry, lock)

