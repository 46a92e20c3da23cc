"""The built wheel: a library that installs into a TorchRec user's environment without changing it.

One wheel is built (from a copy of the sources, offline, no build isolation) and checked:

- its files: the four packages and the experiment configs; no benchmark scripts, no tests;
- its metadata: ``import embtable`` needs torch, TorchRec and NumPy, each a compatible range (no ``==``),
  nothing of FBGEMM; the experiment libraries are the ``experiments`` extra, the test tools ``test``;
- ``pip install --dry-run --report`` of the wheel into this environment, offline, changes none of torch,
  TorchRec and FBGEMM, and adds nothing else that this environment does not already lack.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for package in ("embtable", "ctr_models", "data_prep", "experiments"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src),
         "-w", str(out)], capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        if "No module named" in done.stderr and "setuptools" in done.stderr:
            pytest.skip(f"cannot build a wheel here: setuptools missing ({done.stderr.strip()[-200:]})")
        raise AssertionError(f"pip wheel failed:\n{done.stderr}")
    (built,) = out.glob("embtable-*.whl")
    return built


def test_the_wheel_holds_the_packages_without_benchmarks_or_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"embtable", "ctr_models", "data_prep", "experiments"}
    assert "embtable/methods/hash.py" in names and "experiments/cli.py" in names
    assert any(n.startswith("experiments/configs/") and n.endswith(".yaml") for n in names)
    assert not [n for n in names if "benchmarks/" in n or (n.endswith(".py") and "/bench_" in n)
                or n.startswith("tests/")]


def test_the_library_needs_torch_torchrec_numpy_in_ranges(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                    if line.startswith("Requires-Dist:")]
    base = {_norm(r.name): r for r in requirements if r.marker is None}
    assert set(base) == {"torch", "torchrec", "numpy"}
    for r in base.values():
        assert r.specifier and all(s.operator in (">=", "<", "<=", "!=", "~=") for s in r.specifier), r
        installed = md.version(r.name)
        assert r.specifier.contains(installed, prereleases=True), f"{r} excludes the installed {installed}"
    extras = {_norm(r.name) for r in requirements if r.marker is not None}
    assert {"pandas", "pyarrow", "optuna", "pytest", "hypothesis"} <= extras
    assert not [r for r in requirements if _norm(r.name).startswith("fbgemm")]


def _unmet_requirements_of_installed() -> set[str]:
    """Names required (without extras) by installed distributions but not installed: the environment's own
    pending changes, which any ``pip install`` would make (e.g. TorchRec's ``fbgemm-gpu`` beside the
    ``fbgemm-gpu-cpu`` this CPU environment uses)."""
    installed = {_norm(d.metadata["Name"]) for d in md.distributions()}
    unmet = set()
    for dist in md.distributions():
        for line in dist.requires or []:
            r = Requirement(line)
            if (r.marker is None or r.marker.evaluate({"extra": ""})) and _norm(r.name) not in installed:
                unmet.add(_norm(r.name))
    return unmet


def test_installing_the_wheel_changes_no_torch_torchrec_or_fbgemm(wheel, tmp_path):
    """Offline (``--no-index``: only the wheel's folder): the dependencies must be met by what is installed."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--find-links",
         str(wheel.parent), "--report", str(report), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    pending = _unmet_requirements_of_installed()
    if done.returncode != 0:
        missing = re.findall(r"No matching distribution found for ([A-Za-z0-9_.-]+)", done.stderr)
        if missing and all(_norm(m) in pending for m in missing):
            pytest.skip(f"this environment already lacks {missing}, which its own packages require (e.g. TorchRec's "
                        "fbgemm-gpu beside fbgemm-gpu-cpu): an offline dry run cannot resolve it")
        raise AssertionError(f"pip install --dry-run --no-index failed:\n{done.stderr}")
    changes = {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "embtable" in changes
    touched = {n: v for n, v in changes.items() if n in KEEP and n not in pending}
    assert not touched, f"installing embtable would change {touched}"
    added_by_embtable = set(changes) - {"embtable"} - pending
    assert not added_by_embtable, f"installing embtable would also install {sorted(added_by_embtable)}"
