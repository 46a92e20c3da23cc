"""Streaming the raw text formats in newline-aligned chunks, and parsing one chunk fast.

A chunk is parsed in three steps, all vectorized:

1. line structure with numpy on the raw bytes: blank lines, CR characters (CRLF line ends) and wrong
   field counts are found per line and those lines are cut out;
2. the remaining lines go to ``pyarrow.csv`` (typed read; on a conversion error, a string read and a
   per-value check finds the offending rows);
3. categorical values become int64 keys: hexadecimal Criteo values are decoded, arbitrary strings
   (Avazu) are hashed (FNV-1a + SplitMix64); a missing value is the key :data:`MISSING_KEY`.

Criteo chunks first try a fast path (:func:`_criteo_fast`): ``pyarrow.csv`` (C++) splits the lines
into binary columns, pyarrow's hash table dictionary-encodes each column, and numpy decodes only the
distinct values, with the same arithmetic as the exact parser (:func:`_criteo_fields`); the categorical
columns stay dictionary-encoded (:meth:`ParsedChunk.columns`), which is what the converter counts and maps. It accepts a chunk only when every line is well-formed; on any doubt (a CR, a
wrong field count, an empty or bad label, a value it does not decode exactly) the chunk is re-parsed by
the exact parser, which finds and classifies the malformed lines. Both give identical results.

Every rejected line keeps its 1-based line number in the file and a reason (:data:`MALFORMED_KINDS`).
Windows line ends (``\\r\\n``) are read like ``\\n``; a carriage return anywhere else in a line is the
reason ``crlf``. Criteo files may also come with a header naming the columns (``label,I1,..,C26``,
comma- or tab-separated, as Kaggle's CSV exports): :func:`criteo_format` reads the layout from it, and
integer values written as decimals (``260.0``) are read as the integers they are.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import re
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .meta import DataPrepError
from .schema import AVAZU_CATEGORICAL, AVAZU_COLUMNS, CRITEO_CATEGORICAL, CRITEO_DENSE
from .splits import mix64

__all__ = [
    "TextFormat", "CRITEO", "AVAZU", "MALFORMED_KINDS", "MISSING_KEY", "MalformedRowError", "DataPrepError",
    "open_text", "iter_chunks", "parse_chunk", "ParsedChunk", "dictionary_encode", "criteo_format", "check_header",
]

#: Key of a missing (empty) categorical value: it gets its own vocabulary entry like any value.
MISSING_KEY = -1

#: Reasons a line is rejected; the code stored per rejected line is the index in this tuple.
MALFORMED_KINDS = (
    "blank_line", "crlf", "field_count", "empty_label", "bad_label", "non_integer_dense",
    "non_hex_category", "bad_hour", "non_utf8",
)
_K = {k: i for i, k in enumerate(MALFORMED_KINDS)}


class MalformedRowError(DataPrepError):
    """A malformed row in strict mode: names the file, the 1-based line and what is wrong."""

    def __init__(self, file: str, line: int, kind: str, detail: str = "") -> None:
        self.file, self.line, self.kind, self.detail = file, line, kind, detail
        msg = f"{file}:{line}: malformed row ({kind})"
        super().__init__(msg + (f": {detail}" if detail else "") +
                         "; run without strict=True to skip and count such rows")

    def __reduce__(self):  # picklable across the worker pool
        return (type(self), (self.file, self.line, self.kind, self.detail))


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """Layout of a raw text format.

    Args:
        name: ``"criteo"`` or ``"avazu"``.
        delimiter: field separator.
        header: the first line is a header (checked against ``columns``).
        columns: names of the file's columns in order.
        label: the label column.
        dense: integer feature columns (``log1p`` transformed).
        categorical: categorical columns read as keys.
        hex_categories: categorical values must be hexadecimal (Criteo); otherwise any string (hashed).
        hour: Avazu's ``YYMMDDHH`` column, turned into the features hour_of_day and weekday.
        feature_names: categorical feature names of the dataset, in order.
    """

    name: str
    delimiter: str
    header: bool
    columns: tuple[str, ...]
    label: str
    dense: tuple[str, ...]
    categorical: tuple[str, ...]
    hex_categories: bool
    hour: str | None
    feature_names: tuple[str, ...]


CRITEO = TextFormat(
    name="criteo", delimiter="\t", header=False, columns=("label", *CRITEO_DENSE, *CRITEO_CATEGORICAL),
    label="label", dense=tuple(CRITEO_DENSE), categorical=tuple(CRITEO_CATEGORICAL), hex_categories=True,
    hour=None, feature_names=tuple(CRITEO_CATEGORICAL),
)
AVAZU = TextFormat(
    name="avazu", delimiter=",", header=True, columns=tuple(AVAZU_COLUMNS), label="click", dense=(),
    categorical=tuple(AVAZU_COLUMNS[3:]), hex_categories=False, hour="hour",
    feature_names=tuple(AVAZU_CATEGORICAL),
)


def open_text(path: str | os.PathLike):
    """Open a raw file for binary reading, gzip-decompressing when it starts with the gzip magic."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


