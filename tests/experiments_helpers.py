"""Shared by the sweep / tune / report / CLI tests: the tiny dataset (generated once per session) and a
helper to run the command-line tool in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny generator preset, generated once per test session (shared base temp folder)."""
    import data_prep

    path = tmp_path_factory.getbasetemp() / "embtable-tiny"
    if not (path / "meta.json").is_file():
        data_prep.generate_dataset("tiny", path, progress=False)
    return path


def cli(*args: str) -> subprocess.Popen:
    """Start ``python -m experiments.cli ARGS`` in its own process group (so a test can kill it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05):
    """Poll ``condition()`` until it is truthy; fail with ``what`` (and the process output) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(poll)
    if proc is not None:
        proc.kill()
        pytest.fail(f"timed out waiting for {what}:\n{proc.communicate()[0]}")
    pytest.fail(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for ``proc``; fail with its output if it did not exit 0."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"process timed out:\n{out}")
    assert proc.returncode == 0, out
    return out
