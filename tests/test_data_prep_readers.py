"""Readers of the real Criteo / Avazu layouts: shared sample rows, malformed rows, protocols, resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep import MALFORMED_KINDS, MalformedRowError, convert_avazu, convert_criteo, load_meta
from data_prep.schema import CRITEO_CATEGORICAL, CRITEO_DENSE
from data_prep.splits import random_split

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO_TXT = DATA / "criteo_kaggle_sample.txt"
AVAZU_CSV = DATA / "avazu_sample.csv"
REPO = Path(__file__).resolve().parents[1]


def _read_all(path: Path) -> pd.DataFrame:
    """All splits of a converted dataset, shards in manifest order, with a split column."""
    meta = load_meta(path)
    frames = []
    for split in ("train", "valid", "test"):
        for shard in meta.shards(split):
            df = pd.read_parquet(shard)
            df["split"] = split
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _criteo_frame() -> pd.DataFrame:
    names = ["label", *CRITEO_DENSE, *CRITEO_CATEGORICAL]
    return pd.read_csv(CRITEO_TXT, sep="\t", header=None, names=names, dtype={c: str for c in CRITEO_CATEGORICAL})


def test_criteo_sample_dlrm_protocol(tmp_path):
    out = convert_criteo(CRITEO_TXT, tmp_path / "d", workers=1, chunk_bytes=10_000, progress=False)
    meta = load_meta(out)
    raw = _criteo_frame()
    got = _read_all(out)
    assert meta.source == "criteo-kaggle" and meta.protocol == "dlrm" and meta.num_dense == 13
    assert meta.categorical_features == CRITEO_CATEGORICAL
    # 200 lines -> 7 days: the first ceil(200*6/7)=172 train, the last 28 halved.
    assert meta.split_rows == {"train": 172, "valid": 14, "test": 14}
    assert len(meta.raw["manifest"]["shards"]) > 3  # several chunks
    # Shards in manifest order reproduce the file order (consecutive days).
    assert got["label"].tolist() == raw["label"].tolist()
    for name in CRITEO_DENSE:
        want = np.log1p(np.clip(raw[name].fillna(0).to_numpy(np.float64), 0, None)).astype(np.float32)
        np.testing.assert_allclose(got[name].to_numpy(), want, rtol=1e-6)
    assert np.isfinite(got[CRITEO_DENSE].to_numpy()).all()
    # Vocabulary: fitted on train, every training value keeps its own id (min_count=1), unseen -> 0.
    train = got["split"] == "train"
    for name in CRITEO_CATEGORICAL:
        values = raw[name].fillna("<missing>")
        pairs = pd.DataFrame({"v": values[train], "id": got.loc[train, name]}).drop_duplicates()
        assert pairs["v"].is_unique and pairs["id"].is_unique and (pairs["id"] > 0).all(), name
        unseen = ~values.isin(set(values[train])) & ~train
        assert (got.loc[unseen, name] == 0).all()
        assert got[name].max() < meta.num_embeddings[name]
    # Counts: training frequencies, sorted by decreasing count after the OOV id.
    specs = meta.feature_specs(8)
    for spec in specs:
        assert spec.counts.sum() == 172 and spec.counts[0] == 0
        assert np.all(np.diff(spec.counts[1:]) <= 0)
        np.testing.assert_array_equal(spec.counts, np.bincount(got.loc[train, spec.name], minlength=spec.num_embeddings))
    assert meta.positive_rate["train"] == pytest.approx(raw["label"][:172].mean())
    assert meta.raw["dense_transform"]["version"] == 1
    for s in meta.raw["manifest"]["shards"]:
        assert len(s["sha256"]) == 64 and s["rows"] > 0


def test_criteo_random_protocol_min_count(tmp_path):
    out = convert_criteo(CRITEO_TXT, tmp_path / "r", protocol="random", workers=1, progress=False)
    meta = load_meta(out)
    got = _read_all(out)
    assert meta.protocol == "random" and meta.raw["min_count"] == 10
    rows = meta.split_rows
    assert sum(rows.values()) == 200 and 130 < rows["train"] < 190 and rows["valid"] > 0 and rows["test"] > 0
    counts = meta.counts()
    # C3 is a high-cardinality field: in 200 rows no value is seen 10 times, everything is OOV.
    assert meta.num_embeddings["C3"] == 1 and (got["C3"] == 0).all()
    # C9 is a 3-valued field: its values are frequent and keep ids, frequencies sum to the train rows.
    assert meta.num_embeddings["C9"] >= 2 and counts["C9"].sum() == rows["train"]
    assert (counts["C9"][1:] >= 10).all()
    # Same seed, same split; another seed, another split.
    again = convert_criteo(CRITEO_TXT, tmp_path / "r2", protocol="random", workers=1, progress=False)
    assert load_meta(again).raw["manifest"] == meta.raw["manifest"]
    other = convert_criteo(CRITEO_TXT, tmp_path / "r3", protocol="random", seed=1, workers=1, progress=False)
    assert load_meta(other).raw["manifest"] != meta.raw["manifest"]


def test_criteo_1tb_day_files_gzip_and_two_workers(tmp_path):
    lines = CRITEO_TXT.read_bytes().splitlines(keepends=True)
    days = [lines[:80], lines[80:150], lines[150:]]
    files = []
    for i, part in enumerate(days):
        f = tmp_path / (f"day_{i}.gz" if i == 1 else f"day_{i}")
        f.write_bytes(gzip.compress(b"".join(part)) if i == 1 else b"".join(part))
        files.append(f)
    out = convert_criteo(list(reversed(files)), tmp_path / "tb", workers=2, chunk_bytes=6_000, progress=False)
    meta = load_meta(out)
    assert meta.source == "criteo-1tb"
    assert meta.split_rows == {"train": 150, "valid": 25, "test": 25}
    got = _read_all(out)
    assert got["label"].tolist() == _criteo_frame()["label"].tolist()
    single = convert_criteo(list(reversed(files)), tmp_path / "tb1", workers=1, chunk_bytes=6_000, progress=False)
    assert load_meta(single).raw["manifest"] == meta.raw["manifest"]  # workers do not change the output


def test_avazu_sample(tmp_path):
    out = convert_avazu(AVAZU_CSV, tmp_path / "a", min_count=1, workers=1, progress=False)
    meta = load_meta(out)
    raw = pd.read_csv(AVAZU_CSV, dtype=str)
    got = _read_all(out)
    assert meta.source == "avazu" and meta.num_dense == 0 and meta.protocol == "random"
    assert meta.categorical_features[:3] == ["hour_of_day", "weekday", "C1"] and len(meta.categorical_features) == 23
    assert sum(meta.split_rows.values()) == 100
    assert got["label"].sum() == raw["click"].astype(int).sum()
    # 14102100 is 2014-10-21 00h, a Tuesday: one hour and one weekday value.
    assert meta.num_embeddings["hour_of_day"] == 2 and meta.num_embeddings["weekday"] == 2
    codes = random_split(np.arange(100), seed=0)  # data line i -> split, independent of chunking
    for code, split in enumerate(("train", "valid", "test")):
        assert got.loc[got["split"] == split, "label"].tolist() == raw["click"][codes == code].astype(int).tolist()
    train = got["split"] == "train"
    assert (got.loc[train, "device_ip"] > 0).all()
    assert meta.num_embeddings["device_ip"] == 1 + raw.loc[codes == 0, "device_ip"].nunique()


def _malformed_file(path: Path) -> dict[int, str]:
    """The Criteo sample with one malformed row of every kind inserted; returns {line: kind}."""
    rows = [line.split("\t") for line in CRITEO_TXT.read_text().splitlines()]
    out: list[str] = []
    expected: dict[int, str] = {}

    def add(text: str, kind: str | None = None) -> None:
        out.append(text)
        if kind:
            expected[len(out)] = kind

    def edit(row: list[str], col: int, value: str) -> str:
        row = list(row)
        row[col] = value
        return "\t".join(row)

    for i, row in enumerate(rows[:60]):
        add("\t".join(row))
        if i == 3:
            add("", "blank_line")
        if i == 7:
            add(edit(rows[40], 20, "0a0b\r0c0d"), "crlf")  # a CR inside a line (a CRLF line end is read)
        if i == 11:
            add("\t".join(rows[41][:-1]), "field_count")
        if i == 15:
            add("\t".join(rows[42] + ["x"]), "field_count")
        if i == 19:
            add(edit(rows[43], 0, ""), "empty_label")
        if i == 23:
            add(edit(rows[44], 0, "2"), "bad_label")
        if i == 27:
            add(edit(rows[45], 2, "3.5"), "non_integer_dense")
        if i == 31:
            add(edit(rows[46], 14, "zz12ab34"), "non_hex_category")
        if i == 35:
            add(edit(rows[47], 5, "99999999999999999999999"), "non_integer_dense")
    add(edit(rows[48], 3, "-7"))  # negative dense: valid, clamped to 0
    path.write_text("\n".join(out) + "\n")
    return expected


def test_malformed_rows_counted_with_line_numbers(tmp_path):
    src = tmp_path / "bad.txt"
    expected = _malformed_file(src)
    assert set(expected.values()) == set(MALFORMED_KINDS) - {"bad_hour", "non_utf8"}
    out = convert_criteo(src, tmp_path / "d", workers=1, chunk_bytes=3_000, progress=False, max_malformed=0.2)
    meta = load_meta(out)
    mal = meta.raw["manifest"]["malformed"]
    assert mal["count"] == len(expected) and not mal["truncated"]
    assert {r["line"]: r["kind"] for r in mal["rows"]} == expected
    assert all(r["file"] == "bad.txt" for r in mal["rows"])
    total_lines = src.read_bytes().count(b"\n")
    assert sum(meta.split_rows.values()) == total_lines - len(expected)
    got = _read_all(out)
    dense = got[CRITEO_DENSE].to_numpy()
    assert np.isfinite(dense).all() and (dense >= 0).all()
    assert got["I3"].iloc[-1] == 0.0  # -7 clamped
    with pytest.raises(MalformedRowError, match=r"bad\.txt:5: malformed row \(blank_line\)") as err:
        convert_criteo(src, tmp_path / "strict", strict=True, workers=1, progress=False)
    assert err.value.line == 5 and err.value.kind == "blank_line"


def test_strict_reports_value_errors_with_line(tmp_path):
    src = tmp_path / "one_bad.txt"
    lines = CRITEO_TXT.read_text().splitlines()
    row = lines[9].split("\t")
    row[20] = "not-hex!"
    lines[9] = "\t".join(row)
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedRowError, match=r"one_bad\.txt:10: malformed row \(non_hex_category\)"):
        convert_criteo(src, tmp_path / "s", strict=True, workers=2, chunk_bytes=4_000, progress=False)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_criteo(tmp_path / "nope.txt", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="protocol"):
        convert_criteo(CRITEO_TXT, tmp_path / "x", protocol="chrono", progress=False)
    with pytest.raises(ValueError, match="header"):
        convert_avazu(CRITEO_TXT, tmp_path / "y", progress=False)
    convert_criteo(CRITEO_TXT, tmp_path / "z", workers=1, progress=False)
    with pytest.raises(FileExistsError, match="different dataset"):
        convert_criteo(CRITEO_TXT, tmp_path / "z", protocol="random", workers=1, progress=False)


def _generated_tsv(tmp_path: Path) -> Path:
    from data_prep import GeneratorConfig, generate_tsv

    cfg = GeneratorConfig(scale=1 / 3000, num_rows=8000, rows_per_shard=4000, calibration_rows=2000)
    return generate_tsv(cfg, tmp_path / "gen.tsv", progress=False)


def _kill_when(cmd: list[str], out: Path, pattern: str, at_least: int, timeout: float = 120) -> None:
    """Start ``cmd``, SIGKILL it once ``out/_work`` holds ``at_least`` files matching ``pattern``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if len(list((out / "_work").glob(pattern))) >= at_least:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert not (out / "meta.json").exists()