#: What a damaged or cut gzip stream raises while it is read.
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _gzip_error(path, f, text_offset: int, err: BaseException) -> DataPrepError:
    raw = getattr(f, "fileobj", None)
    try:
        at = f" near byte {raw.tell():,} of {os.path.getsize(path):,}" if raw is not None else ""
    except (OSError, ValueError):
        at = ""
    return DataPrepError(
        f"{path}: the gzip data is damaged or cut short{at} (within 1 MiB after byte {text_offset:,} of the "
        f"decompressed text): {type(err).__name__}: {err}. Download or copy the file again (`gzip -t FILE` checks it)"
    )


def read_first_lines(path: str | os.PathLike, n: int = 2) -> list[bytes]:
    """The first ``n`` lines of a raw file (fewer if it has fewer), a damaged gzip stream named as such."""
    lines: list[bytes] = []
    with open_text(path) as f:
        try:
            while len(lines) < n and (line := f.readline()):
                lines.append(line)
        except _GZIP_ERRORS as err:
            raise _gzip_error(path, f, sum(map(len, lines)), err) from None
    return lines


def _split_header(line: str) -> tuple[str, list[str]]:
    """The delimiter (tab or comma, the one giving more fields) and the stripped fields of a line."""
    delim = "\t" if line.count("\t") >= line.count(",") else ","
    return delim, [f.strip() for f in line.rstrip("\r\n").split(delim)]


def _column_diff(got: list[str], expected: Sequence[str]) -> str:
    missing = [c for c in expected if c not in got]
    unexpected = [c for c in got if c not in expected]
    if missing or unexpected:
        return f"missing columns {missing}, unexpected columns {unexpected}"
    return f"the columns are all there but in another order: {got}"


def check_header(path: str | os.PathLike, fmt: TextFormat) -> None:
    """Raise :class:`DataPrepError` naming the missing and unexpected columns if ``path``'s header is not ``fmt``'s."""
    lines = read_first_lines(path, 1)
    got = _split_header(lines[0].decode("utf-8", "replace"))[1] if lines else []
    if got != list(fmt.columns):
        raise DataPrepError(f"{path}:1: not the {fmt.name} header: {_column_diff(got, fmt.columns)}; "
                            f"expected {fmt.delimiter!r}-separated {list(fmt.columns)}")


def criteo_format(path: str | os.PathLike) -> TextFormat:
    """The Criteo layout of ``path``, read from its first line.

    Kaggle's ``train.txt`` / the 1TB day files: tab-separated, no header. A first line naming the
    columns (``label, I1..I13, C1..C26``, any case, tab- or comma-separated) is a header and sets the
    delimiter; 40 comma-separated values without a header are read too. A header naming other columns
    is an error listing the missing and unexpected ones.
    """
    lines = read_first_lines(path, 1)
    if not lines:
        return CRITEO
    first = lines[0].decode("utf-8", "replace")
    delim, fields = _split_header(first)
    expected = [c.lower() for c in CRITEO.columns]
    if [f.lower() for f in fields] == expected:
        return dataclasses.replace(CRITEO, delimiter=delim, header=True)
    if delim == "," and len(fields) == len(expected) and fields[0] in ("0", "1"):
        return dataclasses.replace(CRITEO, delimiter=",")
    if fields and re.search(r"[A-Za-z]", fields[0]):  # a header, but not Criteo's
        names = [f.lower() for f in fields]
        raise DataPrepError(
            f"{path}:1: this header does not name the Criteo layout: {_column_diff(names, expected)}. "
            f"Expected either no header (Kaggle train.txt: tab-separated label, 13 integers, 26 hex values) "
            f"or a header label,I1..I13,C1..C26 (comma- or tab-separated)"
        )
    return CRITEO


