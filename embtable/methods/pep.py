"""PEP: learnable soft thresholds prune single weights during training; the pruned rows are stored sparse.

Liu et al., ICLR 2021, "Learnable Embedding Sizes for Recommender Systems". Each feature's table ``V``
(``n x d``) is used through a soft threshold with a learnable threshold ``s`` per (feature, dimension) —
the paper's dimension-wise granularity, one threshold vector ``s_f`` of ``d`` values per feature (our
"feature" is the paper's field)::

    effective weight  Ŵ = sign(V) · relu(|V| - sigmoid(s_f))        s_f initialised at threshold_init

The planner turns the byte budget into a target number of non-zeros ``target_nnz`` for all features together.
After every ``check_every`` optimizer steps :meth:`PEPEmbeddingBagCollection.train_step_end` counts the
non-zeros of ``Ŵ``; once they are at most ``target_nnz`` the mask ``Ŵ != 0`` is frozen (a buffer), the
thresholds stop training, and the rows keep training under the mask: ``retrain="continue"`` (default) keeps
the pruned values ``Ŵ`` and goes on (no output jump, no second run of the data); ``retrain="rewind"`` resets
the kept weights to their initial values (the paper's lottery-ticket retraining; costs a training-only copy
of the initial tables).

Serving storage: one CSR matrix over the rows of all features (features' rows stacked in order)::

    row_ptr  int32 [N + 1]     rows r of feature f: r = offset_f + id; entries of r: [row_ptr[r], row_ptr[r+1])
    columns  uint8 [nnz_cap]   the dimension of each kept weight (int16 when a dim exceeds 256)
    values   fp32  [nnz_cap]   the kept weights; entries past row_ptr[N] are unused padding

CSR rather than a bitmask per row because at the budgets PEP targets (most weights pruned) one byte per
kept weight is less than ``d`` bits per row; rows stay randomly accessible through ``row_ptr``; ``row_ptr``
is int32 unless ``Σ n_f·d_f >= 2**31`` (then int64).

Memory: ``(N + 1)·p + nnz_cap·(4 + c)`` bytes, ``N = Σ n_f``, ``p = 4`` (or 8), ``c = 1`` (or 2). These CSR
buffers, pre-sized at the target, are the module's inference bytes while it trains; the dense tables, the
thresholds, the masks (and the rewind copy) are training-only tensors (:func:`embtable.training_bytes`).
The CSR buffers are filled from the trained tables when the mask freezes, when the module is switched to
``eval()``, and by :meth:`~PEPEmbeddingBagCollection.inference_module`, which returns the serving module
(CSR buffers only, same forward contract). Before the target is reached, filling keeps the ``nnz_cap``
largest-magnitude weights of ``Ŵ``.

Forward in training mode: dense rows are looked up, thresholded (or masked once frozen, selected with
``torch.where`` on the ``frozen`` buffer, no Python branch) and pooled in fp32. In eval mode the forward
decodes the CSR buffers, so evaluation measures exactly what is served at the budget.

Sharding: not sharded by DMP (the training tables are plain ``nn.Embedding`` modules transformed per id before
pooling, and the serving CSR is a module buffer); :func:`embtable.sharding.shard` refuses it.

Degenerate: ``threshold_init=-inf`` (``sigmoid(s) = 0``) and ``target_nnz = Σ n_f·d_f`` give the plain table.
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

__all__ = ["PEPConfig", "PEPEmbeddingBagCollection", "PEPSparseEmbeddingBagCollection", "csr_layout"]

VALUE_BYTES = 4


@dataclasses.dataclass(frozen=True)
class PEPConfig(MethodConfig):
    """PEP: learnable soft-threshold pruning, stored as CSR rows.

    Args:
        target_nnz: the number of weights kept over all features (the CSR capacity); ``None``: planned from
            the budget.
        threshold_init: initial ``s`` (``sigmoid(s)`` is the threshold): very negative prunes nothing at first;
            the paper uses about -15 to -150 (below about -88, ``sigmoid`` and its gradient underflow in fp32,
            so the thresholds do not move). ``-inf`` disables pruning.
        check_every: count the non-zeros every this many optimizer steps (a pass over every table).
        retrain: after the mask freezes, ``"continue"`` training the pruned weights, or ``"rewind"`` the kept
            weights to their initial values (lottery-ticket retraining).
    """

    method = "pep"
    target_nnz: int | None = None
    threshold_init: float = -15.0
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
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ValueError(f"PEPConfig.check_every must be a positive integer, got {self.check_every!r}")
        if self.retrain not in ("continue", "rewind"):
            raise ValueError(f"PEPConfig.retrain must be 'continue' or 'rewind', got {self.retrain!r}")


@dataclasses.dataclass(frozen=True)
class CSRLayout:
    rows: int  # N = sum n_f
    capacity: int  # nnz_cap
    pointer_dtype: torch.dtype
    column_dtype: torch.dtype

    @property
    def bytes(self) -> int:
        p = torch.empty(0, dtype=self.pointer_dtype).element_size()
        c = torch.empty(0, dtype=self.column_dtype).element_size()
        return (self.rows + 1) * p + self.capacity * (VALUE_BYTES + c)


def csr_layout(features: Sequence[FeatureSpec], capacity: int) -> CSRLayout:
    """The CSR storage of ``capacity`` kept weights over ``features``' rows."""
    entries = sum(f.num_embeddings * f.embedding_dim for f in features)
    pointer = torch.int32 if entries < 2**31 else torch.int64
    column = torch.uint8 if max(f.embedding_dim for f in features) <= 256 else torch.int16
    return CSRLayout(sum(f.num_embeddings for f in features), capacity, pointer, column)


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


