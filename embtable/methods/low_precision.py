"""Low-precision rows, kept at low precision DURING training, optionally hashed into fewer rows.

Each feature's ids are mapped by the hashing trick of :mod:`embtable.methods.hash` (identity when the
feature's rows fit: ``m = n``), and its ``m`` rows are stored at one of four precisions::

    id ──► hash / identity ──► row r ──► fp32 : weight[r]                          (TorchRec table, d·4 B)
                                         fp16 : weight16[r].float()     (TorchRec table at fp16, d·2 B)
                                         int8 : step[r] · (codes[r, :] - 128)            (d B + 4 B)
                                                or bias[r] + scale[r] · codes[r, :]     (d B + 8 B, "fit")
                                         int4 : the same with 4-bit codes, zero point 8  (⌈d/2⌉ B + 4 or 8 B)
                                                 codes[r] = [hi(c1) lo(c0) | hi(c3) lo(c2) | ...]

Two per-row quantizers (config ``step_size``), codes in ``[0, 2**bits - 1]``, int4 packing two codes per byte
(column ``2j`` in the low nibble):

- ``"learned"`` (default; ALPT, Li et al., AAAI 2023, "Adaptive Low-Precision Training for Embeddings in
  Click-Through Rate Prediction"): symmetric codes around the zero point ``Z = 2**(bits-1)`` times a per-row
  step size that is a trainable fp32 parameter — an ``nn.Embedding(m, 1)``, so the trainer's sparse optimizer
  learns it; a write-back whose values leave ``[-(Z - 1), Z - 1] · step`` widens that row's step to fit them
  (it never shrinks there), so the code updates are not clipped away. Unlike ALPT (which scales the step's gradient),
  the step is learned in log space, ``step = exp(log_step)``: the gradient ``Σ_j g_j · value_j`` is
  scale-free, so the trainer's embedding learning rate suits it, and the step stays positive.
  Initial step: ``max|row| / (Z - 1)``.
- ``"fit"``: asymmetric, re-fitted at every write-back: ``bias = min(row)``,
  ``scale = (max(row) - min(row)) / (2**bits - 1)`` (fp32 buffers); no trainable parameter at all.

Looked-up rows are dequantized to fp32 and pooled in fp32 (sum / mean / weighted sum), at every precision.

Training (after Zhang et al., VLDB 2024, "Experimental Analysis of Large-scale Learnable Vector Storage
Compression", §quantization; stochastic rounding as in Gupta et al., ICML 2015, "Deep Learning with
Limited Numerical Precision", and low-precision embedding training as in ALPT, Li et al., AAAI 2023):

- ``fp16``: a TorchRec ``EmbeddingBagCollection`` (child ``storage``, one table per feature) whose
  ``EmbeddingBagConfig`` s have ``data_type=DataType.FP16``: real TorchRec storage, so

  * :func:`embtable.fuse_storage` (the trainer's default) trains it in FBGEMM's CPU TBE kernel at
    ``weights_precision=SparseType.FP16`` with the fused optimizer (SGD, Adagrad, row-wise Adagrad) applied in
    backward; the kernel reads the fp16 rows, pools in fp32 and writes each updated row back rounded to
    nearest; its optimizer state is fp32 (row-wise Adagrad: ``m·4`` bytes), counted by
    :func:`embtable.optimizer_state_bytes`;
  * unfused, the plain collection's fp16 weights get sparse gradients from
    :func:`embtable.sparse_parameters` and the trainer's Python optimizer (which rounds to nearest too);
    the lookup gathers the fp16 rows and pools them in fp32 itself (the collection's own forward would pool
    in fp16), so plain and fused give the same forward up to fp32 summation order;
  * DMP shards it like any TorchRec table (its sharded kernel is the same fp16 TBE, fp32 output).
- ``int8`` / ``int4``: the codes are buffers, not parameters. In training mode the forward records the
  dequantized rows it looked up (with their gradient); after the optimizer step the trainer calls
  :meth:`LowPrecisionEmbeddingBagCollection.train_step_end`, which sums the row gradients per touched row,
  applies SGD (or row-wise Adagrad) with the config's ``lr``, and writes the rows back at low precision with
  **stochastic rounding** (unbiased: ``E[dequant(quant(x))] = x`` inside the range), on the row's learned
  step (the trainer's optimizer has already updated the step) or re-fitting its scale and bias. Rows not
  looked up are not touched. Without ``train_step_end`` the codes do not change.
- ``fp32``: a plain TorchRec table (with ``m = n`` and ``hash_fn="modulo"``, exactly an
  ``EmbeddingBagCollection``: the degenerate setting).

Memory (inference = training, plus the optimizer state: int8/int4 row-wise Adagrad's ``m·4`` training-only
buffer, or the trainer's optimizer state of the fp32/fp16 tables and learned steps):
``sum_f (m_f · row_bytes(d_f) + 48)`` with ``row_bytes = 4d | 2d | d + 4 | ⌈d/2⌉ + 4`` (learned step) or
``d + 8 | ⌈d/2⌉ + 8`` (fit: scale and bias) and 48 bytes of hash
parameters per feature. The planner keeps every row at the chosen precision when that fits the budget and
otherwise hashes (one row cap for all features, the largest that fits, as the hash method does).

Sharding: DMP shards the fp32 and fp16 settings (TorchRec storage); int8/int4 codes are module buffers
updated by the module itself, so :func:`embtable.sharding.shard` refuses them with the reason in
``sharding_unsupported``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, register_method
from ..features import FeatureSpec
from ..hashing import PRIME
from ..module import (
    EmbeddingModule,
    config_field_per_feature,
    device_constants,
    storage_collection,
    storage_values,
    torchrec_pooling,
)
from .hash import HASH_PARAM_BYTES, HashIdMapper

__all__ = [
    "LowPrecisionConfig",
    "LowPrecisionEmbeddingBagCollection",
    "QuantizedRows",
    "row_bytes",
    "stochastic_round",
]

PRECISIONS = ("fp32", "fp16", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
STEP_SIZES = ("learned", "fit")
ROW_PARAM_BYTES = {"learned": 4, "fit": 8}  # per row: fp32 step, or fp32 scale + fp32 bias


def row_bytes(precision: str, dim: int, step_size: str = "learned") -> int:
    """Bytes of one stored row of ``dim`` values at ``precision`` (its step, or scale and bias, included)."""
    if precision == "fp32":
        return dim * FP32
    if precision == "fp16":
        return dim * 2
    if precision == "int8":
        return dim + ROW_PARAM_BYTES[step_size]
    return (dim + 1) // 2 + ROW_PARAM_BYTES[step_size]


@dataclasses.dataclass(frozen=True)
class LowPrecisionConfig(MethodConfig):
    """Rows at low precision during training, hashed into fewer rows when the budget needs it.

    Args:
        precision: ``"int8"`` (default), ``"int4"``, ``"fp16"`` or ``"fp32"`` (a plain / hashed table).
        num_buckets: rows per feature (int, ``{feature: rows}``, or ``None``: planned from the budget; every
            row kept when it fits). Capped at the feature's ``num_embeddings``.
        hash_fn: ``"universal"`` or ``"modulo"`` (as in :class:`embtable.HashConfig`).
        seed: seed of the hash salts and of the stochastic rounding.
        lr: learning rate of the int8/int4 code updates applied in ``train_step_end`` (the trainer's optimizer
            never sees the codes; it trains learned steps and fp16/fp32 rows, which are parameters).
        optimizer: ``"sgd"`` or ``"rowwise_adagrad"`` (one fp32 accumulator per row, training bytes) for
            the int8/int4 row updates.
        rounding: ``"stochastic"`` (default, unbiased) or ``"nearest"`` when writing rows back.
        step_size: ``"learned"`` (ALPT: a trainable per-row step, symmetric codes) or ``"fit"`` (per-row
            min/max scale and bias re-fitted at each write-back) for int8/int4.
    """

    method = "low_precision"
    precision: str = "int8"
    num_buckets: int | Mapping[str, int] | None = None
    hash_fn: str = "universal"
    seed: int = 0
    lr: float = 0.05
    optimizer: str = "sgd"
    rounding: str = "stochastic"
    step_size: str = "learned"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"LowPrecisionConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.hash_fn not in ("universal", "modulo"):
            raise ValueError(f"LowPrecisionConfig.hash_fn must be 'universal' or 'modulo', got {self.hash_fn!r}")
        if self.optimizer not in ("sgd", "rowwise_adagrad"):
            raise ValueError(
                f"LowPrecisionConfig.optimizer must be 'sgd' or 'rowwise_adagrad', got {self.optimizer!r}"
            )
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"LowPrecisionConfig.rounding must be 'stochastic' or 'nearest', got {self.rounding!r}")
        if self.step_size not in STEP_SIZES:
            raise ValueError(f"LowPrecisionConfig.step_size must be one of {STEP_SIZES}, got {self.step_size!r}")
        if not (self.lr > 0):
            raise ValueError(f"LowPrecisionConfig.lr must be positive, got {self.lr!r}")
        values = self.num_buckets.values() if isinstance(self.num_buckets, Mapping) else [self.num_buckets]
        for v in values:
            if v is not None and (int(v) != v or v < 1 or v > PRIME):
                raise ValueError(f"LowPrecisionConfig.num_buckets must be integers in [1, 2**31 - 1], got {v!r}")


def _buckets(features: Sequence[FeatureSpec], config: LowPrecisionConfig) -> list[int]:
    per_feature = config_field_per_feature(config.num_buckets, features, "num_buckets", "low_precision")
    if per_feature is None:
        return [f.num_embeddings for f in features]
    return [min(int(per_feature[f.name]), f.num_embeddings) for f in features]


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(x + u)`` with ``u ~ U[0, 1)``: an integer-valued tensor with ``E[result] = x``.

    >>> g = torch.Generator().manual_seed(0)
    >>> r = stochastic_round(torch.full((10_000,), 2.25), g)
    >>> sorted(set(r.tolist())), abs(r.mean().item() - 2.25) < 0.02
    ([2.0, 3.0], True)
    """
    return torch.floor(x + torch.rand(x.shape, generator=generator, device=x.device))


