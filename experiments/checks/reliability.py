"""The fault report: bad inputs tried through the command line, faults injected into real runs.

    python -m experiments.checks.reliability            # bad inputs + every fault drill (a few minutes)
    python -m experiments.checks.reliability --quick    # bad inputs + the full-disk drill of a conversion (seconds)

Bad inputs (issue 15's table and more) go through ``embtable``'s command line in this process, as a user
would type them: each must end with the expected exit code and a one-line message, never a traceback.
Faults are injected into child processes: SIGKILL of a conversion, of a training run (and, in full mode,
the sweep and tune-worker drills of the test suite), and a full disk (``RLIMIT_FSIZE``, set in the child
only) while a shard or a checkpoint is written. Each faulted run is then run again without the fault; it
must resume and end with the same result as an undisturbed run.

The summary counts inputs tried, faults injected, runs resumed, results lost (goal 0) and tracebacks that
reached the user (goal 0). :func:`main` returns it, so a test calls ``main(["--quick"])``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["Outcome", "Summary", "bad_inputs", "fault_drills", "main"]

REPO = Path(__file__).resolve().parents[2]


def _drill_method() -> str:
    """The method the drills train and compress with: the hashing trick (cheap, fits any budget here)."""
    from embtable import HashConfig  # imported late: the bad-input part runs without torch

    return HashConfig.method


@dataclasses.dataclass
class Outcome:
    """One bad input or one injected fault, and what came of it."""

    name: str
    kind: str  # "input" or "fault"
    ok: bool  # the expected behaviour (exit code and message; for a fault: resumed to the same result)
    traceback: bool = False  # a traceback reached the user
    resumed: bool = False  # a faulted run, run again, finished
    lost: int = 0  # results (rows, runs, trials) missing or different after the resume
    detail: str = ""


@dataclasses.dataclass
class Summary:
    outcomes: list[Outcome]

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    @property
    def figures(self) -> dict[str, int]:
        return {
            "inputs tried": self.count("input"),
            "faults injected": self.count("fault"),
            "runs resumed": sum(o.resumed for o in self.outcomes),
            "results lost": sum(o.lost for o in self.outcomes),
            "tracebacks that reached the user": sum(o.traceback for o in self.outcomes),
            "not as expected": sum(not o.ok for o in self.outcomes),
        }

    def table(self) -> str:
        width = max(len(o.name) for o in self.outcomes)
        lines = [f"{'case':<{width}}  kind   ok   detail"]
        for o in self.outcomes:
            lines.append(f"{o.name:<{width}}  {o.kind:<5}  {'yes' if o.ok else 'NO ':<3}  {o.detail}")
        lines.append("")
        lines += [f"{k}: {v}" for k, v in self.figures.items()]
        return "\n".join(lines)


# ----- the command line, in this process ---------------------------------------------------------------
def _cli(argv: Sequence[str]) -> tuple[int, str, bool]:
    """``embtable ARGV`` here: (exit code, stderr + stdout, whether an exception escaped = a traceback)."""
    from experiments.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 -- exactly what this report counts
            return 1, f"{type(e).__name__}: {e}", True
    text = err.getvalue() + out.getvalue()
    return code, text, "Traceback (most recent call last)" in text


def _input(name: str, argv: Sequence[str], code: int, expect: str = "",
           check: Callable[[], str | None] | None = None) -> Outcome:
    got, text, tb = _cli(argv)
    problem = None
    if got != code:
        problem = f"exit {got}, expected {code}"
    elif expect and expect not in text:
        problem = f"message lacks {expect!r}"
    elif check is not None:
        problem = check()
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return Outcome(name, "input", problem is None and not tb, traceback=tb,
                   detail=problem + f": {last[:160]}" if problem else f"exit {got}: {last[:110]}")


# ----- sample files ------------------------------------------------------------------------------------
def _tiny_tsv(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """Criteo ``train.txt`` rows (label, 13 integers, 26 hex values; some empty), written directly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = (rng.random(rows) < 0.25).astype(int)
    dense = rng.integers(0, 500, (rows, 13))
    cats = rng.zipf(1.3, (rows, 26)) % (1 << 32)
    lines = []
    for i in range(rows):
        ints = ["" if (i + j) % 7 == 0 else str(v) for j, v in enumerate(dense[i])]
        hexes = ["" if (i * j) % 11 == 5 else f"{v:08x}" for j, v in enumerate(cats[i])]
        lines.append("\t".join([str(labels[i]), *ints, *hexes]))
    path.write_text("\n".join(lines) + "\n")
    return path


