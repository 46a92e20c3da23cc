"""Any parquet or CSV table (single-id, multi-id and dense columns) -> a dataset directory.

``prepare_table(FILES, out, label="clicked")`` reads parquet files or CSV files (plain or ``.gz``;
several files, or a directory of them, read in sorted path order) through ``pyarrow.dataset`` and writes
the same dataset directory the Criteo / Avazu readers write (``meta.json``, ``counts.npz``, parquet
shards with a sha256 manifest), so ``BatchLoader``, ``embtable train`` and ``embtable advise`` read it.

Column kinds (inferred from the schema unless given; what was inferred is logged):

=============  ==========================================  ===============================================
kind           inferred from                               becomes
=============  ==========================================  ===============================================
categorical    string, integer, bool, dictionary columns   one id per row (KJT length 1)
multi-hot      list columns (parquet); in CSV a string     a bag of ids per row (KJT length = list length;
               column named in ``multi_hot``, split on     an empty or null list is an empty bag), with
               ``list_separator``                          optional per-id weights from a parallel list
                                                           column (``weights={"hist": "hist_w"}``)
dense          float columns                               one float32 input, transformed (below)
=============  ==========================================  ===============================================

Given kinds replace inference: when any of ``categorical`` / ``multi_hot`` / ``dense`` is given, only the
named columns are used. A named column of the wrong type (``dense`` on a string column, ``categorical`` on
a list column ...) is an error naming the column, its type and the kind that fits it.

Ids, per categorical or multi-hot feature (the vocabulary is fitted on the training split)::

    0        out of vocabulary (values seen fewer than min_count times in training, or unseen)
    1        missing (null, or an empty string; a null element of a list)
    2 ..     the other values by decreasing training count (ties: smaller key first)

Dense transforms (``dense_transform``, recorded in ``meta.json``):

- ``"log1p"`` (default, the Criteo one): missing -> 0, ``x < 0`` -> 0, ``log(1 + x)``;
- ``"standardize"``: ``(x - mean) / std`` with the training split's mean and std; missing -> 0 (the mean);
- ``"none"``: ``x`` as float32, missing -> 0.

Rows whose label is missing or not 0/1 are skipped and listed in the manifest (kind ``bad_label``).

Splits: ``"random"`` (8:1:1 by a seeded hash of the row position, ``min_count`` 10) or ``"dlrm"`` (rows in
file order cut into 7 equal consecutive days: 6 train, the last halved into valid / test; ``min_count`` 1),
as in :mod:`data_prep.convert`.

Resumable: rows are cut into chunks of ``rows_per_shard``; pass 1 (counting) and pass 2 (writing the
shards) record every chunk in ``_work/`` when done, and a rerun of the same job skips recorded chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .jobs import check_or_claim
from .meta import SPLITS, atomic_write_json
from .schema import FORMAT_VERSION, LABEL
from .shards import read_record, write_counts, write_record, write_shard
from .splits import dlrm_split, random_split
from .textparse import MISSING_KEY, string_keys
from .vocab import KeyCounter, build_vocab, lookup_ids

__all__ = ["TableColumns", "infer_columns", "prepare_table", "DENSE_TRANSFORMS", "OOV_ID", "MISSING_ID",
           "WEIGHT_SUFFIX", "multi_hot_array"]

#: Version of the table reader's output for the same input and options (part of the fingerprint).
TABLE_VERSION = 1
#: Id of values rarer than ``min_count`` in training, or unseen there.
OOV_ID = 0
#: Id of missing values (null, empty string, null list element).
MISSING_ID = 1
#: A weighted multi-hot feature ``f`` stores its per-id weights in the shard column ``f + WEIGHT_SUFFIX``.
WEIGHT_SUFFIX = "__weight"
DENSE_TRANSFORMS = {
    "log1p": "missing -> 0; x < 0 -> 0; x -> log(x + 1); stored as float32",
    "standardize": "x -> (x - mean) / std with the training split's mean and std (std 0 -> 1); missing -> 0",
    "none": "x as float32; missing -> 0",
}
_DEFAULT_MIN_COUNT = {"dlrm": 1, "random": 10}
_MAX_LISTED_BAD = 10_000


@dataclasses.dataclass(frozen=True)
class TableColumns:
    """Which input column is what.

    Args:
        label: the 0/1 label column.
        categorical: one-id columns (strings or integers).
        multi_hot: list columns (bags of ids).
        dense: numeric columns.
        weights: multi-hot column -> its parallel list column of per-id weights.
        inferred: the kinds were read off the schema (nothing was given).
        source_types: input column -> its Arrow type, as text.
        ignored: input columns not used, with the reason.
    """

    label: str
    categorical: tuple[str, ...]
    multi_hot: tuple[str, ...]
    dense: tuple[str, ...]
    weights: Mapping[str, str]
    inferred: bool
    source_types: Mapping[str, str]
    ignored: Mapping[str, str]

    @property
    def features(self) -> tuple[str, ...]:
        """The categorical features (KJT keys) in order: one-id columns, then multi-hot columns."""
        return self.categorical + self.multi_hot

    def summary(self) -> str:
        """A few lines naming every column's kind (what ``prepare table`` prints)."""
        how = "inferred from the schema" if self.inferred else "as given"
        lines = [f"columns ({how}):", f"  label        {self.label} ({self.source_types[self.label]})"]
        for kind, names in (("categorical", self.categorical), ("multi-hot", self.multi_hot), ("dense", self.dense)):
            for name in names:
                extra = f", weights {self.weights[name]}" if name in self.weights else ""
                lines.append(f"  {kind:<12} {name} ({self.source_types[name]}{extra})")
        for name, why in self.ignored.items():
            lines.append(f"  ignored      {name} ({why})")
        return "\n".join(lines)