def test_resume_after_kill_gives_same_manifest(tmp_path):
    """SIGKILL a conversion while parsing, rerun and SIGKILL it while writing shards, then finish it."""
    src = _generated_tsv(tmp_path)
    chunk = 24_000
    ref = convert_criteo(src, tmp_path / "ref", workers=1, chunk_bytes=chunk, progress=False)
    n_chunks = len(json.loads((ref / "meta.json").read_text())["manifest"]["shards"])
    assert n_chunks > 40
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep", "convert-criteo", str(src), "--out", str(out), "--workers", "1",
           "--chunk-mb", repr(chunk / (1 << 20))]
    _kill_when(cmd, out, "p1-*.rec", at_least=10)
    assert 10 <= len(list((out / "_work").glob("p1-*.rec"))) < n_chunks
    _kill_when(cmd, out, "p2-*.rec", at_least=10)
    assert 10 <= len(list((out / "_work").glob("p2-*.rec"))) < n_chunks
    resumed = convert_criteo(src, out, workers=1, chunk_bytes=chunk, progress=False)
    assert json.loads((resumed / "meta.json").read_text())["manifest"] == load_meta(ref).raw["manifest"]
    assert not (out / "_work").exists()
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    # A finished directory is returned at once, and a different job there is refused.
    assert convert_criteo(src, out, workers=1, chunk_bytes=chunk, progress=False) == out


