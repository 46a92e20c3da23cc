"""Raw Criteo (Kaggle ``train.txt`` or 1TB ``day_*``) and Avazu files -> a dataset directory.

Passes, each resumable (a killed run continues where it stopped, and ends with the same manifest):

0. plan: cut every input into newline-aligned chunks and count lines (kept in ``_work/plan.json``);
1. parse the chunks on both cores: malformed lines are skipped and recorded with their line numbers,
   dense values transformed, categorical values turned into keys, each row assigned to its split;
   training-split key counts are recorded per chunk;
2. vocabularies from the training counts (``min_count``; id 0 is the out-of-vocabulary id);
3. map keys to ids on both cores and write the parquet shards;
4. ``counts.npz`` and ``meta.json`` (manifest: shards with row counts and sha256, malformed rows).

``meta.json`` is written last, atomically, and only when everything succeeded: a directory without it is
never a dataset. Bad input stops a conversion with a :class:`DataPrepError` naming the file: an empty
file, a wrong header (the missing and unexpected columns), a damaged gzip stream (where), or more than
``max_malformed`` (default 1%) malformed lines (the first ones, their line numbers and kinds). The
partial output of such a run is removed, except the parsed chunks of a run stopped for too many
malformed lines: a rerun with a higher ``max_malformed`` continues from them.

Protocols (never mixed; recorded in ``meta.json``):

- ``"dlrm"``: Kaggle: rows cut into 7 equal consecutive days, days 1-6 train, day 7 halved into
  validation and test. 1TB (several day files): all files but the last train, the last halved.
  All training ids are kept (``min_count=1``) unless told otherwise.
- ``"random"``: rows assigned 8:1:1 by a seeded hash of their position; ``min_count=10``.

Dense features (Criteo): missing -> 0, negatives -> 0, ``log(x + 1)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import mmap
import os
import pathlib
import re
import shutil
from collections.abc import Iterator, Sequence

import numpy as np

from .jobs import Workers, check_or_claim
from .meta import SPLITS, DataPrepError, atomic_write_json
from .schema import DENSE_TRANSFORM, FORMAT_VERSION, LABEL
from .shards import (
    arrays_to_entries,
    entries_to_arrays,
    read_record,
    write_counts,
    write_record,
    write_split_shards,
)
from .splits import SPLIT_CODES, dlrm_split, random_split
from .textparse import (
    AVAZU,
    CRITEO,
    MALFORMED_KINDS,
    MalformedRowError,
    TextFormat,
    check_header,
    count_lines,
    criteo_format,
    is_gzip,
    iter_chunks,
    open_text,
    parse_chunk,
    read_first_lines,
)
from .vocab import KeyCounter, build_vocab, lookup_ids

__all__ = ["convert_criteo", "convert_avazu", "MAX_LISTED_MALFORMED", "DEFAULT_MAX_MALFORMED", "TooManyMalformedError"]

#: Default largest fraction of malformed lines a conversion accepts (more is an error; raise it with
#: ``max_malformed=`` / ``--max-malformed``): a few bad lines are normal in web logs, 1% means a wrong file.
DEFAULT_MAX_MALFORMED = 0.01

#: At most this many malformed rows are listed one by one in ``meta.json`` (all are counted by kind).
MAX_LISTED_MALFORMED = 10_000
_FORMATS = {"criteo": CRITEO, "avazu": AVAZU}
_DEFAULT_MIN_COUNT = {"dlrm": 1, "random": 10}


class TooManyMalformedError(DataPrepError):
    """More malformed lines than ``max_malformed`` allows: names the files, the first bad lines and their kinds."""


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything that determines a conversion's output (hashed into the fingerprint)."""

    fmt: str
    inputs: tuple[str, ...]
    sizes: tuple[int, ...]
    layout: str  # "kaggle" (one stream of consecutive days) or "1tb" (one file per day)
    protocol: str
    min_count: int
    seed: int
    days: int
    chunk_bytes: int
    strict: bool

    def fingerprint(self) -> str:
        blob = json.dumps([dataclasses.asdict(self), FORMAT_VERSION], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def convert_criteo(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    protocol: str = "dlrm",
    min_count: int | None = None,
    strict: bool = False,
    layout: str = "auto",
    seed: int = 0,
    days: int = 7,
    workers: int = 2,
    chunk_bytes: int = 32 << 20,
    progress: bool = True,
    max_malformed: float = DEFAULT_MAX_MALFORMED,
) -> pathlib.Path:
    """Convert Criteo text files (Kaggle ``train.txt`` or 1TB ``day_0 .. day_23``, gzip or plain).

    Args:
        inputs: one file (Kaggle) or the day files in order (1TB).
        out_dir: the dataset directory to write (resumes an interrupted run of the same job).
        protocol: ``"dlrm"`` (consecutive days) or ``"random"`` (8:1:1 by seeded hash).
        min_count: ids seen fewer times in training become the OOV id 0 (default 1 for dlrm, 10 for random).
        strict: stop at the first malformed row with a :class:`MalformedRowError` naming file and line.
        max_malformed: largest fraction of malformed lines accepted (0..1); more stops the conversion
            with a :class:`TooManyMalformedError` listing the first bad lines.
        layout: ``"kaggle"`` (the inputs are one stream, cut into ``days`` days), ``"1tb"`` (one file per
            day) or ``"auto"`` (1tb when several files are given).
        seed: seed of the random split.
        days: days of the Kaggle layout under the dlrm protocol.
        workers: processes parsing in parallel (1 = in this process).
        chunk_bytes: text bytes per chunk (one parquet shard per chunk and split).
        progress: tqdm progress bars.

    Example (not run: it needs Criteo's ``train.txt``, 45M rows)::

        convert_criteo("train.txt", "data/criteo_kaggle")          # DLRM protocol
        convert_criteo("train.txt", "data/criteo_x1", protocol="random")
    """
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not paths:
        raise ValueError("convert_criteo needs at least one input file")
    if layout == "auto":
        layout = "1tb" if len(paths) > 1 else "kaggle"
    if layout not in ("kaggle", "1tb"):
        raise ValueError(f"layout must be 'auto', 'kaggle' or '1tb', got {layout!r}")
    if layout == "1tb" and len(paths) < 2 and protocol == "dlrm":
        raise ValueError("the 1TB dlrm protocol needs several day files (all but the last train); "
                         "pass them all, or use layout='kaggle'")
    source = "criteo-1tb" if layout == "1tb" else "criteo-kaggle"
    return _convert("criteo", paths, out_dir, layout=layout, protocol=protocol, min_count=min_count,
                    strict=strict, seed=seed, days=days, workers=workers, chunk_bytes=chunk_bytes,
                    progress=progress, source=source, max_malformed=max_malformed)


def convert_avazu(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    protocol: str = "random",
    min_count: int | None = None,
    strict: bool = False,
    seed: int = 0,
    days: int = 7,
    workers: int = 2,
    chunk_bytes: int = 32 << 20,
    progress: bool = True,
    max_malformed: float = DEFAULT_MAX_MALFORMED,
) -> pathlib.Path:
    """Convert the Avazu ``train`` CSV (header ``id,click,hour,...``; gzip or plain).

    ``hour`` (YYMMDDHH) becomes the categorical features ``hour_of_day`` and ``weekday``; ``id`` is
    dropped; the 21 other fields are categorical (any string). No dense features. ``protocol="dlrm"``
    here means consecutive equal blocks of rows (the file is in time order). Other arguments as in
    :func:`convert_criteo`.
    """
    return _convert("avazu", [input], out_dir, layout="kaggle", protocol=protocol, min_count=min_count,
                    strict=strict, seed=seed, days=days, workers=workers, chunk_bytes=chunk_bytes,
                    progress=progress, source="avazu", max_malformed=max_malformed)


def _convert(fmt_name: str, paths: list, out_dir, *, layout: str, protocol: str, min_count: int | None,
             strict: bool, seed: int, days: int, workers: int, chunk_bytes: int, progress: bool,
             source: str, max_malformed: float) -> pathlib.Path:

    if not 0 <= max_malformed <= 1:
        raise ValueError(f"max_malformed is a fraction of the lines, 0..1; got {max_malformed!r}")
    if protocol not in _DEFAULT_MIN_COUNT:
        raise ValueError(f"protocol must be 'dlrm' or 'random', got {protocol!r}")
    min_count = _DEFAULT_MIN_COUNT[protocol] if min_count is None else int(min_count)
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    files = []
    for p in paths:
        p = pathlib.Path(p).resolve()
        if not p.is_file():
            raise FileNotFoundError(f"input file {p} does not exist")
        files.append(p)
    if layout == "1tb":
        files = _sort_days(files)
    fmt = _input_format(fmt_name, files)
    job = _Job(fmt=fmt_name, inputs=tuple(map(str, files)), sizes=tuple(f.stat().st_size for f in files),
               layout=layout, protocol=protocol, min_count=min_count, seed=seed, days=days,
               chunk_bytes=chunk_bytes, strict=strict)
    out = pathlib.Path(out_dir)
    fp = job.fingerprint()
    existed = out.exists()
    if check_or_claim(out, fp, f"convert-{fmt_name}"):
        return out
    work = out / "_work"
    if sum(job.sizes) <= chunk_bytes:  # one chunk: starting worker processes would cost more than it saves
        workers = 1
    try:
        with Workers(workers, initializer=_tune_malloc, preload=[__name__]) as pool:
            pool.start(_warm_up)  # the workers import their modules while this process plans
            plan = _plan(job, fmt, work, progress, pool)
            _convert_planned(pool, job, fmt, files, plan, work, out, strict, chunk_bytes, min_count, progress,
                             max_malformed)
            pool.release()  # the workers exit while this process writes the metadata
            _finish(out, fp, fmt, job, plan, files, source)
    except TooManyMalformedError:
        raise  # the parsed chunks stay in _work: a rerun with a higher max_malformed continues from them
    except MalformedRowError:  # strict mode: the input must change, so its partial output is of no use
        _remove_partial(out, existed)
        raise
    except DataPrepError as err:
        raise DataPrepError(f"{err} -- {_remove_partial(out, existed)}") from None
    return out


def _input_format(fmt_name: str, files: list[pathlib.Path]) -> TextFormat:
    """The layout of the inputs, checked before any work starts: a wrong or empty file is refused here."""
    if fmt_name == "criteo":
        fmts = [criteo_format(f) for f in files]
        if len(set(fmts)) > 1:
            kinds = {str(f.name): (repr(x.delimiter), "header" if x.header else "no header") for f, x in zip(files, fmts)}
            raise DataPrepError(f"the Criteo inputs are not all in the same layout (delimiter, header): {kinds}")
        fmt = fmts[0]
    else:
        fmt = _FORMATS[fmt_name]
        for path in files:
            check_header(path, fmt)
    for path in files:
        lines = read_first_lines(path, 2 if fmt.header else 1)
        if len(lines) < (2 if fmt.header else 1):
            what = "is empty" if not lines else "holds only its header line"
            raise DataPrepError(f"{path} {what}: no data rows to convert")
    return fmt


def _remove_partial(out: pathlib.Path, existed: bool) -> str:
    """Delete what this conversion wrote in ``out`` (work files, shards); say so for the error message."""
    shutil.rmtree(out / "_work", ignore_errors=True)
    removed = 0
    for split in SPLITS:
        for f in list((out / split).glob("part-*.parquet")) + list((out / split).glob(".*.tmp")):
            f.unlink(missing_ok=True)
            removed += 1
        if (out / split).is_dir() and not any((out / split).iterdir()):
            (out / split).rmdir()
    for f in out.glob(".counts.*.tmp"):
        f.unlink(missing_ok=True)
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        return f"nothing was written ({out} was not kept)"
    if removed:
        return f"nothing was kept: the {removed} shard file(s) written so far were removed from {out}"
    return f"nothing was written to {out}"


def _warm_up(_: int) -> int:
    """Worker start-up: importing this module (to unpickle this function) is the work."""
    return 0


def _tune_malloc() -> None:
    """Initializer of the worker processes: keep big freed blocks in the heap (glibc only).

    A chunk's big arrays (tens of MB) are above glibc's mmap threshold, so every chunk would map fresh
    pages and fault them in again (~15% of a chunk's time); in the worker processes only, such blocks
    stay in the heap and are reused. Peak memory is unchanged.
    """
    import ctypes
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):
            pass


