"""Fuzzing the raw-text readers: whatever the bytes, a correct dataset or a clear error of our own.

"Clear error" means a :class:`data_prep.DataPrepError` (``MalformedRowError`` and the others are
subclasses): never a traceback from pyarrow, numpy, gzip or zlib. Small example counts and tiny files
keep this file to a few seconds.
"""

from __future__ import annotations

import dataclasses
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep import DataPrepError, convert_avazu, convert_criteo, load_meta
from data_prep.textparse import (
    AVAZU,
    CRITEO,
    MALFORMED_KINDS,
    MalformedRowError,
    count_lines,
    criteo_format,
    hex_keys,
    iter_chunks,
    parse_chunk,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
CRITEO_LINES = (DATA / "criteo_kaggle_sample.txt").read_bytes().splitlines()[:12] if DATA.is_dir() else []
AVAZU_LINES = (DATA / "avazu_sample.csv").read_bytes().splitlines()[:12] if DATA.is_dir() else []
pytestmark = pytest.mark.skipif(not CRITEO_LINES, reason="sample data not found")
CRITEO_CSV = dataclasses.replace(CRITEO, delimiter=",", header=True)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _check_parsed(p, data: bytes, first_line: int) -> None:
    """Every physical line is either a row or a rejected line with a known reason, in order."""
    n = count_lines(data)
    assert len(p.lines) + len(p.bad_lines) == n
    assert sorted(np.concatenate([p.lines, p.bad_lines]).tolist()) == list(range(first_line, first_line + n))
    assert len(p.labels) == len(p.dense) == len(p.keys) == len(p.lines)
    assert set(p.labels.tolist()) <= {0, 1}
    assert np.isfinite(p.dense).all() and (p.dense >= 0).all()  # NaN / negative never reach a dataset
    assert all(0 <= k < len(MALFORMED_KINDS) for k in p.bad_kinds.tolist())


@FAST
@given(data=st.binary(min_size=1, max_size=600),  # a chunk is never empty
        fmt=st.sampled_from([CRITEO, AVAZU, CRITEO_CSV]), strict=st.booleans())
def test_random_bytes_parse_or_raise_our_error(data, fmt, strict):
    try:
        p = parse_chunk(data, 7, fmt, file="f.txt", strict=strict)
    except MalformedRowError as err:
        assert strict and err.file == "f.txt" and err.line >= 7
        return
    _check_parsed(p, data, 7)


def _mutate(line: bytes, kind: str, arg: int, sep: bytes) -> bytes:
    fields = line.split(sep)
    i = arg % len(fields)
    if kind == "truncate":
        return line[: arg % (len(line) + 1)]
    if kind == "extra":
        return line + sep + b"x" * (arg % 3)
    if kind == "missing":
        return sep.join(fields[:i] + fields[i + 1:])
    if kind == "huge":
        fields[i] = b"7" * (1000 + arg % 20_000)
    elif kind == "non_utf8":
        fields[i] = fields[i][:2] + b"\xff\xfe\xc3" + fields[i][2:]
    elif kind == "nan":
        fields[1 + arg % 13] = b"nan"
    elif kind == "negative":
        fields[1 + arg % 13] = b"-" + str(arg).encode()
    elif kind == "big_hex":  # 16 hex digits >= 2**63: a key like any other
        fields[14 + arg % 26] = b"%016x" % ((1 << 63) + arg)
    return sep.join(fields)


KINDS = ["truncate", "extra", "missing", "huge", "non_utf8", "nan", "negative", "big_hex", "none"]
mutations = st.lists(st.tuples(st.integers(0, 11), st.sampled_from(KINDS), st.integers(0, 10**6)), max_size=4)


def _edited(mutations, avazu: bool, crlf: bool) -> tuple[list[bytes], bytes, set[int]]:
    lines = list(AVAZU_LINES[1:] if avazu else CRITEO_LINES)
    sep = b"," if avazu else b"\t"
    edited = set()
    for i, kind, arg in mutations:
        if avazu and kind in ("nan", "negative", "big_hex"):
            continue
        i %= len(lines)
        lines[i] = _mutate(lines[i], kind, arg, sep)
        if kind not in ("none", "negative", "big_hex"):
            edited.add(i)
    return lines, (b"\r\n" if crlf else b"\n").join(lines) + b"\n", edited


@FAST
@given(mutations=mutations, avazu=st.booleans(), crlf=st.booleans(), strict=st.booleans())
def test_edited_sample_lines_parse_or_raise_our_error(mutations, avazu, crlf, strict):
    lines, body, edited = _edited(mutations, avazu, crlf)
    try:
        p = parse_chunk(body, 1, AVAZU if avazu else CRITEO, file="in.txt", strict=strict)
    except MalformedRowError as err:
        assert strict and err.file == "in.txt" and err.line - 1 in edited
        return
    _check_parsed(p, body, 1)
    assert set(range(len(lines))) - edited <= set((p.lines - 1).tolist())  # untouched lines are rows


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutations=mutations, avazu=st.booleans(), crlf=st.booleans())
def test_edited_sample_lines_convert_or_raise_our_error(tmp_path_factory, mutations, avazu, crlf):
    lines, body, edited = _edited(mutations, avazu, crlf)
    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "in.txt"
    src.write_bytes((AVAZU_LINES[0] + b"\n" if avazu else b"") + body)
    convert = convert_avazu if avazu else convert_criteo
    try:
        out = convert(src, tmp / "d", workers=1, progress=False, max_malformed=1.0, chunk_bytes=700)
    except DataPrepError as err:
        assert "in.txt" in str(err)
        return
    finally:
        shutil.rmtree(tmp / "_unused", ignore_errors=True)  # noqa: B012
    meta = load_meta(out)
    bad = meta.raw["manifest"]["malformed"]["count"]
    assert sum(meta.split_rows.values()) + bad == len(lines)
    assert bad <= len(edited)