def test_workers_lend_a_hand_while_starting_and_keep_job_order():
    """While the workers warm up, this process runs jobs too; results and errors still come in job order."""
    from data_prep.jobs import Workers

    class Bar:
        def __init__(self):
            self.got = []

        def update(self, r):
            self.got.append(r)

    bar = Bar()
    with Workers(2) as pool:
        pool.start(time.sleep)  # worker i sleeps i seconds: not ready for a while
        pool.run(int, ["1", "2", "3", "4", "5", "6"], bar)
    assert bar.got == [1, 2, 3, 4, 5, 6]
    with Workers(2) as pool:
        pool.start(time.sleep)
        # jobs 0 and 1 go to the (starting) workers, the next ones run here first: the error of job 1
        # (in a worker) must be the one reported, not the later one of job 3 (run here)
        with pytest.raises(ValueError, match="early"):
            pool.run(int, ["1", "early", "3", "late", "5"], Bar())


def test_plan_line_counts_of_mapped_ranges(tmp_path):
    """The plan counts each byte range's lines on a memory map (any offset, a last line without newline)."""
    import mmap

    from data_prep.convert import _count_job
    from data_prep.meta import DataPrepError
    from data_prep.textparse import count_lines

    rng = np.random.default_rng(0)
    data = bytes(rng.choice(np.frombuffer(b"ab\n", np.uint8), size=3 * mmap.ALLOCATIONGRANULARITY + 123))
    path = tmp_path / "t.txt"
    path.write_bytes(data)
    g = mmap.ALLOCATIONGRANULARITY
    for offset, nbytes in [(0, len(data)), (1, 10), (g - 1, 2), (g, g), (g + 7, len(data) - g - 7), (len(data) - 1, 1),
                           (5, 0)]:
        assert _count_job((str(path), offset, nbytes), piece=1000) == (count_lines(data[offset:offset + nbytes]), nbytes)
    with pytest.raises(DataPrepError, match="changed while it was converted"):
        _count_job((str(path), 10, len(data)))