class QuantizedRows(nn.Module):
    """``m`` rows of ``dim`` values as ``bits``-bit codes with a learned per-row step or a fitted scale and bias.

    ``codes``: uint8 ``[m, dim]`` (int8) or ``[m, ⌈dim/2⌉]`` (int4, two codes per byte). ``learned=True``:
    ``log_step`` is an ``nn.Embedding(m, 1)`` (a trainable table), value ``= exp(log_step) · (code - Z)``; else fp32
    buffers ``scale`` and ``bias`` ``[m]``, value ``= bias + scale · code``.
    """

    def __init__(self, rows: int, dim: int, bits: int, learned: bool = True,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.dim, self.bits, self.levels, self.learned = dim, bits, 2**bits - 1, learned
        self.zero = 2 ** (bits - 1) if learned else 0
        width = dim if bits == 8 else (dim + 1) // 2
        self.register_buffer("codes", torch.zeros(rows, width, dtype=torch.uint8, device=device))
        if learned:
            self.log_step = nn.Embedding(rows, 1, device=device)
        else:
            self.register_buffer("scale", torch.zeros(rows, device=device))
            self.register_buffer("bias", torch.zeros(rows, device=device))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """uint8 codes ``[N, width]`` -> integer codes ``[N, dim]`` (int64)."""
        if self.bits == 8:
            return packed.to(torch.int64)
        p = packed.to(torch.int64)
        return torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)[:, : self.dim]

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """integer codes ``[N, dim]`` in ``[0, levels]`` -> uint8 ``[N, width]``."""
        if self.bits == 8:
            return codes.to(torch.uint8)
        if self.dim % 2:
            codes = F.pad(codes, (0, 1))
        pairs = codes.view(codes.shape[0], -1, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 values ``[N, dim]`` of storage rows ``rows`` ``[N]`` (differentiable in a learned step)."""
        codes = self.unpack(self.codes[rows]).to(torch.float32)
        if self.learned:
            return torch.exp(self.log_step(rows)) * (codes - self.zero)
        return self.bias[rows, None] + self.scale[rows, None] * codes

    @torch.no_grad()
    def init_rows_(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows from fp32 ``values`` (a learned step starts at ``max|row| / (Z - 1)``), rounding to nearest."""
        if self.learned:
            step = values.abs().max(dim=1).values / (self.zero - 1)
            self.log_step.weight[rows] = torch.where(step > 0, step, torch.ones_like(step)).log()[:, None]
        self.quantize_(rows, values)

    @torch.no_grad()
    def quantize_(self, rows: torch.Tensor, values: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Store fp32 ``values`` ``[N, dim]`` at the distinct storage rows ``rows`` ``[N]``.

        A learned step is kept (values outside its range are clipped); a fitted scale and bias are re-fitted to
        each row's range. With a ``generator`` the codes are rounded stochastically (unbiased inside the
        range), otherwise to nearest.
        """
        if self.learned:
            x = values / torch.exp(self.log_step.weight[rows]) + self.zero
        else:
            lo, hi = values.min(dim=1).values, values.max(dim=1).values
            scale = (hi - lo) / self.levels
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            x = (values - lo[:, None]) / safe[:, None]
            self.scale[rows] = scale
            self.bias[rows] = lo
        q = stochastic_round(x, generator) if generator is not None else torch.round(x)
        self.codes[rows] = self.pack(q.clamp_(0, self.levels).to(torch.int64))

    def extra_repr(self) -> str:
        return f"rows={self.codes.shape[0]}, dim={self.dim}, bits={self.bits}, learned_step={self.learned}"


def _pool(rows: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None, mean: bool) -> torch.Tensor:
    """Pool looked-up rows ``[N, d]`` into bags of ``lengths`` ``[B]`` -> ``[B, d]`` (empty bags give zeros)."""
    offsets = torch.cumsum(lengths, 0) - lengths
    index = torch.arange(rows.shape[0], device=rows.device)
    return F.embedding_bag(index, rows, offsets, mode="mean" if mean else "sum", per_sample_weights=weights)


@register_method(LowPrecisionConfig)
class LowPrecisionEmbeddingBagCollection(EmbeddingModule):
    """Hashed or full tables with rows stored at fp16 / int8 / int4 during training (fp32 = the plain table).

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, LowPrecisionConfig(precision="int8"), budget="1/8", seed=0)
    >>> m.config.num_buckets  # int8 rows are 16 + 4 B instead of 64 B: the user table is hashed as well
    {'user': 39875, 'country': 200}
    >>> embtable.memory_report(m).inference_bytes == (39875 + 200) * (16 + 4) + 2 * 48
    True
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123, 7, 3]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> out = m(kjt).values()
    >>> out.shape
    torch.Size([2, 32])
    >>> out.sum().backward()   # gradients of the looked-up rows are recorded
    >>> m.train_step_end(0)    # ... and applied here, rows written back as int8 (stochastic rounding)

    fp16 rows are a TorchRec table at ``DataType.FP16``, which the trainer fuses into FBGEMM's fp16 kernel:

    >>> h = embtable.build(feats, LowPrecisionConfig(precision="fp16"), budget="1/4", seed=0)
    >>> embtable.memory_report(h).inference_bytes == (h.config.num_buckets["user"] + 200) * 16 * 2 + 2 * 48
    True
    >>> embtable.fuse_storage(h, "rowwise_adagrad", lr=0.1)
    1
    >>> h.storage.tbe.weights_precision.value, h(kjt).values().dtype
    ('fp16', torch.float32)
    """

    def __init__(self, features: Sequence[FeatureSpec], config: LowPrecisionConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        buckets = _buckets(self.features, config)
        self.precision = config.precision
        self.mapper = HashIdMapper(self.features, buckets, config.hash_fn, config.seed, self.device)
        # per training forward and dim group: (feature indices, their storage rows, the looked-up rows)
        self._pending: list[tuple[list[int], list[torch.Tensor], torch.Tensor]] = []
        tables = [(f.name, m, f.embedding_dim, [f.name]) for f, m in zip(self.features, buckets)]
        if self.precision == "fp32":
            self.storage = storage_collection(tables, self.pooling, self._is_weighted, self.device)
            return
        if self.precision == "fp16":
            # storage_collection's tables at fp16 (TorchRec initialises them uniform in +-sqrt(1 / rows))
            self.storage = EmbeddingBagCollection(
                tables=[EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=dim,
                                           feature_names=names, pooling=torchrec_pooling(self.pooling),
                                           data_type=DataType.FP16)
                        for name, rows, dim, names in tables],
                is_weighted=self._is_weighted, device=self.device,
            )
            return
        self.sharding_unsupported = (
            f"low_precision rows at {self.precision} are not TorchRec tables (int8/int4 codes are buffers the "
            "module updates in train_step_end); DMP cannot shard them: train on one process, or use "
            "precision='fp16' or 'fp32'"
        )
        self.rows = nn.ModuleDict()
        for f, m in zip(self.features, buckets):
            q = QuantizedRows(m, f.embedding_dim, BITS[self.precision], config.step_size == "learned", self.device)
            if self.device.type != "meta":
                bound = (1.0 / m) ** 0.5
                q.init_rows_(torch.arange(m, device=self.device),
                             torch.empty(m, f.embedding_dim, device=self.device).uniform_(-bound, bound))
            if config.optimizer == "rowwise_adagrad":
                q.register_buffer("adagrad_sum", torch.zeros(m, device=self.device))
                q.training_only_tensors = ("adagrad_sum",)
            self.rows[f.name] = q

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kjt = self.mapper(kjt)
        if self.precision == "fp32" or (self.precision == "fp16" and self._fp16_bags() is None):
            # fused (fp32 output) or sharded storage, or an exported one whose tables were replaced
            return storage_values(self.storage(kjt), self.feature_names).float()
        values, weights = kjt.values(), kjt.weights_or_none()
        splits = kjt.length_per_key()
        ids_per_feature = torch.split(values, splits)
        lengths = kjt.lengths().view(len(self.features), -1)  # [F, B]
        batch = lengths.shape[1]
        record = self.training and torch.is_grad_enabled() and self.precision != "fp16"
        bags = self._fp16_bags() if self.precision == "fp16" else None
        # vectorised over the features of one dim: a gather per feature (each has its own rows), then one
        # dequantization and one pooling per dim group (the same element-wise ops and per-bag sums, so the
        # same values as per feature)
        pooled: list[torch.Tensor | None] = [None] * len(self.features)
        for _dim, members, index in self._dim_groups(lengths.device):
            ids = [ids_per_feature[i] for i in members]
            rows = self._lookup(members, ids, bags)  # [N_g, dim]
            if record:
                if rows.requires_grad:  # through a learned step: keep the rows' own gradient too
                    rows.retain_grad()
                else:
                    rows.requires_grad_(True)
                self._pending.append((members, ids, rows))
            group_lengths = lengths if len(members) == len(self.features) else lengths.index_select(0, index)
            group_weights = None
            if weights is not None:
                group_weights = weights if len(members) == len(self.features) else torch.cat(
                    [torch.split(weights, splits)[i] for i in members])
            out = _pool(rows, group_lengths.reshape(-1), group_weights, self.pooling.value == "mean")  # [G*B, d]
            # slices, not a view + transpose + reshape (whose view check guards "batch != 1" under torch.export)
            for j, i in enumerate(members):
                pooled[i] = out[j * batch:(j + 1) * batch]
        return torch.cat(pooled, dim=1)  # [B, sum d]

    def _dim_groups(self, device: torch.device) -> list[tuple[int, list[int], torch.Tensor]]:
        """``(dim, feature indices, the same as an int64 tensor on device)`` per distinct dim, built once per
        device (constants of the config, not state: no bytes)."""
        def build(device: torch.device) -> list[tuple[int, list[int], torch.Tensor]]:
            dims: dict[int, list[int]] = {}
            for i, f in enumerate(self.features):
                dims.setdefault(f.embedding_dim, []).append(i)
            return [(d, m, torch.tensor(m, dtype=torch.int64, device=device)) for d, m in dims.items()]

        return device_constants(self, "dim_groups", device, build)

    def _fp16_bags(self) -> list[nn.EmbeddingBag] | None:
        """The fp16 storage's tables in feature order while it is a plain collection of ``nn.EmbeddingBag`` s
        (whose rows :meth:`pooled` gathers and pools in fp32 itself); None once fused, sharded or exported."""
        if type(self.storage) is not EmbeddingBagCollection:
            return None
        bags = [self.storage.embedding_bags[name] for name in self.feature_names]
        return bags if all(type(b) is nn.EmbeddingBag for b in bags) else None

    def _lookup(self, members: list[int], ids: list[torch.Tensor],
                bags: list[nn.EmbeddingBag] | None = None) -> torch.Tensor:
        """fp32 rows ``[sum N_i, d]`` of features ``members`` (one dim) at their storage rows ``ids``."""
        if self.precision == "fp16":  # sparse gradients when the trainer asked the tables for them
            return torch.cat([F.embedding(x, bags[i].weight, sparse=bags[i].sparse)
                              for i, x in zip(members, ids)]).float()
        names = [self.features[i].name for i in members]
        qs = [self.rows[n] for n in names]
        q = qs[0]
        codes = q.unpack(torch.cat([t.codes[x] for t, x in zip(qs, ids)])).to(torch.float32)
        if q.learned:
            return torch.exp(torch.cat([t.log_step(x) for t, x in zip(qs, ids)])) * (codes - q.zero)
        bias = torch.cat([t.bias[x] for t, x in zip(qs, ids)])
        scale = torch.cat([t.scale[x] for t, x in zip(qs, ids)])
        return bias[:, None] + scale[:, None] * codes

    @torch.no_grad()
    def train_step_end(self, step: int) -> None:
        """Apply the recorded row gradients to the int8/int4 rows and write them back at low precision."""
        pending, self._pending = self._pending, []
        if self.precision in ("fp32", "fp16"):
            return
        got_by_feature: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for members, ids, rows in pending:  # one entry per forward and dim group: split it by feature
            if rows.grad is None:
                continue
            for i, x, g in zip(members, ids, rows.grad.split([x.numel() for x in ids])):
                got_by_feature.setdefault(i, []).append((x, g))
        for _, members, _ in self._dim_groups(next(iter(self.rows.values())).codes.device):
            feats = [i for i in members if got_by_feature.get(i)]
            if feats:
                self._update_rows(feats, [got_by_feature[i] for i in feats], step)

    @torch.no_grad()
    def _update_rows(self, feats: list[int], got: list[list[tuple[torch.Tensor, torch.Tensor]]], step: int) -> None:
        """One optimizer step and low-precision write-back for the rows of features ``feats`` (one dim), given
        each one's recorded (storage rows, row gradients). Vectorised over the features: their rows are
        shifted into one id space for one ``unique`` and one ``index_add_`` (each row's gradients are added in
        the order they were recorded, as per feature), the update is element-wise on all rows at once, and
        only the gathers, the writes and each feature's own rounding stream stay per feature."""
        qs = [self.rows[self.features[i].name] for i in feats]
        q, dim, device = qs[0], self.features[feats[0]].embedding_dim, got[0][0][1].device
        base = [0]
        for t in qs[:-1]:
            base.append(base[-1] + t.codes.shape[0])
        ids = torch.cat([x + b for g, b in zip(got, base) for x, _ in g])  # feature-major, records in order
        grads = torch.cat([grad for g in got for _, grad in g])
        touched_all, inverse = torch.unique(ids, return_inverse=True)  # sorted: grouped by feature
        grad = torch.zeros(touched_all.numel(), dim, device=device).index_add_(0, inverse, grads)
        ends = torch.searchsorted(touched_all, torch.tensor(base[1:], device=device)).tolist()
        sizes = [e - s for s, e in zip([0, *ends], [*ends, touched_all.numel()])]
        touched = [x - b for x, b in zip(touched_all.split(sizes), base)]  # each feature's storage rows
        if self.config.optimizer == "rowwise_adagrad":
            acc = torch.cat([t.adagrad_sum[x] for t, x in zip(qs, touched)]) + grad.pow(2).mean(dim=1)
            for t, x, a in zip(qs, touched, acc.split(sizes)):
                t.adagrad_sum[x] = a
            grad = grad / (acc.sqrt()[:, None] + 1e-10)
        codes = q.unpack(torch.cat([t.codes[x] for t, x in zip(qs, touched)])).to(torch.float32)
        if q.learned:
            log_step = torch.cat([t.log_step.weight[x] for t, x in zip(qs, touched)])  # [T, 1]
            updated = torch.exp(log_step) * (codes - q.zero) - self.config.lr * grad
            # widen (never shrink) a step whose range the update left, instead of clipping it
            log_step = torch.maximum(log_step[:, 0].exp(), updated.abs().amax(dim=1) / (q.zero - 1)).log()
            for t, x, ls in zip(qs, touched, log_step.split(sizes)):
                t.log_step.weight[x, 0] = ls
            x_codes = updated / torch.exp(log_step[:, None]) + q.zero
        else:
            bias = torch.cat([t.bias[x] for t, x in zip(qs, touched)])
            scale = torch.cat([t.scale[x] for t, x in zip(qs, touched)])
            updated = (bias[:, None] + scale[:, None] * codes) - self.config.lr * grad
            lo, hi = updated.min(dim=1).values, updated.max(dim=1).values
            scale = (hi - lo) / q.levels
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            x_codes = (updated - lo[:, None]) / safe[:, None]
            for t, x, s, b in zip(qs, touched, scale.split(sizes), lo.split(sizes)):
                t.scale[x] = s
                t.bias[x] = b
        if self.config.rounding == "stochastic":  # each feature's own stream, resumable: seeded per step
            noise = []
            for i, n in zip(feats, sizes):
                generator = torch.Generator(device=device)
                generator.manual_seed((self.config.seed * 1_000_003 + int(step)) * 1_009 + i)
                noise.append(torch.rand((n, dim), generator=generator, device=device))
            rounded = torch.floor(x_codes + torch.cat(noise))
        else:
            rounded = torch.round(x_codes)
        packed = q.pack(rounded.clamp_(0, q.levels).to(torch.int64))
        for t, x, c in zip(qs, touched, packed.split(sizes)):
            t.codes[x] = c

    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        m = self.mapper.hash_params[self.feature_names.index(name), 4].item()
        if m < weight.shape[0]:
            raise NotImplementedError("low_precision: a hashed table is not initialised from a trained one")
        if self.precision in ("fp32", "fp16"):
            self.storage.embedding_bags[name].weight.copy_(weight)
        else:
            self.rows[name].init_rows_(torch.arange(weight.shape[0], device=weight.device), weight)
        return f"rows quantized to {self.precision} (round to nearest)"

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.num_buckets is not None or budget_bytes is None:
            return config

        def total(cap: int) -> int:
            return sum(min(f.num_embeddings, cap) * row_bytes(config.precision, f.embedding_dim, config.step_size) + HASH_PARAM_BYTES
                       for f in features)

        cap = largest_feasible(total, budget_bytes, 1, max(f.num_embeddings for f in features))
        if cap is None:
            raise smallest_budget_error(
                "low_precision", total(1), budget_bytes, features, f"one {config.precision} row per feature",
            )
        return dataclasses.replace(config, num_buckets={f.name: min(f.num_embeddings, cap) for f in features})

    @classmethod
    def describe(cls, features, config):
        plans = []
        for f, m in zip(features, _buckets(features, config)):
            hashed = m < f.num_embeddings
            nbytes = m * row_bytes(config.precision, f.embedding_dim, config.step_size) + HASH_PARAM_BYTES
            detail = f"{config.precision} rows" + (f", {config.hash_fn} hash into {m:,} rows" if hashed else "")
            plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, m, f.embedding_dim, nbytes,
                                     hashed or config.precision != "fp32", detail))
        return plans, {}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", precision={self.precision}"