def is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def iter_chunks(path: str | os.PathLike, chunk_bytes: int, skip_header: bool) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, data)``: newline-aligned pieces of about ``chunk_bytes`` of the (decompressed) text.

    ``offset`` is the position of ``data`` in the decompressed stream. The last piece may lack a final
    newline. With ``skip_header`` the first line is left out (offsets still count it).
    """
    with open_text(path) as f:
        offset = 0
        carry = b""
        if skip_header:
            header = _read(path, f, offset, f.readline)
            offset = len(header)
        while True:
            block = _read_block(path, f, offset + len(carry), chunk_bytes)
            if not block:
                break
            data = carry + block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 1:]
            yield offset, data[: cut + 1]
            offset += cut + 1
        if carry:
            yield offset, carry


def _read(path, f, offset: int, fn, *args) -> bytes:
    try:
        return fn(*args)
    except _GZIP_ERRORS as err:
        raise _gzip_error(path, f, offset, err) from None


def _read_block(path, f, offset: int, nbytes: int, piece: int = 1 << 20) -> bytes:
    """Up to ``nbytes`` from ``f``, read in pieces so that a damaged gzip stream is located to a piece."""
    if not isinstance(f, gzip.GzipFile):
        return f.read(nbytes)
    parts, got = [], 0
    while got < nbytes:
        part = _read(path, f, offset + got, f.read, min(piece, nbytes - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_header(path: str | os.PathLike) -> str:
    with open_text(path) as f:
        return f.readline().decode("utf-8", errors="replace").rstrip("\r\n")


def count_lines(data: bytes) -> int:
    """Physical lines in a chunk (a last line without newline counts)."""
    n = data.count(b"\n")
    return n + (1 if data and not data.endswith(b"\n") else 0)


@dataclasses.dataclass
class ParsedChunk:
    """Valid rows of a chunk and the rejected lines.

    The categorical keys come either as a matrix (``keys``) or per feature as the distinct keys and an
    index into them (``encoded``, what the Criteo fast path produces); each form is derived from the
    other on first use (:attr:`keys`, :meth:`columns`).

    Shape:
        labels ``[N]`` int8, dense ``[N, num_dense]`` float32 (transformed), keys ``[N, F]`` int64,
        lines ``[N]`` (1-based line numbers), bad_lines / bad_kinds ``[M]``; ``encoded``: per feature
        ``(index int32 [N], distinct keys int64 [U])`` with ``distinct[index] == keys[:, f]``.
    """

    labels: np.ndarray
    dense: np.ndarray
    keys_matrix: dataclasses.InitVar[np.ndarray | None] = None
    lines: np.ndarray = None
    bad_lines: np.ndarray = None
    bad_kinds: np.ndarray = None
    encoded: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __post_init__(self, keys_matrix):
        self._keys = keys_matrix
        if keys_matrix is None and self.encoded is None:
            raise ValueError("ParsedChunk needs keys_matrix or encoded")

    @property
    def keys(self) -> np.ndarray:
        """``[N, F]`` int64 keys (built from ``encoded`` on first use)."""
        if self._keys is None:
            keys = np.empty((len(self.encoded), len(self.labels)), dtype=np.int64).T
            for f, (idx, uniq) in enumerate(self.encoded):
                np.take(uniq, idx, out=keys[:, f])
            self._keys = keys
        return self._keys

    def columns(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per feature ``(index int32 [N], distinct keys int64)`` (pyarrow's hash table on first use)."""
        if self.encoded is None:
            self.encoded = [dictionary_encode(self._keys[:, f]) for f in range(self._keys.shape[1])]
        return self.encoded