def _convert_planned(pool, job, fmt, files, plan, work, out, strict, chunk_bytes, min_count, progress, max_malformed):
    """Passes 1-3 over a planned conversion (skipping chunks already done)."""
    total_lines = [sum(c["n_lines"] for c in plan if c["file_idx"] == i) for i in range(len(files))]
    line_offset = np.concatenate([[0], np.cumsum(total_lines)]).astype(np.int64).tolist()
    split_info = {"protocol": job.protocol, "layout": job.layout, "days": job.days, "seed": job.seed,
                  "total_lines": total_lines, "line_offset": line_offset, "num_files": len(files)}

    # ---- pass 1: parse -------------------------------------------------------------------------------
    todo = [c for c in plan if not (work / f"p1-{c['chunk']:05d}.rec").is_file()]

    def pass1_jobs():
        by_file: dict[int, list[dict]] = {}
        for c in todo:
            by_file.setdefault(c["file_idx"], []).append(c)
        for i, chunks in sorted(by_file.items()):
            wanted = {c["offset"]: c for c in chunks}
            base = {"fmt": fmt, "file": str(files[i]), "out": str(out), "strict": strict, "split": split_info}
            if not is_gzip(files[i]):
                for c in chunks:
                    yield {**base, **c, "data": None}
                continue
            for offset, data in iter_chunks(files[i], chunk_bytes, skip_header=fmt.header):
                if offset in wanted:
                    yield {**base, **wanted[offset], "data": data}

    _run_passes(pool, todo, pass1_jobs(), plan, work, out, fmt, files, min_count, progress, max_malformed)


