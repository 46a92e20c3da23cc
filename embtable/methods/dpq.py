"""Differentiable product quantization: each id is ``D`` codes, each code one of ``K`` learned centroids.

Chen, Li & Sun, ICML 2020, "Differentiable Product Quantization for End-to-End Embedding Compression".
A compressed feature's ``d`` dims are cut into ``D`` groups of ``s = d / D`` dims. Training keeps a full
QUERY table ``Q`` (``n x d``, a TorchRec ``EmbeddingCollection`` child, training bytes only) and a codebook
``C`` (``D x K x s``). An id's code in group ``j`` is the nearest centroid to its query slice, and its
vector is the concatenation of the chosen centroids::

    id ──► query row q = Q[id]    (training only)      q = [ q_1 | q_2 | ... | q_D ]      (s dims each)
           code c_j = argmin_k ||q_j - C[j, k]||²                                          (j = 1..D)
           vector   = [ C[1, c_1] | C[2, c_2] | ... | C[D, c_D] ]                          (d dims)

    serving: packed codes, one bit stream per feature, D codes of b = ceil(log2 K) bits per id:
      byte:  |    0     |    1     |    2     | ...
      bits:  |c(0,1) c(0,2) ... c(0,D) c(1,1) ... c(n-1,D)|   (LSB first, no padding between ids)

This is the paper's straight-through "VQ" variant: the forward pass outputs the centroids, the backward
pass hands their gradient to the chosen centroids AND, unchanged, to the query (``C[j, c_j] + q_j -
sg(q_j)``), and :meth:`DPQEmbeddingBagCollection.auxiliary_loss` adds the usual regulariser
``||sg(q) - C[c]||² + commitment * ||q - sg(C[c])||²`` (mean over the batch's ids and dims) that pulls the
centroids and the queries together. At inference only the packed codes and the codebooks remain:
:meth:`~DPQEmbeddingBagCollection.inference_module` returns that compact module (same ``forward``). The
training module holds the packed codes too (so its inference bytes equal the plan's): they are recomputed
from the query table by :meth:`~DPQEmbeddingBagCollection.refresh_codes`, which ``eval()`` calls when the
query table or the codebooks changed since the last refresh. An eval forward reads the packed codes when
they are current and otherwise (a query table changed since, or sharded by DMP) computes the codes from the
query rows; both give the same output, so a stale code buffer never changes one.

Sharding: DMP shards the query tables (``EmbeddingCollection``, one per dim) and the full tables of small
features (``EmbeddingBagCollection``); the codebooks and packed codes are replicated (data parallel).

Memory (inference; fp32 codebooks, codes packed into a ``uint8`` buffer, no padding)::

    compressed feature:  ceil(n * D * ceil(log2 K) / 8)  +  D * K * (d / D) * 4   bytes
    plain feature:       n * d * 4                                                  (a full table)

Training adds the query table, ``n * d * 4`` per compressed feature (and optimizer state).

Budget planning (pure): features whose full table fits an equal share of the budget stay full (as in
``hash``); the others share the rest in proportion to their full bytes, and each takes the ``(D, K)``
with ``D`` dividing ``d`` and ``2 <= K <= min(max_centroids, n)`` that fits its share with the most code
bits per id, ``D * log2(K)`` (ties: more centroids); what a feature leaves unused goes to the next, then a second
pass gives the remainder to the largest features (a full table where it fits). A plan never stores a
feature in more bytes than its full table. Code bits come in steps of ``D`` bits per id, so a single
feature's plan can leave up to ``1 / (D * ceil(log2 K))`` of its share unused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from ..budget import FP32, BudgetError, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, Pooling, register_method
from ..features import FeatureSpec
from ..module import EmbeddingModule, is_tracing, storage_collection, storage_values
from ..pooling import select_features

__all__ = [
    "DPQConfig",
    "DPQEmbeddingBagCollection",
    "FeatureCodes",
    "code_bits",
    "pack_codes",
    "packed_bytes",
    "unpack_codes",
]

MAX_BITS = 16  # codes of up to 16 bits (K <= 65536): one code spans at most 3 bytes of the stream
_PACK_ROWS = 8192  # ids packed per chunk (a multiple of 8, so every chunk starts on a byte boundary)


# ----- packed codes -----
def code_bits(num_centroids: int) -> int:
    """Bits of one code: ``ceil(log2 K)``, at least 1."""
    return max(1, (int(num_centroids) - 1).bit_length())


def packed_bytes(rows: int, num_groups: int, bits: int) -> int:
    """Bytes of ``rows`` ids' packed codes: ``ceil(rows * D * bits / 8)``."""
    return (rows * num_groups * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[rows, D]`` (each ``< 2**bits``) into a ``uint8`` bit stream, LSB first.

    Code ``(r, j)`` occupies bits ``[(r * D + j) * bits, (r * D + j + 1) * bits)`` of the stream.

    >>> codes = torch.tensor([[1, 0, 3], [2, 3, 1]])
    >>> packed = pack_codes(codes, 2)
    >>> packed.tolist(), packed_bytes(2, 3, 2)
    ([177, 7], 2)
    >>> unpack_codes(packed, torch.tensor([1, 0]), 3, 2).tolist()
    [[2, 3, 1], [1, 0, 3]]
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"codes must have 1 to {MAX_BITS} bits, got {bits}")
    rows, groups = codes.shape
    out = torch.empty(packed_bytes(rows, groups, bits), dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(bits, device=codes.device)
    weights = torch.arange(8, device=codes.device)
    for start in range(0, rows, _PACK_ROWS):
        chunk = codes[start:start + _PACK_ROWS].reshape(-1).to(torch.int64)
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)  # [chunk ids * D * bits], LSB first
        stream = F.pad(stream, (0, (-stream.numel()) % 8))
        chunk_bytes = (stream.view(-1, 8) << weights).sum(1).to(torch.uint8)
        first = start * groups * bits // 8
        out[first:first + chunk_bytes.numel()] = chunk_bytes
    return out


