"""PEP: learnable soft thresholds prune single weights during training; the kept weights are stored sparse.

Liu et al., ICLR 2021, "Learnable Embedding Sizes for Recommender Systems". Each feature's table ``V``
(``n x d``) is used through a soft threshold with a learnable threshold ``s`` per (feature, dimension) —
the paper's dimension-wise granularity, one threshold vector ``s_f`` of ``d`` values per feature (our
"feature" is the paper's field)::

    effective weight  Ŵ = sign(V) · relu(|V| - sigmoid(s_f))        s_f initialised at threshold_init

Training, in two stages (:meth:`PEPEmbeddingBagCollection.train_step_end` drives them):

1. **Pruning.** ``V`` and ``s`` are trained by the task loss's gradient. With the paper's init (-15) alone,
   the gradient on ``s`` carries ``sigmoid'(-15) = 3e-7``: on the demo preset it is ~4e-10, under Adam's
   ``eps`` (1e-8), so the trainer's Adam (lr 1e-3) moves ``s`` ~2e-5 a step (measured: -15 ± 0.004 after 300
   steps), ``sigmoid(s)`` stays ~3e-7, nothing is pruned by learning and the serving buffers kept the largest
   weights (magnitude pruning). Two changes make the learned thresholds prune, and reach the target:

   - ``s = threshold_lr_scale · u`` with ``u`` the trained parameter: a dense optimizer's step on ``u``
     moves ``s`` ``threshold_lr_scale`` times as far (Adam's step does not depend on the gradient's scale),
     so the thresholds of the features and dims the loss needs fall behind the others within the run;
   - a common offset ``c`` (a training buffer, not trained) added to every ``s``: every ``check_every``
     steps it is set so that the non-zeros follow the cubic schedule
     ``target + (E - target)·(1 - t/prune_steps)^3`` (Zhu & Gupta's gradual pruning): ``c`` is the value
     above which exactly that many ``logit(|v|) - s`` lie (a ``kthvalue`` over all weights). The learned
     ``s`` decide WHICH weights go (their order across features and dims, and the rows, through ``V``); the
     offset decides HOW MANY, like a Lagrange multiplier of the size constraint solved exactly. It also puts
     ``s + c`` where the weights are, so ``sigmoid'`` is ~0.1 there and the gradient on ``s`` is no longer
     lost under Adam's ``eps``.

   The effective threshold of feature ``f``, dim ``j`` is ``sigmoid(s_fj + c)``.

2. **Retraining with the mask.** Once the non-zeros are at most ``target_nnz`` (at the check at
   ``prune_steps``, or earlier) the mask ``Ŵ != 0`` is frozen (a buffer; if rounding at the boundary left a
   few weights over the target, the smallest ``|Ŵ|`` of them are dropped), the thresholds stop and the rows
   keep training under the mask: ``retrain="continue"`` (default) keeps the pruned values ``Ŵ`` (no output
   jump); ``retrain="rewind"`` resets the kept weights to their initial values (the paper's lottery-ticket
   retraining; costs a training-only copy of the initial tables). If the run ends before the target, the
   serving buffers keep the ``target_nnz`` largest ``|Ŵ|``.

Serving storage: the kept weights as sorted 16-bit keys in 2**16-entry buckets. Every weight of every feature
has a flat index ``k = e_f + id·d_f + j`` (``e_f``: the entries of the features before ``f``), split into a
bucket ``k >> 16`` and a 16-bit key ``k & 0xFFFF``::

    flat index k:   | bucket 0: k in [0, 65536) | bucket 1 | ... | bucket B-1 |      B = ceil(E / 65536)
    bucket_ptr  int32 [B + 1]    kept weights of bucket b: positions [bucket_ptr[b], bucket_ptr[b+1])
    keys        int16 [nnz_cap]  k & 0xFFFF (stored minus 32768), sorted within a bucket
    values      fp32  [nnz_cap]  the kept weights; positions past bucket_ptr[B] are unused padding

A lookup makes the ``[N, d]`` flat indices of its ids and binary-searches each in its bucket with a fixed
number of vectorised steps (``bit_length(min(65536, nnz_cap))``, at most 17): fixed shapes, no Python
branch on data, so it traces. Why not CSR rows (an int32 pointer per row, 4 bytes a row: 13.5 MB on the
standard preset's 3.4M rows, more than 1/16 of its tables) or a per-row bitmap (``d`` bits a row, the
smallest budget ~1/32 at d = 16): the per-row cost here is 4 bytes per 65536/d rows (~0.001 bytes a row at
d = 16), so 1/100 and 1/1000 are reachable; a kept weight costs 6 bytes (CSR: 5, plus the row pointers).

Memory: ``(B + 1)·p + nnz_cap·(2 + 4)`` bytes, ``B = ceil(E / 65536)``, ``E = Σ n_f·d_f``, ``p = 4`` (8 when
``E >= 2**31``). These buffers, pre-sized at the target, are the module's inference bytes while it trains;
the dense tables, the thresholds, the offset, the masks (and the rewind copy) are training-only tensors
(:func:`embtable.training_bytes`). They are filled from the trained tables when the mask freezes, when the
module is switched to ``eval()``, and by :meth:`~PEPEmbeddingBagCollection.inference_module`, which returns
the serving module (these buffers only, same forward contract).

Forward in training mode: the features of one embedding dim train as ONE flat table (their rows concatenated
in feature order; ``u`` is one ``[features, d]`` parameter, the mask one ``[rows, d]`` buffer)::

    tables["dim16"]:  | feature 0's rows | feature 1's rows | ... |     id i of feature f -> row r_f + i

A batch is, per dim, one lookup of all its ids, the soft threshold (or the mask once frozen, selected with
``torch.where`` on the ``frozen`` buffer, no Python branch) of the looked-up rows only (each with its
feature's ``sigmoid(s_f + c)``: the same values and gradients as thresholding the whole table), and one
``embedding_bag`` over all the bags, in fp32. The table gets sparse gradients (the trainer's
``sparse_parameters`` / row-wise Adagrad path; no fused kernel: the rows are transformed before pooling). The
offset's check selects its rank with a sampled bracket (:func:`_kth_smallest_pair`, exact) instead of two
``kthvalue`` over all weights. In eval mode the forward decodes the sparse buffers, so evaluation measures
exactly what is served at the budget.

Sharding: not sharded by DMP (the training tables are plain ``nn.Embedding`` modules transformed per id before
pooling, and the serving storage is module buffers); :func:`embtable.sharding.shard` refuses it.

Degenerate: ``threshold_init=-inf`` (``sigmoid(s) = 0``, the offset never moves) and ``target_nnz = Σ n_f·d_f``
give the plain table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FeaturePlan, smallest_budget_error
from ..config import MethodConfig, register_method
from ..features import FeatureSpec
from ..module import EmbeddingModule

__all__ = ["PEPConfig", "PEPEmbeddingBagCollection", "PEPSparseEmbeddingBagCollection", "sparse_layout"]

VALUE_BYTES = 4
KEY_BYTES = 2
BUCKET_BITS = 16  # a bucket holds 2**16 flat indices; its keys are their low 16 bits
SPARSE_BUFFERS = ("sparse_values", "sparse_keys", "sparse_bucket_ptr")


@dataclasses.dataclass(frozen=True)
class PEPConfig(MethodConfig):
    """PEP: learnable soft-threshold pruning, stored as bucketed 16-bit keys and fp32 values.

    Args:
        target_nnz: the number of weights kept over all features (the storage's capacity); ``None``: planned
            from the budget.
        threshold_init: initial ``s`` (``sigmoid(s)`` is the threshold): very negative prunes nothing at first
            (the paper's -15). ``-inf`` disables pruning.
        threshold_lr_scale: ``s = threshold_lr_scale · u``, ``u`` trained: the thresholds move this many times
            as far per optimizer step as a plain parameter (Adam at 1e-3 and 30: up to 0.03 a step).
        prune_steps: optimizer steps by which the schedule reaches ``target_nnz`` (0: at the first check);
            the retraining with the mask takes the steps after it. Give it about half the run.
        check_every: set the offset and count the non-zeros every this many optimizer steps (two passes over
            every table).
        retrain: after the mask freezes, ``"continue"`` training the pruned weights, or ``"rewind"`` the kept
            weights to their initial values (lottery-ticket retraining).
    """

    method = "pep"
    target_nnz: int | None = None
    threshold_init: float = -15.0
    threshold_lr_scale: float = 30.0
    prune_steps: int = 400
    check_every: int = 10
    retrain: str = "continue"

    def __post_init__(self) -> None:
        if self.target_nnz is not None and (int(self.target_nnz) != self.target_nnz or self.target_nnz < 1):
            raise ValueError(f"PEPConfig.target_nnz must be a positive integer or None, got {self.target_nnz!r}")
        if not isinstance(self.threshold_init, int | float) or math.isnan(self.threshold_init) \
                or self.threshold_init == math.inf:
            raise ValueError(
                f"PEPConfig.threshold_init must be a finite float or -inf (no pruning), got {self.threshold_init!r}"
            )
        if not self.threshold_lr_scale > 0 or math.isinf(self.threshold_lr_scale):
            raise ValueError(f"PEPConfig.threshold_lr_scale must be a positive finite float (1: the plain "
                             f"parametrisation), got {self.threshold_lr_scale!r}")
        if int(self.prune_steps) != self.prune_steps or self.prune_steps < 0:
            raise ValueError(f"PEPConfig.prune_steps must be an integer >= 0, got {self.prune_steps!r}")
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ValueError(f"PEPConfig.check_every must be a positive integer, got {self.check_every!r}")
        if self.retrain not in ("continue", "rewind"):
            raise ValueError(f"PEPConfig.retrain must be 'continue' or 'rewind', got {self.retrain!r}")


@dataclasses.dataclass(frozen=True)
class SparseLayout:
    entries: int  # E = sum n_f * d_f
    capacity: int  # nnz_cap

    @property
    def buckets(self) -> int:
        return max(1, -(-self.entries // 2**BUCKET_BITS))

    @property
    def pointer_dtype(self) -> torch.dtype:
        return torch.int32 if self.entries < 2**31 else torch.int64

    @property
    def pointer_bytes(self) -> int:
        return (self.buckets + 1) * (4 if self.pointer_dtype == torch.int32 else 8)

    @property
    def bytes(self) -> int:
        return self.pointer_bytes + self.capacity * (KEY_BYTES + VALUE_BYTES)

    @property
    def search_steps(self) -> int:
        """Binary-search steps that find any position in a bucket (a bucket holds at most this many keys)."""
        return min(2**BUCKET_BITS, self.capacity).bit_length()


def sparse_layout(features: Sequence[FeatureSpec], capacity: int) -> SparseLayout:
    """The serving storage of ``capacity`` kept weights over ``features``' weights."""
    return SparseLayout(sum(f.num_embeddings * f.embedding_dim for f in features), capacity)


def _soft_threshold(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(s))


def _pool(rows: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None, mean: bool) -> torch.Tensor:
    """Pool looked-up rows ``[N, d]`` into bags of ``lengths`` ``[B]`` -> ``[B, d]`` (empty bags give zeros)."""
    offsets = torch.cumsum(lengths, 0) - lengths
    index = torch.arange(rows.shape[0], device=rows.device)
    return F.embedding_bag(index, rows, offsets, mode="mean" if mean else "sum", per_sample_weights=weights)


def _per_feature(kjt: KeyedJaggedTensor, num_features: int):
    splits = kjt.length_per_key()
    ids = torch.split(kjt.values(), splits)
    weights = kjt.weights_or_none()
    weights = torch.split(weights, splits) if weights is not None else [None] * num_features
    return ids, weights, kjt.lengths().view(num_features, -1)


class _SparseStorage:
    """Shared by the training and the serving module: the bucketed-key buffers and the per-feature lookup."""

    def _register_sparse(self, layout: SparseLayout, device: torch.device) -> None:
        self.register_buffer("sparse_values", torch.zeros(layout.capacity, device=device))
        self.register_buffer("sparse_keys", torch.zeros(layout.capacity, dtype=torch.int16, device=device))
        self.register_buffer("sparse_bucket_ptr", torch.zeros(layout.buckets + 1, dtype=layout.pointer_dtype,
                                                              device=device))
        starts, offset = [], 0
        for f in self.features:
            starts.append(offset)
            offset += f.num_embeddings * f.embedding_dim
        self.entry_offsets = starts  # e_f: the flat index of feature f's first weight

    def sparse_rows(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """Dense ``[N, d]`` rows of feature ``i``'s ids, decoded from the sparse buffers (fixed shapes)."""
        d = self.features[i].embedding_dim
        flat = (ids.to(torch.int64) * d + self.entry_offsets[i]).unsqueeze(1) \
            + torch.arange(d, device=ids.device)  # [N, d]
        key = (flat & (2**BUCKET_BITS - 1)) - 2**(BUCKET_BITS - 1)  # as stored (int16 order = key order)
        bucket = flat >> BUCKET_BITS
        lo = self.sparse_bucket_ptr[bucket].to(torch.int64)
        end = self.sparse_bucket_ptr[bucket + 1].to(torch.int64)
        hi = end
        last = self.layout.capacity - 1
        for _ in range(self.layout.search_steps):  # lower bound of key in [lo, hi)
            mid = (lo + hi) >> 1
            less = self.sparse_keys[mid.clamp(max=last)].to(torch.int64) < key
            active = lo < hi
            lo, hi = torch.where(active & less, mid + 1, lo), torch.where(active & ~less, mid, hi)
        at = lo.clamp(max=last)
        found = (lo < end) & (self.sparse_keys[at].to(torch.int64) == key)
        return torch.where(found, self.sparse_values[at], torch.zeros((), device=ids.device))

    @torch.no_grad()
    def _fill_sparse(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        """Store kept weights at sorted flat indices ``flat`` (at most the capacity)."""
        k = values.numel()
        bucket = flat >> BUCKET_BITS
        self.sparse_values.zero_()[:k] = values
        self.sparse_keys.zero_()[:k] = ((flat & (2**BUCKET_BITS - 1)) - 2**(BUCKET_BITS - 1)).to(torch.int16)
        counts = torch.bincount(bucket, minlength=self.layout.buckets)
        self.sparse_bucket_ptr[0] = 0
        self.sparse_bucket_ptr[1:] = torch.cumsum(counts, 0).to(self.sparse_bucket_ptr.dtype)


@dataclasses.dataclass(frozen=True)
class _DimGroup:
    """The features of one embedding dim: their rows, concatenated in feature order, form one training table."""

    key: str  # "dim16": the key of the group's table, thresholds, mask (and rewind copy)
    dim: int
    features: tuple[int, ...]  # feature indices, in feature order
    row_starts: tuple[int, ...]  # each feature's first row in the group's table
    rows_per_feature: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.rows_per_feature)


def _dim_groups(features: Sequence[FeatureSpec]) -> list[_DimGroup]:
    by_dim: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        by_dim.setdefault(f.embedding_dim, []).append(i)
    groups = []
    for dim, members in by_dim.items():
        rows = [features[i].num_embeddings for i in members]
        starts = [sum(rows[:j]) for j in range(len(rows))]
        groups.append(_DimGroup(f"dim{dim}", dim, tuple(members), tuple(starts), tuple(rows)))
    return groups


def _shrink(v: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """``sign(v) · relu(|v| - cut)``: the soft threshold at ``cut = sigmoid(s)``."""
    return torch.sign(v) * torch.relu(v.abs() - cut)


_SAMPLE = 2**14  # values sorted directly, and the sample a larger selection brackets its ranks with
_CHUNK = 2**18  # weights per piece of a pass over all tables (1 MiB of fp32: its temporaries stay in cache)


def _kth_smallest_pair(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k``-th and ``(k+1)``-th smallest of the 1-D ``x`` (1-based; the ``(k+1)``-th is the ``k``-th when
    ``k = x.numel()``), the values two ``torch.kthvalue`` calls give, in a few passes over ``x``.

    A strided sample of ``_SAMPLE`` values brackets the two ranks (4 standard deviations of a sample quantile on
    each side); the values inside the bracket (~3% of ``x``) are selected from recursively. A bracket that
    misses the ranks (counted exactly) falls back to ``torch.kthvalue``. (``torch.kthvalue`` alone takes ~40x
    the time of a pass over the values on CPU.)
    """
    n = x.numel()
    k2 = min(k + 1, n)
    if n <= _SAMPLE:
        ordered = torch.sort(x).values
        return ordered[k - 1], ordered[k2 - 1]
    sample = torch.sort(x[:: n // _SAMPLE]).values
    m = sample.numel()
    margin = 2 * math.isqrt(m) + 8
    first, last = (k - 1) * m // n - margin, (k2 - 1) * m // n + margin
    lo = float(sample[first]) if first >= 0 else -math.inf
    hi = float(sample[last]) if last < m else math.inf
    below, band = torch.zeros((), dtype=torch.int64, device=x.device), []
    for piece in x.split(_CHUNK):  # pieces that stay in cache (a pass over the whole would allocate E-sized masks)
        below += torch.count_nonzero(piece < lo)
        band.append(piece[(piece >= lo) & (piece <= hi)])
    below, band = int(below), torch.cat(band)
    if below < k and below + band.numel() >= k2 and band.numel() < n:
        return _kth_smallest_pair(band, k - below)
    return torch.kthvalue(x, k).values, torch.kthvalue(x, k2).values


@register_method(PEPConfig)
class PEPEmbeddingBagCollection(_SparseStorage, EmbeddingModule):
    """PEP's training module: dense tables under learned soft thresholds; sparse serving buffers at the target.

    The features of one embedding dim train as one flat table (their rows concatenated in feature order, see
    :meth:`table_weight`), with one ``[features, dim]`` threshold parameter and one mask: a batch is one
    lookup, one soft threshold of the looked-up rows and one pooling per dim.

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 10_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, PEPConfig(check_every=1, prune_steps=4), budget="1/4", seed=0)
    >>> m.config.target_nnz, embtable.memory_report(m).inference_bytes   # (3 + 1)·4 + nnz·6
    (27197, 163198)
    >>> m.tables["dim16"].weight.shape   # both features' rows in one training table
    torch.Size([10200, 16])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123, 7, 3]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> m(kjt).values().shape
    torch.Size([2, 32])
    >>> m.train_step_end(0); bool(m.frozen)   # after step 0 of 4 the offset prunes to the schedule
    False
    >>> round(m.nnz() / m.layout.entries, 3)   # 1/6 kept at the end: 1/6 + 5/6 · (1 - 1/4)^3
    0.518
    >>> m.train_step_end(3); bool(m.frozen), m.nnz() <= m.config.target_nnz   # the schedule's end
    (True, True)
    >>> serve = m.inference_module()   # the sparse buffers only
    >>> torch.equal(serve(kjt).values(), m(kjt).values())
    True
    """

    def __init__(self, features: Sequence[FeatureSpec], config: PEPConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        if config.target_nnz is None:
            raise ValueError("pep: target_nnz is not set; give a byte budget or PEPConfig(target_nnz=...)")
        self.layout = sparse_layout(self.features, int(config.target_nnz))
        self._register_sparse(self.layout, self.device)
        self.sharding_unsupported = (
            "pep trains plain nn.Embedding tables through per-id soft thresholds and serves bucketed sparse "
            "buffers; DMP cannot shard it: train it on one process"
        )
        # training-only tensors, one each per embedding dim: the dense table, the thresholds u [features, dim]
        # (s = threshold_lr_scale * u), the mask (and the rewind copy); the offset c and the frozen flag
        self.groups = _dim_groups(self.features)
        self._slots = {}  # feature name -> (group, row within the group's thresholds, first row, rows)
        self.tables = nn.ModuleDict()
        self.thresholds = nn.ParameterDict()
        self.masks = nn.Module()
        self.initial = nn.Module()
        # per feature (index), where its ids go: row offset in its group's table, its group, its threshold row
        self.lookup = nn.Module()
        row_start, group_of, local_of = [0] * len(self.features), [0] * len(self.features), [0] * len(self.features)
        for gi, g in enumerate(self.groups):
            weight = torch.empty(g.rows, g.dim, device=self.device)
            for j, (i, start, rows) in enumerate(zip(g.features, g.row_starts, g.rows_per_feature)):
                bound = (1.0 / rows) ** 0.5
                nn.init.uniform_(weight[start:start + rows], -bound, bound)  # as TorchRec's tables
                self._slots[self.features[i].name] = (g, j, start, rows)
                row_start[i], group_of[i], local_of[i] = start, gi, j
            table = nn.Embedding(g.rows, g.dim, _weight=weight, device=self.device)
            table.training_only_tensors = ("weight",)
            self.tables[g.key] = table
            self.thresholds[g.key] = nn.Parameter(torch.full(
                (len(g.features), g.dim), float(config.threshold_init) / config.threshold_lr_scale, device=self.device
            ))
            self.masks.register_buffer(g.key, torch.zeros(g.rows, g.dim, dtype=torch.bool, device=self.device))
            if config.retrain == "rewind":
                self.initial.register_buffer(g.key, weight.detach().clone())
            self.lookup.register_buffer(f"features_{g.key}", torch.tensor(g.features, device=self.device),
                                        persistent=False)
        for name, values in (("row_start", row_start), ("group", group_of), ("local", local_of)):
            self.lookup.register_buffer(name, torch.tensor(values, device=self.device), persistent=False)
        keys = tuple(g.key for g in self.groups)
        # the columns of the groups' pooled outputs, concatenated, that give feature order (none if already in it)
        first, start = {}, 0
        for g in self.groups:
            for i in g.features:
                first[i], start = start, start + g.dim
        columns = [first[i] + j for i, f in enumerate(self.features) for j in range(f.embedding_dim)]
        self._reorder = columns != sorted(columns)
        if self._reorder:
            self.lookup.register_buffer("columns", torch.tensor(columns, device=self.device), persistent=False)
        self.thresholds.training_only_tensors = keys
        self.masks.training_only_tensors = keys
        self.initial.training_only_tensors = keys if config.retrain == "rewind" else ()
        self.lookup.training_only_tensors = tuple(name for name, _ in self.lookup.named_buffers())
        self.register_training_buffer("frozen", torch.zeros((), dtype=torch.bool, device=self.device))
        self.register_training_buffer("threshold_offset", torch.zeros((), device=self.device))  # c

    def table_weight(self, name: str) -> torch.Tensor:
        """Feature ``name``'s dense rows ``[n, d]``: a view of its rows in its dim's training table."""
        g, _, start, rows = self._slots[name]
        return self.tables[g.key].weight[start:start + rows]

    def mask(self, name: str) -> torch.Tensor:
        """Feature ``name``'s frozen mask ``[n, d]`` (all False before the freeze): a view of its dim's mask."""
        g, _, start, rows = self._slots[name]
        return self.masks.get_buffer(g.key)[start:start + rows]

    def threshold(self, name: str) -> torch.Tensor:
        """Feature ``name``'s learned thresholds ``s`` ``[d]`` (``sigmoid(s + c)`` is cut from every ``|weight|``)."""
        g, j, _, _ = self._slots[name]
        return self.thresholds[g.key][j] * self.config.threshold_lr_scale

    def _cut(self, name: str) -> torch.Tensor:
        return self.threshold(name) + self.threshold_offset

    def effective_weight(self, name: str) -> torch.Tensor:
        """Feature ``name``'s weights as the forward uses them (thresholded, or masked once frozen)."""
        w = self.table_weight(name)
        return torch.where(self.frozen, w * self.mask(name), _soft_threshold(w, self._cut(name)))

    def _row_cuts(self, g: _DimGroup) -> torch.Tensor:
        """``sigmoid(s + c)`` of every row of group ``g``'s table ``[rows, d]``."""
        cut = torch.sigmoid(self.thresholds[g.key] * self.config.threshold_lr_scale + self.threshold_offset)
        counts = torch.tensor(g.rows_per_feature, device=cut.device)
        return torch.repeat_interleave(cut, counts, dim=0, output_size=g.rows)

    def _group_effective(self, g: _DimGroup) -> torch.Tensor:
        """Group ``g``'s whole table as the forward uses it ``[rows, d]``."""
        w = self.tables[g.key].weight
        return torch.where(self.frozen, w * self.masks.get_buffer(g.key), _shrink(w, self._row_cuts(g)))

    def _group_pooled(self, gi: int, ids: torch.Tensor, feature: torch.Tensor, weights: torch.Tensor | None,
                      lengths: torch.Tensor) -> torch.Tensor:
        """Pool group ``gi``'s ids (``feature``: each id's feature index; ``lengths``: its bags, feature-major)."""
        g = self.groups[gi]
        rows = ids + self.lookup.row_start[feature]  # [N] rows of the group's table
        v = self.tables[g.key](rows)  # [N, d]
        cut = torch.sigmoid(self.thresholds[g.key] * self.config.threshold_lr_scale + self.threshold_offset)
        thresholded = _shrink(v, cut[self.lookup.local[feature]])
        masked = v * self.masks.get_buffer(g.key)[rows]
        effective = torch.where(self.frozen, masked, thresholded)
        offsets = torch.cumsum(lengths, 0) - lengths
        index = torch.arange(effective.shape[0], device=effective.device)
        mode = "mean" if self.pooling.value == "mean" else "sum"
        bags = F.embedding_bag(index, effective, offsets, mode=mode, per_sample_weights=weights)  # [F_g * B, d]
        batch = lengths.numel() // len(g.features)
        return bags.view(len(g.features), batch, g.dim).transpose(0, 1).reshape(batch, len(g.features) * g.dim)

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        if not self.training:  # evaluate what a server holds: the sparse rows (filled by eval())
            return _sparse_pooled(self, *_per_feature(kjt, len(self.features)))
        ids, lengths, weights = kjt.values(), kjt.lengths(), kjt.weights_or_none()
        num_features = len(self.features)
        batch = lengths.numel() // num_features
        bag_feature = torch.arange(num_features, device=ids.device).repeat_interleave(batch)
        feature = torch.repeat_interleave(bag_feature, lengths, output_size=ids.numel())  # [N] each id's feature
        if len(self.groups) == 1:
            return self._group_pooled(0, ids, feature, weights, lengths)  # [B, sum d]
        out = []
        for gi in range(len(self.groups)):  # one pass per embedding dim
            keep = self.lookup.group[feature] == gi
            members = self.lookup.get_buffer(f"features_{self.groups[gi].key}")
            out.append(self._group_pooled(gi, ids[keep], feature[keep], weights[keep] if weights is not None else None,
                                          lengths.view(num_features, batch)[members].flatten()))
        out = torch.cat(out, dim=1)  # [B, sum d], the groups' columns
        return out[:, self.lookup.columns] if self._reorder else out

    @torch.no_grad()
    def nnz(self) -> int:
        """Non-zero effective weights over all features."""
        if bool(self.frozen):
            return sum(int(torch.count_nonzero(self.tables[g.key].weight * self.masks.get_buffer(g.key)))
                       for g in self.groups)
        # the soft threshold keeps v iff not |v| <= sigmoid(s + c) (NaN kept, as it is by sign · relu)
        cut = {g.key: torch.sigmoid(self.thresholds[g.key] * self.config.threshold_lr_scale + self.threshold_offset)
               for g in self.groups}
        pruned = torch.zeros((), dtype=torch.int64, device=self.device)
        for g, j, start, stop in self._row_pieces():
            pruned += torch.count_nonzero(self.tables[g.key].weight[start:stop].abs() <= cut[g.key][j])
        return self.layout.entries - int(pruned)

    def _row_pieces(self):
        """``(group, feature's threshold row, first row, end row)`` over every feature's rows, ~``_CHUNK`` weights
        a piece, in group order: the passes over all weights run piece by piece."""
        for g in self.groups:
            step = max(1, _CHUNK // g.dim)
            for j, (start, rows) in enumerate(zip(g.row_starts, g.rows_per_feature)):
                for first in range(start, start + rows, step):
                    yield g, j, first, min(first + step, start + rows)

    @property
    def target_sparsity(self) -> float:
        """Share of the weights pruned at the target."""
        return 1.0 - self.layout.capacity / self.layout.entries

    def scheduled_nnz(self, step: int) -> int:
        """The non-zeros the offset prunes to after ``step + 1`` steps: cubic from all weights to the target."""
        left = max(0.0, 1.0 - (step + 1) / self.config.prune_steps) if self.config.prune_steps else 0.0
        return self.layout.capacity + math.floor((self.layout.entries - self.layout.capacity) * left**3)

    @torch.no_grad()
    def _set_offset(self, keep: int) -> None:
        """Set ``c`` so that ``keep`` weights pass their thresholds: ``|v| > sigmoid(s + c)`` iff
        ``logit(|v|) - s > c``; ``c`` is midway between the ``(E - keep)``-th and the next smallest of these."""
        if math.isinf(self.config.threshold_init) or keep >= self.layout.entries:
            return
        critical = torch.empty(self.layout.entries, device=self.device)  # in group order
        s = {g.key: self.thresholds[g.key] * self.config.threshold_lr_scale for g in self.groups}
        done = 0
        for g, j, start, stop in self._row_pieces():
            w = self.tables[g.key].weight[start:stop]
            out = critical[done:done + w.numel()].view_as(w)
            torch.abs(w, out=out).clamp_(max=1.0).logit_().sub_(s[g.key][j])
            done += w.numel()
        k = self.layout.entries - keep
        low, high = _kth_smallest_pair(critical, k)
        if not keep:
            high = low
        c = torch.where(torch.isfinite(low) & torch.isfinite(high), (low + high) / 2, low)
        self.threshold_offset.copy_(c.clamp(-60.0, 60.0))  # sigmoid saturates beyond; no inf in s + c

    @torch.no_grad()
    def train_step_end(self, step: int) -> None:
        """Every ``check_every`` steps: set the offset to the schedule; once the non-zeros reach the target (or
        the schedule ends), freeze the mask and stop the thresholds."""
        if bool(self.frozen) or (step + 1) % self.config.check_every:
            return
        self._set_offset(self.scheduled_nnz(step))
        if self.nnz() > self.layout.capacity and step + 1 < self.config.prune_steps:
            return
        pruned = [_shrink(self.tables[g.key].weight, self._row_cuts(g)) for g in self.groups]
        kept = sum(int(torch.count_nonzero(w)) for w in pruned)
        if kept > self.layout.capacity:  # rounding or ties left a few over: drop the smallest |Ŵ|
            magnitude = torch.cat([w.abs().flatten() for w in pruned])
            cut, _ = _kth_smallest_pair(magnitude, self.layout.entries - self.layout.capacity)
            pruned = [w * (w.abs() > cut) for w in pruned]
        for g, w in zip(self.groups, pruned):
            weight, mask = self.tables[g.key].weight, w != 0
            self.masks.get_buffer(g.key).copy_(mask)
            if self.config.retrain == "rewind":
                weight.copy_(self.initial.get_buffer(g.key) * mask)
            else:
                weight.copy_(w)
            self.thresholds[g.key].requires_grad_(False)
        self.frozen.fill_(True)
        self.sync_sparse()

    @torch.no_grad()
    def sync_sparse(self) -> None:
        """Fill the sparse buffers from the current effective weights (the ``nnz_cap`` largest if there are more)."""
        if self.device.type == "meta":
            return
        effective = {g.key: self._group_effective(g) for g in self.groups}
        flat, vals = [], []
        for i, f in enumerate(self.features):
            g, _, start, rows = self._slots[f.name]
            w = effective[g.key][start:start + rows].flatten()
            (k,) = torch.nonzero(w, as_tuple=True)  # ascending
            flat.append(k + self.entry_offsets[i])
            vals.append(w[k])
        flat, vals = torch.cat(flat), torch.cat(vals)  # ascending flat indices
        if vals.numel() > self.layout.capacity:
            keep = torch.topk(vals.abs(), self.layout.capacity).indices.sort().values
            flat, vals = flat[keep], vals[keep]
        self._fill_sparse(flat, vals)

    def train(self, mode: bool = True):
        if not mode:
            self.sync_sparse()
        return super().train(mode)

    def inference_module(self) -> nn.Module:
        """The serving module: the sparse buffers only (filled from the current weights), same forward contract."""
        self.sync_sparse()
        serve = PEPSparseEmbeddingBagCollection(
            self.logical_features, self.config, pooling=self.pooling, is_weighted=self._is_weighted,
            out_of_range=self.out_of_range, device=self.device,
        )
        serve.load_state_dict({k: getattr(self, k) for k in SPARSE_BUFFERS})
        return serve.eval()

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        self.table_weight(name).copy_(weight)
        if self.config.retrain == "rewind":
            g, _, start, rows = self._slots[name]
            self.initial.get_buffer(g.key)[start:start + rows].copy_(weight)
        return "dense table copied; pruning starts from it"

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.target_nnz is not None or budget_bytes is None:
            return config
        empty = sparse_layout(features, 0)
        per_weight = KEY_BYTES + VALUE_BYTES
        capacity = min(empty.entries, (budget_bytes - empty.bytes) // per_weight)
        if capacity < 1:
            raise smallest_budget_error(
                "pep", empty.bytes + per_weight, budget_bytes, features,
                f"the bucket pointers need {empty.bytes:,} bytes (one per 2**16 weights: {empty.buckets:,} "
                f"buckets, plus one) and one kept weight {per_weight} more",
            )
        return dataclasses.replace(config, target_nnz=int(capacity))

    @classmethod
    def describe(cls, features, config):
        if config.target_nnz is None:
            raise ValueError("pep: target_nnz is not set; give a byte budget or PEPConfig(target_nnz=...)")
        layout = sparse_layout(features, int(config.target_nnz))
        kept = f"{layout.capacity / layout.entries:.2%} of all weights kept"
        plans = [
            FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings, f.embedding_dim, 0, True,
                        f"sparse weights in the shared bucketed buffers ({kept})")
            for f in features
        ]
        shared = {"sparse_bucket_ptr": layout.pointer_bytes,
                  "sparse_values_keys": layout.capacity * (KEY_BYTES + VALUE_BYTES)}
        return plans, shared


class PEPSparseEmbeddingBagCollection(_SparseStorage, EmbeddingModule):
    """PEP's serving module: the pruned rows decoded from the bucketed sparse buffers (see :mod:`embtable.methods.pep`).

    Built by :meth:`PEPEmbeddingBagCollection.inference_module`; its buffers are exactly the planned bytes.
    """

    config_cls = PEPConfig

    def __init__(self, features: Sequence[FeatureSpec], config: PEPConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.layout = sparse_layout(self.features, int(config.target_nnz))
        self._register_sparse(self.layout, self.device)
        self.sharding_unsupported = "pep's serving sparse buffers are module buffers; DMP cannot shard them"

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return _sparse_pooled(self, *_per_feature(kjt, len(self.features)))


def _sparse_pooled(module: _SparseStorage, ids_per_feature, weights, lengths) -> torch.Tensor:
    mean = module.pooling.value == "mean"
    out = [_pool(module.sparse_rows(i, ids), lengths[i], weights[i], mean) for i, ids in enumerate(ids_per_feature)]
    return torch.cat(out, dim=1)  # [B, sum d]