@FAST
@given(cut=st.integers(0, 10**9), piece=st.integers(1, 4096))
def test_gzip_reader_cut_at_any_byte(tmp_path_factory, cut, piece):
    text = b"\n".join(CRITEO_LINES) + b"\n"
    data = gzip.compress(text)
    cut = cut % (len(data) + 1)
    src = tmp_path_factory.mktemp("gz") / "day_0.gz"
    src.write_bytes(data[:cut])
    try:
        got = b"".join(d for _, d in iter_chunks(src, piece, skip_header=False))
        criteo_format(src)
    except DataPrepError as err:
        assert "day_0.gz" in str(err) and "damaged or cut short" in str(err)
        return
    assert cut == len(data) and got == text or cut < 2  # 0-1 bytes: not even a gzip magic, read as text


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(cut=st.integers(0, 10**9))
def test_gzip_cut_at_any_byte(tmp_path_factory, cut):
    data = gzip.compress(b"\n".join(CRITEO_LINES) + b"\n")
    cut = cut % (len(data) + 1)
    tmp = tmp_path_factory.mktemp("gz")
    src = tmp / "day_0.gz"
    src.write_bytes(data[:cut])
    try:
        out = convert_criteo(src, tmp / "d", workers=1, progress=False, max_malformed=1.0)
    except DataPrepError as err:
        assert "day_0.gz" in str(err)
        assert not (tmp / "d" / "meta.json").exists()
        return
    assert cut == len(data)  # only the whole stream converts
    assert sum(load_meta(out).split_rows.values()) == len(CRITEO_LINES)


def test_hex_keys_beyond_2_63_are_distinct_keys():
    import pyarrow as pa

    values = ["8000000000000000", "fffffffffffffffe", "7fffffffffffffff", "00000000000000001"]
    keys, bad = hex_keys(pa.array(values))
    assert bad.tolist() == [False, False, False, True]  # 17 digits do not fit 64 bits
    assert len(set(keys[:3].tolist())) == 3 and keys[0] == np.int64(-(1 << 63))
