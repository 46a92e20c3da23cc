"""Running chunk jobs on both cores, and claiming an output directory for one job (resume safety)."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Sequence

__all__ = ["Workers", "run_ordered", "check_or_claim"]


class Workers:
    """A lazily started pool of ``workers`` processes, reused by several :meth:`run` calls.

    With ``workers <= 1`` jobs run in this process. ``initializer`` runs once in every worker process.
    The workers are forked from a fork server (a fresh, single-threaded process, so safe beside threads
    here) that imports ``preload`` once: each worker then starts in milliseconds instead of importing
    numpy and pyarrow itself (about half a second of CPU per worker). Use as a context manager.
    """

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None,
                 preload: Sequence[str] = ()) -> None:
        self.workers = int(workers)
        self.initializer = initializer
        self.preload = list(preload)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._warming: list[cf.Future] = []
        self._closing: threading.Thread | None = None
        self._starting: threading.Thread | None = None
        self._start_error: BaseException | None = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._closing is not None:
            self._closing.join()
            self._closing = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
            self._pool = None

    def release(self) -> None:
        """Let the worker processes exit in the background (no more :meth:`run`); the context exit waits."""
        self._wait_started()
        if self._pool is not None and self._closing is None:
            self._closing = threading.Thread(target=self._pool.shutdown, name="workers-shutdown")
            self._closing.start()
            self._pool = None

    def start(self, warm_up: Callable) -> None:
        """Start the worker processes now (each runs ``warm_up(i)``), so their start-up overlaps other work.

        Returns at once: the pool is started by a thread (a fork server's first fork waits for its
        imports), and :meth:`ready` says when the workers are up.
        """
        if self.workers > 1 and self._pool is None and self._starting is None:
            def start() -> None:
                try:
                    self._start_pool()
                    self._warming = [self._pool.submit(warm_up, i) for i in range(self.workers)]
                except BaseException as err:  # raised by the next run()
                    self._start_error = err

            self._starting = threading.Thread(target=start, name="workers-start", daemon=True)
            self._starting.start()

    def _wait_started(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._start_error is not None:
            err, self._start_error = self._start_error, None
            raise err

    def _start_pool(self) -> None:
        ctx = multiprocessing.get_context(_start_method())
        if ctx.get_start_method() == "forkserver" and self.preload:
            # (takes effect when this process's fork server starts; a running one keeps its modules).
            # "__main__" first, as the default preload: the workers then need not re-import it.
            ctx.set_forkserver_preload(["__main__", *self.preload])
        self._pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=self.initializer)

    def ready(self) -> bool:
        """True once the started workers have run their warm-up (always True without worker processes)."""
        if self.workers <= 1:
            return True
        if self._starting is not None and self._starting.is_alive():
            return False
        return all(f.done() for f in self._warming)

    def run(self, fn: Callable, jobs: Iterable, bar=None, parallel: bool = True) -> None:
        """Run ``fn(job)`` for every job, ``bar.update(result)`` after each, results taken in job order.

        At most ``2 * workers`` jobs are in flight, so a lazy ``jobs`` iterator carrying data keeps
        memory bounded; errors surface in job order (in strict mode the first malformed row of the
        file is the one reported). While workers started by :meth:`start` are still warming up (and
        already have a job each), this process runs the next jobs itself.
        """
        if self.workers <= 1 or not parallel:
            for job in jobs:
                r = fn(job)
                if bar is not None:
                    bar.update(r)
            return
        self._wait_started()
        if self._pool is None:
            self._start_pool()
        window: collections.deque = collections.deque()
        try:
            for job in jobs:
                if len(window) >= self.workers and not self.ready():
                    # the workers are still starting and have jobs queued: this process lends a hand
                    window.append(_Inline(fn, job))
                else:
                    window.append(self._pool.submit(fn, job))
                if len(window) >= 2 * self.workers:
                    r = window.popleft().result()
                    if bar is not None:
                        bar.update(r)
            while window:
                r = window.popleft().result()
                if bar is not None:
                    bar.update(r)
        except BaseException:
            for fut in window:
                fut.cancel()
            raise


class _Inline:
    """A job run in this process, holding its result or exception like a finished future."""

    def __init__(self, fn: Callable, job) -> None:
        self._result, self._error = None, None
        try:
            self._result = fn(job)
        except Exception as e:  # raised when its turn comes, so errors still surface in job order
            self._error = e

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> bool:
        return False


def run_ordered(fn: Callable, jobs: Iterable, workers: int, bar=None, preload: Sequence[str] = ()) -> None:
    """``Workers(workers, preload=preload).run(fn, jobs, bar)`` with a pool of its own."""
    with Workers(workers, preload=preload) as pool:
        pool.run(fn, jobs, bar)


def _start_method() -> str:
    """``forkserver`` (safe beside threads) unless ``__main__`` cannot be re-imported (REPL, stdin): ``fork``.

    Where there is no fork server (not POSIX), ``spawn``.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not (path and os.path.exists(path)):
        return "fork"
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def check_or_claim(out_dir: pathlib.Path, fingerprint: str, what: str) -> bool:
    """True if ``out_dir`` already holds this finished dataset; raise if it holds another one.

    Otherwise marks ``out_dir/_work`` as belonging to ``fingerprint`` (a rerun of the same job resumes,
    a different job in the same directory is refused) and returns False.
    """
    meta = out_dir / "meta.json"
    if meta.is_file():
        got = json.loads(meta.read_text()).get("fingerprint")
        if got == fingerprint:
            # killed between writing meta.json and removing the work files: finish the cleanup
            shutil.rmtree(out_dir / "_work", ignore_errors=True)
            return True
        raise FileExistsError(
            f"{out_dir} already holds a different dataset (fingerprint {got}, this {what} job is {fingerprint}); "
            "choose another output directory or delete it"
        )
    work = out_dir / "_work" / "fingerprint.txt"
    if work.is_file() and work.read_text().strip() != fingerprint:
        raise FileExistsError(
            f"{out_dir} holds an unfinished run of a different job ({work.read_text().strip()}, this {what} "
            f"job is {fingerprint}); delete the directory or choose another"
        )
    work.parent.mkdir(parents=True, exist_ok=True)
    if work.is_file():  # resuming: temporary files of a killed run are garbage
        for tmp in out_dir.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    else:
        work.write_text(fingerprint + "\n")
    return False