def _avazu_csv(path: Path, rows: int = 200) -> Path:
    import numpy as np

    from data_prep.schema import AVAZU_COLUMNS

    rng = np.random.default_rng(0)
    lines = [",".join(AVAZU_COLUMNS)]
    for i in range(rows):
        values = [str(10**18 + i), str(int(rng.random() < 0.2)), f"141021{i % 24:02d}"]
        values += [f"{rng.integers(0, 50):08x}" for _ in AVAZU_COLUMNS[3:]]
        lines.append(",".join(values))
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(path: Path) -> int:
    from data_prep import load_meta

    return sum(load_meta(path).split_rows.values())


def bad_inputs(work: Path) -> list[Outcome]:
    """Every bad input of issue 15's table (and a few more) through the command line."""
    import torch

    import data_prep

    work.mkdir(parents=True, exist_ok=True)
    tsv = _tiny_tsv(work / "train.txt")
    text = tsv.read_bytes()
    n = text.count(b"\n")
    header = ",".join(["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)])
    (work / "with_header.csv").write_bytes(header.encode() + b"\n" + text.replace(b"\t", b","))
    (work / "crlf.txt").write_bytes(text.replace(b"\n", b"\r\n"))
    (work / "empty.txt").write_bytes(b"")
    avazu = _avazu_csv(work / "avazu.csv")
    (work / "avazu_header_only.csv").write_text(avazu.read_text().splitlines()[0] + "\n")
    cols = avazu.read_text().splitlines()
    drop = {12, 16}  # device_ip, C14
    (work / "avazu_missing.csv").write_text("\n".join(",".join(v for j, v in enumerate(line.split(",")) if j not in drop)
                                                      for line in cols) + "\n")
    gz = gzip.compress(text)
    (work / "cut.txt.gz").write_bytes(gz[: len(gz) * 2 // 3])
    lines = text.split(b"\n")
    for i in range(0, n, 40):  # 2.5% of the lines lose their tab layout
        lines[i] = lines[i].replace(b"\t", b" ", 3)
    (work / "malformed.txt").write_bytes(b"\n".join(lines))
    (work / "renamed.csv").write_bytes(header.replace("I5", "dense5").encode() + b"\n" + text.replace(b"\t", b","))
    (work / "random.bin").write_bytes(os.urandom(5000))

    out: list[Outcome] = []

    def prepare(name, src, code, expect="", rows=None, source="criteo", extra=()):
        dest = work / f"d_{name}"
        check = (lambda: None if _rows(dest) == rows else f"{_rows(dest)} rows, expected {rows}") if rows else None
        out.append(_input(name, ["prepare", source, str(work / src), "--out", str(dest), *extra], code, expect, check))

    prepare("criteo_csv_with_header", "with_header.csv", 0, rows=n)
    prepare("criteo_crlf_lines", "crlf.txt", 0, rows=n)
    prepare("empty_file", "empty.txt", 2, "is empty")
    prepare("avazu_header_only", "avazu_header_only.csv", 2, "only its header", source="avazu")
    prepare("truncated_gzip", "cut.txt.gz", 2, "cut short near byte")
    prepare("avazu_missing_columns", "avazu_missing.csv", 2, "missing columns ['device_ip', 'C14']", source="avazu")
    prepare("criteo_wrong_header", "renamed.csv", 2, "unexpected columns ['dense5']")
    prepare("random_bytes", "random.bin", 2, "random.bin")
    prepare("too_many_malformed", "malformed.txt", 2, "--max-malformed")
    prepare("malformed_allowed", "malformed.txt", 0, rows=n - len(range(0, n, 40)), extra=("--max-malformed", "0.05"))
    prepare("avazu_ok", "avazu.csv", 0, rows=200, source="avazu")

    # training on broken datasets
    good = work / "d_criteo_crlf_lines"
    train = ["train", _drill_method(), "--set", "train.max_steps=2", "--set", "embedding.budget=1/2", "--quiet"]
    empty = work / "zero_rows"
    if good.is_dir():
        empty.mkdir(exist_ok=True)
        meta = json.loads((good / "meta.json").read_text())
        meta["split_rows"] = dict.fromkeys(meta["split_rows"], 0)
        meta["manifest"]["shards"] = []
        (empty / "meta.json").write_text(json.dumps(meta))
        shutil.copy(good / "counts.npz", empty / "counts.npz")
        out.append(_input("train_on_zero_rows", [*train, "--set", f"data.path={empty}"], 2, "has no training rows"))
        flipped = work / "flipped"
        shutil.copytree(good, flipped, dirs_exist_ok=True)
        for shard in data_prep.load_meta(flipped).shards("train"):
            raw = bytearray(shard.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            shard.write_bytes(bytes(raw))
        out.append(_input("train_on_byte_flipped_shard", [*train, "--set", f"data.path={flipped}"], 2,
                          "does not match the manifest"))
        bad_ckpt = work / "bad_checkpoint"
        bad_ckpt.mkdir(exist_ok=True)
        torch.save([1, 2, 3], bad_ckpt / "checkpoint.pt")
        out.append(_input("resume_from_non_dict_checkpoint", [*train, "--set", f"data.path={good}", "--out",
                          str(bad_ckpt)], 2, "not a checkpoint"))
    out.append(_padding_case())
    return out


def _padding_case() -> Outcome:
    """``compress()`` of a sequence model with ``padding_idx=0``: supported, exact zeros, for one method."""
    import torch
    from torch import nn

    import embtable

    model = nn.ModuleDict({"seq": nn.Embedding(5000, 8, padding_idx=0)})
    try:
        new, _ = embtable.compress(model, "1/4", _drill_method(), seed=0, init_from_weights=False)
        zero = bool((new["seq"](torch.tensor([0, 0])) == 0).all())
    except Exception as e:  # noqa: BLE001
        return Outcome("compress_padding_idx", "input", False, traceback=True, detail=f"{type(e).__name__}: {e}")
    return Outcome("compress_padding_idx", "input", zero, detail="padding id reads exact zeros" if zero else "nonzero")


# ----- faults in child processes ----------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def _child(cmd: Sequence[str], fsize: int | None = None, kill_when: Callable[[], bool] | None = None,
           timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd``; with ``fsize`` no file it writes may exceed that many bytes (a full disk); with
    ``kill_when`` it is SIGKILLed once that returns True. Returns (exit code, output)."""

    def limit() -> None:
        os.setsid()
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=limit)
    deadline = time.monotonic() + timeout
    try:
        if kill_when is not None:
            while proc.poll() is None and time.monotonic() < deadline:
                if kill_when():
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.01)
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output.decode("utf-8", "replace")


def _manifest(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())["manifest"]


def _fault(name: str, faulted: tuple[int, str], expect_code: int, resume: Callable[[], bool],
           same: Callable[[], int]) -> Outcome:
    code, text = faulted
    tb = "Traceback (most recent call last)" in text
    if code != expect_code:
        return Outcome(name, "fault", False, traceback=tb, detail=f"faulted run exited {code}, expected "
                       f"{expect_code}: {text.strip()[-200:]}")
    try:
        resumed = resume()
    except Exception as e:  # noqa: BLE001
        return Outcome(name, "fault", False, traceback=True, detail=f"resume raised {type(e).__name__}: {e}")
    lost = same() if resumed else 1
    last = text.strip().splitlines()[-1][:100] if text.strip() else f"exit {code}"
    return Outcome(name, "fault", resumed and lost == 0 and not tb, traceback=tb, resumed=resumed, lost=lost,
                   detail=f"{last}; resumed: {'yes' if resumed else 'no'}, lost {lost}")


def _prepare_drills(work: Path, quick: bool) -> list[Outcome]:
    from data_prep import convert_criteo

    tsv = _tiny_tsv(work / "drill.txt", rows=2000 if quick else 8000)
    chunk = 24_000
    ref = convert_criteo(tsv, work / "ref", workers=1, chunk_bytes=chunk, progress=False)
    cmd = [sys.executable, "-m", "data_prep", "convert-criteo", str(tsv), "--workers", "1",
           "--chunk-mb", repr(chunk / (1 << 20))]

    def resume(out: Path) -> Callable[[], bool]:
        return lambda: convert_criteo(tsv, out, workers=1, chunk_bytes=chunk, progress=False) == out

    def lost(out: Path) -> Callable[[], int]:
        ref_shards = {s["path"]: s for s in _manifest(ref)["shards"]}
        got = {s["path"]: s for s in _manifest(out)["shards"]}
        return lambda: sum(got.get(k) != v for k, v in ref_shards.items())

    outcomes = []
    # a full disk while the shards and work files are written: at most half the biggest shard fits
    biggest = max((ref / s["path"]).stat().st_size for s in _manifest(ref)["shards"])
    full = work / "full_disk"
    faulted = _child([*cmd, "--out", str(full)], fsize=biggest // 2)
    outcomes.append(_fault("disk_full_while_writing_shards", faulted, 1, resume(full), lambda: lost(full)()))
    if not quick:
        killed = work / "killed"
        faulted = _child([*cmd, "--out", str(killed)],
                         kill_when=lambda: len(list((killed / "_work").glob("p1-*.rec"))) >= 3)
        outcomes.append(_fault("sigkill_prepare", faulted, -signal.SIGKILL, resume(killed), lambda: lost(killed)()))
    return outcomes


def _train_drills(work: Path) -> list[Outcome]:
    """SIGKILL of a training run, and a full disk while it writes a checkpoint; each resumed."""
    import data_prep
    from experiments.training.checkpoint import load_checkpoint
    from experiments.training.config import load_config
    from experiments.training.train import run

    data = work / "tiny"
    if not (data / "meta.json").is_file():
        data_prep.generate_dataset("tiny", data, progress=False)
    sets = [f"data.path={data}", "train.max_steps=60", "train.checkpoint_every=5", "embedding.budget=1/4"]
    ref = run(load_config(_drill_method(), overrides=sets), work / "train_ref", progress=False)
    cmd = [sys.executable, "-m", "experiments.cli", "train", _drill_method(), "--quiet"] + [a for s in sets for a in ("--set", s)]
    outcomes = []

    def resume(out: Path) -> Callable[[], bool]:
        def go() -> bool:
            code, text = _child([*cmd, "--out", str(out)])
            return code == 0
        return go

    def lost(out: Path) -> int:
        got = json.loads((out / "result.json").read_text())
        return int(got["test_auc"] != ref.test_auc or got["steps"] != ref.steps)

    killed = work / "train_killed"
    faulted = _child([*cmd, "--out", str(killed)], kill_when=lambda: (killed / "checkpoint.pt").exists())
    outcomes.append(_fault("sigkill_training_run", faulted, -signal.SIGKILL, resume(killed), lambda: lost(killed)))

    size = (work / "train_ref" / "checkpoint.pt").stat().st_size
    full = work / "train_full_disk"
    faulted = _child([*cmd, "--out", str(full)], fsize=size // 2)

    def intact() -> bool:  # the full disk left no torn checkpoint behind: the last one (if any) loads
        if (full / "checkpoint.pt").exists():
            load_checkpoint(full / "checkpoint.pt")
        return resume(full)()

    outcomes.append(_fault("disk_full_while_writing_checkpoint", faulted, 1, intact, lambda: lost(full)))
    return outcomes


def _test_drills() -> list[Outcome]:
    """The SIGKILL drills of the test suite that need a sweep or a study (each resumes and checks no loss)."""
    drills = {
        "sigkill_sweep": "tests/test_sweep.py::test_sweep_killed_with_sigkill_loses_nothing_and_resumes",
        "sigkill_tune_worker": "tests/test_tune.py::test_a_killed_workers_trial_is_failed_and_retried",
    }
    outcomes = []
    for name, test in drills.items():
        if not (REPO / test.split("::")[0]).is_file():
            continue
        code, text = _child([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test], timeout=600)
        ok = code == 0
        outcomes.append(Outcome(name, "fault", ok, resumed=ok, lost=0 if ok else 1,
                                detail=text.strip().splitlines()[-1][:100] if text.strip() else f"exit {code}"))
    return outcomes


def fault_drills(work: Path, quick: bool = False) -> list[Outcome]:
    """Faults injected into child processes, each run resumed (quick: the full-disk conversion only)."""
    work.mkdir(parents=True, exist_ok=True)
    outcomes = _prepare_drills(work, quick)
    if not quick:
        outcomes += _train_drills(work)
        outcomes += _test_drills()
    return outcomes


def main(argv: Sequence[str] | None = None) -> Summary:
    """Run the report; print its table and figures; return the :class:`Summary`."""
    p = argparse.ArgumentParser(prog="python -m experiments.checks.reliability", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="bad inputs and one full-disk drill only (seconds)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    a = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(a.work) if a.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        outcomes = bad_inputs(work / "inputs") + fault_drills(work / "faults", quick=a.quick)
    summary = Summary(outcomes)
    print(summary.table())
    return summary


if __name__ == "__main__":
    figures = main().figures
    sys.exit(0 if figures["not as expected"] == 0 else 1)
