"""The README's "Your own data" example runs as written and prints what the README shows."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Your own data"


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    return re.split(r"\n## ", text.split(SECTION, 1)[1], maxsplit=1)[0]


def test_own_data_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    section = _section()
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    shown = re.findall(r"prints the inferred columns, then\n\n```\n(.*?)```", section, flags=re.S)[0]
    exec(compile(code, "README: Your own data", "exec"), {"__name__": "readme_own_data"})
    out = capsys.readouterr().out
    assert "multi-hot    recent_items" in out  # the inferred kinds are printed
    assert out.strip().endswith(shown.strip())
    # the shell line of the README gives the same dataset (resume: the finished directory is reused)
    from experiments.cli import main

    line = next(ln for ln in section.splitlines() if ln.startswith("embtable prepare table"))
    argv = line.split("#")[0].split()[1:]
    assert main(argv) == 0