def test_resume_reads_raw_rows_of_an_earlier_version(tmp_path, monkeypatch):
    """Raw rows written by an earlier version (one int32 index array) are still mapped to the same shards."""
    import data_prep.convert as conv
    from data_prep.shards import read_record, write_record

    ref = convert_criteo(CRITEO_TXT, tmp_path / "ref", workers=1, chunk_bytes=10_000, progress=False)

    def stop(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_pass2", stop)
    out = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        convert_criteo(CRITEO_TXT, out, workers=1, chunk_bytes=10_000, progress=False)
    monkeypatch.undo()
    raws = sorted((out / "_work").glob("raw-*.rec"))
    assert len(raws) > 1
    for path in raws:  # the earlier layout: all features' indices in one int32 array
        rec = read_record(path)
        narrow, wide = iter(rec.pop("index16")), iter(rec.pop("index32"))
        rec["index"] = np.stack([next(narrow) if n else next(wide) for n in rec.pop("narrow")]).astype(np.int32)
        write_record(path, **rec)
    resumed = convert_criteo(CRITEO_TXT, out, workers=1, chunk_bytes=10_000, progress=False)
    assert load_meta(resumed).raw["manifest"] == load_meta(ref).raw["manifest"]


def test_raw_indices_narrow_and_wide_give_same_shards(tmp_path, monkeypatch):
    """Pass 1 stores a chunk's indices as uint16 or int32 per feature; the shards do not depend on it."""
    import data_prep.convert as conv

    ref = convert_criteo(CRITEO_TXT, tmp_path / "ref", workers=1, chunk_bytes=10_000, progress=False)
    monkeypatch.setattr(conv, "_NARROW_MAX", 3)  # most features wide, a few (<= 3 distinct keys) narrow
    out = convert_criteo(CRITEO_TXT, tmp_path / "mixed", workers=1, chunk_bytes=10_000, progress=False)
    assert load_meta(out).raw["manifest"] == load_meta(ref).raw["manifest"]