# ---- input files and schema ----------------------------------------------------------------------
def _input_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[pathlib.Path], str]:
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not paths:
        raise ValueError("prepare_table needs at least one input file or directory")
    files: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _format_of(f) and not f.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"directory {p} holds no .parquet / .csv / .csv.gz / .tsv files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    formats = {_format_of(f) for f in files}
    if None in formats:
        bad = next(f for f in files if _format_of(f) is None)
        raise ValueError(f"{bad}: unknown file type; expected .parquet, .csv, .tsv (optionally .gz)")
    if len(formats) > 1:
        raise ValueError(f"inputs mix file types {sorted(formats)}; give only parquet or only CSV files")
    return [f.resolve() for f in files], formats.pop()


def _format_of(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    return None


def _ds():
    """``pyarrow.dataset``, imported on first use: it imports pandas (~1 s), which ``import data_prep``
    and every worker process of a Criteo / Avazu conversion would otherwise pay."""
    import pyarrow.dataset as ds

    return ds


def _file_format(fmt: str, column_types: Mapping[str, pa.DataType] | None = None):
    ds = _ds()
    if fmt == "parquet":
        return ds.ParquetFileFormat()
    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
    convert = pacsv.ConvertOptions(column_types=dict(column_types or {}), strings_can_be_null=True)
    return ds.CsvFileFormat(parse_options=parse, convert_options=convert)


def _is_stringish(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and _is_stringish(t.value_type))


def _is_intish(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_boolean(t) or (pa.types.is_dictionary(t) and _is_intish(t.value_type))


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _parse_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in items if s.strip())


def infer_columns(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    label: str,
    *,
    categorical: str | Sequence[str] | None = None,
    multi_hot: str | Sequence[str] | None = None,
    dense: str | Sequence[str] | None = None,
    weights: Mapping[str, str] | None = None,
) -> TableColumns:
    """Read the inputs' schema and decide every column's kind (given ones are checked against their type).

    Raises:
        ValueError: a named column is missing or has a type its kind cannot read (the message names the
            column, its type and the kind that would fit).

    Example:
        >>> import pyarrow as pa, pyarrow.parquet as pq, tempfile, os
        >>> d = tempfile.mkdtemp(); f = os.path.join(d, "t.parquet")
        >>> pq.write_table(pa.table({"y": [0, 1], "user": ["a", "b"], "tags": [[1, 2], []],
        ...                          "price": [1.5, None]}), f)
        >>> cols = infer_columns(f, "y")
        >>> cols.categorical, cols.multi_hot, cols.dense
        (('user',), ('tags',), ('price',))
    """
    files, fmt = _input_files(inputs)
    schema = _ds().dataset([str(f) for f in files[:1]], format=_file_format(fmt)).schema
    types = {name: schema.field(name).type for name in schema.names}
    text = {name: str(t) for name, t in types.items()}
    if label not in types:
        raise ValueError(f"label column {label!r} is not in the table; its columns are {schema.names}")
    given = {k: _parse_names(v) for k, v in (("categorical", categorical), ("multi_hot", multi_hot), ("dense", dense))}
    weights = dict(weights or {})
    weight_cols = set(weights.values())
    csv = fmt != "parquet"
    for kind, names in given.items():
        for name in names or ():
            if name not in types:
                raise ValueError(f"--{kind.replace('_', '-')} column {name!r} is not in the table; its columns "
                                 f"are {schema.names}")
            if name == label or name in weight_cols:
                raise ValueError(f"column {name!r} is the label or a weight column; it cannot also be {kind}")
    seen: dict[str, str] = {}
    for kind, names in given.items():
        for name in names or ():
            if name in seen:
                raise ValueError(f"column {name!r} is given as both {seen[name]} and {kind}")
            seen[name] = kind
    inferred = all(v is None for v in given.values())
    ignored: dict[str, str] = {}
    cat: list[str] = []
    multi: list[str] = []
    den: list[str] = []
    if inferred:
        for name, t in types.items():
            if name == label or name in weight_cols:
                continue
            if _is_list(t):
                multi.append(name)
            elif _is_stringish(t) or _is_intish(t):
                if csv and name in weights:
                    multi.append(name)
                else:
                    cat.append(name)
            elif pa.types.is_floating(t) or pa.types.is_decimal(t):
                den.append(name)
            else:
                ignored[name] = f"type {t} is neither categorical, a list nor numeric"
    else:
        cat, multi, den = (list(given[k] or ()) for k in ("categorical", "multi_hot", "dense"))
        for name in types:
            if name not in seen and name != label and name not in weight_cols:
                ignored[name] = "not named by --categorical / --multi-hot / --dense"
    for name in cat:
        t = types[name]
        if not (_is_stringish(t) or _is_intish(t) or (csv and not _is_list(t))):  # CSV: read as text
            hint = "a list column is a bag of ids: use --multi-hot" if _is_list(t) else "use --dense for numbers"
            raise ValueError(f"column {name!r} has type {t}: a categorical column must hold strings or integers; {hint}")
    for name in multi:
        t = types[name]
        ok = (_is_list(t) and (_is_stringish(t.value_type) or _is_intish(t.value_type))) or (csv and _is_stringish(t))
        if not ok:
            need = ("a list of strings or integers" if not csv
                    else "a string of ids separated by list_separator (CSV has no list type)")
            raise ValueError(f"column {name!r} has type {t}: a multi-hot column must be {need}")
    for name in den:
        t = types[name]
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)):
            raise ValueError(f"column {name!r} has type {t}: a dense column must be numeric; "
                             + ("use --categorical for strings" if _is_stringish(t) else "use --multi-hot for lists"
                                if _is_list(t) else "drop it"))
    for feature, wcol in weights.items():
        if feature not in multi:
            raise ValueError(f"weights given for {feature!r}, which is not a multi-hot column (multi-hot: {multi})")
        if wcol not in types:
            raise ValueError(f"weight column {wcol!r} (for {feature!r}) is not in the table; its columns are {schema.names}")
        t = types[wcol]
        ok = (_is_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))) or (
            csv and _is_stringish(t))
        if not ok:
            raise ValueError(f"weight column {wcol!r} has type {t}: it must be a list of numbers parallel to {feature!r}")
    lt = types[label]
    if not (pa.types.is_integer(lt) or pa.types.is_floating(lt) or pa.types.is_boolean(lt)):
        raise ValueError(f"label column {label!r} has type {lt}: it must hold 0/1 (integers, floats or booleans)")
    if not cat and not multi:
        raise ValueError("the table has no categorical or multi-hot column: nothing to embed")
    return TableColumns(label=label, categorical=tuple(cat), multi_hot=tuple(multi), dense=tuple(den),
                        weights=weights, inferred=inferred, source_types=text, ignored=ignored)


