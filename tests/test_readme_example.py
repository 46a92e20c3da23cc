"""The README's "Compress your own model" example runs as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Compress your own model"


def readme_example() -> str:
    """The first python block of the section, from README.md (or README_compress.md before the merge)."""
    for name in ("README.md", "README_compress.md"):
        path = ROOT / name
        if not path.exists() or SECTION not in path.read_text():
            continue
        section = path.read_text().split(SECTION, 1)[1]
        section = re.split(r"\n## ", section, maxsplit=1)[0]
        blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
        assert blocks, f"{name}: the section {SECTION!r} has no ```python block"
        return blocks[0]
    raise AssertionError(f"neither README.md nor README_compress.md has the section {SECTION!r}")


def test_compress_your_own_model_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # run it as a module of its own, so its classes are importable by name (as in a user's file)
    module = types.ModuleType("readme_compress_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        exec(compile(readme_example(), "README: Compress your own model", "exec"), module.__dict__)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "DRY RUN" in out and "user" in out and "int8" in out
    assert (tmp_path / "my_recommender.int8.pt").exists()
    assert module.report.bytes_after <= module.report.budget_bytes
    assert float((module.served(module.ids) - module.small(module.ids)).abs().max()) < 0.05