def _run_passes(pool, todo, pass1_jobs, plan, work, out, fmt, files, min_count, progress, max_malformed) -> None:
    from tqdm.auto import tqdm

    # ---- pass 2: vocabularies, counted while pass 1 runs (this process is idle then) ----------------
    vocab_file = work / "vocab.rec"
    counters = None if vocab_file.is_file() else [KeyCounter() for _ in fmt.feature_names]
    with tqdm(total=sum(c["nbytes"] for c in todo), unit="B", unit_scale=True, desc="parse",
              disable=not progress) as bar:
        done = _CountKeys(work, counters, bar)
        pool.run(_pass1, pass1_jobs, done, parallel=len(todo) > 1)
    _check_malformed(plan, work, files, max_malformed)
    if counters is not None:
        for c in plan:  # chunks parsed by an earlier (interrupted) run
            if c["chunk"] not in done.counted:
                done.add(c["chunk"])
        arrays = {}
        for f, counter in enumerate(counters):
            v = build_vocab(*counter.result(), min_count)
            for k, a in v.items():
                arrays[f"{k}_{f}"] = a
        write_record(vocab_file, **arrays)

    # ---- pass 3: ids and shards ----------------------------------------------------------------------
    todo3 = [c for c in plan if not (work / f"p2-{c['chunk']:05d}.rec").is_file()]
    jobs3 = [{"chunk": c["chunk"], "out": str(out), "fmt": fmt} for c in todo3]
    with tqdm(total=len(jobs3), unit="chunk", desc="write", disable=not progress) as bar:
        pool.run(_pass2, jobs3, bar, parallel=len(jobs3) > 1)