# ---- reading rows in chunks ----------------------------------------------------------------------
def _read_types(cols: TableColumns, fmt: str) -> dict[str, pa.DataType]:
    """CSV column types forced at read time (so that every file parses the same way)."""
    if fmt == "parquet":
        return {}
    types = {c: pa.string() for c in (*cols.categorical, *cols.multi_hot, *cols.weights.values())}
    types.update({c: pa.float64() for c in cols.dense})
    types[cols.label] = pa.float64()
    return types


def _chunks(files: list[pathlib.Path], fmt: str, cols: TableColumns, rows: int) -> Iterator[tuple[pa.Table, list]]:
    """Tables of exactly ``rows`` rows (the last may be shorter), in file order, with their row origins.

    The origins are ``[(file index, first row in file, n), ...]`` for the pieces of the chunk.
    """
    names = [cols.label, *cols.categorical, *cols.multi_hot, *cols.weights.values(), *cols.dense]
    file_format = _file_format(fmt, _read_types(cols, fmt))
    pending: list[pa.RecordBatch] = []
    origins: list[tuple[int, int, int]] = []
    held = 0
    for i, f in enumerate(files):
        pos = 0
        dataset = _ds().dataset(str(f), format=file_format)
        missing = [n for n in names if n not in dataset.schema.names]
        if missing:
            raise ValueError(f"{f}: columns {missing} are missing (the first input has them)")
        for batch in dataset.to_batches(columns=names, batch_size=min(rows, 1 << 16), use_threads=False):
            while batch.num_rows:
                take = min(batch.num_rows, rows - held)
                pending.append(batch.slice(0, take))
                origins.append((i, pos, take))
                pos += take
                held += take
                batch = batch.slice(take)
                if held == rows:
                    yield pa.Table.from_batches(pending).combine_chunks(), origins
                    pending, origins, held = [], [], 0
    if held:
        yield pa.Table.from_batches(pending).combine_chunks(), origins


