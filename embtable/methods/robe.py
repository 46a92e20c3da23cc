"""ROBE-Z: every embedding is read from ONE shared circular array of ``M`` learnable floats.

Desai, Chou and Shrivastava, "Random Offset Block Embedding (ROBE) for compressed embedding tables in deep
learning recommendation systems", MLSys 2022. All features share one flat array ``W`` of ``M`` floats. A
feature of dim ``d`` is cut into ``B = ceil(d / Z)`` blocks of ``Z`` values; block ``j`` of id ``x`` of
feature ``f`` starts at ``o = h_{f,j}(x)`` (a salted universal hash into ``[0, M)``, one salt per feature
and block) and reads the ``Z`` consecutive values ``W[o], W[o+1 mod M], ..., W[o+Z-1 mod M]``, wrapping
around the end of the array (circular)::

    W (M floats, shared by every feature, circular)
    index  0                 o1      o1+Z            o2      o2+Z          M-1 | 0 ..
           [ . . . . . . . . | Z values | . . . . . . | Z values | . . . . . . ]
                               ^ block 0 of (f, x)      ^ block 1 of (f, x)
    embedding(f, x) = concat_j W[(h_{f,j}(x) + 0 .. Z-1) mod M]   (first d values kept)

Blocks of different ids overlap freely (that is the compression); within a block the values stay
contiguous, which is ROBE-Z's point (fewer random memory reads than hashing every value, ROBE-1).
``hash_fn="identity"`` replaces the hash with ``o = start_f + x * d_f + j * Z`` (``start_f`` = the sum of
``n * d`` of the features before ``f``): with ``M = sum_f n_f * d_f`` it lays every feature's plain table out
row after row, so the module IS a plain table (the degenerate case the contract tests).

Small features: all features live in the one array (no feature is kept as a separate full table); a small
feature's blocks simply collide less often with each other.

Memory (inference): ``M * 4 + 48 * F * B`` bytes, ``F`` features, ``B = ceil(max_f d_f / Z)`` blocks per
feature: the array, plus per (feature, block) the hash salt ``a0, a1, a2, b`` and the identity layout's
``base, stride`` as int64 (one ``[F, B, 6]`` buffer). The planner takes ``M = (budget - 48 * F * B) // 4``,
so every budget down to one block (``4 * Z + 48 * F * B`` bytes) is feasible.

Distributed (DMP): the array is NOT TorchRec table storage (a window of ``Z`` values that wraps around
the end cannot be served by row-sharded lookups without cross-shard reads, and it is ``1 / ratio`` of the
full tables, e.g. 1/1000, so it is small): it is a dense parameter meant to be REPLICATED, trained
data-parallel (DDP all-reduces its gradient). :func:`embtable.sharding.shard` refuses it with that reason
(``sharding_unsupported``).

Sparse updates: the array is an ``nn.Embedding(M, 1)``, so :func:`embtable.sparse_parameters` switches it
to sparse gradients and an optimizer step touches only the values a batch read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, smallest_budget_error
from ..config import MethodConfig, Pooling, register_method
from ..features import FeatureSpec
from ..hashing import PRIME, hash_coefficients, universal_hash
from ..module import EmbeddingModule, per_id

__all__ = ["RobeConfig", "RobeEmbeddingBagCollection"]

PARAM_BYTES = 6 * 8  # a0, a1, a2, b, base, stride per (feature, block), int64
HASH_FNS = ("universal", "identity")


@dataclasses.dataclass(frozen=True)
class RobeConfig(MethodConfig):
    """ROBE-Z: one circular array of ``size`` floats for all features, read in blocks of ``block_size``.

    Args:
        size: ``M``, floats in the shared array (at most ``2**31 - 1``); ``None`` lets the planner take
            all the budget left after the hash parameters.
        block_size: ``Z``, consecutive values read per hash (ROBE-Z); ``Z = 1`` hashes every value (ROBE-1),
            ``Z = d`` reads a whole embedding from one offset. 8 by default: two reads per 16-dim embedding.
        hash_fn: ``"universal"`` (salted universal hash per feature and block) or ``"identity"``
            (``start_f + id * d_f + j * Z``: a plain table when ``size = sum n_f * d_f``; for tests).
        seed: seed of the salts.
    """

    method = "robe"
    size: int | None = None
    block_size: int = 8
    hash_fn: str = "universal"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hash_fn not in HASH_FNS:
            raise ValueError(f"RobeConfig.hash_fn must be one of {HASH_FNS}, got {self.hash_fn!r}")
        if int(self.block_size) != self.block_size or self.block_size < 1:
            raise ValueError(f"RobeConfig.block_size must be a positive integer, got {self.block_size!r}")
        if self.size is not None and (int(self.size) != self.size or not 1 <= self.size <= PRIME):
            raise ValueError(f"RobeConfig.size must be an integer in [1, 2**31 - 1] (floats), got {self.size!r}")
        if self.size is not None and self.size < self.block_size:
            raise ValueError(
                f"RobeConfig: size {self.size} is smaller than one block (block_size {self.block_size}); "
                "give size >= block_size or a smaller block_size"
            )


def _blocks(features: Sequence[FeatureSpec], config: RobeConfig) -> int:
    return math.ceil(max(f.embedding_dim for f in features) / config.block_size)


def _fixed_bytes(features: Sequence[FeatureSpec], config: RobeConfig) -> int:
    return PARAM_BYTES * len(features) * _blocks(features, config)


@register_method(RobeConfig)
class RobeEmbeddingBagCollection(EmbeddingModule):
    """ROBE-Z over all features (Desai et al., MLSys 2022): see the module docstring for layout and bytes.

    >>> import embtable
    >>> feats = [embtable.FeatureSpec("user", 1_000_000, 16), embtable.FeatureSpec("country", 200, 16)]
    >>> m = embtable.build(feats, RobeConfig(), budget="1/1000", seed=0)
    >>> m.config.size, embtable.memory_report(m).inference_bytes  # M floats + 2 features x 2 blocks x 48
    (15955, 64012)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123456, 7, 3]),
    ...                                           torch.tensor([2, 0, 1, 0]))
    >>> m(kjt).values().shape
    torch.Size([2, 32])
    """

    sharding_unsupported = (
        "robe keeps its one circular array as a dense parameter (a block wraps around the array's end, which "
        "row-sharded table lookups cannot serve); replicate it instead: train data-parallel (DDP), the array "
        "is the budget's size (e.g. 1/1000 of the full tables)"
    )

    def __init__(self, features: Sequence[FeatureSpec], config: RobeConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        if config.size is None:
            raise ValueError(
                "robe: size is not set; give a byte budget (build(features, RobeConfig(), budget=...)) or "
                "RobeConfig(size=...)"
            )
        self.size, self.block_size = int(config.size), int(config.block_size)
        self.num_blocks = _blocks(self.features, config)
        self.hash_fn = config.hash_fn
        rows, start = [], 0
        for f in self.features:
            rows.append([hash_coefficients(config.seed, "robe", f.name, j) + [start + j * self.block_size,
                                                                              f.embedding_dim]
                         for j in range(self.num_blocks)])
            start += f.num_embeddings * f.embedding_dim
        # [F, B, 6] int64: a0, a1, a2, b (universal hash) and base, stride (identity layout)
        self.register_buffer("block_params", torch.tensor(rows, dtype=torch.int64, device=self.device))
        # the array as an M x 1 embedding table: sparse gradients via embtable.sparse_parameters
        self.array = nn.Embedding(self.size, 1, device=self.device)
        # a hashed table of M / d rows would start uniform in +-sqrt(1 / rows) (TorchRec's default)
        bound = math.sqrt(1.0 / max(1, self.size // max(self.embedding_dims)))
        if self.device.type != "meta":
            with torch.no_grad():
                self.array.weight.uniform_(-bound, bound)

    def offsets(self, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Start offsets ``[N, B]`` in ``[0, M)`` of every block of ids ``[N]`` of features ``feature`` ``[N]``."""
        params = self.block_params[feature]  # [N, B, 6]
        if self.hash_fn == "identity":
            return (params[..., 4] + ids[:, None] * params[..., 5]) % self.size
        # one hash per block (B is a few): no reshape that ties the id count to the blocks, which a traced
        # program would have to guard (torch.export specialises an id count of 1)
        return torch.stack([universal_hash(ids, params[:, j, :4], self.size) for j in range(self.num_blocks)], dim=1)

    def embeddings(self, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Unpooled vectors ``[N, B * Z]`` (the first ``d_f`` values are feature ``f``'s embedding)."""
        window = torch.arange(self.block_size, dtype=torch.int64, device=ids.device)
        index = (self.offsets(ids, feature)[..., None] + window) % self.size  # [N, B, Z], circular
        return self.array(index).flatten(1)  # [N, B * Z * 1]

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        ids = kjt.values()
        num_features, batch = len(self.features), kjt.stride()
        width = self.num_blocks * self.block_size
        lengths = kjt.lengths()
        # from the lengths, not kjt.length_per_key() (Python ints: a host read-back a traced program avoids)
        feature = per_id(kjt, torch.arange(num_features, device=ids.device), ids.numel())
        bag = torch.repeat_interleave(torch.arange(num_features * batch, device=ids.device), lengths,
                                      output_size=ids.numel())  # (feature, sample) of every id
        vectors = self.embeddings(ids, feature)
        if self._is_weighted:
            vectors = vectors * kjt.weights()[:, None]
        elif self.pooling is Pooling.MEAN:
            vectors = vectors / lengths[bag].to(vectors.dtype)[:, None]
        out = torch.zeros(num_features * batch, width, dtype=vectors.dtype, device=ids.device)
        out = out.index_add(0, bag, vectors).view(num_features, batch, width)
        return torch.cat([out[i, :, :d] for i, d in enumerate(self.embedding_dims)], dim=1)

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """Each array value = the mean of the trained values that read it (used by ``compress``).

        Features share the array, so the means accumulate over the features initialised so far (in
        ``compress``, all of them); values no trained value reads keep their random start.
        """
        i = self.feature_names.index(name)
        d = self.embedding_dims[i]
        w = self.array.weight[:, 0]
        if not hasattr(self, "_init_sums"):
            self._init_sums, self._init_hits = torch.zeros_like(w), torch.zeros_like(w)
        for start in range(0, weight.shape[0], 1 << 16):
            ids = torch.arange(start, min(weight.shape[0], start + (1 << 16)), device=w.device)
            window = torch.arange(self.block_size, dtype=torch.int64, device=w.device)
            index = (self.offsets(ids, torch.full_like(ids, i))[..., None] + window) % self.size
            index = index.view(ids.numel(), -1)[:, :d].reshape(-1)
            self._init_sums.index_add_(0, index, weight[start:start + ids.numel()].to(w).reshape(-1))
            self._init_hits.index_add_(0, index, torch.ones_like(index, dtype=w.dtype))
        used = self._init_hits > 0
        w[used] = self._init_sums[used] / self._init_hits[used]
        return f"mean of the trained values sharing each array value ({int(used.sum()):,} of {self.size:,} read)"

    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.size is not None or budget_bytes is None:
            return config
        fixed = _fixed_bytes(features, config)
        size = min(PRIME, (budget_bytes - fixed) // FP32)
        if size < config.block_size:
            raise smallest_budget_error(
                "robe", fixed + FP32 * config.block_size, budget_bytes, features,
                f"one block of {config.block_size} floats plus the hash parameters; a smaller block_size needs less",
            )
        return dataclasses.replace(config, size=int(size))

    @classmethod
    def describe(cls, features, config):
        if config.size is None:
            raise ValueError("robe: size is not set; give a byte budget or RobeConfig(size=...)")
        blocks = _blocks(features, config)
        plans = [
            FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, 0, f.embedding_dim, PARAM_BYTES * blocks, True,
                        f"{math.ceil(f.embedding_dim / config.block_size)} block(s) of {config.block_size} "
                        "from the shared array")
            for f in features
        ]
        return plans, {"robe_array": config.size * FP32}