class _CountKeys:
    """Progress "bar" of pass 1: adds every finished chunk's training key counts to the counters."""

    def __init__(self, work: pathlib.Path, counters: list[KeyCounter] | None, bar) -> None:
        self.work, self.counters, self.bar = work, counters, bar
        self.counted: set[int] = set()

    def update(self, result: tuple[int, int]) -> None:
        chunk, nbytes = result
        self.bar.update(nbytes)
        if self.counters is not None:
            self.add(chunk)

    def add(self, chunk: int) -> None:
        rec = read_record(self.work / f"p1-{chunk:05d}.rec")
        if "cnt_sizes" in rec:
            bounds = np.concatenate([[0], np.cumsum(rec["cnt_sizes"])])
            for f, counter in enumerate(self.counters):
                counter.add(rec["cnt_keys"][bounds[f]: bounds[f + 1]], rec["cnt_vals"][bounds[f]: bounds[f + 1]])
        else:  # a record of an interrupted run by an earlier version: one array pair per feature
            for f, counter in enumerate(self.counters):
                counter.add(rec[f"cnt_keys_{f}"], rec[f"cnt_vals_{f}"])
        self.counted.add(chunk)


def _check_malformed(plan: list[dict], work: pathlib.Path, files: list, max_malformed: float, show: int = 5) -> None:
    """After parsing: stop when more than ``max_malformed`` of the lines are malformed, or no row is valid."""
    lines = sum(c["n_lines"] for c in plan)
    bad, rows, first = 0, 0, []
    per_file = [0] * len(files)
    for c in plan:
        rec = read_record(work / f"p1-{c['chunk']:05d}.rec")
        bad += len(rec["bad_lines"])
        per_file[c["file_idx"]] += len(rec["bad_lines"])
        rows += int(rec["rows"].sum())
        for line, kind in zip(rec["bad_lines"][: show - len(first)].tolist(), rec["bad_kinds"].tolist()):
            first.append(f"{files[c['file_idx']].name}:{line} ({MALFORMED_KINDS[kind]})")
    if rows > 0 and bad <= max_malformed * lines:
        return
    where = ", ".join(f"{f} ({n:,} bad)" for f, n in zip(files, per_file) if n) or ", ".join(map(str, files))
    if rows == 0:
        msg = f"no valid row in {lines:,} lines of {where}"
    else:
        msg = (f"{bad:,} of {lines:,} lines ({bad / lines:.1%}) are malformed, more than max_malformed="
               f"{max_malformed:g} allows, in {where}")
    raise TooManyMalformedError(
        f"{msg}; first bad lines: {', '.join(first)}. Check that the file is in the expected layout; to convert "
        "anyway and skip the bad lines, pass a higher --max-malformed FRACTION (max_malformed=; the parsed "
        "chunks are kept and reused)"
    )