def unpack_codes(packed: torch.Tensor, rows: torch.Tensor, num_groups: int, bits: int) -> torch.Tensor:
    """The codes ``[N, D]`` (int64) of ids ``rows`` ``[N]`` from a stream written by :func:`pack_codes`.

    Reads the (at most 3) bytes each code spans with integer gathers and shifts: no loop, no float.
    """
    pos = (rows.to(torch.int64)[:, None] * num_groups + torch.arange(num_groups, device=rows.device)) * bits
    first, shift = pos >> 3, pos & 7
    last = packed.numel() - 1
    word = packed[first.clamp(max=last)].to(torch.int64)
    word = word | (packed[(first + 1).clamp(max=last)].to(torch.int64) << 8)
    word = word | (packed[(first + 2).clamp(max=last)].to(torch.int64) << 16)
    return (word >> shift) & ((1 << bits) - 1)


# ----- quantization -----
def nearest_codes(query: torch.Tensor, codebook: torch.Tensor, limit: torch.Tensor | None = None) -> torch.Tensor:
    """Per group, the nearest centroid to each query slice: ``[N, D]`` codes (no gradient).

    Args:
        query: ``[N, D, s]``.
        codebook: ``[D, K, s]``.
        limit: optional ``[N]``: id ``i`` may only use centroids ``k < limit[i]`` (MGQE's rare ids).
    """
    with torch.no_grad():
        q = query.detach().transpose(0, 1)  # [D, N, s]
        c = codebook.detach()
        # ||q - c||² - ||q||² = ||c||² - 2 q.c  (||q||² is the same for every centroid)
        dist = torch.baddbmm(c.pow(2).sum(-1)[:, None, :], q, c.transpose(1, 2), alpha=-2)  # [D, N, K]
        if limit is not None:
            k = torch.arange(c.shape[1], device=c.device)
            dist = dist.masked_fill(k[None, None, :] >= limit[None, :, None], float("inf"))
        return dist.argmin(-1).transpose(0, 1)  # [N, D]


def decode(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The vectors ``[N, D * s]`` of codes ``[N, D]``: the chosen centroid of each group, concatenated."""
    groups = torch.arange(codebook.shape[0], device=codes.device)
    return codebook[groups, codes].flatten(1)  # [N, D, s] -> [N, d]


# ----- config -----
def _per_feature(value, features: Sequence[FeatureSpec], field: str, method: str) -> dict[str, int]:
    """An int for every feature, or a mapping naming some features (the others stay full tables)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in features})
        if unknown:
            raise ValueError(f"{method}: {field} names unknown feature(s) {unknown}; features: "
                             f"{[f.name for f in features]}")
        return {k: int(v) for k, v in value.items()}
    return {f.name: int(value) for f in features}


