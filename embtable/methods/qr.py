"""Compositional embeddings from complementary partitions (Shi et al., KDD 2020, "Compositional Embeddings
Using Complementary Partitions for Memory-Efficient Recommendation Systems").

A compressed feature writes each id in a mixed radix with ``k`` digits (``k = num_partitions``,
``m = num_collisions``)::

    id = p0 + m * p1 + m**2 * p2 + ... + m**(k-1) * p(k-1)
    p_i = (id // m**i) % m   for i < k - 1          p(k-1) = id // m**(k-1)   (the top digit: no modulo)

For ``k = 2`` this is the quotient-remainder trick: ``p0 = id % m`` (remainder), ``p1 = id // m`` (quotient).
The digits are computed with integer ``//`` and ``%`` on int64 (exact for every id, also above 2**24 and
2**32), and every id below ``num_embeddings`` gets its own digit tuple (the partitions are complementary).
Digit ``i`` indexes its own table; the ``k`` looked-up vectors are combined::

    ids of "user" ──► digits p0, p1 ──► rows of tables user__p0 [m x d], user__p1 [ceil(n/m) x d]
                                        └──────────── multiply (default):  v = e0 ⊙ e1        (dim d)
                                                      add:                 v = e0 + e1        (dim d)
                                                      concat:              v = [e0 | e1]      (dims d0 + d1 = d)

With ``concat`` the dim ``d`` is split over the partitions: ``d_i = d // k``, plus one for the first
``d % k`` partitions (so ``d >= k`` is needed). A feature with ``num_collisions >= num_embeddings`` (and every
feature when ``num_partitions = 1``) keeps its plain ``n x d`` table with the identity mapping.

Bags with several ids. ``bag_mode="pool_then_combine"`` (default, cheaper: the DLRM reference's choice)
pools each partition's vectors with a TorchRec ``EmbeddingBagCollection`` and combines the pooled vectors;
``bag_mode="combine_then_pool"`` (exact) looks the rows up unpooled with an ``EmbeddingCollection``,
combines them per id and then pools (sum or mean, per-id weights applied once). The two agree when every
bag holds one id, and for every bag with ``add`` and ``concat`` (both are linear, so pooling commutes with
them: these combiners always use the pooled lookups). They differ for ``multiply`` with several ids per bag:
``(e0_a + e0_b) ⊙ (e1_a + e1_b)`` versus ``e0_a ⊙ e1_a + e0_b ⊙ e1_b``. With per-id weights and ``multiply``,
the pooled path weights only partition 0, so a one-id bag gives ``w * (e0 ⊙ e1)`` in both modes.

Memory (fp32, no buffers: the digits are computed from Python ints per call)::

    compressed feature:  sum_i rows_i * d_i * 4 bytes,
                         rows_i = min(m, ceil(n / m**i)) for i < k - 1,  rows_(k-1) = ceil(n / m**(k-1)),
                         d_i = d (multiply, add) or the split of d (concat)
                         k = 2, multiply: (m + ceil(n / m)) * d * 4
    full feature:        n * d * 4

Budget planning: water-filling on a cap ``T`` in rows of the feature's dim (as for hashing): a feature with
``n <= T`` stays full, a larger one gets the largest ``m`` whose tables take at most ``T * d * 4`` bytes
(at least the ``m`` that minimises its bytes, ``m = ceil(n ** (1/k))``); what is left after the largest
feasible ``T`` is handed out greedily, largest features first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, BudgetError, FeaturePlan, largest_feasible
from ..config import MethodConfig, Pooling, register_method
from ..features import FeatureSpec
from ..module import EmbeddingModule, config_field_per_feature, storage_collection, storage_values

__all__ = ["QRConfig", "QREmbeddingBagCollection", "QRIdMapper", "qr_digits", "partition_rows", "partition_dims"]

COMBINERS = ("multiply", "add", "concat")
BAG_MODES = ("pool_then_combine", "combine_then_pool")


@dataclasses.dataclass(frozen=True)
class QRConfig(MethodConfig):
    """Compositional (quotient-remainder) embeddings.

    Args:
        num_collisions: the radix ``m`` (rows of the remainder table; each quotient row is shared by ``m``
            ids): one int for all features, a ``{feature: m}`` mapping, or ``None`` to let the planner pick
            ``m`` per feature from the budget. ``m >= num_embeddings`` keeps the feature's full table.
        num_partitions: ``k``, the number of complementary partitions (digits); 2 is the quotient-remainder
            trick, 1 is the plain table for every feature.
        combiner: ``"multiply"`` (element-wise product, the paper's default), ``"add"`` or ``"concat"``.
        bag_mode: ``"pool_then_combine"`` (cheaper) or ``"combine_then_pool"`` (exact for multi-id bags
            with ``multiply``; see the module docstring for when they agree).
    """

    method = "qr"
    num_collisions: int | Mapping[str, int] | None = None
    num_partitions: int = 2
    combiner: str = "multiply"
    bag_mode: str = "pool_then_combine"

    def __post_init__(self) -> None:
        if self.combiner not in COMBINERS:
            raise ValueError(f"QRConfig.combiner must be one of {COMBINERS}, got {self.combiner!r}")
        if self.bag_mode not in BAG_MODES:
            raise ValueError(f"QRConfig.bag_mode must be one of {BAG_MODES}, got {self.bag_mode!r}")
        if isinstance(self.num_partitions, bool) or int(self.num_partitions) != self.num_partitions or not (
            1 <= self.num_partitions <= 8
        ):
            raise ValueError(
                f"QRConfig.num_partitions must be an integer in [1, 8] (2 = quotient-remainder), "
                f"got {self.num_partitions!r}"
            )
        values = self.num_collisions.values() if isinstance(self.num_collisions, Mapping) else [self.num_collisions]
        for v in values:
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 2):
                raise ValueError(
                    f"QRConfig.num_collisions must be integers >= 2 (the radix m; m >= num_embeddings keeps a "
                    f"feature's full table), got {v!r}"
                )


# ----- pure integer helpers (planning and the mapper share them) -----
def partition_rows(n: int, m: int, k: int) -> list[int]:
    """Rows of each partition's table for ``n`` ids, radix ``m`` and ``k`` partitions (digit 0 first).

    >>> partition_rows(1000, 32, 2)
    [32, 32]
    >>> partition_rows(1000, 10, 3)
    [10, 10, 10]
    >>> partition_rows(1000, 500, 3)  # m**2 > n: the middle digit only takes ceil(1000/500) values
    [500, 2, 1]
    """
    rows, remaining = [], n  # remaining = ceil(n / m**i): the number of values id // m**i takes
    for _ in range(k - 1):
        rows.append(min(m, remaining))
        remaining = -(-remaining // m)
    rows.append(remaining)
    return rows


def partition_dims(d: int, k: int, combiner: str) -> list[int]:
    """Dim of each partition's table: ``d`` for multiply/add, ``d`` split into ``k`` parts for concat.

    >>> partition_dims(16, 3, "concat"), partition_dims(16, 3, "multiply")
    ([6, 5, 5], [16, 16, 16])
    """
    if combiner != "concat":
        return [d] * k
    return [d // k + (1 if i < d % k else 0) for i in range(k)]


def _min_radix(n: int, k: int) -> int:
    """The smallest ``m >= 2`` with ``m**k >= n`` (about the ``m`` that minimises the rows)."""
    m = max(2, int(round(n ** (1.0 / k))))
    while m > 2 and (m - 1) ** k >= n:
        m -= 1
    while m**k < n:
        m += 1
    return m


def _compressed_bytes(f: FeatureSpec, m: int, k: int, combiner: str) -> int:
    rows = partition_rows(f.num_embeddings, m, k)
    return sum(r * d for r, d in zip(rows, partition_dims(f.embedding_dim, k, combiner))) * FP32


def qr_digits(ids: torch.Tensor, radix: torch.Tensor | int, num_partitions: int) -> torch.Tensor:
    """The mixed-radix digits of non-negative int64 ids, digit 0 (the remainder) first.

    Integer ``//`` and ``%`` only, one division per digit (no power of ``m`` is formed, so nothing overflows).

    Args:
        ids: int64 ``[N]``.
        radix: ``m``, an int or an int64 tensor ``[N]`` (one radix per id).
        num_partitions: ``k``.

    Returns:
        int64 ``[k, N]``.

    >>> qr_digits(torch.tensor([0, 7, 2**33 + 5]), 1000, 2).tolist()
    [[0, 7, 597], [0, 0, 8589934]]
    """
    digits, rest = [], ids
    for _ in range(num_partitions - 1):
        digits.append(torch.remainder(rest, radix))
        rest = torch.div(rest, radix, rounding_mode="floor")
    digits.append(rest)
    return torch.stack(digits)


def _segment_index(starts: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """``cat([arange(s, s + l) for s, l in zip(starts, lengths)])`` without a Python loop over ids."""
    total = sum(lengths)
    out_starts = [0]
    for length in lengths[:-1]:
        out_starts.append(out_starts[-1] + length)
    shift = torch.tensor([s - o for s, o in zip(starts, out_starts)], dtype=torch.int64, device=device)
    return torch.repeat_interleave(
        shift, torch.tensor(lengths, dtype=torch.int64, device=device), output_size=total
    ) + torch.arange(total, device=device)


def table_name(feature: str, partition: int, compressed: bool) -> str:
    """The storage table (and KJT key) of one partition: ``"user__p0"``, ...; a full feature keeps its name."""
    return f"{feature}__p{partition}" if compressed else feature


class QRIdMapper(nn.Module):
    """Maps a KJT of logical ids to a KJT of digits, one key per (feature, partition) table.

    Output keys are partition-major (``a__p0, b, c__p0, a__p1, c__p1``: the pooled vectors of partition 0 of
    all features come first, then partition 1 of the compressed ones, ...) or feature-major
    (``a__p0, a__p1, b, c__p0, c__p1``: pooled output is already the concatenation). Holds no tensors.

    Args:
        features: the stored features.
        radices: ``m`` per feature, ``None`` for a full feature.
        num_partitions: ``k``.
        feature_major: key order (see above).
        unit_weights_after_first: give partitions ``>= 1`` weight 1 (multiply: the bag's weight applies once).
    """

    def __init__(self, features: Sequence[FeatureSpec], radices: Sequence[int | None], num_partitions: int,
                 feature_major: bool, unit_weights_after_first: bool) -> None:
        super().__init__()
        self.num_partitions = num_partitions
        # a full feature uses radix n: its digit 0 is id % n = id, and it has no other partition
        self.radix = [f.num_embeddings if m is None else m for f, m in zip(features, radices)]
        parts = [1 if m is None else num_partitions for m in radices]
        if feature_major:
            self.keys = [(j, i) for j in range(len(features)) for i in range(parts[j])]
        else:
            self.keys = [(j, i) for i in range(num_partitions) for j in range(len(features)) if i < parts[j]]
        self.key_names = [table_name(features[j].name, i, radices[j] is not None) for j, i in self.keys]
        self.identity = self.keys == [(j, 0) for j in range(len(features))]
        self.unit_weights_after_first = unit_weights_after_first

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values, device = kjt.values(), kjt.values().device
        n_values, batch = values.numel(), kjt.stride()
        per_key = kjt.length_per_key()
        radix = torch.repeat_interleave(
            torch.tensor(self.radix, dtype=torch.int64, device=device),
            torch.tensor(per_key, dtype=torch.int64, device=device), output_size=n_values,
        )
        digits = qr_digits(values, radix, self.num_partitions if not self.identity else 1)  # [k, N]
        weights = kjt.weights_or_none()
        lengths = kjt.lengths().view(len(self.radix), batch)  # [F, B]
        if self.identity:
            return self._kjt(digits[0], weights, lengths.flatten(), per_key, batch)
        offsets = [0]
        for length in per_key[:-1]:
            offsets.append(offsets[-1] + length)
        new_per_key = [per_key[j] for j, _ in self.keys]
        index = _segment_index([i * n_values + offsets[j] for j, i in self.keys], new_per_key, device)
        new_values = digits.flatten()[index]
        new_weights = None
        if weights is not None:
            new_weights = weights[index % max(n_values, 1)]
            if self.unit_weights_after_first:
                new_weights = torch.where(index < n_values, new_weights, torch.ones_like(new_weights))
        rows = torch.tensor([j for j, _ in self.keys], dtype=torch.int64, device=device)
        return self._kjt(new_values, new_weights, lengths[rows].flatten(), new_per_key, batch)

    def _kjt(self, values, weights, lengths, per_key, batch) -> KeyedJaggedTensor:
        offset_per_key = [0]
        for length in per_key:
            offset_per_key.append(offset_per_key[-1] + length)
        return KeyedJaggedTensor(keys=self.key_names, values=values, weights=weights, lengths=lengths,
                                 stride=batch, length_per_key=per_key, offset_per_key=offset_per_key)

    def extra_repr(self) -> str:
        return f"num_partitions={self.num_partitions}, keys={len(self.keys)}"


def _collisions(features: Sequence[FeatureSpec], config: QRConfig) -> list[int | None]:
    """``m`` per feature, ``None`` where the feature keeps its full table."""
    if config.num_partitions == 1:
        return [None] * len(features)
    per_feature = config_field_per_feature(config.num_collisions, features, "num_collisions", "qr")
    if per_feature is None:
        raise ValueError(
            "qr: num_collisions is not set; give a byte budget (build(features, QRConfig(), budget=...)) "
            "or QRConfig(num_collisions=...)"
        )
    out = []
    for f in features:
        m = int(per_feature[f.name])
        out.append(None if m >= f.num_embeddings else m)
    return out


def _check(features: Sequence[FeatureSpec], config: QRConfig, radices: Sequence[int | None]) -> None:
    k = config.num_partitions
    for f, m in zip(features, radices):
        if m is not None and config.combiner == "concat" and f.embedding_dim < k:
            raise ValueError(
                f"qr: feature {f.name!r} has embedding_dim {f.embedding_dim}, too small to concatenate "
                f"{k} partitions (each needs a dim of at least 1); use combiner='multiply' or 'add', or fewer "
                "num_partitions"
            )
    dims = {f.embedding_dim for f in features}
    if _exact(config) and len(dims) > 1:
        raise ValueError(
            f"qr: bag_mode='combine_then_pool' looks rows up in one TorchRec EmbeddingCollection, which needs "
            f"one embedding_dim for all features; got dims {sorted(dims)}. Use bag_mode='pool_then_combine' "
            "(identical for one-id bags) or build one module per dim"
        )


def _exact(config: QRConfig) -> bool:
    # add and concat commute with pooling: their exact mode is the pooled computation
    return config.bag_mode == "combine_then_pool" and config.combiner == "multiply" and config.num_partitions > 1


@register_method(QRConfig)
class QREmbeddingBagCollection(EmbeddingModule):
    """Compositional embeddings: per-feature partition tables in one TorchRec collection, combined per feature.

    Args:
        features, config, pooling, is_weighted, out_of_range, device: see :class:`embtable.EmbeddingModule`.

    Shape:
        input: ``KeyedJaggedTensor`` with the features' keys; output: ``KeyedTensor`` ``[B, sum(d_f)]``.

    Example:
        >>> import embtable
        >>> feats = [embtable.FeatureSpec("user", 1_000_000, 16), embtable.FeatureSpec("country", 200, 16)]
        >>> m = embtable.build(feats, QRConfig(), budget="1/100", seed=0)
        >>> m.config.num_collisions
        {'user': 9698, 'country': 200}
        >>> [(t.name, t.num_embeddings) for t in m.storage.embedding_bag_configs()]
        [('user__p0', 9698), ('country', 200), ('user__p1', 104)]
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123456, 7, 3]),
        ...                                           torch.tensor([2, 0, 1, 0]))
        >>> m(kjt).values().shape
        torch.Size([2, 32])
        >>> embtable.memory_report(m).inference_bytes == (9698 + 104 + 200) * 16 * 4
        True
    """

    def __init__(self, features: Sequence[FeatureSpec], config: QRConfig, **kwargs) -> None:
        super().__init__(features, config, **kwargs)
        radices = _collisions(self.features, config)
        _check(self.features, config, radices)
        k = config.num_partitions
        self.exact = _exact(config)
        self.radices = radices
        self.mapper = QRIdMapper(
            self.features, radices, k,
            feature_major=config.combiner == "concat",
            unit_weights_after_first=config.combiner == "multiply",
        )
        by_name = {}
        for f, m in zip(self.features, radices):
            if m is None:
                by_name[f.name] = (f.num_embeddings, f.embedding_dim)
            else:
                dims = partition_dims(f.embedding_dim, k, config.combiner)
                for i, (rows, dim) in enumerate(zip(partition_rows(f.num_embeddings, m, k), dims)):
                    by_name[table_name(f.name, i, True)] = (rows, dim)
        tables = [(name, *by_name[name], [name]) for name in self.mapper.key_names]
        if self.exact:
            self.storage = EmbeddingCollection(
                tables=[EmbeddingConfig(name=name, num_embeddings=rows, embedding_dim=dim, feature_names=names)
                        for name, rows, dim, names in tables],
                device=self.device,
            )
        else:
            self.storage = storage_collection(tables, self.pooling, self._is_weighted, self.device)
        self.compressed = [m is not None for m in radices]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every table so the combined vector has the scale of a full table's row.

        A full ``n``-row table starts at ``U(-s, s)``, ``s = sqrt(1/n)`` (TorchRec's default). For
        ``multiply``, every partition starts at ``U(-a, a)`` with ``(a**2 / 3) ** k = s**2 / 3``: the product
        of ``k`` independent factors then has the full row's variance, all factors get gradients of the
        same scale (none starts near 0, which would stall the others), and ids sharing a quotient differ
        from the first step. For ``add``, ``a = s / sqrt(k)`` (the sum has the full variance); for
        ``concat`` each part is a slice of a full row, ``a = s``.
        """
        if self.device.type == "meta":
            return
        k = self.config.num_partitions
        weights = self._table_weights()
        for f, m in zip(self.features, self.radices):
            s = math.sqrt(1.0 / f.num_embeddings)
            if m is None:
                weights[f.name].uniform_(-s, s)
                continue
            if self.config.combiner == "multiply":
                a = math.sqrt(3.0 * (s * s / 3.0) ** (1.0 / k))
            elif self.config.combiner == "add":
                a = s / math.sqrt(k)
            else:
                a = s
            for i in range(k):
                weights[table_name(f.name, i, True)].uniform_(-a, a)

    def _table_weights(self) -> dict[str, torch.Tensor]:
        tables = self.storage.embeddings if self.exact else self.storage.embedding_bags
        return {name: module.weight for name, module in tables.items()}

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        digits = self.mapper(kjt)
        if self.exact:
            return self._combine_then_pool(kjt, digits)
        pooled = storage_values(self.storage(digits), self.mapper.key_names)  # [B, sum of table dims], in the mapper's key order
        if self.config.combiner == "concat" or not any(self.compressed):
            return pooled
        # partition-major: [all features' partition 0 | compressed features' partition 1 | ...]
        width = sum(self.embedding_dims)
        width_c = sum(d for d, c in zip(self.embedding_dims, self.compressed) if c)
        first, rest = pooled[:, :width], pooled[:, width:].unflatten(1, (-1, width_c))  # [B, D], [B, k-1, D_c]
        other = rest.prod(1) if self.config.combiner == "multiply" else rest.sum(1)  # [B, D_c]
        if all(self.compressed):
            return first * other if self.config.combiner == "multiply" else first + other
        starts, lengths, at = [], [], 0  # the columns of the compressed features
        for d, c in zip(self.embedding_dims, self.compressed):
            if c:
                starts.append(at)
                lengths.append(d)
            at += d
        columns = _segment_index(starts, lengths, first.device)
        part = first.index_select(1, columns)
        part = part * other if self.config.combiner == "multiply" else part + other
        return first.index_copy(1, columns, part)

    def _combine_then_pool(self, kjt: KeyedJaggedTensor, digits: KeyedJaggedTensor) -> torch.Tensor:
        """Exact multiply: combine the unpooled rows per id, then weight and pool per bag."""
        lookups = self.storage(digits)
        rows = torch.cat([lookups[name].values() for name in self.mapper.key_names])  # [N + (k-1) N_c, D]
        per_key = kjt.length_per_key()
        n_values = sum(per_key)
        first = rows[:n_values]
        if any(self.compressed):
            n_c = sum(n for n, c in zip(per_key, self.compressed) if c)
            rest = rows[n_values:].unflatten(0, (-1, n_c))  # [k-1, N_c, D]
            other = rest.prod(0)
            if all(self.compressed):
                first = first * other
            else:
                starts, lengths, at = [], [], 0  # the positions of the compressed features' ids
                for n, c in zip(per_key, self.compressed):
                    if c:
                        starts.append(at)
                        lengths.append(n)
                    at += n
                index = _segment_index(starts, lengths, first.device)
                first = first.index_copy(0, index, first.index_select(0, index) * other)
        weights = kjt.weights_or_none()
        if self._is_weighted and weights is not None:
            first = first * weights.unsqueeze(1)
        lengths = kjt.lengths().to(torch.int64)
        num_bags, dim = lengths.numel(), first.size(1)
        bag = torch.repeat_interleave(torch.arange(num_bags, device=first.device), lengths, output_size=n_values)
        pooled = torch.zeros(num_bags, dim, dtype=first.dtype, device=first.device).index_add(0, bag, first)
        if self.pooling is Pooling.MEAN:
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        return pooled.view(len(self.features), kjt.stride(), dim).transpose(0, 1).reshape(kjt.stride(), -1)

    # ----- planning -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.num_partitions == 1:
            full = sum(f.full_table_bytes for f in features)
            if budget_bytes is not None and full > budget_bytes:
                raise BudgetError(
                    f"qr: num_partitions=1 keeps the full tables ({full:,} bytes), over the budget of "
                    f"{budget_bytes:,}; use num_partitions >= 2"
                )
            return config
        if config.num_collisions is not None or budget_bytes is None:
            return config
        k, combiner = config.num_partitions, config.combiner
        # the m with the fewest bytes; None where even that is no smaller than the full table
        lowest = {}
        for f in features:
            m = _min_radix(f.num_embeddings, k)
            small = m < f.num_embeddings and _compressed_bytes(f, m, k, combiner) < f.full_table_bytes
            lowest[f.name] = m if small else None

        def feature_bytes(f: FeatureSpec, cap: int) -> tuple[int, int]:
            """(m, bytes) of feature ``f`` under a cap of ``cap`` rows of its dim; m = n means full."""
            if f.num_embeddings <= cap or lowest[f.name] is None:
                return f.num_embeddings, f.full_table_bytes
            limit = cap * f.embedding_dim * FP32
            m = largest_feasible(lambda r: _compressed_bytes(f, r, k, combiner), limit,
                                 lowest[f.name], f.num_embeddings - 1)
            m = lowest[f.name] if m is None else m
            return m, _compressed_bytes(f, m, k, combiner)

        def total(cap: int) -> int:
            return sum(feature_bytes(f, cap)[1] for f in features)

        cap = largest_feasible(total, budget_bytes, 1, max(f.num_embeddings for f in features))
        if cap is None:
            raise BudgetError(
                f"qr: even the smallest tables ({k} partitions of about n**(1/{k}) rows each) need "
                f"{total(1):,} bytes, over the budget of {budget_bytes:,}; raise the budget, or use more "
                "num_partitions"
            )
        chosen = {f.name: feature_bytes(f, cap) for f in features}
        left = budget_bytes - sum(b for _, b in chosen.values())
        # hand what the cap leaves out to the largest features first (greedy: m grows while it fits)
        for f in sorted(features, key=lambda f: -f.num_embeddings):
            m, nbytes = chosen[f.name]
            if m >= f.num_embeddings or left <= 0:
                continue
            if f.full_table_bytes - nbytes <= left:
                new = (f.num_embeddings, f.full_table_bytes)
            else:
                new_m = largest_feasible(lambda r, f=f: _compressed_bytes(f, r, k, combiner), nbytes + left,
                                         m, f.num_embeddings - 1)
                new = (new_m, _compressed_bytes(f, new_m, k, combiner))
            left -= new[1] - nbytes
            chosen[f.name] = new
        return dataclasses.replace(config, num_collisions={f.name: chosen[f.name][0] for f in features})

    @classmethod
    def describe(cls, features, config):
        radices = _collisions(features, config)
        _check(features, config, radices)
        k = config.num_partitions
        plans = []
        for f, m in zip(features, radices):
            if m is None:
                plans.append(FeaturePlan(f.name, f.num_embeddings, f.embedding_dim, f.num_embeddings,
                                         f.embedding_dim, f.full_table_bytes, False, "identity"))
                continue
            rows = partition_rows(f.num_embeddings, m, k)
            plans.append(FeaturePlan(
                f.name, f.num_embeddings, f.embedding_dim, sum(rows), f.embedding_dim,
                _compressed_bytes(f, m, k, config.combiner), True,
                f"{k} partitions, m={m:,}, rows {rows}, {config.combiner}",
            ))
        return plans, {}