def _sort_days(files: list[pathlib.Path]) -> list[pathlib.Path]:
    nums = [re.search(r"day_(\d+)", f.name) for f in files]
    if all(nums):
        return [f for _, f in sorted(zip([int(m.group(1)) for m in nums], files))]
    return files


def _plan(job: _Job, fmt: TextFormat, work: pathlib.Path, progress: bool, pool: Workers) -> list[dict]:
    """Chunks of all inputs: file index, offset, bytes, first line number, number of lines.

    Plain files are cut at the first newline after every ``chunk_bytes`` (a few seeks) and the chunks'
    lines are counted by this process while the workers start up, then by the workers in parallel;
    gzip files are decompressed once, in order.
    """
    from tqdm.auto import tqdm

    plan_file = work / "plan.json"
    if plan_file.is_file():
        return json.loads(plan_file.read_text())
    plan = []
    for i, path in enumerate(job.inputs):
        header_len = 0
        if fmt.header:
            with open_text(path) as f:
                header_len = len(f.readline())
        line = 2 if fmt.header else 1
        with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"scan {pathlib.Path(path).name}",
                  disable=not progress) as bar:
            if is_gzip(path):
                pieces = []
                for offset, data in iter_chunks(path, job.chunk_bytes, skip_header=fmt.header):
                    pieces.append((offset, len(data), count_lines(data)))
                    bar.update(len(data))
            else:
                ranges = _byte_ranges(path, header_len, job.chunk_bytes)
                counts: list[int] = []
                done = _Collect(counts, bar)
                # while the workers start up, and the last range (a round trip would cost more)
                while len(counts) < len(ranges) and (not pool.ready() or len(ranges) - len(counts) <= 1):
                    done.update(_count_job((path, *ranges[len(counts)])))
                pool.run(_count_job, [(path, o, n) for o, n in ranges[len(counts):]], done)
                pieces = [(o, n, c) for (o, n), c in zip(ranges, counts)]
        for offset, nbytes, n in pieces:
            plan.append({"chunk": len(plan), "file_idx": i, "offset": offset, "nbytes": nbytes,
                         "first_line": line, "n_lines": n})
            line += n
    atomic_write_json(plan_file, plan)
    return plan