def _combined(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _keys(arr: pa.Array) -> np.ndarray:
    """int64 keys of a flat column of strings or integers; missing -> :data:`MISSING_KEY`."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if _is_stringish(t):
        return string_keys(arr.cast(pa.string()).fill_null(""))
    vals = np.asarray(arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    # a present value equal to MISSING_KEY would read as missing: it becomes the int64 minimum instead
    vals = np.where(vals == MISSING_KEY, np.iinfo(np.int64).min, vals)
    if arr.null_count:
        vals = np.where(np.asarray(arr.is_null().to_numpy(zero_copy_only=False)), MISSING_KEY, vals)
    return vals


def _bag(arr: pa.Array, separator: str) -> tuple[np.ndarray, pa.Array]:
    """``(lengths [n], flat values)`` of a list column (or a CSV string column split on ``separator``).

    A null or empty list (empty string in CSV) is an empty bag.
    """
    if _is_stringish(arr.type):
        arr = arr.cast(pa.string())
        empty = np.asarray(pc.fill_null(pc.equal(arr, ""), True).to_numpy(zero_copy_only=False))
        arr = pc.split_pattern(arr.fill_null(""), separator)
        lengths = np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False), dtype=np.int64)
        values = pc.list_flatten(arr)
        if empty.any():
            keep = ~np.repeat(empty, lengths)
            values = values.filter(pa.array(keep))
            lengths = np.where(empty, 0, lengths)
        return lengths, values
    lengths = np.asarray(pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    return lengths, pc.list_flatten(arr)


def _bag_weights(arr: pa.Array, lengths: np.ndarray, column: str, feature: str, separator: str,
                 first_row: int) -> np.ndarray:
    wl, wv = _bag(arr, separator)
    if not np.array_equal(wl, lengths):
        row = int(np.nonzero(wl != lengths)[0][0])
        raise ValueError(f"weight column {column!r}: row {first_row + row} has {wl[row]} weights for "
                         f"{lengths[row]} ids of {feature!r}; the lists must be parallel")
    if _is_stringish(wv.type):
        wv = pc.cast(pc.if_else(pc.equal(wv, ""), None, wv), pa.float64())
    return np.asarray(wv.cast(pa.float32()).fill_null(1.0).to_numpy(zero_copy_only=False), dtype=np.float32)


def _labels(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(labels int8, valid mask): a label is valid when present and 0 or 1."""
    vals = np.asarray(arr.cast(pa.float64()).fill_null(-1.0).to_numpy(zero_copy_only=False), dtype=np.float64)
    ok = (vals == 0) | (vals == 1)
    return np.where(ok, vals, 0).astype(np.int8), ok


def _dense_raw(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    vals = np.asarray(arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
    present = np.isfinite(vals)
    return np.where(present, vals, 0.0), present


@dataclasses.dataclass(frozen=True)
class _Job:
    inputs: tuple[str, ...]
    sizes: tuple[int, ...]
    columns: dict
    protocol: str
    min_count: int
    seed: int
    days: int
    rows_per_shard: int
    dense_transform: str
    list_separator: str

    def fingerprint(self) -> str:
        blob = json.dumps([dataclasses.asdict(self), FORMAT_VERSION, TABLE_VERSION], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- the conversion ------------------------------------------------------------------------------
def prepare_table(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    label: str,
    categorical: str | Sequence[str] | None = None,
    multi_hot: str | Sequence[str] | None = None,
    dense: str | Sequence[str] | None = None,
    weights: Mapping[str, str] | None = None,
    protocol: str = "random",
    min_count: int | None = None,
    seed: int = 0,
    days: int = 7,
    dense_transform: str = "log1p",
    list_separator: str = "|",
    rows_per_shard: int = 1 << 18,
    log: Callable[[str], None] | None = print,
) -> pathlib.Path:
    """Convert parquet / CSV files of any schema into a dataset directory (see the module docstring).

    Args:
        inputs: files or directories (parquet, or CSV / TSV, plain or ``.gz``).
        out_dir: the dataset directory (an interrupted run of the same job resumes).
        label: the 0/1 label column.
        categorical, multi_hot, dense: column names (a list or a comma-separated string); when none is
            given every column's kind is inferred from the schema.
        weights: multi-hot column -> parallel list column of per-id weights (sum pooling weights).
        protocol: ``"random"`` (8:1:1) or ``"dlrm"`` (consecutive days in file order).
        min_count: values seen fewer times in training become the OOV id 0 (default: 10 random, 1 dlrm).
        seed: seed of the random split.
        days: days of the dlrm protocol.
        dense_transform: ``"log1p"``, ``"standardize"`` or ``"none"``.
        list_separator: separator of ids in a CSV multi-hot column.
        rows_per_shard: rows per chunk (one parquet shard per chunk and split).
        log: where the column summary goes (``None``: nowhere).

    Returns:
        ``out_dir`` as a path (read it with ``load_meta`` / ``BatchLoader``).

    Example (not run: it needs the user's table; tests/test_prepare_table.py runs it on small files)::

        prepare_table("logs/*.parquet", "data/mine", label="clicked", multi_hot=["recent_items"])
    """
    if protocol not in _DEFAULT_MIN_COUNT:
        raise ValueError(f"protocol must be 'random' or 'dlrm', got {protocol!r}")
    if dense_transform not in DENSE_TRANSFORMS:
        raise ValueError(f"dense_transform must be one of {sorted(DENSE_TRANSFORMS)}, got {dense_transform!r}")
    min_count = _DEFAULT_MIN_COUNT[protocol] if min_count is None else int(min_count)
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    files, fmt = _input_files(inputs)
    cols = infer_columns(files, label, categorical=categorical, multi_hot=multi_hot, dense=dense, weights=weights)
    if log is not None:
        log(cols.summary())
    col_dict = {"label": cols.label, "categorical": list(cols.categorical), "multi_hot": list(cols.multi_hot),
                "dense": list(cols.dense), "weights": dict(sorted(cols.weights.items()))}
    job = _Job(inputs=tuple(map(str, files)), sizes=tuple(f.stat().st_size for f in files), columns=col_dict,
               protocol=protocol, min_count=min_count, seed=seed, days=days, rows_per_shard=int(rows_per_shard),
               dense_transform=dense_transform, list_separator=list_separator)
    out = pathlib.Path(out_dir)
    fp = job.fingerprint()
    if check_or_claim(out, fp, "prepare-table"):
        return out
    work = out / "_work"
    total = _total_rows(files, fmt, work) if protocol == "dlrm" else None
    n_chunks = _pass1(files, fmt, cols, job, work, total)
    _build_vocab(cols, work, n_chunks, min_count, job)
    _pass2(files, fmt, cols, job, work, out, n_chunks, total)
    _finish(out, fp, cols, job, files, fmt, work, n_chunks)
    return out


def _total_rows(files: list[pathlib.Path], fmt: str, work: pathlib.Path) -> int:
    f = work / "total_rows.json"
    if f.is_file():
        return int(json.loads(f.read_text()))
    n = sum(_ds().dataset(str(p), format=_file_format(fmt)).count_rows() for p in files)
    atomic_write_json(f, n)
    return n


def _split_codes(c: int, n: int, job: _Job, total: int | None) -> np.ndarray:
    rows = np.arange(c * job.rows_per_shard, c * job.rows_per_shard + n, dtype=np.int64)
    if job.protocol == "random":
        return random_split(rows, job.seed)
    return dlrm_split(rows, total, job.days)


def _pass1(files, fmt, cols: TableColumns, job: _Job, work: pathlib.Path, total: int | None) -> int:
    """Count training keys, label statistics and dense moments per chunk; return the number of chunks."""
    done_file = work / "pass1.json"
    if done_file.is_file():
        return int(json.loads(done_file.read_text()))
    c = -1
    for c, (table, origins) in enumerate(_chunks(files, fmt, cols, job.rows_per_shard)):
        rec_path = work / f"p1-{c:05d}.rec"
        if rec_path.is_file():
            continue
        n = table.num_rows
        codes = _split_codes(c, n, job, total)
        labels, ok = _labels(_combined(table[cols.label]))
        train = (codes == 0) & ok
        rec: dict[str, np.ndarray] = {
            "rows": np.array([((codes == i) & ok).sum() for i in range(3)], dtype=np.int64),
            "positives": np.array([labels[(codes == i) & ok].sum(dtype=np.int64) for i in range(3)], dtype=np.int64),
            "bad_rows": _bad_rows(ok, origins),
        }
        for f, name in enumerate(cols.features):
            arr = _combined(table[name])
            if name in cols.multi_hot:
                lengths, values = _bag(arr, job.list_separator)
                keys = _keys(values)
                keys = keys[np.repeat(train, lengths)]
            else:
                keys = _keys(arr)[train]
            missing = keys == MISSING_KEY
            k, v = np.unique(keys[~missing], return_counts=True)
            rec[f"cnt_keys_{f}"], rec[f"cnt_vals_{f}"] = k, v.astype(np.int64)
            rec[f"missing_{f}"] = np.array([missing.sum()], dtype=np.int64)
        moments = np.zeros((len(cols.dense), 3), dtype=np.float64)
        for j, name in enumerate(cols.dense):
            x, present = _dense_raw(_combined(table[name]))
            sel = present & train
            moments[j] = (sel.sum(), x[sel].sum(), (x[sel] ** 2).sum())
        rec["dense_moments"] = moments
        write_record(rec_path, **rec)
    atomic_write_json(done_file, c + 1)
    return c + 1


def _bad_rows(ok: np.ndarray, origins: list) -> np.ndarray:
    """``[k, 2]`` (file index, 0-based row in file) of the rows with a bad label."""
    bad = np.nonzero(~ok)[0]
    if not len(bad):
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.cumsum([0] + [o[2] for o in origins])
    piece = np.searchsorted(starts, bad, side="right") - 1
    file_idx = np.array([o[0] for o in origins])[piece]
    row = np.array([o[1] for o in origins])[piece] + bad - starts[piece]
    return np.stack([file_idx, row], axis=1).astype(np.int64)


def _build_vocab(cols: TableColumns, work: pathlib.Path, n_chunks: int, min_count: int, job: _Job) -> None:
    vocab_file = work / "vocab.rec"
    if vocab_file.is_file():
        return
    counters = [KeyCounter() for _ in cols.features]
    missing = np.zeros(len(cols.features), dtype=np.int64)
    moments = np.zeros((len(cols.dense), 3), dtype=np.float64)
    for c in range(n_chunks):
        rec = read_record(work / f"p1-{c:05d}.rec")
        for f, counter in enumerate(counters):
            counter.add(rec[f"cnt_keys_{f}"], rec[f"cnt_vals_{f}"])
            missing[f] += int(rec[f"missing_{f}"][0])
        moments += rec["dense_moments"]
    arrays: dict[str, np.ndarray] = {}
    for f, counter in enumerate(counters):
        v = build_vocab(*counter.result(), min_count)
        arrays[f"sorted_keys_{f}"] = v["sorted_keys"]
        arrays[f"sorted_ids_{f}"] = v["sorted_ids"] + 1  # id 1 is the missing value's
        arrays[f"counts_{f}"] = np.concatenate([v["counts"][:1], [missing[f]], v["counts"][1:]]).astype(np.int64)
    count = np.maximum(moments[:, 0], 1)
    mean = moments[:, 1] / count
    std = np.sqrt(np.maximum(moments[:, 2] / count - mean**2, 0))
    arrays["dense_mean"], arrays["dense_std"] = mean, np.where(std > 0, std, 1.0)
    write_record(vocab_file, **arrays)


def _transform(x: np.ndarray, present: np.ndarray, how: str, mean: float, std: float) -> np.ndarray:
    if how == "log1p":
        return np.log1p(np.where(present, np.maximum(x, 0), 0)).astype(np.float32)
    if how == "standardize":
        return np.where(present, (x - mean) / std, 0).astype(np.float32)
    return np.where(present, x, 0).astype(np.float32)


def _ids(vocab: dict, keys: np.ndarray) -> np.ndarray:
    ids = lookup_ids(vocab, keys)  # OOV -> 0
    return np.where(keys == MISSING_KEY, MISSING_ID, ids)


def multi_hot_array(lengths: np.ndarray, values: np.ndarray, value_type: pa.DataType | None = None) -> pa.Array:
    """A ``list<value_type>`` (default int64) Arrow array from bag lengths ``[n]`` and flat values (no nulls)."""
    value_type = pa.int64() if value_type is None else value_type
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = pa.array(np.ascontiguousarray(values), type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), flat)


def _pass2(files, fmt, cols: TableColumns, job: _Job, work, out, n_chunks: int, total: int | None) -> None:
    rec = read_record(work / "vocab.rec")
    vocab = [{"sorted_keys": rec[f"sorted_keys_{f}"], "sorted_ids": rec[f"sorted_ids_{f}"]}
             for f in range(len(cols.features))]
    for c, (table, _origins) in enumerate(_chunks(files, fmt, cols, job.rows_per_shard)):
        done = work / f"p2-{c:05d}.rec"
        if done.is_file():
            continue
        n = table.num_rows
        codes = _split_codes(c, n, job, total)
        labels, ok = _labels(_combined(table[cols.label]))
        arrays: list[pa.Array] = [pa.array(labels, type=pa.int8())]
        names = [LABEL]
        for j, name in enumerate(cols.dense):
            x, present = _dense_raw(_combined(table[name]))
            arrays.append(pa.array(_transform(x, present, job.dense_transform, rec["dense_mean"][j],
                                              rec["dense_std"][j]), type=pa.float32()))
            names.append(name)
        for f, name in enumerate(cols.features):
            arr = _combined(table[name])
            if name in cols.multi_hot:
                lengths, values = _bag(arr, job.list_separator)
                arrays.append(multi_hot_array(lengths, _ids(vocab[f], _keys(values))))
                names.append(name)
                if name in cols.weights:
                    w = _bag_weights(_combined(table[cols.weights[name]]), lengths, cols.weights[name], name,
                                     job.list_separator, c * job.rows_per_shard)
                    arrays.append(multi_hot_array(lengths, w, pa.float32()))
                    names.append(name + WEIGHT_SUFFIX)
            else:
                arrays.append(pa.array(_ids(vocab[f], _keys(arr)), type=pa.int64()))
                names.append(name)
        shard = pa.Table.from_arrays(arrays, names=names)
        entries = []
        for code, split in enumerate(SPLITS):
            sel = (codes == code) & ok
            if sel.any():
                part = shard if sel.all() else shard.filter(pa.array(sel))
                entries.append(write_shard(out, f"{split}/part-{c:05d}.parquet", part, dictionary=False))
        write_record(done, entries=np.array(json.dumps(entries)))


def _finish(out, fp, cols: TableColumns, job: _Job, files, fmt, work, n_chunks: int) -> None:
    rows = np.zeros(3, dtype=np.int64)
    positives = np.zeros(3, dtype=np.int64)
    entries: list[dict] = []
    bad: list[dict] = []
    n_bad = 0
    for c in range(n_chunks):
        rec = read_record(work / f"p1-{c:05d}.rec")
        rows += rec["rows"]
        positives += rec["positives"]
        for file_idx, row in rec["bad_rows"].tolist():
            n_bad += 1
            if len(bad) < _MAX_LISTED_BAD:  # line numbers as in a CSV with a header (parquet: row + 1)
                bad.append({"file": files[file_idx].name, "line": row + (2 if fmt != "parquet" else 1),
                            "kind": "bad_label"})
        entries += json.loads(str(read_record(work / f"p2-{c:05d}.rec")["entries"]))
    vocab = read_record(work / "vocab.rec")
    counts = {name: vocab[f"counts_{f}"] for f, name in enumerate(cols.features)}
    write_counts(out, counts)
    split_rows = {s: int(rows[i]) for i, s in enumerate(SPLITS)}
    if job.protocol == "dlrm":
        desc = (f"rows in file order cut into {job.days} equal consecutive days; first {job.days - 1} train, "
                "the last halved into valid (first half) and test")
    else:
        desc = f"each row assigned 8:1:1 (train/valid/test) by a hash of its position with seed {job.seed}"
    transform = {"name": job.dense_transform, "version": 1, "formula": DENSE_TRANSFORMS[job.dense_transform]}
    if job.dense_transform == "standardize":
        transform["mean"] = dict(zip(cols.dense, map(float, vocab["dense_mean"])))
        transform["std"] = dict(zip(cols.dense, map(float, vocab["dense_std"])))
    meta = {
        "format_version": FORMAT_VERSION,
        "source": "table",
        "fingerprint": fp,
        "label": LABEL,
        "input_label": cols.label,
        "dense_features": list(cols.dense),
        "categorical_features": list(cols.features),
        "multi_hot_features": list(cols.multi_hot),
        "weighted_features": {name: name + WEIGHT_SUFFIX for name in cols.multi_hot if name in cols.weights},
        "columns": {"inferred": cols.inferred, "source_types": dict(cols.source_types),
                    "weights": dict(cols.weights), "ignored": dict(cols.ignored)},
        "num_embeddings": {name: int(len(counts[name])) for name in cols.features},
        "oov_id": OOV_ID,
        "missing_id": MISSING_ID,
        "min_count": job.min_count,
        "protocol": job.protocol,
        "split": {"protocol": job.protocol, "days": job.days, "seed": job.seed, "description": desc},
        "split_rows": split_rows,
        "positive_rate": {s: float(positives[i] / rows[i]) if rows[i] else 0.0 for i, s in enumerate(SPLITS)},
        "bayes_auc": None,
        "dense_transform": transform if cols.dense else None,
        "counts_file": "counts.npz",
        "inputs": [{"file": str(f), "bytes": s} for f, s in zip(job.inputs, job.sizes)],
        "vocabulary": {"min_count": job.min_count, "oov_id": OOV_ID, "missing_id": MISSING_ID, "fitted_on": "train",
                       "order": "id 0 = out of vocabulary; id 1 = missing; ids 2.. by decreasing training count",
                       "missing_value": "null, an empty string or a null list element; a null or empty list "
                                        "is an empty bag"},
        "manifest": {
            "shards": entries,
            "malformed": {"count": n_bad, "by_kind": {"bad_label": n_bad} if n_bad else {}, "rows": bad,
                          "truncated": n_bad > len(bad)},
        },
    }
    empty = [s for s, r in split_rows.items() if r == 0]
    if empty:
        print(f"warning: split(s) {empty} have no rows; training or evaluating on them will fail (more rows, "
              "or protocol='random')", file=sys.stderr)
    atomic_write_json(out / "meta.json", meta)
    shutil.rmtree(work, ignore_errors=True)



# ---- command line (shared by `embtable prepare table` and `python -m data_prep table`) ------------
def add_table_arguments(parser) -> None:
    """The arguments of the ``table`` subcommand, added to an ``argparse`` parser."""
    parser.add_argument("inputs", nargs="+", help="parquet or CSV/TSV files (.gz ok), or directories of them")
    parser.add_argument("--out", required=True, help="dataset directory to write (resumes an interrupted run)")
    parser.add_argument("--label", required=True, help="the 0/1 label column")
    parser.add_argument("--categorical", default=None, help="comma-separated one-id columns (strings or integers)")
    parser.add_argument("--multi-hot", default=None,
                        help="comma-separated list columns (CSV: strings of ids joined by --list-separator)")
    parser.add_argument("--dense", default=None, help="comma-separated numeric columns")
    parser.add_argument("--weights", action="append", default=[], metavar="COLUMN:WEIGHTS",
                        help="per-id weights of multi-hot COLUMN from the parallel list column WEIGHTS (repeatable)")
    parser.add_argument("--protocol", choices=["random", "dlrm"], default="random",
                        help="random 8:1:1 (default) or dlrm (consecutive days in file order)")
    parser.add_argument("--min-count", type=int, default=None,
                        help="values seen fewer times in training become the OOV id (default: 10 random, 1 dlrm)")
    parser.add_argument("--dense-transform", choices=sorted(DENSE_TRANSFORMS), default="log1p",
                        help="log1p (default: missing/negative -> 0, log(1+x)), standardize, or none")
    parser.add_argument("--list-separator", default="|", help="separator of ids in CSV multi-hot columns (default |)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
    parser.add_argument("--rows-per-shard", type=int, default=1 << 18, help="rows per chunk / parquet shard")


def _parse_weights(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        column, sep, weights = item.partition(":")
        if not sep or not column or not weights:
            raise ValueError(f"--weights {item!r}: expected COLUMN:WEIGHTS (e.g. hist:hist_weights)")
        out[column] = weights
    return out


def prepare_table_from_args(args) -> pathlib.Path:
    """Run :func:`prepare_table` with parsed :func:`add_table_arguments` arguments."""
    return prepare_table(args.inputs, args.out, label=args.label, categorical=args.categorical,
                         multi_hot=args.multi_hot, dense=args.dense, weights=_parse_weights(args.weights),
                         protocol=args.protocol, min_count=args.min_count, seed=args.seed,
                         dense_transform=args.dense_transform, list_separator=args.list_separator,
                         rows_per_shard=args.rows_per_shard)