class _CSRStorage:
    """Shared by the training and the serving module: the CSR buffers and the per-feature row lookup."""

    def _register_csr(self, layout: CSRLayout, device: torch.device) -> None:
        self.register_buffer("csr_values", torch.zeros(layout.capacity, device=device))
        self.register_buffer("csr_columns", torch.zeros(layout.capacity, dtype=layout.column_dtype, device=device))
        self.register_buffer("csr_row_ptr", torch.zeros(layout.rows + 1, dtype=layout.pointer_dtype, device=device))
        starts, offset = [], 0
        for f in self.features:
            starts.append(offset)
            offset += f.num_embeddings
        self.row_offsets = starts

    def sparse_rows(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """Dense ``[N, d]`` rows of feature ``i``'s ids, decoded from the CSR buffers.

        A row holds at most ``d`` entries, so slot ``k < d`` of id ``n`` reads entry ``row_ptr[r] + k`` when
        ``k`` is below the row's count and nothing otherwise: a fixed-size gather (no data-dependent number
        of entries, so ``torch.export`` traces it), and the stored bytes stay the CSR buffers'.
        """
        rows = ids + self.row_offsets[i]
        start = self.csr_row_ptr[rows].to(torch.int64)
        count = self.csr_row_ptr[rows + 1].to(torch.int64) - start  # [N], each <= d
        slot = torch.arange(self.features[i].embedding_dim, device=ids.device)
        kept = slot < count[:, None]  # [N, d]
        entry = torch.where(kept, start[:, None] + slot, 0)  # entry 0 always exists; its reads are masked
        values = torch.where(kept, self.csr_values[entry], 0.0)
        columns = torch.where(kept, self.csr_columns[entry].to(torch.int64), 0)  # (entry 0 may be a wider feature's)
        out = torch.zeros(ids.shape[0], self.features[i].embedding_dim, device=ids.device)
        return out.scatter_add(1, columns, values)  # a row's columns are distinct: each slot gets its one value


@register_method(PEPConfig)
class PEPEmbeddingBagCollection(_CSRStorage, EmbeddingModule):
    """PEP's training module: dense tables under learned soft thresholds; CSR serving buffers at the target.

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 10_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, PEPConfig(check_every=1), budget="1/4", seed=0)
    >>> m.config.target_nnz, embtable.memory_report(m).inference_bytes   # (10200 + 1)·4 + nnz·5
    (24479, 163199)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123, 7, 3]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> m(kjt).values().shape
    torch.Size([2, 32])
    >>> with torch.no_grad():
    ...     _ = [s.fill_(-3.0) for s in m.thresholds.values()]   # sigmoid(-3) = 0.047: most weights pruned
    >>> m.train_step_end(0); bool(m.frozen)
    True
    >>> serve = m.inference_module()   # CSR buffers only
    >>> torch.equal(serve(kjt).values(), m(kjt).values())
    True
    """

    def __init__(self, features: Sequence[FeatureSpec], config: PEPConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        if config.target_nnz is None:
            raise ValueError("pep: target_nnz is not set; give a byte budget or PEPConfig(target_nnz=...)")
        self.layout = csr_layout(self.features, int(config.target_nnz))
        self._register_csr(self.layout, self.device)
        self.sharding_unsupported = (
            "pep trains plain nn.Embedding tables through per-id soft thresholds and serves a CSR buffer; "
            "DMP cannot shard it: train it on one process"
        )
        # training-only tensors: the dense tables, thresholds, masks (and the rewind copy)
        self.tables = nn.ModuleDict()
        self.thresholds = nn.ParameterDict()
        self.masks = nn.Module()
        self.initial = nn.Module()
        for f in self.features:
            table = nn.Embedding(f.num_embeddings, f.embedding_dim, device=self.device)
            bound = (1.0 / f.num_embeddings) ** 0.5
            nn.init.uniform_(table.weight, -bound, bound)  # as TorchRec's tables
            table.training_only_tensors = ("weight",)
            self.tables[f.name] = table
            self.thresholds[f.name] = nn.Parameter(
                torch.full((f.embedding_dim,), float(config.threshold_init), device=self.device)
            )
            self.masks.register_buffer(f.name, torch.zeros(f.num_embeddings, f.embedding_dim, dtype=torch.bool,
                                                           device=self.device))
            if config.retrain == "rewind":
                self.initial.register_buffer(f.name, table.weight.detach().clone())
        self.thresholds.training_only_tensors = tuple(self.feature_names)
        self.masks.training_only_tensors = tuple(self.feature_names)
        self.initial.training_only_tensors = tuple(self.feature_names) if config.retrain == "rewind" else ()
        self.register_training_buffer("frozen", torch.zeros((), dtype=torch.bool, device=self.device))

    def effective_weight(self, name: str) -> torch.Tensor:
        """Feature ``name``'s weights as the forward uses them (thresholded, or masked once frozen)."""
        w = self.tables[name].weight
        return torch.where(self.frozen, w * self.masks.get_buffer(name), _soft_threshold(w, self.thresholds[name]))

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        ids_per_feature, weights, lengths = _per_feature(kjt, len(self.features))
        if not self.training:  # evaluate what a server holds: the CSR rows (filled by eval())
            return _sparse_pooled(self, ids_per_feature, weights, lengths)
        out = []
        for i, f in enumerate(self.features):
            ids = ids_per_feature[i]
            v = self.tables[f.name](ids)  # [N, d]
            masked = v * self.masks.get_buffer(f.name)[ids]
            rows = torch.where(self.frozen, masked, _soft_threshold(v, self.thresholds[f.name]))
            out.append(_pool(rows, lengths[i], weights[i], self.pooling.value == "mean"))
        return torch.cat(out, dim=1)  # [B, sum d]

    @torch.no_grad()
    def nnz(self) -> int:
        """Non-zero effective weights over all features."""
        return sum(int(torch.count_nonzero(self.effective_weight(f.name))) for f in self.features)

    @property
    def target_sparsity(self) -> float:
        """Share of the weights pruned at the target."""
        entries = sum(f.num_embeddings * f.embedding_dim for f in self.features)
        return 1.0 - self.layout.capacity / entries

    @torch.no_grad()
    def train_step_end(self, step: int) -> None:
        """Every ``check_every`` steps: once the non-zeros reach the target, freeze the mask and stop the thresholds."""
        if bool(self.frozen) or (step + 1) % self.config.check_every:
            return
        if self.nnz() > self.layout.capacity:
            return
        for f in self.features:
            weight = self.tables[f.name].weight
            pruned = _soft_threshold(weight, self.thresholds[f.name])
            mask = pruned != 0
            self.masks.get_buffer(f.name).copy_(mask)
            if self.config.retrain == "rewind":
                weight.copy_(self.initial.get_buffer(f.name) * mask)
            else:
                weight.copy_(pruned)
            self.thresholds[f.name].requires_grad_(False)
        self.frozen.fill_(True)
        self.sync_sparse()

    @torch.no_grad()
    def sync_sparse(self) -> None:
        """Fill the CSR buffers from the current effective weights (the ``nnz_cap`` largest if there are more)."""
        if self.device.type == "meta":
            return
        rows, cols, vals = [], [], []
        for i, f in enumerate(self.features):
            r, c = torch.nonzero(self.effective_weight(f.name), as_tuple=True)
            rows.append(r + self.row_offsets[i])
            cols.append(c)
            vals.append(self.effective_weight(f.name)[r, c])
        rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
        if vals.numel() > self.layout.capacity:
            keep = torch.topk(vals.abs(), self.layout.capacity).indices.sort().values
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        order = torch.argsort(rows * 65536 + cols)  # row-major (dims < 2**16)
        rows, cols, vals = rows[order], cols[order], vals[order]
        k = vals.numel()
        self.csr_values.zero_()[:k] = vals
        self.csr_columns.zero_()[:k] = cols.to(self.csr_columns.dtype)
        counts = torch.bincount(rows, minlength=self.layout.rows)
        self.csr_row_ptr[0] = 0
        self.csr_row_ptr[1:] = torch.cumsum(counts, 0).to(self.csr_row_ptr.dtype)

    def train(self, mode: bool = True):
        if not mode:
            self.sync_sparse()
        return super().train(mode)

    def inference_module(self) -> nn.Module:
        """The serving module: the CSR buffers only (filled from the current weights), same forward contract."""
        self.sync_sparse()
        serve = PEPSparseEmbeddingBagCollection(
            self.logical_features, self.config, pooling=self.pooling, is_weighted=self._is_weighted,
            out_of_range=self.out_of_range, device=self.device,
        )
        serve.load_state_dict({k: getattr(self, k) for k in ("csr_values", "csr_columns", "csr_row_ptr")})
        return serve.eval()

    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        self.tables[name].weight.copy_(weight)
        if self.config.retrain == "rewind":
            self.initial.get_buffer(name).copy_(weight)
        return "dense table copied; pruning starts from it"

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.target_nnz is not None or budget_bytes is None:
            return config
        entries = sum(f.num_embeddings * f.embedding_dim for f in features)
        empty = csr_layout(features, 0)
        per_entry = csr_layout(features, 1).bytes - empty.bytes
        capacity = min(entries, (budget_bytes - empty.bytes) // per_entry)
        if capacity < 1:
            raise smallest_budget_error(
                "pep", empty.bytes + per_entry, budget_bytes, features,
                f"the CSR row pointers alone need {empty.bytes:,} bytes and one kept weight {per_entry} more; "
                "hash or qr reach smaller budgets",
            )
        return dataclasses.replace(config, target_nnz=int(capacity))

    @classmethod
    def describe(cls, features, config):
        if config.target_nnz is None:
            raise ValueError("pep: target_nnz is not set; give a byte budget or PEPConfig(target_nnz=...)")
        layout = csr_layout(features, int(config.target_nnz))
        entries = sum(f.num_embeddings * f.embedding_dim for f in features)
        p = torch.empty(0, dtype=layout.pointer_dtype).element_size()
        plans = [
            FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings, f.embedding_dim,
                        f.num_embeddings * p, True,
                        f"CSR rows (row pointers here; {layout.capacity / entries:.2%} of all weights kept)")
            for f in features
        ]
        shared = {"csr_row_ptr_end": p, "csr_values_columns": layout.bytes - (layout.rows + 1) * p}
        return plans, shared


class PEPSparseEmbeddingBagCollection(_CSRStorage, EmbeddingModule):
    """PEP's serving module: the pruned rows decoded from CSR buffers (see :mod:`embtable.methods.pep`).

    Built by :meth:`PEPEmbeddingBagCollection.inference_module`; its buffers are exactly the planned bytes.
    """

    config_cls = PEPConfig

    def __init__(self, features: Sequence[FeatureSpec], config: PEPConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.layout = csr_layout(self.features, int(config.target_nnz))
        self._register_csr(self.layout, self.device)
        self.sharding_unsupported = "pep's serving CSR rows are module buffers; DMP cannot shard them"

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return _sparse_pooled(self, *_per_feature(kjt, len(self.features)))


def _sparse_pooled(module: _CSRStorage, ids_per_feature, weights, lengths) -> torch.Tensor:
    mean = module.pooling.value == "mean"
    out = [_pool(module.sparse_rows(i, ids), lengths[i], weights[i], mean) for i, ids in enumerate(ids_per_feature)]
    return torch.cat(out, dim=1)  # [B, sum d]