class _Collect:
    """A progress "bar" for :meth:`Workers.run` that keeps the results (line counts) in order."""

    def __init__(self, out: list, bar) -> None:
        self.out, self.bar = out, bar

    def update(self, result: tuple[int, int]) -> None:
        self.out.append(result[0])
        self.bar.update(result[1])


def _byte_ranges(path: str, start: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``(offset, nbytes)`` pieces of a plain file, each ending just after a newline (or at the end)."""
    size = os.path.getsize(path)
    bounds = [start]
    with open(path, "rb") as f:
        pos = start + chunk_bytes
        while pos < size:
            f.seek(pos)
            while True:
                block = f.read(1 << 16)
                if not block:
                    cut = size
                    break
                k = block.find(b"\n")
                if k >= 0:
                    cut = pos + k + 1
                    break
                pos += len(block)
            if cut >= size:
                break
            bounds.append(cut)
            pos = cut + chunk_bytes
    bounds.append(size)
    return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@contextlib.contextmanager
def _mapped(path: str, offset: int, nbytes: int) -> Iterator[np.ndarray]:
    """Bytes ``[offset, offset + nbytes)`` of a plain file as a read-only uint8 array on a memory map.

    Nothing is copied (a read would copy the chunk once more); the map closes when the last view of it
    goes. A file shorter than planned is a :class:`DataPrepError`.
    """
    if nbytes == 0:
        yield np.zeros(0, dtype=np.uint8)
        return
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < offset + nbytes:
            raise DataPrepError(f"{path} changed while it was converted: it is shorter than when the conversion "
                                "started; convert it again")
        mm = mmap.mmap(f.fileno(), offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    try:
        yield np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset - start)
    finally:
        try:
            mm.close()
        except BufferError:  # a view is still alive (an exception's traceback): closed when it goes
            pass


def _count_job(job: tuple[str, int, int], piece: int = 1 << 20) -> tuple[int, int]:
    """Worker job: lines in a byte range of a plain file (and its size, for the progress bar).

    The range is mapped, not read (no copy), and its newlines counted by numpy a cache-sized piece
    at a time: about 4x faster than ``bytes.count`` on a copy.
    """
    path, offset, nbytes = job
    with _mapped(path, offset, nbytes) as arr:
        lines = sum(int(np.count_nonzero(arr[i: i + piece] == 10)) for i in range(0, nbytes, piece))
        last_ends = nbytes == 0 or arr[-1] == 10
        del arr
    return lines + int(not last_ends), nbytes


def _split_codes(lines: np.ndarray, file_idx: int, first_data_line: int, split: dict) -> np.ndarray:
    """Split code per row from its file and 1-based line number (see the module docstring)."""
    pos_in_file = lines - first_data_line
    if split["protocol"] == "random":
        return random_split(split["line_offset"][file_idx] + pos_in_file, split["seed"])
    if split["layout"] == "1tb":
        if file_idx < split["num_files"] - 1:
            return np.zeros(len(lines), dtype=np.int8)
        return np.where(pos_in_file < split["total_lines"][file_idx] // 2, 1, 2).astype(np.int8)
    total = split["line_offset"][-1]
    return dlrm_split(split["line_offset"][file_idx] + pos_in_file, total, split["days"])


#: Features with at most this many distinct keys in a chunk store their raw indices as uint16.
_NARROW_MAX = 1 << 16


def _pass1(job: dict) -> int:
    """Parse one chunk; write its raw rows (keys, not ids yet) and its record. Returns (chunk, bytes)."""
    fmt = job["fmt"]
    out = pathlib.Path(job["out"])
    if job["data"] is None:  # a plain file: parsed where it lies (mapped)
        with _mapped(job["file"], job["offset"], job["nbytes"]) as data:
            parsed = parse_chunk(data, job["first_line"], fmt, file=job["file"], strict=job["strict"],
                                 n_lines=job["n_lines"])
            del data
    else:
        parsed = parse_chunk(job["data"], job["first_line"], fmt, file=job["file"], strict=job["strict"],
                             n_lines=job["n_lines"])
    first_data_line = 2 if fmt.header else 1
    codes = _split_codes(parsed.lines, job["file_idx"], first_data_line, job["split"])
    chunk = job["chunk"]
    rec: dict[str, np.ndarray] = {
        "bad_lines": parsed.bad_lines, "bad_kinds": parsed.bad_kinds,
        "rows": np.array([(codes == i).sum() for i in range(3)], dtype=np.int64),
        "positives": np.array([parsed.labels[codes == i].sum(dtype=np.int64) for i in range(3)], dtype=np.int64),
    }
    # Each feature's column becomes its distinct keys and an int32 index into them (pyarrow's hash
    # table): the training counts are a bincount, and pass 3 maps only the distinct keys to ids.
    train = codes == SPLIT_CODES["train"]
    all_train = bool(train.all())
    columns = parsed.columns()
    n = len(parsed.labels)
    # the indices are stored as uint16 where a feature has at most 2^16 distinct keys in the chunk (most
    # do): the raw rows are written here and read back by pass 3, and half the bytes is less of both
    narrow = np.array([len(uniq) <= _NARROW_MAX for _, uniq in columns], dtype=bool)
    index16 = np.empty((int(narrow.sum()), n), dtype=np.uint16)
    index32 = np.empty((len(columns) - len(index16), n), dtype=np.int32)
    uniques, cnt_keys, cnt_vals = [], [], []
    for f, (idx, uniq) in enumerate(columns):
        if narrow[f]:
            index16[int(narrow[:f].sum())] = idx
        else:
            index32[int((~narrow[:f]).sum())] = idx
        uniques.append(uniq)
        cnt = np.bincount(idx if all_train else idx[train], minlength=len(uniq))
        seen = cnt > 0
        cnt_keys.append(uniq[seen])
        cnt_vals.append(cnt[seen].astype(np.int64))
    # all features' counts in three arrays: the main process loads every record several times, and
    # each array costs a header parse
    rec["cnt_sizes"] = np.array([len(k) for k in cnt_keys], dtype=np.int64)
    rec["cnt_keys"] = np.concatenate(cnt_keys) if cnt_keys else np.zeros(0, np.int64)
    rec["cnt_vals"] = np.concatenate(cnt_vals) if cnt_vals else np.zeros(0, np.int64)
    write_record(out / "_work" / f"raw-{chunk:05d}.rec", labels=parsed.labels, dense=parsed.dense,
                 narrow=narrow, index16=index16, index32=index32,
                 uniques=np.concatenate(uniques) if uniques else np.zeros(0, np.int64),
                 unique_sizes=np.array([len(u) for u in uniques], dtype=np.int64), split=codes)
    write_record(out / "_work" / f"p1-{chunk:05d}.rec", **rec)
    return chunk, job["nbytes"]


_VOCAB_CACHE: dict[str, list[dict[str, np.ndarray]]] = {}


def _load_vocab(path: pathlib.Path, num_features: int) -> list[dict]:
    """The vocabularies, cached per process (a worker maps many chunks with the same vocabularies)."""
    key = f"{path}:{path.stat().st_mtime_ns}"
    if key not in _VOCAB_CACHE:
        _VOCAB_CACHE.clear()
        rec = read_record(path)
        _VOCAB_CACHE[key] = [{k: rec[f"{k}_{f}"] for k in ("sorted_keys", "sorted_ids", "counts")}
                             for f in range(num_features)]
    return _VOCAB_CACHE[key]


def _pass2(job: dict) -> int:
    """Map one chunk's keys to ids and write its shards; record them; drop the raw rows."""
    fmt = job["fmt"]
    out = pathlib.Path(job["out"])
    chunk = job["chunk"]
    vocab = _load_vocab(out / "_work" / "vocab.rec", len(fmt.feature_names))
    raw_file = out / "_work" / f"raw-{chunk:05d}.rec"
    raw = read_record(raw_file)
    bounds = np.concatenate([[0], np.cumsum(raw["unique_sizes"])])
    if "index" in raw:  # a record of an interrupted run by an earlier version: one int32 array
        index = list(raw["index"])
    else:
        narrow, wide = iter(raw["index16"]), iter(raw["index32"])
        index = [next(narrow) if is_narrow else next(wide) for is_narrow in raw["narrow"]]
    ids = np.empty((len(index), len(raw["labels"])), dtype=np.int64).T  # [n, F], each feature's column contiguous
    for f, idx in enumerate(index):
        ids[:, f] = lookup_ids(vocab[f], raw["uniques"][bounds[f]: bounds[f + 1]])[idx]
    entries = write_split_shards(out, chunk, raw["split"], raw["labels"], raw["dense"], ids,
                                 fmt.dense, fmt.feature_names, [len(v["counts"]) for v in vocab])
    write_record(out / "_work" / f"p2-{chunk:05d}.rec", **entries_to_arrays(entries))
    raw_file.unlink()
    return 1


def _finish(out: pathlib.Path, fp: str, fmt: TextFormat, job: _Job, plan: list[dict], files: list,
            source: str) -> None:
    work = out / "_work"
    rows = np.zeros(3, dtype=np.int64)
    positives = np.zeros(3, dtype=np.int64)
    by_kind = dict.fromkeys(MALFORMED_KINDS, 0)
    listed: list[dict] = []
    n_bad = 0
    entries: list[dict] = []
    for c in plan:
        rec = read_record(work / f"p1-{c['chunk']:05d}.rec")
        rows += rec["rows"]
        positives += rec["positives"]
        for line, kind in zip(rec["bad_lines"].tolist(), rec["bad_kinds"].tolist()):
            by_kind[MALFORMED_KINDS[kind]] += 1
            n_bad += 1
            if len(listed) < MAX_LISTED_MALFORMED:
                listed.append({"file": files[c["file_idx"]].name, "line": line, "kind": MALFORMED_KINDS[kind]})
        entries += arrays_to_entries(read_record(work / f"p2-{c['chunk']:05d}.rec"))
    vocab = _load_vocab(work / "vocab.rec", len(fmt.feature_names))
    counts = {name: vocab[f]["counts"] for f, name in enumerate(fmt.feature_names)}
    write_counts(out, counts)
    split_rows = {s: int(rows[i]) for i, s in enumerate(SPLITS)}
    if job.protocol == "dlrm":
        desc = (f"{job.layout}: all day files but the last train, the last halved into valid and test"
                if job.layout == "1tb" else
                f"lines cut into {job.days} equal consecutive days; first {job.days - 1} train, "
                "the last halved into valid (first half) and test")
    else:
        desc = f"each line assigned 8:1:1 (train/valid/test) by a hash of its position with seed {job.seed}"
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "fingerprint": fp,
        "label": LABEL,
        "dense_features": list(fmt.dense),
        "categorical_features": list(fmt.feature_names),
        "num_embeddings": {name: int(len(counts[name])) for name in fmt.feature_names},
        "oov_id": 0,
        "min_count": job.min_count,
        "protocol": job.protocol,
        "split": {"protocol": job.protocol, "layout": job.layout, "days": job.days, "seed": job.seed,
                  "description": desc},
        "split_rows": split_rows,
        "positive_rate": {s: float(positives[i] / rows[i]) if rows[i] else 0.0 for i, s in enumerate(SPLITS)},
        "bayes_auc": None,
        "dense_transform": DENSE_TRANSFORM if fmt.dense else None,
        "counts_file": "counts.npz",
        "inputs": [{"file": str(f), "bytes": s} for f, s in zip(job.inputs, job.sizes)],
        "vocabulary": {"min_count": job.min_count, "oov_id": 0, "fitted_on": "train",
                       "order": "id 0 = out of vocabulary; ids 1.. by decreasing training count",
                       "missing_value": "an empty field is a value of its own"},
        "manifest": {
            "shards": entries,
            "malformed": {"count": n_bad, "by_kind": {k: v for k, v in by_kind.items() if v},
                          "rows": listed, "truncated": n_bad > len(listed)},
        },
    }
    atomic_write_json(out / "meta.json", meta)
    shutil.rmtree(work, ignore_errors=True)
