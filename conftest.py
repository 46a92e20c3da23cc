"""Test-session settings shared by tests/ and the doctests of embtable/, data_prep/, experiments/, README.md.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``). Each worker computes
with one thread on one core, and so do the processes it starts (data preparation workers, DMP ranks, the
CLI, training runs), so two workers share two cores without oversubscribing them. Tests that read a
module-scoped fixture (one tracing or training run shared by several asserts) stay together on one worker,
so the fixture is built once.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the processes the tests start
        os.environ["MKL_NUM_THREADS"] = "1"
        # one core per worker, inherited too: a training run's ``num_threads: null`` means "every core this
        # process may use", so runs (in process, the CLI, sweeps, tune workers) train on one thread, as the
        # worker does. Two threads per run on two busy cores cost ~10x the CPU time (OpenMP waits spinning).
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cores) > 1:
            index = int("".join(c for c in worker if c.isdigit()) or 0)
            os.sched_setaffinity(0, {cores[index % len(cores)]})
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group (``xdist_group``) every test that reads a module- or class-scoped fixture by its file.

    A parametrized module fixture (one chunk of an expensive job, e.g. ``served`` in tests/test_serving.py)
    is built once per parameter, so its tests are grouped by file and parameter: the chunks of one file
    spread over both workers.
    """
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs if info is not None else {}
        wide = [name for name, d in defs.items() if d and d[-1].scope in ("module", "class", "package")]
        if wide:
            params = getattr(getattr(item, "callspec", None), "params", {})
            chunks = sorted({str(params[name]) for name in wide if name in params})
            group = item.nodeid.split("::")[0] + "".join(f"[{c}]" for c in chunks)
            item.add_marker(pytest.mark.xdist_group(group))
