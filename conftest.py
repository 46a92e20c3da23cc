"""Test-session settings shared by tests/ and the doctests of embtable/, data_prep/, experiments/, README.md.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``). Each worker computes
with one thread, and so do the processes it starts (data preparation workers, DMP ranks, the CLI), so two
workers share two cores without oversubscribing them. Tests that read a module-scoped fixture (one tracing
or training run shared by several asserts) stay together on one worker, so the fixture is built once.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the processes the tests start
        os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group (``xdist_group``) every test that reads a module- or class-scoped fixture by its file."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d and d[-1].scope in ("module", "class", "package") for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