def dictionary_encode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(index int32 [n], distinct keys int64)`` with ``distinct[index] == keys`` (pyarrow's hash table).

    The distinct keys are in order of first occurrence. Arrays move through their buffers: ``pa.array`` /
    ``to_numpy`` would import pandas (~0.2 s of every worker's start).
    """
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    enc = pa.Array.from_buffers(pa.int64(), len(keys), [None, pa.py_buffer(keys)]).dictionary_encode()
    idx, uniq = enc.indices, enc.dictionary
    return (np.frombuffer(idx.buffers()[1], dtype=np.int32, count=len(idx), offset=idx.offset * 4),
            np.frombuffer(uniq.buffers()[1], dtype=np.int64, count=len(uniq), offset=uniq.offset * 8))


# ---- categorical keys ------------------------------------------------------------------------------
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i


def _string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets ``[n+1]`` (int64) and the data bytes of a string array (nulls have length 0)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type == pa.large_string():
        odt = np.int64
    else:
        arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
        odt = np.int32
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=odt, count=len(arr) + 1, offset=arr.offset * np.dtype(odt).itemsize)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64), data


def _char_matrix(offsets: np.ndarray, data: np.ndarray, width: int, pad: int) -> np.ndarray:
    """Right-aligned ``[n, width]`` byte matrix of the strings (left padding ``pad``)."""
    lengths = np.diff(offsets)
    cols = np.arange(width)[None, :]
    pos = offsets[:-1, None] + cols - (width - lengths)[:, None]
    valid = cols >= (width - lengths)[:, None]
    out = np.where(valid, data[np.clip(pos, 0, max(len(data) - 1, 0))] if len(data) else pad, pad)
    return out.astype(np.uint8)


def hex_keys(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Keys of a column of hexadecimal strings; returns ``(keys int64 [n], bad bool [n])``.

    Empty / null values give :data:`MISSING_KEY`; values that are not 1..16 hex digits are ``bad``.

    Example:
        >>> keys, bad = hex_keys(pa.array(["05db9164", None, "ff", "xyz"]))
        >>> keys[:3].tolist(), bad.tolist()
        ([98275684, -1, 255], [False, False, False, True])
    """
    offsets, data = _string_parts(arr)
    lengths = np.diff(offsets)
    n = len(lengths)
    missing = lengths == 0
    keys = np.full(n, MISSING_KEY, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    present = ~missing
    if not present.any():
        return keys, bad
    if np.all((lengths == 8) | missing):  # fast path: Criteo values are always 8 digits
        nib = _HEX_LUT[data[offsets[0]: offsets[-1]]].reshape(-1, 4, 2)
        rows = np.flatnonzero(present)
        bad_rows = (nib == 255).reshape(-1, 8).any(axis=1)
        # two nibbles -> one byte; four bytes, most significant first -> one big-endian uint32
        octets = np.ascontiguousarray((nib[:, :, 0] << 4) | nib[:, :, 1])
        keys[rows] = octets.view(">u4")[:, 0]
        bad[rows[bad_rows]] = True
        keys[bad] = MISSING_KEY
        return keys, bad
    return _hex_from_parts(offsets, data)


def _hex_from_parts(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """General hex decoding of strings given by ``offsets`` into ``data`` (any length; > 16 is bad)."""
    lengths = np.diff(offsets)
    missing = lengths == 0
    too_long = lengths > 16
    lens = np.where(too_long, 0, lengths)
    off2 = np.concatenate([[0], np.cumsum(lens)])
    src = np.repeat(offsets[:-1], lens) + (np.arange(off2[-1]) - np.repeat(off2[:-1], lens))
    chars = _char_matrix(off2, data[src], 16, ord("0"))
    nib = _HEX_LUT[chars]
    bad = too_long | (nib == 255).any(axis=1)
    shifts = np.arange(60, -1, -4, dtype=np.uint64)
    vals = (np.where(nib == 255, 0, nib).astype(np.uint64) << shifts[None, :]).sum(axis=1, dtype=np.uint64)
    keys = np.where(missing | bad, MISSING_KEY, vals.view(np.int64))
    return keys, bad


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def string_keys(arr: pa.Array) -> np.ndarray:
    """64-bit keys of arbitrary strings (FNV-1a then SplitMix64); empty / null -> :data:`MISSING_KEY`."""
    offsets, data = _string_parts(arr)
    lengths = np.diff(offsets)
    h = np.full(len(lengths), _FNV_OFFSET, dtype=np.uint64)
    width = int(lengths.max()) if len(lengths) else 0
    with np.errstate(over="ignore"):
        for j in range(width):
            live = lengths > j
            c = data[np.minimum(offsets[:-1] + j, max(len(data) - 1, 0))].astype(np.uint64) if len(data) else 0
            h = np.where(live, (h ^ c) * _FNV_PRIME, h)
        keys = (mix64(h) >> np.uint64(1)).astype(np.int64)  # non-negative: never the missing key
    return np.where(lengths == 0, MISSING_KEY, keys)


# ---- one chunk -------------------------------------------------------------------------------------
_PAD = 24  # bytes in front of a chunk, so that 8-byte windows ending in the first field start at >= 0


def _scan(data: bytes, fmt: TextFormat):
    """Padded chunk bytes and its line structure (one pass over the bytes per character class).

    Returns ``arr`` (``_PAD`` bytes of ``"0"``, the chunk, a final newline if missing, 8 NUL bytes),
    per physical line its ``starts`` and ``ends`` (position of the newline) in ``arr``, the positions of
    all delimiters, and per line the malformed code (-1 = fine).
    """
    tail = b"" if data.endswith(b"\n") else b"\n"
    arr = np.frombuffer(b"0" * _PAD + data + tail + b"\0" * 8, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    starts = np.empty_like(ends)
    starts[0] = _PAD
    starts[1:] = ends[:-1] + 1
    delims = np.flatnonzero(arr == ord(fmt.delimiter))
    per_line = np.diff(np.searchsorted(delims, ends), prepend=0)
    code = np.full(len(ends), -1, dtype=np.int8)
    code[per_line != len(fmt.columns) - 1] = _K["field_count"]
    if data.find(b"\r") >= 0:
        code[np.searchsorted(ends, np.flatnonzero(arr == 13))] = _K["crlf"]
    code[ends == starts] = _K["blank_line"]
    return arr, starts, ends, delims, code


def _read_arrow(buf: bytes | pa.Buffer, fmt: TextFormat, typed: bool) -> pa.Table:
    types = {c: pa.string() for c in fmt.columns}
    if typed:
        types[fmt.label] = pa.int64()
        types.update({c: pa.int64() for c in fmt.dense})
    include = [fmt.label, *fmt.dense, *fmt.categorical] + ([fmt.hour] if fmt.hour else [])
    return pacsv.read_csv(
        pa.py_buffer(buf) if isinstance(buf, bytes) else buf,
        read_options=pacsv.ReadOptions(column_names=list(fmt.columns), use_threads=False,
                                       block_size=max(len(buf) + 1, 1 << 20)),
        parse_options=pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char=False, escape_char=False,
                                         double_quote=False, newlines_in_values=False, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True,
                                             include_columns=include, null_values=[""]),
    )


_INT_RE = r"^[+-]?[0-9]{1,18}$"  # 18 digits always fit in int64


def _int_column(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer column as ``(values int64 with 0 for missing/bad, present bool, bad bool)``."""
    if pa.types.is_integer(col.type):
        present = col.is_valid().to_numpy(zero_copy_only=False)
        return col.fill_null(0).to_numpy().astype(np.int64), present, np.zeros(len(col), bool)
    present = col.is_valid().to_numpy(zero_copy_only=False)
    ok = pc.match_substring_regex(col, _INT_RE).fill_null(False).to_numpy(zero_copy_only=False)
    bad = present & ~ok
    clean = pc.if_else(pa.array(ok), col, pa.scalar(None, pa.string()))
    vals = pc.cast(clean, pa.int64(), safe=False).fill_null(0).to_numpy().astype(np.int64)
    return vals, present & ok, bad


def _arrow_fields(buf: bytes, fmt: TextFormat, n: int):
    """Fields of ``n`` well-formed lines through ``pyarrow.csv`` (any format)."""
    try:
        table = _read_arrow(buf, fmt, typed=True)
    except pa.ArrowInvalid:  # a value that is not an integer: read strings, find the rows
        table = _read_arrow(buf, fmt, typed=False)
    row_bad = np.full(n, -1, dtype=np.int8)  # first reason per row, in column order

    def flag(mask: np.ndarray, kind: str) -> None:
        row_bad[(row_bad < 0) & mask] = _K[kind]

    lab, lab_present, lab_bad = _int_column(table[fmt.label])
    flag(~lab_present & ~lab_bad, "empty_label")
    flag(lab_bad | (lab_present & (lab != 0) & (lab != 1)), "bad_label")
    labels = lab.astype(np.int8)
    dense = np.zeros((n, len(fmt.dense)), dtype=np.float32)
    for j, name in enumerate(fmt.dense):
        vals, present, bad = _int_column(table[name])
        flag(bad, "non_integer_dense")
        dense[:, j] = np.log1p(np.where(present, np.maximum(vals, 0), 0).astype(np.float64))
    keys = np.empty((n, len(fmt.feature_names)), dtype=np.int64)
    j0 = 0
    if fmt.hour:
        hour_of_day, weekday, bad = _avazu_hour(table[fmt.hour])
        flag(bad, "bad_hour")
        keys[:, 0], keys[:, 1] = hour_of_day, weekday
        j0 = 2
    for j, name in enumerate(fmt.categorical):
        if fmt.hex_categories:
            k, bad = hex_keys(table[name])
            flag(bad, "non_hex_category")
        else:
            k = string_keys(table[name])
        keys[:, j0 + j] = k
    return labels, dense, keys, row_bad


def _criteo_fields(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray, tabs: np.ndarray,
                   block: int = 32768):
    """Fields of well-formed Criteo lines (40 fields each) with numpy only, all columns at once.

    ``arr``, ``starts``, ``ends``, ``tabs`` come from :func:`_scan`. Field starts / ends form ``[n, 40]``
    tables; blocks of rows are then decoded together with SWAR arithmetic (per-byte arithmetic on 64-bit
    words read at any byte offset): integers of up to 8 characters and 8-digit hex values are one word
    each. Values of unusual length or case take a general path cell by cell.
    """
    n = len(ends)
    tabs = tabs.astype(np.int32).reshape(n, 39)
    fs = np.empty((n, 40), dtype=np.int32)
    fe = np.empty((n, 40), dtype=np.int32)
    fs[:, 0] = starts
    fs[:, 1:] = tabs + 1
    fe[:, :39] = tabs
    fe[:, 39] = ends
    # every 8-byte window of the buffer as an unaligned little-endian uint64
    words = np.ndarray(shape=(len(arr) - 7,), dtype="<u8", buffer=arr, strides=(1,))
    parts = [_criteo_block(arr, words, fs[a:a + block], fe[a:a + block]) for a in range(0, n, block)]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))


_B01 = np.uint64(0x0101010101010101)
_B0F = np.uint64(0x0F0F0F0F0F0F0F0F)
_B30 = np.uint64(0x3030303030303030)
_BF0 = np.uint64(0xF0F0F0F0F0F0F0F0)
_L0F = np.uint64(0x000F000F000F000F)
_L32 = np.uint64(0x0000FFFF0000FFFF)
_L64 = np.uint64(0xFFFFFFFF)


def _swar_hex8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8 ASCII chars per uint64 (first char in the lowest byte) -> (value of the 8 hex digits, exact).

    ``exact`` is False unless all 8 chars are lowercase hex digits (then re-encoding gives ``x`` back).
    """
    nib = (x & _B0F) + ((x >> np.uint64(6)) & _B01) * np.uint64(9)  # digit or letter value per byte
    enc = nib + _B30 + (((nib + np.uint64(0x0606060606060606)) >> np.uint64(4)) & _B01) * np.uint64(0x27)
    exact = (enc == x) & ((nib & _BF0) == 0)  # round trip, and no "digit" above 15 (g..z)
    t = ((nib & _L0F) << np.uint64(4)) | ((nib >> np.uint64(8)) & _L0F)  # byte k = nib[2k] << 4 | nib[2k+1]
    t = (t | (t >> np.uint64(8))) & _L32
    t = (t | (t >> np.uint64(16))) & _L64
    return t.astype(np.uint32).byteswap().astype(np.int64), exact


_B06 = np.uint64(0x0606060606060606)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def _swar_int8(x: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal value of the last ``digits`` (0..8) chars of each word (first char in the lowest byte).

    Bytes before them are replaced by ``"0"``. Returns ``(value int64, ok)``; ``ok`` is False when a
    char is not a digit or ``digits > 8``.
    """
    with np.errstate(over="ignore"):
        nlow = (8 - np.minimum(digits, 8)).astype(np.uint64) * np.uint64(8)
        low = np.where(nlow >= 64, _ALL, (np.uint64(1) << np.minimum(nlow, np.uint64(63))) - np.uint64(1))
        x = (x & ~low) | (_B30 & low)
        ok = ((x & _BF0) == _B30) & (((x + _B06) & _BF0) == _B30) & (digits <= 8)
        # pairs, quads, octets: the first (lowest) char is the most significant digit
        d = ((x & _B0F) * np.uint64(10 * (1 << 8) + 1)) >> np.uint64(8)
        d = ((d & np.uint64(0x00FF00FF00FF00FF)) * np.uint64(100 * (1 << 16) + 1)) >> np.uint64(16)
        d = ((d & np.uint64(0x0000FFFF0000FFFF)) * np.uint64(10000 * (1 << 32) + 1)) >> np.uint64(32)
    return d.astype(np.int64), ok


def _long_ints(arr: np.ndarray, ends: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of cells with 9..18+ digits ending before ``ends`` (``ok`` False beyond 18 digits)."""
    width = 18
    cols = np.arange(-width, 0)
    ch = arr[np.maximum(ends[:, None] + cols, 0)].astype(np.int64) - 48
    inside = cols >= -digits[:, None]
    ok = ((ch >= 0) & (ch <= 9) | ~inside).all(axis=1) & (digits <= width)
    value = np.where(inside & ok[:, None], ch, 0) @ (10 ** np.arange(width - 1, -1, -1, dtype=np.int64))
    return value, ok


def _criteo_block(arr: np.ndarray, words: np.ndarray, fs: np.ndarray, fe: np.ndarray):
    n = len(fs)
    lens = fe - fs
    row_bad = np.full(n, -1, dtype=np.int8)

    def flag(mask: np.ndarray, kind: str) -> None:
        row_bad[(row_bad < 0) & mask] = _K[kind]

    # label: exactly one character, 0 or 1
    first = arr[fs[:, 0]]
    flag(lens[:, 0] == 0, "empty_label")
    flag((lens[:, 0] > 1) | ((first != 48) & (first != 49)), "bad_label")
    labels = (first == 49).astype(np.int8)
    # dense: an optional sign then digits; the last 8 chars of each field are one word
    dfs, dl = fs[:, 1:14], lens[:, 1:14]
    c0 = arr[dfs]
    signed = ((c0 == 45) | (c0 == 43)) & (dl > 0)
    digits = dl - signed
    value, ok = _swar_int8(words[fe[:, 1:14] - 8], digits)
    long = digits > 8
    if long.any():  # 9..18 digits (rare): digit matrix, cell by cell
        r, c = np.nonzero(long)
        value[r, c], ok[r, c] = _long_ints(arr, fe[:, 1:14][r, c], digits[r, c])
    ok &= ~(signed & (digits == 0))
    flag(~ok.all(axis=1), "non_integer_dense")
    value = np.where(signed & (c0 == 45), 0, value)  # missing (empty) and negative -> 0
    dense = np.log1p(value.astype(np.float64)).astype(np.float32)
    # categorical: 8 lowercase hex digits (fast path) or empty (missing)
    cs = fs[:, 14:]
    cl = lens[:, 14:]
    values, exact = _swar_hex8(words[np.minimum(cs, len(words) - 1)])
    fast = (cl == 8) & exact
    keys = np.where(fast, values, MISSING_KEY)
    bad_hex = np.zeros((n, 26), dtype=bool)
    odd = (cl != 0) & ~fast
    if odd.any():  # other lengths or upper case, cell by cell through the general decoder
        r, c = np.nonzero(odd)
        starts, ln = cs[r, c].astype(np.int64), cl[r, c].astype(np.int64)
        ends = np.cumsum(ln)
        src = np.repeat(starts, ln) + (np.arange(ends[-1]) - np.repeat(ends - ln, ln))
        k, b = _hex_from_parts(np.concatenate([[0], ends]), arr[src])
        keys[r, c] = k
        bad_hex[r, c] = b
    flag(bad_hex.any(axis=1), "non_hex_category")
    return labels, dense, keys, row_bad


# ---- Criteo fast path: pyarrow.csv tokenizes, numpy decodes the columns, any doubt -> exact parser --
def _binary_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Value lengths ``[n]`` (int64) and the bytes (from the first value on) of a binary column."""
    col = table[name]
    return _binary_parts(col.chunk(0) if col.num_chunks == 1 else col.combine_chunks())


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Value lengths ``[n]`` (int64) and the bytes (from the first value on) of a binary array."""
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return np.diff(offsets).astype(np.int64), data[offsets[0]: offsets[-1]]


def _dense_values(lens: np.ndarray, chars: np.ndarray) -> np.ndarray | None:
    """``log1p`` (float32) of Criteo dense values given as binary parts; None unless all are integers.

    An optional sign, then digits; missing (empty) and negative values are 0. The last 8 characters of
    a value form one word, decoded with the same arithmetic as :func:`_criteo_block`.
    """
    buf = np.concatenate([np.full(_PAD, 48, np.uint8), chars, np.zeros(8, np.uint8)])
    ends = np.cumsum(lens) + _PAD
    c0 = buf[ends - lens]
    signed = ((c0 == 45) | (c0 == 43)) & (lens > 0)
    digits = lens - signed
    words = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
    v, ok = _swar_int8(words[ends - 8], digits)
    long = digits > 8
    if long.any():
        v[long], ok[long] = _long_ints(buf, ends[long], digits[long])
    if not (ok & ~(signed & (digits == 0))).all():
        return None
    return np.log1p(np.where(signed & (c0 == 45), 0, v).astype(np.float64)).astype(np.float32)


def _dictionary_parts(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dictionary encoding of a (chunked) column: ``(index int32 [n], distinct values)``.

    The chunks share one hash table, filled in order of first occurrence, so every chunk's indices
    are valid in the last chunk's dictionary.
    """
    enc = col.dictionary_encode()
    chunks = [c for c in enc.chunks if len(c)]
    idx = [np.frombuffer(c.indices.buffers()[1], dtype=np.int32, count=len(c), offset=c.indices.offset * 4)
           for c in chunks]
    return (idx[0] if len(idx) == 1 else np.concatenate(idx)), chunks[-1].dictionary


def _criteo_fast(data: bytes, first_line: int, fmt: TextFormat = CRITEO,
                 n_lines: int | None = None) -> ParsedChunk | None:
    """A chunk of only well-formed Criteo lines, parsed through ``pyarrow.csv``; None when in doubt.

    ``pyarrow.csv`` (C++) splits the lines into binary columns; labels, dense integers and 8-digit
    lowercase hex categories are then decoded with the same SWAR arithmetic as the exact parser, dense
    and categorical values once per distinct value of the chunk, so the values are identical.
    ``n_lines``: the chunk's line count when the caller knows it. Anything this path does not handle exactly -- a CR, a line
    whose field count is not 40 (pyarrow raises), a blank line (an empty label), a bad label, a dense
    value that is not an integer, a category that is not 8 lowercase hex digits -- returns None, and
    the caller re-parses the chunk with the exact parser, which finds and classifies the lines.
    """
    if len(data) >= 1 << 31 or (isinstance(data, bytes) and data.find(b"\r") >= 0):  # (int32 offsets of one
        return None  # binary column; CRs in an array: see parse_chunk)
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            # pyarrow's default 1 MB blocks: one block per chunk would be half as fast (caches)
            read_options=pacsv.ReadOptions(column_names=list(fmt.columns), use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char=False, escape_char=False,
                                             double_quote=False, newlines_in_values=False,
                                             ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(fmt.columns, pa.binary())),
        )
    except pa.ArrowInvalid:
        return None
    n = table.num_rows
    if n == 0 or n != (count_lines(data) if n_lines is None else n_lines):
        return None
    # label: exactly one character, 0 or 1
    lens, chars = _binary_column(table, fmt.label)
    if not (lens == 1).all() or not ((chars == 48) | (chars == 49)).all():
        return None
    labels = (chars == 49).astype(np.int8)
    # dense: each column is dictionary-encoded (pyarrow's hash table on the bytes), and only its distinct
    # values are decoded (a few thousand per chunk), which is the same as decoding every value.
    dense = np.empty((len(fmt.dense), n), dtype=np.float32)
    for j, name in enumerate(fmt.dense):
        idx, distinct = _dictionary_parts(table[name])
        values = _dense_values(*_binary_parts(distinct))
        if values is None:
            return None
        np.take(values, idx, out=dense[j])
    dense = dense.T
    # categorical: 8 lowercase hex digits or empty (missing). The 8 characters of a value are one 64-bit
    # word (a missing value is the word 0, never 8 hex digits): the words are dictionary-encoded and only
    # the distinct ones are decoded, which is the same encoding as decoding every value first.
    encoded = []
    for name in fmt.categorical:
        lens, chars = _binary_column(table, name)
        if len(chars) == 8 * n:  # (only 0 or 8 characters per value: then all are present)
            words = chars.view("<u8")
        else:
            present = lens == 8
            if not (present | (lens == 0)).all():
                return None
            words = np.zeros(n, dtype="<u8")
            words[present] = chars.view("<u8")
        idx, distinct = dictionary_encode(words.view(np.int64))
        vals, exact = _swar_hex8(distinct.view("<u8"))
        missing = distinct == 0
        if not (exact | missing).all():
            return None
        encoded.append((idx, np.where(missing, MISSING_KEY, vals)))
    none = np.zeros(0, dtype=np.int64)
    return ParsedChunk(labels=labels, dense=dense, encoded=encoded,
                       lines=first_line + np.arange(n, dtype=np.int64),
                       bad_lines=none, bad_kinds=none.astype(np.int8))


def parse_chunk(data: bytes | np.ndarray, first_line: int, fmt: TextFormat, *, file: str = "<chunk>",
                strict: bool = False, n_lines: int | None = None) -> ParsedChunk:
    """Parse one newline-aligned chunk whose first line is line ``first_line`` (1-based) of ``file``.

    ``data``: the chunk's bytes, or a uint8 array of them (a mapped file range): a Criteo chunk is then
    read where it lies, without a copy, unless it needs normalising. ``n_lines``: the chunk's physical lines when
    the caller has counted them already (saves a pass).

    Example:
        >>> row = "1\\t" + "5\\t" * 13 + "\\t".join(["0a0b0c0d"] * 26) + "\\n"
        >>> p = parse_chunk((row + "\\n" + row).encode(), 1, CRITEO)
        >>> p.labels.tolist(), p.lines.tolist(), p.bad_lines.tolist(), [MALFORMED_KINDS[k] for k in p.bad_kinds]
        ([1, 1], [1, 3], [2], ['blank_line'])
    """
    if isinstance(data, np.ndarray):
        # Read in place, not normalised: pyarrow.csv ends a line at CRLF as at LF (the fields are those of
        # the normalised text), and any other CR or a decimal point makes the fast path decline; then the
        # bytes are copied, normalised and parsed again.
        tried = fmt.name == "criteo" and n_lines is not None
        if tried:
            fast = _criteo_fast(data, first_line, fmt, n_lines)
            if fast is not None:
                return fast
        data = data.tobytes()
        # the fast path said no: again only if normalising changes the text
        try_fast = not tried or data.find(b"\r") >= 0 or data.find(b".") >= 0
    else:
        try_fast = True
    data = _normalise(data, fmt)
    if fmt.name == "criteo" and try_fast:
        fast = _criteo_fast(data, first_line, fmt, n_lines)
        if fast is not None:
            return fast
    arr, starts, ends, delims, code = _scan(data, fmt)
    if not fmt.hex_categories:
        _flag_non_utf8(data, arr, starts, ends, code)
    line_no = first_line + np.arange(len(ends), dtype=np.int64)
    good = code < 0
    if strict and not good.all():
        i = int(np.flatnonzero(~good)[0])
        raise MalformedRowError(file, int(line_no[i]), MALFORMED_KINDS[code[i]],
                                repr(arr[starts[i]:ends[i]][:200].tobytes().decode("utf-8", "replace")))
    if not good.all() and good.any():  # cut the bad lines out and scan again
        keep = np.repeat(good, ends - starts + 1)
        arr, starts, ends, delims, _ = _scan(arr[_PAD: ends[-1] + 1][keep].tobytes(), fmt)
    rows_line = line_no[good]
    n = len(rows_line)
    if n == 0:
        labels = np.zeros(0, np.int8)
        dense = np.zeros((0, len(fmt.dense)), np.float32)
        keys = np.zeros((0, len(fmt.feature_names)), np.int64)
        row_bad = np.zeros(0, np.int8)
    elif fmt.name == "criteo":
        labels, dense, keys, row_bad = _criteo_fields(arr, starts, ends, delims)
    else:
        labels, dense, keys, row_bad = _arrow_fields(pa.py_buffer(arr[_PAD: ends[-1] + 1]), fmt, n)
    bad_rows = row_bad >= 0
    if strict and bad_rows.any():
        i = int(np.flatnonzero(bad_rows)[0])
        raise MalformedRowError(file, int(rows_line[i]), MALFORMED_KINDS[row_bad[i]])
    bad_lines = np.concatenate([line_no[~good], rows_line[bad_rows]])
    bad_kinds = np.concatenate([code[~good], row_bad[bad_rows]])
    order = np.argsort(bad_lines, kind="stable")
    ok = ~bad_rows
    return ParsedChunk(labels=labels[ok], dense=dense[ok], keys_matrix=keys[ok], lines=rows_line[ok],
                       bad_lines=bad_lines[order], bad_kinds=bad_kinds[order].astype(np.int8))


def _flag_non_utf8(data: bytes, arr: np.ndarray, starts: np.ndarray, ends: np.ndarray, code: np.ndarray) -> None:
    """Mark the lines that are not UTF-8 (string columns are read as text); one C pass when all are."""
    try:
        data.decode("utf-8")
        return
    except UnicodeDecodeError:
        pass
    for i in np.flatnonzero(code < 0):  # only in a chunk holding bad bytes
        try:
            arr[starts[i]:ends[i]].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            code[i] = _K["non_utf8"]


#: An integer written as a decimal (``260.0``, ``3.``) in a Criteo field: the fraction is dropped.
_DECIMAL_ZERO = re.compile(rb"(?<=[0-9])\.0*(?=[\t,\r\n]|\Z)")


def _normalise(data: bytes, fmt: TextFormat) -> bytes:
    """Windows line ends become ``\\n``; Criteo integers written as ``N.0`` become ``N`` (lines stay lines)."""
    if data.find(b"\r") >= 0:
        data = data.replace(b"\r\n", b"\n")
        if data.endswith(b"\r"):
            data = data[:-1]
    if fmt.name == "criteo" and data.find(b".") >= 0:
        data = _DECIMAL_ZERO.sub(b"", data)
    return data


def _avazu_hour(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``YYMMDDHH`` -> (hour of day, weekday 0=Monday, bad)."""
    import pandas as pd

    vals, present, _ = _int_column(col)
    text = pd.Series(np.where(present, vals, 0).astype(np.int64).astype(str))
    when = pd.to_datetime(text, format="%y%m%d%H", errors="coerce")
    ok = present & when.notna().to_numpy() & (vals >= 0) & (text.str.len().to_numpy() == 8)
    hour = when.dt.hour.fillna(0).to_numpy().astype(np.int64)
    weekday = when.dt.weekday.fillna(0).to_numpy().astype(np.int64)
    return np.where(ok, hour, 0), np.where(ok, weekday, 0), ~ok


def file_label(path: str | os.PathLike) -> str:
    return str(pathlib.Path(path))
