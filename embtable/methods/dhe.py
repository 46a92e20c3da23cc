"""Deep Hash Embedding (Kang et al., KDD 2021, "Learning to Embed Categorical Features without Embedding
Tables for Recommendation").

A compressed feature has no table at all. Its id is hashed ``k`` times (``num_hashes``; salted universal
hashes of :mod:`embtable.hashing` into ``[0, p)``, ``p = 2**31 - 1``, exact int64 for every id), the
hashes are turned into real numbers (the dense hash encoding, computed on the fly, never stored), and an
MLP decoder maps the encoding to the embedding::

    id ──► h_1(id) .. h_k(id) in [0, p)      (k salted hashes, shared by all features)
       ──► encoding x in R^k:  uniform:   x_i = 2 * h_i / (p - 1) - 1                      in [-1, 1]
                               gaussian:  Box-Muller on pairs (u, v) = ((h_i + 1) / p, h_(i+k/2) / p):
                                          x_i = sqrt(-2 ln u) cos(2 pi v), x_(i+k/2) = sqrt(-2 ln u) sin(2 pi v)
       ──► decoder of the feature: Linear(k, h) ─ Mish ─ [Linear(h, h) ─ Mish] x (L - 1) ─ Linear(h, d)
       ──► e (dim d), then pooled per bag (sum, weighted sum, mean; empty bag = zeros)

Each compressed feature has its own decoder (as in the paper); the hash functions are shared (a decoder
only ever sees its own feature's ids). Features whose table is small keep a plain table in a TorchRec
``EmbeddingBagCollection`` child (``storage``). No BatchNorm (the paper's optional BN after each hidden
layer): outputs then depend on the id alone, never on the rest of the batch, so training and serving agree
and results are deterministic.

Cost per id: ``k`` hashes, and ``k*h + (L-1)*h**2 + h*d`` multiply-adds (dense matmuls over all ids of a
batch at once). That is far more arithmetic than a table lookup: DHE trades compute for memory.

Why ``k = 64`` by default: the paper uses ``k = 1024`` (with wide decoders) on GPUs; on CPU the first layer's
``k*h`` multiply-adds per id dominate, and ``k = 64`` keeps the encoding's distinct-id capacity
(64 values of 31 bits) while costing 16x less. Raise it where compute allows.

Memory (fp32 weights, int64 hash coefficients)::

    compressed feature:  (k*h + h + (L-1)*(h*h + h) + h*d + d) * 4 bytes      (the decoder's weights and biases)
    full feature:        n * d * 4 bytes
    shared:              k * 4 * 8 bytes (the k hashes' coefficients a0, a1, a2, b), when any feature is compressed

Budget planning: water-filling on a byte cap ``T`` per feature (as for hashing): a feature whose table fits
``T`` stays full, a larger one gets the widest decoder (``h``) that fits ``T`` (at least 1); a feature whose
narrowest decoder costs as much as its table keeps the table. What the largest feasible ``T`` leaves goes to
the largest features first (a full table if it fits, else a wider decoder). The depth ``L`` is a fixed knob.

Sharding: decoders are dense parameters (DMP replicates them and averages their gradients); only the full
features' tables are sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, register_method
from ..features import FeatureSpec
from ..hashing import PRIME, hash_coefficients, universal_hash
from ..module import EmbeddingModule, config_field_per_feature, storage_collection
from ..pooling import pooled_full_and_rows

__all__ = ["DHEConfig", "DHEEmbeddingBagCollection", "dhe_encoding", "decoder_bytes"]

ENCODINGS = ("uniform", "gaussian")
HASH_COEFFICIENT_BYTES = 4 * 8  # a0, a1, a2, b per hash, int64


@dataclasses.dataclass(frozen=True)
class DHEConfig(MethodConfig):
    """Deep Hash Embedding.

    Args:
        hidden: the decoder width ``h``: one int for all features (every feature compressed), a
            ``{feature: h}`` mapping (``0`` keeps that feature's full table), or ``None`` (planned).
        num_layers: ``L``, hidden layers of the decoder (``>= 1``).
        num_hashes: ``k``, hashes per id (the encoding's dim); even for ``"gaussian"``.
        encoding: ``"uniform"`` (in ``[-1, 1]``) or ``"gaussian"`` (Box-Muller), as in the paper.
        seed: seed of the hash salts.
    """

    method = "dhe"
    hidden: int | Mapping[str, int] | None = None
    num_layers: int = 2
    num_hashes: int = 64
    encoding: str = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"DHEConfig.encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        for name, lo in [("num_layers", 1), ("num_hashes", 1)]:
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < lo:
                raise ValueError(f"DHEConfig.{name} must be an integer >= {lo}, got {v!r}")
        if self.encoding == "gaussian" and self.num_hashes % 2:
            raise ValueError(
                f"DHEConfig: the gaussian encoding pairs hashes (Box-Muller), so num_hashes must be even, "
                f"got {self.num_hashes}"
            )
        values = self.hidden.values() if isinstance(self.hidden, Mapping) else [self.hidden]
        lowest = 0 if isinstance(self.hidden, Mapping) else 1
        for v in values:
            if v is not None and (isinstance(v, bool) or int(v) != v or v < lowest):
                raise ValueError(
                    f"DHEConfig.hidden must be an integer >= 1 (or, per feature in a mapping, >= 0 where 0 keeps "
                    f"the full table), got {v!r}"
                )


def decoder_bytes(k: int, h: int, layers: int, d: int) -> int:
    """Bytes of one decoder: ``(k*h + h + (L-1)*(h*h + h) + h*d + d) * 4``.

    >>> decoder_bytes(64, 32, 2, 16)
    14656
    """
    return (k * h + h + (layers - 1) * (h * h + h) + h * d + d) * FP32


def dhe_encoding(ids: torch.Tensor, coefficients: torch.Tensor, encoding: str) -> torch.Tensor:
    """The dense hash encoding ``[N, k]`` (fp32) of int64 ``ids`` ``[N]`` for hash coefficients ``[k, 4]``.

    >>> c = torch.tensor([hash_coefficients(0, "dhe", i) for i in range(4)])
    >>> x = dhe_encoding(torch.tensor([0, 1, 2**40]), c, "uniform")
    >>> tuple(x.shape), bool((x.abs() <= 1).all())
    ((3, 4), True)
    """
    hashed = universal_hash(ids.unsqueeze(1), coefficients, PRIME).to(torch.float64)  # [N, k] in [0, p)
    if encoding == "uniform":
        return (hashed * (2.0 / (PRIME - 1)) - 1.0).to(torch.float32)
    half = hashed.size(1) // 2
    u = (hashed[:, :half] + 1.0) / PRIME  # (0, 1]: the log is finite
    v = hashed[:, half:] / PRIME
    radius = torch.sqrt(-2.0 * torch.log(u))
    angle = (2.0 * math.pi) * v
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1).to(torch.float32)


def _widths(features: Sequence[FeatureSpec], config: DHEConfig) -> list[int]:
    per = config_field_per_feature(config.hidden, features, "hidden", "dhe")
    if per is None:
        raise ValueError(
            "dhe: hidden is not set; give a byte budget (build(features, DHEConfig(), budget=...)) "
            "or DHEConfig(hidden=...)"
        )
    return [int(per[f.name]) for f in features]


def _decoder(k: int, h: int, layers: int, d: int, device: torch.device | None) -> nn.Sequential:
    parts: list[nn.Module] = [nn.Linear(k, h, device=device), nn.Mish()]
    for _ in range(layers - 1):
        parts += [nn.Linear(h, h, device=device), nn.Mish()]
    parts.append(nn.Linear(h, d, device=device))
    return nn.Sequential(*parts)


@register_method(DHEConfig)
class DHEEmbeddingBagCollection(EmbeddingModule):
    """DHE: compressed features decoded from hash encodings by MLPs (``decoders``), the others as plain
    tables in a TorchRec ``EmbeddingBagCollection`` (``storage``, ``None`` when every feature is compressed).

    Args:
        features, config, pooling, is_weighted, out_of_range, device: see :class:`embtable.EmbeddingModule`.

    Shape:
        input: ``KeyedJaggedTensor`` with the features' keys; output: ``KeyedTensor`` ``[B, sum(d_f)]``.

    Example:
        >>> import embtable
        >>> feats = [embtable.FeatureSpec("user", 1_000_000, 16), embtable.FeatureSpec("country", 200, 16)]
        >>> m = embtable.build(feats, DHEConfig(), budget="1/1000", seed=0)
        >>> m.config.hidden
        {'user': 77, 'country': 0}
        >>> embtable.memory_report(m).inference_bytes == decoder_bytes(64, 77, 2, 16) + 64 * 32 + 200 * 16 * 4
        True
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123456, 7, 3]),
        ...                                           torch.tensor([2, 0, 1, 0]))
        >>> m(kjt).values().shape
        torch.Size([2, 32])
    """

    def __init__(self, features: Sequence[FeatureSpec], config: DHEConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        widths = _widths(self.features, config)
        self.full = [j for j, h in enumerate(widths) if h == 0]
        self.compressed = [j for j, h in enumerate(widths) if h > 0]
        self.full_names = [self.feature_names[j] for j in self.full]
        k = config.num_hashes
        coefficients = [hash_coefficients(config.seed, "dhe", i) for i in range(k)] if self.compressed else None
        # [k, 4] int64: the salts of the k hashes (the server needs them)
        self.register_buffer("hash_coefficients", None if coefficients is None else
                             torch.tensor(coefficients, dtype=torch.int64, device=self.device))
        self.decoders = nn.ModuleList(
            _decoder(k, widths[j], config.num_layers, self.features[j].embedding_dim, self.device)
            for j in self.compressed
        )
        self.storage = storage_collection(
            [(self.features[j].name, self.features[j].num_embeddings, self.features[j].embedding_dim,
              [self.features[j].name]) for j in self.full],
            self.pooling, self._is_weighted, self.device,
        ) if self.full else None

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return pooled_full_and_rows(self, kjt, [functools.partial(self._decode, d) for d in self.decoders])

    def _decode(self, decoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return decoder(dhe_encoding(ids, self.hash_coefficients, self.config.encoding))  # [N, k] -> [N, d]

    # ----- planning -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.hidden is not None or budget_bytes is None:
            return config
        k, layers = config.num_hashes, config.num_layers
        full = [f.full_table_bytes for f in features]
        hash_bytes = k * HASH_COEFFICIENT_BYTES
        if sum(full) <= budget_bytes:
            return dataclasses.replace(config, hidden={f.name: 0 for f in features})

        def mlp(j: int, h: int) -> int:
            return decoder_bytes(k, h, layers, features[j].embedding_dim)

        top = []  # a width at which each feature's decoder costs at least its table
        for j in range(len(features)):
            h = 1
            while mlp(j, h) < full[j]:
                h *= 2
            top.append(h)

        def cost(j: int, cap: int) -> tuple[int, int]:
            """(width, bytes) of feature j under a cap of ``cap`` bytes per feature (width 0 = full table)."""
            if full[j] <= cap or mlp(j, 1) >= full[j]:
                return 0, full[j]
            h = largest_feasible(lambda x: mlp(j, x), cap, 1, top[j]) or 1
            return h, mlp(j, h)

        def total(cap: int) -> int:
            chosen = [cost(j, cap) for j in range(len(features))]
            return sum(b for _, b in chosen) + (hash_bytes if any(h for h, _ in chosen) else 0)

        cap = largest_feasible(total, budget_bytes, 0, max(full))
        if cap is None:
            raise smallest_budget_error("dhe", total(0), budget_bytes, features,
                                        "width-1 decoders for every feature whose table is larger, and the hashes")
        chosen = [cost(j, cap) for j in range(len(features))]
        left = budget_bytes - total(cap)
        for j in sorted(range(len(features)), key=lambda j: -features[j].num_embeddings):
            h, nbytes = chosen[j]
            if h == 0 or left <= 0:
                continue
            if full[j] - nbytes <= left:
                new = (0, full[j])
            else:
                best = largest_feasible(lambda x, j=j: mlp(j, x), nbytes + left, h, top[j])
                new = (best, mlp(j, best))
            left -= new[1] - nbytes
            chosen[j] = new
        return dataclasses.replace(config, hidden={f.name: h for f, (h, _) in zip(features, chosen)})

    @classmethod
    def describe(cls, features, config):
        plans = []
        k, layers = config.num_hashes, config.num_layers
        widths = _widths(features, config)
        for f, h in zip(features, widths):
            if h == 0:
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings,
                                         f.embedding_dim, f.full_table_bytes, False, "full table"))
            else:
                plans.append(FeaturePlan(
                    f.name, f.num_embeddings, f.embedding_dim, 0, f.embedding_dim,
                    decoder_bytes(k, h, layers, f.embedding_dim), True,
                    f"decoder {k}->{h}" + f"->{h}" * (layers - 1) + f"->{f.embedding_dim}, {config.encoding} encoding",
                ))
        shared = {"dhe_hashes": k * HASH_COEFFICIENT_BYTES} if any(widths) else {}
        return plans, shared
