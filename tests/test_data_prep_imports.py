"""A conversion must not pay for importing torch / torchrec or pandas (seconds in every run and worker)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = """
import pathlib, sys
import data_prep
assert "pandas" not in sys.modules, "import data_prep imported pandas"
src = pathlib.Path(sys.argv[1]) / "train.txt"
row = "1\\t" + "5\\t" * 13 + "\\t".join(["0a0b0c0d"] * 26) + "\\n"
src.write_text(row * 70)
data_prep.convert_criteo(src, pathlib.Path(sys.argv[1]) / "out", workers=1, progress=False)
assert (pathlib.Path(sys.argv[1]) / "out" / "meta.json").is_file()
heavy = sorted(m for m in ("torch", "torchrec", "embtable", "pandas") if m in sys.modules)
print(heavy)
"""


def test_convert_criteo_imports_neither_torch_nor_pandas(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout  # meta.json is written with embtable/atomic.py alone
