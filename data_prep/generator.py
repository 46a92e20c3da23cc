"""A calibrated Criteo-shaped data generator whose difficulty is known.

Rows have the Criteo Kaggle schema (label, 13 integer features, 26 categorical fields). The field
cardinalities are the Kaggle ones times ``scale``; ids are drawn from a heavy-tailed (Zipf head +
uniform tail) popularity per field, so a few ids are very frequent and most are rare.

Labels come from a hidden *teacher*, a logistic model in which individual ids matter::

    logit = b + sum_f w_f[id_f]                                  (per-id effects)
              + sum_{f<g} <v_f[id_f], v_g[id_g]>                 (pairwise field interactions, FM)
              + sum_j beta_j * z_j                               (dense effects)
    p = sigmoid(logit),  label ~ Bernoulli(p)

Per-id parameters ``w_f[i]``, ``v_f[i]`` are a pure function of (seed, field, id) through a hash, so
nothing of size "all ids" has to be kept (tables are cached only for fields up to 4M ids). Fields
with more ids carry more of the id-effect variance, so hashing or shrinking the big tables costs
accuracy. The intercept ``b`` is calibrated on a separate sample to ``positive_rate``. The AUC of the
true ``p`` on each split (the Bayes AUC, the ceiling no model can beat) is recorded in the metadata.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .jobs import check_or_claim, run_ordered
from .meta import SPLITS, atomic_write_json, load_meta, temp_file
from .schema import (
    CRITEO_CARDINALITIES,
    CRITEO_CATEGORICAL,
    CRITEO_DENSE,
    DENSE_TRANSFORM,
    FORMAT_VERSION,
    LABEL,
)
from .shards import (
    arrays_to_entries,
    entries_to_arrays,
    read_record,
    record_path,
    write_counts,
    write_record,
    write_split_shards,
)
from .splits import AUCHistogram, dlrm_split, mix64

__all__ = ["GeneratorConfig", "PRESETS", "Teacher", "generate_dataset", "generate_tsv", "resolve_config"]

#: Bump when the generated values change for the same config (part of the dataset fingerprint).
GENERATOR_VERSION = 1

# Criteo-like dense features: missing rates of the Kaggle I1..I13, and a log-normal count model per
# feature (log-scale location and spread), so that log1p of the counts is roughly the latent normal.
_DENSE_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22)
_DENSE_LOC = (0.5, 2.0, 1.5, 1.5, 7.5, 3.0, 1.5, 2.0, 3.5, 0.3, 1.0, 0.3, 1.5)
_DENSE_SPREAD = (1.2, 1.5, 1.5, 1.0, 2.0, 1.6, 1.5, 1.2, 1.3, 0.7, 0.9, 1.0, 1.2)
_DENSE_SHIFT = (0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # I2 has small negative values in Criteo
_TABLE_LIMIT = 1 << 22  # fields up to this many ids get their per-id parameters cached as tables


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Defaults give a teacher whose Bayes AUC is about 0.8 (Criteo-like difficulty).

    Args:
        scale: factor on the Criteo Kaggle cardinalities (1.0 = full size, 10M ids in the biggest field).
        num_rows: rows to generate (all splits together).
        seed: seed of everything (teacher parameters and the rows).
        positive_rate: the intercept is calibrated so that this fraction of labels is positive.
        id_effect_std: std of the summed per-id effects over all fields (logit units).
        interaction_std: std of the pairwise-interaction term (logit units).
        latent_dim: dim of the teacher's per-id latent vectors.
        dense_effect_std: std of the dense term (logit units).
        field_weight_power: a field's share of the id-effect and interaction variance is proportional to
            ``log(1 + num_embeddings) ** field_weight_power`` (times a random factor in [0.5, 1.5]).
        zipf_exponent: exponent of the power-law popularity of ids within a field.
        tail_fraction: fraction of draws taken uniformly over all ids (the long tail of one-off ids).
        min_cardinality: fields are never scaled below this many ids (or their Kaggle count if smaller).
        rows_per_shard: rows per generated chunk / parquet shard.
        days: the split cuts rows into this many consecutive days (DLRM protocol); last day = valid+test.
        calibration_rows: rows of the separate sample used to calibrate the intercept.
        history_fields: multi-hot "history" features ``H1 ..`` (0 = none, the Criteo schema). History ``k``
            is a bag of 1 .. ``history_max_len`` ids (uniform length) drawn from the popularity of the
            ``k``-th biggest field (its id space too), e.g. a user's recent items.
        history_max_len: the longest history bag.
        history_effect_std: std of each history's term in the logit: its per-id effects summed over the bag
            and divided by sqrt(bag length) (a long history is not a stronger signal, a better-averaged one).

    Example:
        >>> cfg = GeneratorConfig(scale=1 / 3000, num_rows=1000)
        >>> max(cfg.cardinalities), min(cfg.cardinalities)
        (3377, 3)
    """

    scale: float
    num_rows: int
    seed: int = 0
    positive_rate: float = 0.256
    id_effect_std: float = 1.6
    interaction_std: float = 0.7
    latent_dim: int = 4
    dense_effect_std: float = 0.5
    field_weight_power: float = 2.0
    zipf_exponent: float = 1.1
    tail_fraction: float = 0.02
    min_cardinality: int = 16
    rows_per_shard: int = 65536
    days: int = 7
    calibration_rows: int = 65536
    history_fields: int = 0
    history_max_len: int = 50
    history_effect_std: float = 0.8

    def __post_init__(self) -> None:
        if not (0 < self.scale <= 1):
            raise ValueError(f"GeneratorConfig.scale must be in (0, 1], got {self.scale!r}")
        if int(self.num_rows) != self.num_rows or self.num_rows < self.days * 2:
            raise ValueError(f"GeneratorConfig.num_rows must be an integer >= 2*days, got {self.num_rows!r}")
        if not (0 < self.positive_rate < 1):
            raise ValueError(f"positive_rate must be in (0, 1), got {self.positive_rate!r}")
        for name in ("id_effect_std", "interaction_std", "dense_effect_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.latent_dim < 1 or self.rows_per_shard < 1 or self.days < 2 or self.calibration_rows < 100:
            raise ValueError("latent_dim >= 1, rows_per_shard >= 1, days >= 2, calibration_rows >= 100 needed")
        if not (0 <= self.tail_fraction <= 1) or self.zipf_exponent <= 0:
            raise ValueError("tail_fraction must be in [0, 1] and zipf_exponent > 0")
        if not (0 <= self.history_fields <= len(CRITEO_CARDINALITIES)) or self.history_max_len < 1:
            raise ValueError(f"history_fields must be in 0..{len(CRITEO_CARDINALITIES)} and history_max_len >= 1")

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Number of ids per categorical field C1..C26."""
        return tuple(
            max(int(round(n * self.scale)), min(n, self.min_cardinality)) for n in CRITEO_CARDINALITIES
        )

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    @property
    def history_names(self) -> list[str]:
        """Names of the multi-hot history features (empty without histories)."""
        return [f"H{k + 1}" for k in range(self.history_fields)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.history_fields:  # configs without histories keep the fingerprint and meta they always had
            for key in ("history_fields", "history_max_len", "history_effect_std"):
                d.pop(key)
        return d

    def fingerprint(self) -> str:
        """Hash of everything that determines the generated bytes."""
        blob = json.dumps([self.to_dict(), GENERATOR_VERSION, FORMAT_VERSION], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Named presets. ``tiny``: tests (about a second). ``demo``: ``make demo`` sweeps (~200k training rows,
#: biggest fields 3e4-5e4 ids). ``standard``: the larger benchmark (4.6M rows, biggest field 1M ids).
PRESETS: dict[str, GeneratorConfig] = {
    "tiny": GeneratorConfig(scale=1 / 3000, num_rows=20_000, rows_per_shard=8192),
    "demo": GeneratorConfig(scale=1 / 200, num_rows=230_000),
    "standard": GeneratorConfig(scale=1 / 10, num_rows=4_584_062, rows_per_shard=262_144),
    # the tiny preset plus two multi-hot histories (1-50 ids from the two biggest fields' popularity)
    "tiny_multihot": GeneratorConfig(scale=1 / 3000, num_rows=20_000, rows_per_shard=8192, history_fields=2),
    "demo_multihot": GeneratorConfig(scale=1 / 200, num_rows=230_000, history_fields=2),
}


def resolve_config(preset_or_config: str | GeneratorConfig, seed: int | None = None) -> GeneratorConfig:
    """A preset name or a config, with ``seed`` overriding the config's seed when given."""
    if isinstance(preset_or_config, GeneratorConfig):
        cfg = preset_or_config
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown generator preset {preset_or_config!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[preset_or_config]
    else:
        raise TypeError(f"expected a preset name or GeneratorConfig, got {type(preset_or_config).__name__}")
    return cfg if seed is None else dataclasses.replace(cfg, seed=int(seed))


def _uniform(h: np.ndarray) -> np.ndarray:
    """Uniform in [0, 1) from the top 53 bits of uint64 hashes."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _hash_normal(h: np.ndarray) -> np.ndarray:
    """Standard normals from uint64 hashes (Box-Muller on the two 32-bit halves)."""
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * (1.0 / 2**32)
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * (1.0 / 2**32)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 (distinct ids -> distinct hex strings)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint32)
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))


class Teacher:
    """The hidden model: samples rows and gives their true click probabilities.

    Args:
        config: the generator config.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        with np.errstate(over="ignore"):  # uint64 hashing wraps around on purpose
            self._setup(config)
        self.intercept = self._calibrate()

    def _setup(self, config: GeneratorConfig) -> None:
        self.config = cfg = config
        self.cards = np.array(cfg.cardinalities, dtype=np.int64)
        nf = len(self.cards)
        base = mix64(np.uint64(cfg.seed) ^ np.uint64(0x5EED))
        self._field_keys = mix64(base + np.arange(1, nf + 1, dtype=np.uint64) * np.uint64(0x9E37))
        u = _uniform(mix64(self._field_keys ^ np.uint64(1)))
        # Bigger fields carry more of the signal (they are the user / ad ids); a random factor per field.
        omega = np.log1p(self.cards.astype(np.float64)) ** cfg.field_weight_power * (0.5 + u)
        self.w_std = cfg.id_effect_std * np.sqrt(omega / omega.sum())
        pair_sum = (omega.sum() ** 2 - (omega**2).sum()) / 2
        c = cfg.interaction_std / math.sqrt(cfg.latent_dim * pair_sum) if pair_sum > 0 else 0.0
        self.v_std = np.sqrt(c * omega)
        # Popular ids are scattered over the id range by an affine bijection rank -> id.
        self.perm_a = np.empty(nf, dtype=np.int64)
        self.perm_c = np.empty(nf, dtype=np.int64)
        for f, n in enumerate(self.cards.tolist()):
            h = int(mix64(self._field_keys[f] ^ np.uint64(2)))
            a = (h % n) | 1 if n > 2 else 1
            while math.gcd(a, n) != 1:
                a += 1
            self.perm_a[f], self.perm_c[f] = a, (h >> 32) % n
        self.hex_salt = (self._field_keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        dk = mix64(base + np.uint64(0xDE45E) + np.arange(13, dtype=np.uint64))
        beta = _hash_normal(dk)
        present = 1 - np.array(_DENSE_MISSING)
        self.beta = beta * cfg.dense_effect_std / math.sqrt(float((beta**2 * present).sum()))
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # histories: the k-th biggest field's popularity and id space, per-id effects of their own
        self.history_source = np.argsort(-self.cards, kind="stable")[: cfg.history_fields]
        self.history_keys = mix64(base + np.uint64(0x4157) + np.arange(cfg.history_fields, dtype=np.uint64))

    # ---- per-id parameters -------------------------------------------------------------------------
    def id_params(self, field: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-id effect ``w`` ``[M]`` and latent vectors ``v`` ``[M, latent_dim]`` of ``ids`` of ``field``."""
        n = int(self.cards[field])
        if n <= _TABLE_LIMIT:
            if field not in self._tables:
                self._tables[field] = self._hash_params(field, np.arange(n, dtype=np.int64))
            w, v = self._tables[field]
            return w[ids], v[ids]
        return self._hash_params(field, ids)

    def _hash_params(self, field: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = self.config.latent_dim
        with np.errstate(over="ignore"):
            h = mix64(self._field_keys[field] + np.asarray(ids, dtype=np.uint64)[:, None] * np.uint64(k + 1)
                      + np.arange(k + 1, dtype=np.uint64)[None, :])
        g = _hash_normal(h).astype(np.float32)
        return g[:, 0] * np.float32(self.w_std[field]), g[:, 1:] * np.float32(self.v_std[field])

    # ---- sampling ----------------------------------------------------------------------------------
    def sample_ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Ids ``[n, 26]``: per field a Zipf-like head plus a uniform tail."""
        out = np.empty((n, len(self.cards)), dtype=np.int64)
        for f in range(len(self.cards)):
            out[:, f] = self._sample_field(rng, f, n)
        return out

    def _sample_field(self, rng: np.random.Generator, f: int, n: int) -> np.ndarray:
        cfg = self.config
        s = cfg.zipf_exponent
        card = int(self.cards[f])
        u = rng.random(n)
        if abs(s - 1.0) < 1e-9:
            r = np.exp(u * math.log(card + 1.0)) - 1.0
        else:
            top = (card + 1.0) ** (1.0 - s)
            r = (top * u + (1.0 - u)) ** (1.0 / (1.0 - s)) - 1.0
        rank = np.minimum(r.astype(np.int64), card - 1)
        tail = rng.random(n) < cfg.tail_fraction
        rank[tail] = rng.integers(0, card, size=int(tail.sum()))
        return (rank * self.perm_a[f] + self.perm_c[f]) % card

    def sample_histories(self, rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per history feature, ``(lengths [n], ids [sum lengths])``: 1 .. history_max_len ids per row."""
        out = []
        for k in range(self.config.history_fields):
            lengths = rng.integers(1, self.config.history_max_len + 1, size=n)
            out.append((lengths, self._sample_field(rng, int(self.history_source[k]), int(lengths.sum()))))
        return out

    def history_logits(self, histories: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """The histories' term of the logit, ``[n]``: per history, sum of per-id effects / sqrt(length)."""
        n = len(histories[0][0])
        total = np.zeros(n, dtype=np.float64)
        scale = self.config.history_effect_std
        for k, (lengths, ids) in enumerate(histories):
            with np.errstate(over="ignore"):
                w = _hash_normal(mix64(self.history_keys[k] + ids.astype(np.uint64)))
            rows = np.repeat(np.arange(n), lengths)
            total += scale * np.bincount(rows, weights=w, minlength=n) / np.sqrt(lengths)
        return total

    def sample_dense(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Latent normals ``z`` ``[n, 13]``, raw integer values ``[n, 13]`` and the present mask ``[n, 13]``."""
        z = rng.standard_normal((n, 13))
        present = rng.random((n, 13)) >= np.array(_DENSE_MISSING)
        raw = np.floor(np.exp(np.array(_DENSE_LOC) + np.array(_DENSE_SPREAD) * z) - 1.0)
        raw = np.maximum(raw, 0).astype(np.int64) - np.array(_DENSE_SHIFT)
        return z, raw, present

    def logits(self, ids: np.ndarray, z: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Teacher logits without the intercept, ``[n]``."""
        n = ids.shape[0]
        total = np.zeros(n, dtype=np.float64)
        v_sum = np.zeros((n, self.config.latent_dim), dtype=np.float64)
        v_sq = np.zeros(n, dtype=np.float64)
        for f in range(ids.shape[1]):
            w, v = self.id_params(f, ids[:, f])
            total += w
            v_sum += v
            v_sq += np.einsum("nk,nk->n", v, v)
        total += 0.5 * (np.einsum("nk,nk->n", v_sum, v_sum) - v_sq)
        total += (z * present) @ self.beta
        return total

    def _calibrate(self) -> float:
        rng = np.random.default_rng([self.config.seed, 0xCA1B])
        n = self.config.calibration_rows
        z, _, present = self.sample_dense(rng, n)
        logit = self.logits(self.sample_ids(rng, n), z, present)
        if self.config.history_fields:  # own generator: the draws above stay those of configs without histories
            hist_rng = np.random.default_rng([self.config.seed, 0xCA1B, 0x4157])
            logit = logit + self.history_logits(self.sample_histories(hist_rng, n))
        target = self.config.positive_rate
        b = math.log(target / (1 - target))
        for _ in range(50):  # Newton on mean(sigmoid(b + logit)) = target
            p = 1.0 / (1.0 + np.exp(-(b + logit)))
            step = (p.mean() - target) / max(float((p * (1 - p)).mean()), 1e-12)
            b -= step
            if abs(step) < 1e-10:
                break
        return float(b)

    def chunk(self, c: int) -> dict[str, np.ndarray]:
        """Rows of chunk ``c``: ``labels`` [n] int8, ``ids`` [n, 26], ``dense_raw``/``present`` [n, 13],
        ``p`` [n] true probabilities, ``rows`` [n] global row positions. Deterministic in (seed, c)."""
        cfg = self.config
        start = c * cfg.rows_per_shard
        n = min(cfg.rows_per_shard, cfg.num_rows - start)
        rng = np.random.default_rng([cfg.seed, c])
        ids = self.sample_ids(rng, n)
        z, raw, present = self.sample_dense(rng, n)
        logit = self.logits(ids, z, present)
        histories = []
        if cfg.history_fields:  # own generator: the draws of `rng` stay those of configs without histories
            histories = self.sample_histories(np.random.default_rng([cfg.seed, c, 0x4157]), n)
            logit = logit + self.history_logits(histories)
        p = 1.0 / (1.0 + np.exp(-(self.intercept + logit)))
        labels = (rng.random(n) < p).astype(np.int8)
        rows = np.arange(start, start + n, dtype=np.int64)
        out = {"labels": labels, "ids": ids, "dense_raw": raw, "present": present, "p": p, "rows": rows}
        for k, (lengths, hist_ids) in enumerate(histories):
            out[f"hist_lengths_{k}"], out[f"hist_ids_{k}"] = lengths, hist_ids
        return out

    def hex_ids(self, field: int, ids: np.ndarray) -> np.ndarray:
        """The 32-bit values written as 8 hex digits for ``ids`` of ``field`` (a bijection of ids)."""
        with np.errstate(over="ignore"):
            return _fmix32(np.asarray(ids, dtype=np.uint32) + self.hex_salt[field])


def dense_transform(raw: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The recorded dense transform: missing -> 0, negatives -> 0, log(x + 1), float32."""
    x = np.where(present, np.maximum(raw, 0), 0).astype(np.float64)
    return np.log1p(x).astype(np.float32)


# ---- writing a dataset directly -------------------------------------------------------------------
_WORKER_TEACHER: dict[str, Teacher] = {}


def _teacher_for(cfg: GeneratorConfig) -> Teacher:
    key = cfg.fingerprint()
    if key not in _WORKER_TEACHER:
        _WORKER_TEACHER.clear()
        _WORKER_TEACHER[key] = Teacher(cfg)
    return _WORKER_TEACHER[key]


def _generate_chunk(job: tuple[dict, int, str]) -> int:
    """Worker job: write chunk ``c``'s shards and its done-record; return its row count."""
    cfg_dict, c, out_dir = job
    cfg = GeneratorConfig(**cfg_dict)
    teacher = _teacher_for(cfg)
    out = pathlib.Path(out_dir)
    ch = teacher.chunk(c)
    codes = dlrm_split(ch["rows"], cfg.num_rows, cfg.days)
    dense = dense_transform(ch["dense_raw"], ch["present"])
    if cfg.history_fields:
        entries = _write_history_shards(out, c, cfg, codes, ch, dense)
    else:
        entries = write_split_shards(out, c, codes, ch["labels"], dense, ch["ids"], CRITEO_DENSE, CRITEO_CATEGORICAL,
                                     cfg.cardinalities)
    rec = entries_to_arrays(entries)
    hist = AUCHistogram()
    for code, split in enumerate(SPLITS):
        sel = codes == code
        b = hist.bin_of(ch["p"][sel])
        y = ch["labels"][sel].astype(bool)
        idx, inv = np.unique(b, return_inverse=True)
        rec[f"hist_idx_{split}"] = idx
        rec[f"hist_pos_{split}"] = np.bincount(inv[y], minlength=len(idx)).astype(np.int64)
        rec[f"hist_neg_{split}"] = np.bincount(inv[~y], minlength=len(idx)).astype(np.int64)
    train = ch["ids"][codes == 0]
    for f in range(train.shape[1]):
        k, v = np.unique(train[:, f], return_counts=True)
        rec[f"cnt_keys_{f}"], rec[f"cnt_vals_{f}"] = k, v.astype(np.int64)
    for k in range(cfg.history_fields):
        lengths, hist_ids = ch[f"hist_lengths_{k}"], ch[f"hist_ids_{k}"]
        keys, vals = np.unique(hist_ids[np.repeat(codes == 0, lengths)], return_counts=True)
        rec[f"cnt_keys_{26 + k}"], rec[f"cnt_vals_{26 + k}"] = keys, vals.astype(np.int64)
    write_record(record_path(out, c), **rec)
    return len(ch["rows"])


def _write_history_shards(out: pathlib.Path, c: int, cfg: GeneratorConfig, codes: np.ndarray, ch: dict,
                          dense: np.ndarray) -> list[dict]:
    """The shards of a chunk with history features: the Criteo columns plus one list<int64> column each."""
    from .shards import make_table, shard_path, write_shard
    from .table import multi_hot_array

    entries = []
    for code, split in enumerate(SPLITS):
        sel = codes == code
        if not sel.any():
            continue
        table = make_table(ch["labels"][sel], dense[sel], ch["ids"][sel], CRITEO_DENSE, CRITEO_CATEGORICAL)
        for k, name in enumerate(cfg.history_names):
            lengths, hist_ids = ch[f"hist_lengths_{k}"], ch[f"hist_ids_{k}"]
            table = table.append_column(name, multi_hot_array(lengths[sel], hist_ids[np.repeat(sel, lengths)]))
        entries.append(write_shard(out, shard_path(split, c), table, dictionary=False))
    return entries


def generate_dataset(
    preset_or_config: str | GeneratorConfig,
    out_dir: str | os.PathLike,
    *,
    seed: int | None = None,
    progress: bool = True,
    workers: int = 2,
) -> pathlib.Path:
    """Generate a dataset directory (parquet shards + ``meta.json`` + ``counts.npz``).

    Resumable: chunks already written by an interrupted run are kept; a finished directory with the
    same config is returned at once.

    Args:
        preset_or_config: a name in :data:`PRESETS` or a :class:`GeneratorConfig`.
        out_dir: the dataset directory to write.
        seed: overrides the config's seed.
        progress: show a tqdm bar.
        workers: processes used to generate chunks (1 = in this process).

    Returns:
        ``out_dir`` as a path; read it with ``load_meta`` / ``BatchLoader``.

    Example:
        >>> import tempfile
        >>> path = generate_dataset(GeneratorConfig(scale=1 / 3000, num_rows=500), tempfile.mkdtemp(),
        ...                         progress=False)   # ``generate_dataset("demo", "data/demo")``: 230k rows
        >>> load_meta(path).split_rows
        {'test': 36, 'train': 429, 'valid': 35}
    """
    cfg = resolve_config(preset_or_config, seed)
    out = pathlib.Path(out_dir)
    fp = cfg.fingerprint()
    if check_or_claim(out, fp, "generator"):
        return out
    from tqdm.auto import tqdm

    todo = [c for c in range(cfg.num_chunks) if not record_path(out, c).is_file()]
    todo_rows = sum(min(cfg.rows_per_shard, cfg.num_rows - c * cfg.rows_per_shard) for c in todo)
    jobs = [(cfg.to_dict(), c, str(out)) for c in todo]
    # Spawning workers costs about a second each: only worth it for many chunks.
    with tqdm(total=todo_rows, unit="rows", unit_scale=True, desc="generate", disable=not progress) as bar:
        run_ordered(_generate_chunk, jobs, workers if len(todo) >= 8 else 1, bar, preload=[__name__])
    _finish_generated(cfg, out, fp)
    return out


def _finish_generated(cfg: GeneratorConfig, out: pathlib.Path, fp: str) -> None:
    teacher = _teacher_for(cfg)
    cards = cfg.cardinalities + tuple(int(teacher.cards[f]) for f in teacher.history_source)
    names = CRITEO_CATEGORICAL + cfg.history_names
    counts = [np.zeros(n, dtype=np.int64) for n in cards]
    hists = {s: AUCHistogram() for s in SPLITS}
    entries: list[dict] = []
    for c in range(cfg.num_chunks):
        rec = read_record(record_path(out, c))
        entries += arrays_to_entries(rec)
        for s in SPLITS:
            hists[s].add_counts(rec[f"hist_idx_{s}"], rec[f"hist_pos_{s}"], rec[f"hist_neg_{s}"])
        for f in range(len(cards)):
            counts[f][rec[f"cnt_keys_{f}"]] += rec[f"cnt_vals_{f}"]
    write_counts(out, dict(zip(names, counts)))
    split_rows = {s: int(hists[s].pos.sum() + hists[s].neg.sum()) for s in SPLITS}
    meta = {
        "format_version": FORMAT_VERSION,
        "source": "generator",
        "fingerprint": fp,
        "label": LABEL,
        "dense_features": CRITEO_DENSE,
        "categorical_features": names,
        "num_embeddings": dict(zip(names, cards)),
        "oov_id": None,
        "protocol": "dlrm",
        "split": {"protocol": "dlrm", "days": cfg.days,
                  "description": f"rows cut into {cfg.days} consecutive days; days 1..{cfg.days - 1} train, "
                                 "the last day halved into valid (first half) and test"},
        "split_rows": split_rows,
        "positive_rate": {s: float(hists[s].pos.sum() / max(split_rows[s], 1)) for s in SPLITS},
        "bayes_auc": {s: hists[s].auc() for s in SPLITS},
        "dense_transform": DENSE_TRANSFORM,
        "counts_file": "counts.npz",
        "generator": {"config": cfg.to_dict(), "version": GENERATOR_VERSION,
                      "intercept": _teacher_intercept(cfg)},
        "manifest": {"shards": entries, "malformed": {"count": 0, "by_kind": {}, "rows": [], "truncated": False}},
    }
    if cfg.history_fields:  # only then: the meta of the other presets stays byte-identical
        meta["multi_hot_features"] = cfg.history_names
        meta["history_sources"] = {n: CRITEO_CATEGORICAL[int(f)] for n, f in zip(names[26:], teacher.history_source)}
    atomic_write_json(out / "meta.json", meta)
    shutil.rmtree(out / "_work", ignore_errors=True)


def _teacher_intercept(cfg: GeneratorConfig) -> float:
    return _teacher_for(cfg).intercept


# ---- writing Criteo TSV text ----------------------------------------------------------------------
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)


def _hex_strings(values: np.ndarray) -> pa.Array:
    """uint32 values as an Arrow string array of 8 lowercase hex digits each."""
    digits = _HEX[((values[:, None] >> _SHIFTS[None, :]) & np.uint32(15)).astype(np.intp)]
    n = len(values)
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(digits)))


def _tsv_chunk(teacher: Teacher, c: int) -> bytes:
    ch = teacher.chunk(c)
    cols = [pa.array(ch["labels"])]
    cols += [pa.array(ch["dense_raw"][:, j], mask=~ch["present"][:, j]) for j in range(13)]
    cols += [_hex_strings(teacher.hex_ids(f, ch["ids"][:, f])) for f in range(26)]
    table = pa.Table.from_arrays(cols, names=[LABEL, *CRITEO_DENSE, *CRITEO_CATEGORICAL])
    buf = io.BytesIO()
    pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"))
    return buf.getvalue()


def generate_tsv(
    preset_or_config: str | GeneratorConfig,
    path: str | os.PathLike,
    *,
    seed: int | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Write the generated rows as Criteo Kaggle ``train.txt`` text (gzip if ``path`` ends in ``.gz``).

    Same rows, labels and dense values as :func:`generate_dataset` with the same config; categorical ids
    are written as 8 hex digits (a bijection of the ids), missing dense values as empty fields.
    The file is written to a temporary name and renamed when complete.
    """
    from tqdm.auto import tqdm

    cfg = resolve_config(preset_or_config, seed)
    if cfg.history_fields:
        raise ValueError("Criteo TSV text has no list columns: a preset with history_fields cannot be written as "
                         "TSV; generate a dataset directory (generate_dataset) instead")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    teacher = Teacher(cfg)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as raw:
            sink = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) if path.suffix == ".gz" else raw
            with tqdm(total=cfg.num_rows, unit="rows", unit_scale=True, desc="tsv", disable=not progress) as bar:
                for c in range(cfg.num_chunks):
                    sink.write(_tsv_chunk(teacher, c))
                    bar.update(min(cfg.rows_per_shard, cfg.num_rows - c * cfg.rows_per_shard))
            if sink is not raw:
                sink.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def describe(path: str | os.PathLike) -> dict:
    """Short summary of a dataset directory (rows, positive rates, Bayes AUC, biggest field)."""
    meta = load_meta(path)
    return {
        "source": meta.source,
        "split_rows": meta.split_rows,
        "positive_rate": meta.positive_rate,
        "bayes_auc": meta.bayes_auc,
        "max_num_embeddings": max(meta.num_embeddings.values()),
        "total_num_embeddings": sum(meta.num_embeddings.values()),
    }