def _check_ints(value, field: str, lo: int, hi: int, cls: str) -> None:
    values = value.values() if isinstance(value, Mapping) else [value]
    for v in values:
        if v is not None and (isinstance(v, bool) or int(v) != v or not lo <= v <= hi):
            raise ValueError(f"{cls}.{field} must be integers in [{lo}, {hi}], got {v!r}")


@dataclasses.dataclass(frozen=True)
class DPQConfig(MethodConfig):
    """Differentiable product quantization (straight-through VQ variant).

    Args:
        num_groups: ``D``, code length (groups per id; must divide the feature's dim): one int, a
            ``{feature: D}`` mapping, or ``None`` to let the planner choose.
        num_centroids: ``K``, centroids per group (``2 <= K <= 65536``): one int for every feature, a
            mapping naming the compressed features (features left out keep a full table), or ``None``
            to let the planner size it from the budget.
        max_centroids: the planner's largest ``K`` (256: codes of at most 8 bits, as in the paper).
        commitment: weight of ``||q - sg(C[c])||²`` in the auxiliary loss (VQ-VAE's beta).
    """

    method = "dpq"
    num_groups: int | Mapping[str, int] | None = None
    num_centroids: int | Mapping[str, int] | None = None
    max_centroids: int = 256
    commitment: float = 0.25

    def __post_init__(self) -> None:
        cls = type(self).__name__
        _check_ints(self.num_groups, "num_groups", 1, 2**20, cls)
        _check_ints(self.num_centroids, "num_centroids", 2, 2**MAX_BITS, cls)
        _check_ints(self.max_centroids, "max_centroids", 2, 2**MAX_BITS, cls)
        if not (isinstance(self.commitment, int | float) and self.commitment >= 0):
            raise ValueError(f"{cls}.commitment must be a number >= 0 (VQ-VAE uses 0.25), got {self.commitment!r}")


@dataclasses.dataclass(frozen=True)
class CodeLayout:
    """How one compressed feature's codes are stored: ``D`` groups, blocks of ids with their own ``K``.

    ``blocks[b] = (rows, K_b)``; block 0 holds the most popular ids and uses all ``K`` centroids, a
    later block uses the first ``K_b`` of them. ``head_ids``: the sorted ids of block 0 when the blocks
    are not id ranges (then the other block holds the remaining ids in id order).
    """

    num_groups: int
    num_centroids: int
    blocks: tuple[tuple[int, int], ...]
    head_ids: object = None  # np.ndarray | None (int32/int64), only for a two-block split

    def bytes(self, dim: int) -> int:
        codes = sum(packed_bytes(rows, self.num_groups, code_bits(k)) for rows, k in self.blocks)
        remap = 0 if self.head_ids is None else self.head_ids.nbytes
        return codes + self.num_centroids * dim * FP32 + remap


class FeatureCodes(nn.Module):
    """One compressed feature's serving state: its codebook, packed codes per block and id remap.

    Holds ``codebook`` ``[D, K, s]`` (a parameter), ``codes{b}`` (``uint8`` streams) and, when the blocks
    are not id ranges, ``head_ids`` (the sorted ids of block 0).
    """

    def __init__(self, feature: FeatureSpec, layout: CodeLayout, device: torch.device | None = None) -> None:
        super().__init__()
        d, D, K = feature.embedding_dim, layout.num_groups, layout.num_centroids
        self.name, self.num_embeddings, self.embedding_dim = feature.name, feature.num_embeddings, d
        self.num_groups, self.num_centroids = D, K
        self.blocks = tuple(layout.blocks)
        self.bits = tuple(code_bits(k) for _, k in self.blocks)
        self.codebook = nn.Parameter(torch.empty(D, K, d // D, device=device))
        for b, ((rows, _), bits) in enumerate(zip(self.blocks, self.bits)):
            self.register_buffer(f"codes{b}", torch.zeros(packed_bytes(rows, D, bits), dtype=torch.uint8,
                                                          device=device))
        if layout.head_ids is not None:
            self.register_buffer("head_ids", torch.as_tensor(layout.head_ids, device=device))
        else:
            self.head_ids = None

    def locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per id ``[N]``: is it in block 0, its row in its block, and how many centroids it may use."""
        if len(self.blocks) == 1:
            head = torch.ones_like(ids, dtype=torch.bool)
            return head, ids, torch.full_like(ids, self.num_centroids)
        h = self.blocks[0][0]
        if self.head_ids is None:  # block 0 = ids [0, h), block 1 = the rest
            head = ids < h
            row = torch.where(head, ids, ids - h)
        else:
            pos = torch.searchsorted(self.head_ids, ids.to(self.head_ids.dtype)).to(torch.int64)
            head = self.head_ids[pos.clamp(max=h - 1)] == ids
            row = torch.where(head, pos, ids - pos)  # pos = number of head ids below the id
        limit = torch.where(head, self.num_centroids, self.blocks[1][1])
        return head, row, limit

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """The codes ``[N, D]`` of ids ``[N]`` from the packed streams."""
        head, row, _ = self.locate(ids)
        D = self.num_groups
        if len(self.blocks) == 1:
            return unpack_codes(self.codes0, row, D, self.bits[0])
        zero = torch.zeros_like(row)
        first = unpack_codes(self.codes0, torch.where(head, row, zero), D, self.bits[0])
        second = unpack_codes(self.codes1, torch.where(head, zero, row), D, self.bits[1])
        return torch.where(head[:, None], first, second)

    def quantize(self, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid codes ``[N, D]`` of ids ``[N]`` with query rows ``[N, d]``."""
        limit = None if len(self.blocks) == 1 else self.locate(ids)[2]
        return nearest_codes(query.view(query.shape[0], self.num_groups, self.embedding_dim // self.num_groups),
                             self.codebook, limit)

    def block_ids(self) -> list[torch.Tensor]:
        """The ids of each block, in the order their codes are stored."""
        device = self.codebook.device
        n, h = self.num_embeddings, self.blocks[0][0]
        if len(self.blocks) == 1:
            return [torch.arange(n, device=device)]
        if self.head_ids is None:
            return [torch.arange(h, device=device), torch.arange(h, n, device=device)]
        tail = torch.ones(n, dtype=torch.bool, device=device)
        tail[self.head_ids.to(torch.int64)] = False
        return [self.head_ids.to(torch.int64), tail.nonzero().squeeze(1)]

    @torch.no_grad()
    def refresh(self, query: torch.Tensor) -> None:
        """Recompute and pack every id's codes from the query table ``[n, d]``."""
        for b, ids in enumerate(self.block_ids()):
            parts = [self.quantize(ids[i:i + 65536], query[ids[i:i + 65536]]) for i in range(0, ids.numel(), 65536)]
            codes = torch.cat(parts) if parts else torch.zeros(0, self.num_groups, dtype=torch.int64)
            getattr(self, f"codes{b}").copy_(pack_codes(codes, self.bits[b]))

    @torch.no_grad()
    def init_codebook(self, query: torch.Tensor | None, kmeans_steps: int = 0) -> None:
        """Centroids from random query rows (normal noise of the query's scale when there is none),
        optionally improved by a few Lloyd (k-means) steps per group on a sample of rows."""
        D, K, s = self.codebook.shape
        if query is None:
            bound = 1.0 / math.sqrt(self.num_embeddings)
            self.codebook.uniform_(-bound, bound)
            return
        n = query.shape[0]
        sample = torch.randperm(n, device=query.device)[:65536] if n <= 2**22 else torch.randint(
            n, (65536,), device=query.device)
        rows = query[sample].view(-1, D, s)  # [S, D, s]
        self.codebook.copy_(rows[torch.arange(K, device=rows.device) % rows.shape[0]].transpose(0, 1))
        groups = torch.arange(D, device=rows.device)
        for _ in range(kmeans_steps):
            codes = nearest_codes(rows, self.codebook)  # [S, D]
            flat = (groups * K + codes).reshape(-1)  # [S * D] in the [D * K] centroid list
            sums = torch.zeros(D * K, s, device=rows.device).index_add_(0, flat, rows.reshape(-1, s))
            counts = torch.zeros(D * K, device=rows.device).index_add_(0, flat, torch.ones_like(flat, dtype=sums.dtype))
            used = counts > 0
            new = self.codebook.view(D * K, s).clone()
            new[used] = sums[used] / counts[used, None]
            self.codebook.copy_(new.view(D, K, s))

    def extra_repr(self) -> str:
        blocks = ", ".join(f"{rows} ids x K={k} ({b} bits)" for (rows, k), b in zip(self.blocks, self.bits))
        return f"{self.name!r}, D={self.num_groups}, [{blocks}]"


def _pool(vectors: torch.Tensor, jt: JaggedTensor, pooling: Pooling) -> torch.Tensor:
    """Sum (or mean) of each bag's vectors ``[N, d]`` -> ``[B, d]``, with per-id weights if any."""
    lengths = jt.lengths()
    bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=vectors.device), lengths,
                                   output_size=vectors.shape[0])
    weights = jt.weights_or_none()
    if weights is not None:
        vectors = vectors * weights[:, None]
    out = torch.zeros(lengths.numel(), vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    out = out.index_add(0, bags, vectors)
    if pooling is Pooling.MEAN:
        out = out / lengths.clamp(min=1)[:, None].to(out.dtype)
    return out


def _fixed_groups(config: DPQConfig, feature: FeatureSpec) -> int | None:
    """The ``D`` the config fixes for ``feature`` (``None``: the planner chooses)."""
    if isinstance(config.num_groups, Mapping):
        value = config.num_groups.get(feature.name)
        return None if value is None else int(value)
    return None if config.num_groups is None else int(config.num_groups)


def _divisors(d: int) -> list[int]:
    return [g for g in range(1, d + 1) if d % g == 0]


@register_method(DPQConfig)
class DPQEmbeddingBagCollection(EmbeddingModule):
    """Product-quantized tables trained end to end (Chen, Li & Sun, ICML 2020).

    Args:
        serving: build the compact serving form (no query table: codes come from the packed buffers);
            :meth:`inference_module` builds it from a trained module.

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, DPQConfig(), budget="1/16", seed=0)
    >>> m.config.num_groups, m.config.num_centroids
    ({'user': 4}, {'user': 128})
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123, 7, 3]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> m(kjt).values().shape
    torch.Size([2, 32])
    >>> served = m.inference_module()   # packed codes + codebooks, no query table
    >>> embtable.memory_report(served).inference_bytes == embtable.memory_report(m).inference_bytes
    True
    >>> torch.equal(served(kjt).values(), m.eval()(kjt).values())
    True
    """

    def __init__(self, features: Sequence[FeatureSpec], config: DPQConfig, *, serving: bool = False,
                 **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        self.serving = bool(serving)
        layouts = type(self).layouts(self.features, config)
        self.compressed = [f for f in self.features if f.name in layouts]
        self.plain = [f for f in self.features if f.name not in layouts]
        self.storage = storage_collection([(f.name, f.num_embeddings, f.embedding_dim, [f.name]) for f in self.plain],
                                          self.pooling, self._is_weighted, self.device) if self.plain else None
        self.quantizers = nn.ModuleList(FeatureCodes(f, layouts[f.name], self.device) for f in self.compressed)
        # the query tables, one EmbeddingCollection per dim (TorchRec needs one dim per collection): DMP
        # shards them like any table; they are training-only (counted by training_bytes, not memory_report)
        self.query: nn.ModuleDict | None = None
        if not self.serving and self.compressed:
            dims = sorted({f.embedding_dim for f in self.compressed})
            self.query = nn.ModuleDict({
                f"dim{d}": EmbeddingCollection(tables=[
                    EmbeddingConfig(name=f.name, num_embeddings=f.num_embeddings, embedding_dim=d,
                                    feature_names=[f.name])
                    for f in self.compressed if f.embedding_dim == d], device=self.device)
                for d in dims})
            for collection in self.query.values():
                for table in collection.embeddings.values():
                    table.training_only_tensors = ("weight",)
        # (ids, codes, query rows) per compressed feature of the last training batch, for auxiliary_loss
        self._last_batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._refreshed: tuple[int, ...] | None = None
        self.reset_parameters()

    # ----- layout (pure; MGQE overrides it) -----
    @classmethod
    def layouts(cls, features: Sequence[FeatureSpec], config: DPQConfig) -> dict[str, CodeLayout]:
        """The code layout of each compressed feature of a sized config."""
        groups = _per_feature(config.num_groups, features, "num_groups", config.method)
        centroids = _per_feature(config.num_centroids, features, "num_centroids", config.method)
        if config.num_centroids is None:
            raise ValueError(f"{config.method}: num_centroids is not set; give a byte budget "
                             f"(build(features, {type(config).__name__}(), budget=...)) or num_centroids=...")
        out = {}
        for f in features:
            if f.name not in centroids:
                continue
            D = groups.get(f.name)
            if D is None:
                raise ValueError(f"{config.method}: feature {f.name!r} has num_centroids but no num_groups; "
                                 "give num_groups for it too (a divisor of its embedding_dim)")
            if f.embedding_dim % D:
                raise ValueError(f"{config.method}: feature {f.name!r}: num_groups={D} does not divide its "
                                 f"embedding_dim {f.embedding_dim}; use one of {_divisors(f.embedding_dim)}")
            out[f.name] = cls.feature_layout(f, D, centroids[f.name], config)
        return out

    @classmethod
    def feature_layout(cls, feature: FeatureSpec, num_groups: int, num_centroids: int, config: DPQConfig) -> CodeLayout:
        return CodeLayout(num_groups, num_centroids, ((feature.num_embeddings, num_centroids),))

    # ----- init -----
    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.device.type == "meta":
            return
        for q in self.quantizers:
            q.init_codebook(self.query_weight(q.name))
        self.refresh_codes()

    def _query_table(self, name: str) -> nn.Embedding | None:
        if self.query is None:
            return None
        for collection in self.query.values():
            if type(collection) is EmbeddingCollection and name in collection.embeddings:
                table = collection.embeddings[name]
                return table if isinstance(table, nn.Embedding) else None  # None: quantized by export
        return None

    def _codes_current(self) -> bool:
        """Whether an eval forward reads the packed codes (else it quantizes the query rows per batch).

        Training: never. Serving form: always. A query table sharded by DMP: never (the codes cannot be
        refreshed from shards). A query table whose rows export quantized: always (eval() refreshed the
        codes before). A plain query table: when the codes were refreshed since it or a codebook last changed.
        """
        if self.training:
            return False
        if self.query is None:
            return True
        if any(type(c) is not EmbeddingCollection for c in self.query.values()):
            return False
        if any(self._query_table(q.name) is None for q in self.quantizers):
            return True
        if is_tracing():  # a traced graph cannot read tensor versions: it serves the codes eval() refreshed
            return True
        return self._refreshed == self._versions()

    def query_weight(self, name: str) -> torch.Tensor | None:
        """The query table ``[n, d]`` of compressed feature ``name`` (``None`` when serving or sharded)."""
        table = self._query_table(name)
        return None if table is None else table.weight

    # ----- forward -----
    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out: dict[str, torch.Tensor] = {}
        if self.storage is not None:
            names = [f.name for f in self.plain]
            sub = select_features(kjt, [self.feature_names.index(n) for n in names])  # traceable with no ids
            out.update(zip(names, storage_values(self.storage(sub), names).split([f.embedding_dim for f in self.plain], 1)))
        if self.quantizers:
            per_feature = kjt.to_dict()
            queries = self._query_rows(kjt) if self.query is not None and not self._codes_current() else {}
            seen = []
            for q in self.quantizers:
                jt = per_feature[q.name]
                ids = jt.values()
                if q.name in queries:  # codes from the query table; straight-through to the query
                    query = queries[q.name]
                    codes = q.quantize(ids, query)
                    vectors = decode(codes, q.codebook)
                    if self.training:
                        seen.append((ids, codes, query))
                        vectors = vectors + query - query.detach()
                else:
                    vectors = decode(q.codes(ids), q.codebook)
                out[q.name] = _pool(vectors, jt, self.pooling)
            if self.training and seen:
                self._last_batch = seen
        return torch.cat([out[n] for n in self.feature_names], dim=1)

    def _query_rows(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        rows: dict[str, torch.Tensor] = {}
        for key, collection in self.query.items():
            d = int(key[3:])
            names = [f.name for f in self.compressed if f.embedding_dim == d]
            sub = kjt.permute([self.feature_names.index(n) for n in names])
            rows.update({n: jt.values() for n, jt in collection(sub).items()})
        return rows

    # ----- hooks -----
    def auxiliary_loss(self) -> torch.Tensor | None:
        """The VQ regulariser over the ids of the last training forward (``None`` before one)::

            sum_f  mean ||sg(q) - C[c]||²  +  commitment * mean ||q - sg(C[c])||²

        Its graph is its own (the query rows are looked up again where the table is a plain one), so it
        can be added to the loss or back-propagated separately.
        """
        if self._last_batch is None:
            return None
        terms = []
        for q, (ids, codes, forward_query) in zip(self.quantizers, self._last_batch):
            table = self._query_table(q.name)
            query = forward_query if table is None else table(ids)
            centroids = decode(codes, q.codebook)
            terms.append(((query.detach() - centroids) ** 2).mean()
                         + self.config.commitment * ((query - centroids.detach()) ** 2).mean())
        return torch.stack(terms).sum()

    def _versions(self) -> tuple[int, ...]:
        out = []
        for q in self.quantizers:
            w = self.query_weight(q.name)
            out += [q.codebook._version, -1 if w is None else w._version]
        return tuple(out)

    @torch.no_grad()
    def refresh_codes(self) -> bool:
        """Recompute the packed codes of every compressed feature from its query table.

        Returns ``False`` (and changes nothing) when there is no plain query table: the serving form, or
        a query table sharded by DMP (codes are then computed per batch from the shards), or the meta device.
        """
        weights = [self.query_weight(q.name) for q in self.quantizers]
        if any(w is None or w.device.type == "meta" for w in weights):
            return False
        for q, w in zip(self.quantizers, weights):
            q.refresh(w)
        self._refreshed = self._versions()
        return True

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode and self._refreshed != self._versions():
            self.refresh_codes()
        return self

    def inference_module(self) -> nn.Module:
        """The serving form: the packed codes (refreshed from the query tables) and the codebooks."""
        self.refresh_codes()
        served = type(self)(self.logical_features, self.config, serving=True, pooling=self.pooling,
                            is_weighted=self._is_weighted, out_of_range=self.out_of_range, device=self.device)
        own = served.state_dict()
        served.load_state_dict({k: v for k, v in self.state_dict().items() if k in own})
        return served.eval()

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """Query table = the trained table; centroids by 10 k-means steps on its rows; codes refreshed."""
        if name in [f.name for f in self.plain]:
            self.storage.embedding_bags[name].weight.copy_(weight)
            return "copied (full table)"
        q = next(q for q in self.quantizers if q.name == name)
        query = self.query_weight(name)
        if query is None:
            raise NotImplementedError(f"{type(self).__name__}: no plain query table to initialise (serving form)")
        query.copy_(weight)
        q.init_codebook(weight, kmeans_steps=10)
        self.refresh_codes()
        return f"query table copied; codebook by 10 k-means steps (D={q.num_groups}, K={q.num_centroids})"

    # ----- planning -----
    @classmethod
    def option_bytes(cls, feature: FeatureSpec, num_groups: int, num_centroids: int, config: DPQConfig) -> int:
        return cls.feature_layout(feature, num_groups, num_centroids, config).bytes(feature.embedding_dim)

    @classmethod
    def option_score(cls, feature: FeatureSpec, num_groups: int, num_centroids: int, config: DPQConfig) -> float:
        """What the planner maximises: the mean code bits per id, ``log2`` of the vectors an id can take."""
        layout = cls.feature_layout(feature, num_groups, num_centroids, config)
        return sum(rows * num_groups * math.log2(k) for rows, k in layout.blocks) / feature.num_embeddings

    @classmethod
    def _best(cls, f: FeatureSpec, share: int, config: DPQConfig) -> tuple[int, int, int] | None:
        """``(D, K, bytes)`` with the most code bits ``D * log2 K`` within ``share`` bytes, or ``None``."""
        fixed = _fixed_groups(config, f)
        share = min(share, f.num_embeddings * f.embedding_dim * FP32 - 1)  # never more than the full table
        best, best_key = None, None
        k_max = min(config.max_centroids, f.num_embeddings)
        if k_max < 2:
            return None
        for D in _divisors(f.embedding_dim) if fixed is None else [fixed]:
            if f.embedding_dim % D:
                continue
            K = largest_feasible(lambda k, D=D: cls.option_bytes(f, D, k, config), share, 2, k_max)
            if K is None:
                continue
            key = (cls.option_score(f, D, K, config), K)
            if best_key is None or key > best_key:
                best, best_key = (D, K, cls.option_bytes(f, D, K, config)), key
        return best

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.num_centroids is not None or budget_bytes is None:
            return config
        full = {f.name: f.num_embeddings * f.embedding_dim * FP32 for f in features}

        def cheapest(f: FeatureSpec) -> int:  # 1-bit codes (K = 2) in the fewest groups, or the full table
            if f.num_embeddings < 2:
                return full[f.name]
            fixed = _fixed_groups(config, f)
            return min(full[f.name], cls.option_bytes(f, fixed or 1, 2, config))

        minimum = sum(cheapest(f) for f in features)
        if minimum > budget_bytes:
            raise smallest_budget_error(config.method, minimum, budget_bytes, features,
                                        "1-bit codes, K = 2, or a full table where smaller")
        # 1. features whose full table fits an equal share stay full (smallest first)
        remaining, left = budget_bytes, len(features)
        plain, compressed = [], []
        for f in sorted(features, key=lambda f: full[f.name]):
            if not compressed and full[f.name] <= remaining // left or f.num_embeddings < 2:
                plain.append(f)
                remaining -= full[f.name]
                left -= 1
            else:
                compressed.append(f)
        # 2. the others share the rest in proportion to their full bytes (smallest first: leftovers flow on),
        # each keeping back what the later ones need at the least
        chosen: dict[str, tuple[int, int, int]] = {}
        weight_left = sum(full[f.name] for f in compressed)
        reserve = sum(cheapest(f) for f in compressed)
        for f in compressed:
            reserve -= cheapest(f)
            share = max(remaining * full[f.name] // weight_left, cheapest(f))
            option = cls._best(f, min(share, remaining - reserve), config)
            if option is None:  # cannot happen after the minimum check, but say so if it does
                raise BudgetError(f"{config.method}: feature {f.name!r} cannot be compressed within the budget of "
                                  f"{budget_bytes:,} bytes; raise the budget")
            chosen[f.name] = option
            remaining -= option[2]
            weight_left -= full[f.name]
        # 3. what is left goes to the largest features first: a full table where it fits, else more code bits
        for f in reversed(compressed):
            if full[f.name] <= chosen[f.name][2] + remaining:
                remaining -= full[f.name] - chosen.pop(f.name)[2]
                continue
            better = cls._best(f, chosen[f.name][2] + remaining, config)
            if better is not None and better[2] > chosen[f.name][2]:
                remaining -= better[2] - chosen[f.name][2]
                chosen[f.name] = better
        return config.replace(num_groups={n: o[0] for n, o in chosen.items()},
                              num_centroids={n: o[1] for n, o in chosen.items()})

    @classmethod
    def describe(cls, features, config):
        layouts = cls.layouts(features, config)
        plans = []
        for f in features:
            layout = layouts.get(f.name)
            if layout is None:
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings,
                                         f.embedding_dim, f.num_embeddings * f.embedding_dim * FP32, False, "full table"))
                continue
            blocks = " + ".join(f"{rows:,} ids x {layout.num_groups} codes of {code_bits(k)} bits"
                                for rows, k in layout.blocks)
            remap = "" if layout.head_ids is None else f", remap of {len(layout.head_ids):,} head ids"
            plans.append(FeaturePlan(
                f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings, layout.num_groups,
                layout.bytes(f.embedding_dim), True,
                f"D={layout.num_groups}, K={layout.num_centroids}: {blocks}{remap}",
            ))
        return plans, {}
