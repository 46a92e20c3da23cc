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

    ids of "user" ──► digits p0, p1 ──► e0 = row p0 of its [m x d] table, e1 = row p1 of its [ceil(n/m) x d] table
                                        └──────────── multiply (default):  v = e0 ⊙ e1        (dim d)
                                                      add:                 v = e0 + e1        (dim d)
                                                      concat:              v = [e0 | e1]      (dims d0 + d1 = d)

    storage: partition i of all compressed features of one dim is ONE stacked TorchRec table,
             p0 = [user's m rows | item's m' rows | ...]; the mapper adds each feature's first row

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
feasible ``T`` is handed out greedily, largest features first.  With ``concat`` a compressed feature never takes more than
about ``n * d_0 * 4`` bytes (its radix table at dim ``d_0 ~ d/k``) and the next size up is the full table,
so a budget in between is not filled.

The number of partitions: with ``num_partitions=None`` (the default) the planner takes the smallest ``k``
from 2 to 8 whose smallest tables fit the budget, so very small budgets (1/1000 and below) still plan: at
``k = 2`` a feature needs at least ``2 * sqrt(n)`` rows, at ``k`` about ``k * n**(1/k)``. An unreachable
budget raises :class:`embtable.BudgetError` naming the smallest budget any ``k`` can meet.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..budget import FP32, BudgetError, FeaturePlan, largest_feasible, smallest_budget_error
from ..config import MethodConfig, Pooling, register_method
from ..features import FeatureSpec
from ..module import EmbeddingModule, config_field_per_feature, storage_collection, storage_values

__all__ = ["QRConfig", "QREmbeddingBagCollection", "QRIdMapper", "qr_digits", "partition_rows", "partition_dims"]

COMBINERS = ("multiply", "add", "concat")
BAG_MODES = ("pool_then_combine", "combine_then_pool")
MAX_PARTITIONS = 8
_INIT_CHUNK = 1 << 20  # ids per step when fitting the partitions to a trained table


@dataclasses.dataclass(frozen=True)
class QRConfig(MethodConfig):
    """Compositional (quotient-remainder) embeddings.

    Args:
        num_collisions: the radix ``m`` (rows of the remainder table; each quotient row is shared by ``m``
            ids): one int for all features, a ``{feature: m}`` mapping, or ``None`` to let the planner pick
            ``m`` per feature from the budget. ``m >= num_embeddings`` keeps the feature's full table.
        num_partitions: ``k``, the number of complementary partitions (digits); 2 is the quotient-remainder
            trick, 1 is the plain table for every feature. ``None`` (default): chosen by the planner, the
            smallest ``k >= 2`` (up to 8) whose tables fit the budget (2 whenever the budget allows it;
            2 when ``num_collisions`` is given or there is no budget).
        combiner: ``"multiply"`` (element-wise product, the paper's default), ``"add"`` or ``"concat"``.
        bag_mode: ``"pool_then_combine"`` (cheaper) or ``"combine_then_pool"`` (exact for multi-id bags
            with ``multiply``; see the module docstring for when they agree).
    """

    method = "qr"
    num_collisions: int | Mapping[str, int] | None = None
    num_partitions: int | None = None
    combiner: str = "multiply"
    bag_mode: str = "pool_then_combine"

    def __post_init__(self) -> None:
        if self.combiner not in COMBINERS:
            raise ValueError(f"QRConfig.combiner must be one of {COMBINERS}, got {self.combiner!r}")
        if self.bag_mode not in BAG_MODES:
            raise ValueError(f"QRConfig.bag_mode must be one of {BAG_MODES}, got {self.bag_mode!r}")
        if self.num_partitions is not None and (
            isinstance(self.num_partitions, bool) or int(self.num_partitions) != self.num_partitions
            or not (1 <= self.num_partitions <= MAX_PARTITIONS)
        ):
            raise ValueError(
                f"QRConfig.num_partitions must be an integer in [1, {MAX_PARTITIONS}] (2 = quotient-remainder), "
                f"or None to let the planner choose it; got {self.num_partitions!r}"
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
    return _table_bytes(f.num_embeddings, f.embedding_dim, m, k, combiner)


@functools.lru_cache(maxsize=2**16)
def _table_bytes(n: int, d: int, m: int, k: int, combiner: str) -> int:
    # cached: the planner's nested searches (a cap per feature, m per cap, k per budget) revisit the same m
    rows = partition_rows(n, m, k)
    if combiner != "concat":
        return sum(rows) * d * FP32
    return sum(r * dim for r, dim in zip(rows, partition_dims(d, k, combiner))) * FP32


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


@dataclasses.dataclass(frozen=True)
class _Group:
    """The compressed features of one dim, stacked: partition ``i`` of all of them is one table."""

    dim: int
    features: list[int]  # indices into the module's features, in feature order
    radices: list[int]
    row_offsets: list[list[int]]  # row_offsets[i][g]: first row of feature g in the partition-i table
    rows: list[int]  # rows of each partition table
    dims: list[int]  # dim of each partition table


def _groups(features: Sequence[FeatureSpec], radices: Sequence[int | None], k: int, combiner: str) -> list[_Group]:
    groups = []
    for dim in sorted({f.embedding_dim for f, m in zip(features, radices) if m is not None}):
        members = [j for j, (f, m) in enumerate(zip(features, radices)) if m is not None and f.embedding_dim == dim]
        offsets, rows = [[] for _ in range(k)], [0] * k
        for j in members:
            for i, r in enumerate(partition_rows(features[j].num_embeddings, radices[j], k)):
                offsets[i].append(rows[i])
                rows[i] += r
        groups.append(_Group(dim, members, [radices[j] for j in members], offsets, rows,
                             partition_dims(dim, k, combiner)))
    return groups


class QRIdMapper(nn.Module):
    """Maps a KJT of logical ids to the KJTs the storage reads: the full features' ids unchanged, and per dim
    group of compressed features one KJT of stacked digits.

    A group's KJT has keys ``p0 .. p(k-1)`` (one per partition table) and ``G * B`` bags (``G`` features
    of the group, feature-major): bag ``g * B + b`` of key ``p_i`` holds digit ``i`` of the ids of
    feature ``g`` in sample ``b``, shifted by the first row of feature ``g`` in the stacked table. Holds no
    tensors: the radices and row offsets are Python ints, so the digits are exact int64 ``//`` and ``%``
    by a scalar.

    Args:
        features: the stored features.
        groups: the stacked layout of the compressed features.
        num_partitions: ``k``.
        unit_weights_after_first: give partitions ``>= 1`` weight 1 (multiply: a bag's weight applies once).
    """

    def __init__(self, features: Sequence[FeatureSpec], groups: Sequence[_Group], num_partitions: int,
                 unit_weights_after_first: bool) -> None:
        super().__init__()
        self.num_partitions = num_partitions
        self.groups = list(groups)
        grouped = {j for g in groups for j in g.features}
        self.full = [j for j in range(len(features)) if j not in grouped]
        self.full_names = [features[j].name for j in self.full]
        self.unit_weights_after_first = unit_weights_after_first

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[KeyedJaggedTensor | None, list[KeyedJaggedTensor]]:
        if not self.groups:
            return kjt, []
        values, weights, batch = kjt.values(), kjt.weights_or_none(), kjt.stride()
        per_key = kjt.length_per_key()
        # one slice per feature (the values of a KJT are grouped by key); a few whole-slice ops per feature
        value_pieces, length_pieces = values.split(per_key), kjt.lengths().split([batch] * len(per_key))
        weight_pieces = weights.split(per_key) if weights is not None else None
        full = None
        if self.full:
            full = self._kjt(self.full_names, [value_pieces[j] for j in self.full],
                             [length_pieces[j] for j in self.full],
                             None if weights is None else [weight_pieces[j] for j in self.full],
                             [per_key[j] for j in self.full], batch)
        stacked = []
        for g in self.groups:
            digits = [qr_digits(value_pieces[j], m, self.num_partitions) for j, m in zip(g.features, g.radices)]
            keys = [f"p{i}" for i in range(self.num_partitions)]
            new_values = [digits[a][i] + g.row_offsets[i][a] if g.row_offsets[i][a] else digits[a][i]
                          for i in range(self.num_partitions) for a in range(len(g.features))]
            new_weights = None
            if weights is not None:
                new_weights = [torch.ones_like(weight_pieces[j]) if i > 0 and self.unit_weights_after_first
                               else weight_pieces[j] for i in range(self.num_partitions) for j in g.features]
            ids = sum(per_key[j] for j in g.features)
            stacked.append(self._kjt(keys, new_values, [length_pieces[j] for j in g.features] * self.num_partitions,
                                     new_weights, [ids] * self.num_partitions, batch * len(g.features)))
        return full, stacked

    @staticmethod
    def _kjt(keys, values, lengths, weights, per_key, stride) -> KeyedJaggedTensor:
        offset_per_key = [0]
        for length in per_key:
            offset_per_key.append(offset_per_key[-1] + length)
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values), weights=None if weights is None else torch.cat(weights),
                                 lengths=torch.cat(lengths), stride=stride, length_per_key=per_key,
                                 offset_per_key=offset_per_key)

    def extra_repr(self) -> str:
        return f"num_partitions={self.num_partitions}, full={len(self.full)}, groups={[g.dim for g in self.groups]}"


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


def _exact(config: QRConfig) -> bool:
    # add and concat commute with pooling: their exact mode is the pooled computation
    return config.bag_mode == "combine_then_pool" and config.combiner == "multiply" and config.num_partitions > 1


@register_method(QRConfig)
class QREmbeddingBagCollection(EmbeddingModule):
    """Compositional embeddings: partition tables in TorchRec collections, combined per feature.

    Storage (all plain TorchRec modules, so DMP can shard them): ``storage``, an ``EmbeddingBagCollection``
    with the full features' tables (``None`` when every feature is compressed), and ``stacked[f"d{d}"]`` per
    dim ``d`` of the compressed features: one collection whose table ``p{i}`` stacks partition ``i`` of
    all of them (feature ``g``'s rows follow feature ``g - 1``'s). Stacking keeps the number of tables,
    lookups and optimizer updates at ``k`` per dim instead of ``k`` per feature (measured: that per-table
    overhead, not the arithmetic, is what a compositional table costs on CPU). The stacked collection is an
    ``EmbeddingCollection`` in the exact ``combine_then_pool`` mode with ``multiply``.
    :meth:`partition_weight` gives one feature's rows of one partition.

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
        >>> tuple(m.partition_weight("user", 0).shape), tuple(m.partition_weight("user", 1).shape)
        ((9698, 16), (104, 16))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "country"], torch.tensor([123456, 7, 3]),
        ...                                           torch.tensor([2, 0, 1, 0]))
        >>> m(kjt).values().shape
        torch.Size([2, 32])
        >>> embtable.memory_report(m).inference_bytes == (9698 + 104 + 200) * 16 * 4
        True
    """

    def __init__(self, features: Sequence[FeatureSpec], config: QRConfig, **kwargs) -> None:
        if config.num_partitions is None:  # not planned (build() plans it): the quotient-remainder trick
            config = dataclasses.replace(config, num_partitions=2)
        super().__init__(features, config, **kwargs)
        radices = _collisions(self.features, config)
        _check(self.features, config, radices)
        k = config.num_partitions
        self.exact = _exact(config)
        self.radices = radices
        self.groups = _groups(self.features, radices, k, config.combiner)
        self.mapper = QRIdMapper(self.features, self.groups, k, unit_weights_after_first=config.combiner == "multiply")
        full = [self.features[j] for j in self.mapper.full]
        self.storage = storage_collection(
            [(f.name, f.num_embeddings, f.embedding_dim, [f.name]) for f in full], self.pooling, self._is_weighted,
            self.device,
        ) if full else None
        stacked = {}
        for g in self.groups:
            tables = [(f"p{i}", g.rows[i], g.dims[i], [f"p{i}"]) for i in range(k)]
            if self.exact:
                stacked[f"d{g.dim}"] = EmbeddingCollection(
                    tables=[EmbeddingConfig(name=name, num_embeddings=rows, embedding_dim=dim, feature_names=names)
                            for name, rows, dim, names in tables],
                    device=self.device,
                )
            else:
                stacked[f"d{g.dim}"] = storage_collection(tables, self.pooling, self._is_weighted, self.device)
        self.stacked = nn.ModuleDict(stacked)
        # the output is assembled from runs of neighbouring features read from the same source
        # (source -1: the full features' pooled columns; source g: group g's combined columns)
        source_of = {j: -1 for j in self.mapper.full}
        for gi, g in enumerate(self.groups):
            source_of.update({j: gi for j in g.features})
        self._runs: list[list[int]] = []  # [source, first column, end column]
        at = {s: 0 for s in range(-1, len(self.groups))}
        for j, f in enumerate(self.features):
            src = source_of[j]
            if self._runs and self._runs[-1][0] == src:
                self._runs[-1][2] += f.embedding_dim
            else:
                self._runs.append([src, at[src], at[src] + f.embedding_dim])
            at[src] += f.embedding_dim
        self.reset_parameters()

    def partition_weight(self, feature: str, partition: int) -> torch.Tensor:
        """The rows of ``feature``'s partition table (a view into its stacked table; for a full feature,
        partition 0 is its whole table)."""
        j = self.feature_names.index(feature)
        if j in self.mapper.full:
            if partition != 0:
                raise ValueError(f"qr: feature {feature!r} keeps its full table; it has only partition 0")
            return self.storage.embedding_bags[feature].weight
        gi = next(gi for gi, g in enumerate(self.groups) if j in g.features)
        g, a = self.groups[gi], self.groups[gi].features.index(j)
        rows = partition_rows(self.features[j].num_embeddings, g.radices[a], self.config.num_partitions)[partition]
        storage = self.stacked[f"d{g.dim}"]
        tables = storage.embeddings if self.exact else storage.embedding_bags
        start = g.row_offsets[partition][a]
        return tables[f"p{partition}"].weight[start:start + rows]

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
        for f, m in zip(self.features, self.radices):
            s = math.sqrt(1.0 / f.num_embeddings)
            if m is None:
                self.partition_weight(f.name, 0).uniform_(-s, s)
                continue
            if self.config.combiner == "multiply":
                a = math.sqrt(3.0 * (s * s / 3.0) ** (1.0 / k))
            elif self.config.combiner == "add":
                a = s / math.sqrt(k)
            else:
                a = s
            for i in range(k):
                self.partition_weight(f.name, i).uniform_(-a, a)

    @torch.no_grad()
    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """Partition tables fitted to the trained rows by averaging over the ids that share a row.

        Used by :func:`embtable.compress`. concat: each partition's row = the mean of its slice of the trained
        rows sharing that digit. add: backfitting, one pass: partition ``i``'s row = the mean residual
        ``W - sum_{j != i} e_j`` of its ids. multiply: partition 0 = the mean of the rows sharing its digit, the
        others (starting at 1) the least squares factor ``sum W * P / sum P**2`` given the product ``P`` of the
        partitions fitted before.
        """
        radix = self.radices[self.feature_names.index(name)]
        if radix is None:
            self.partition_weight(name, 0).copy_(weight)
            return "trained weights copied"
        k, combiner = self.config.num_partitions, self.config.combiner
        tables = [self.partition_weight(name, i) for i in range(k)]  # views into the stacked tables
        n, d = weight.shape
        device = tables[0].device
        w_all = weight.to(device=device, dtype=tables[0].dtype)

        def others(digits: torch.Tensor, i: int) -> torch.Tensor:
            """The combination of every partition but ``i`` at ``digits``: ``[n, d]``."""
            out = torch.full((digits.shape[1], d), 1.0 if combiner == "multiply" else 0.0, device=device)
            for j in range(k):
                if j != i:
                    out = out * tables[j][digits[j]] if combiner == "multiply" else out + tables[j][digits[j]]
            return out

        bounds = [0]
        for dim in partition_dims(d, k, combiner):
            bounds.append(bounds[-1] + dim)
        if combiner == "add":
            for t in tables:
                t.zero_()
        elif combiner == "multiply":
            for t in tables:
                t.fill_(1.0)
        for i in range(k):
            num = torch.zeros_like(tables[i])
            den = torch.zeros_like(tables[i]) if combiner == "multiply" else torch.zeros(
                tables[i].shape[0], 1, device=device)
            for start in range(0, n, _INIT_CHUNK):
                ids = torch.arange(start, min(n, start + _INIT_CHUNK), device=device)
                digits = qr_digits(ids, radix, k)
                w = w_all[start : start + ids.numel()]
                if combiner == "concat":
                    num.index_add_(0, digits[i], w[:, bounds[i] : bounds[i + 1]])
                    den.index_add_(0, digits[i], torch.ones(ids.numel(), 1, device=device))
                elif combiner == "add":
                    num.index_add_(0, digits[i], w - others(digits, i))
                    den.index_add_(0, digits[i], torch.ones(ids.numel(), 1, device=device))
                else:
                    rest = others(digits, i)
                    num.index_add_(0, digits[i], w * rest)
                    den.index_add_(0, digits[i], rest * rest)
            if combiner == "multiply":
                tables[i].copy_(torch.where(den > 1e-12, num / den.clamp_min(1e-12), tables[i]))
            else:
                used = den[:, 0] > 0
                tables[i][used] = num[used] / den[used]
        return f"{combiner} partitions fitted to the trained rows by averaging over shared rows"

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        full_kjt, stacked_kjts = self.mapper(kjt)
        sources = {}
        if full_kjt is not None:
            sources[-1] = storage_values(self.storage(full_kjt), self.mapper.full_names)  # [B, sum of full dims]
        for gi, (g, group_kjt) in enumerate(zip(self.groups, stacked_kjts)):
            storage = self.stacked[f"d{g.dim}"]
            if self.exact:
                combined = self._combine_then_pool(storage, group_kjt)  # [G * B, d]
            else:
                combined = self._combine(storage_values(storage(group_kjt), list(group_kjt.keys())), g)
            # [G * B, d] feature-major -> [B, G * d]: slices, not a transpose + reshape (whose view check
            # guards "batch != 1" under torch.export, so the program would refuse a batch of 1)
            b = kjt.stride()
            sources[gi] = torch.cat([combined[a * b:(a + 1) * b] for a in range(len(g.features))], dim=1)
        if len(self._runs) == 1:
            return sources[self._runs[0][0]]
        return torch.cat([sources[src][:, a:b] for src, a, b in self._runs], dim=1)

    def _combine(self, pooled: torch.Tensor, g: _Group) -> torch.Tensor:
        """``[G * B, sum_i d_i]`` pooled partitions (p0 columns first) -> ``[G * B, d]`` combined."""
        if self.config.combiner == "concat":
            return pooled  # the partitions' columns in order are the concatenation
        out = None
        for part in pooled.split(g.dims, dim=1):
            out = part if out is None else (out * part if self.config.combiner == "multiply" else out + part)
        return out

    def _combine_then_pool(self, storage: EmbeddingCollection, group_kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Exact multiply: combine the unpooled rows per id, then weight and pool per bag -> ``[G * B, d]``."""
        lookups = storage(group_kjt)
        rows = None
        for i in range(self.config.num_partitions):
            part = lookups[f"p{i}"].values()  # [N_g, d], the group's ids in order
            rows = part if rows is None else rows * part
        weights = group_kjt.weights_or_none()
        if self._is_weighted and weights is not None:
            rows = rows * weights[: rows.size(0)].unsqueeze(1)  # partition 0's weights: the bags' own
        lengths = group_kjt.lengths()[: group_kjt.stride()].to(torch.int64)  # key p0's bags
        bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths,
                                       output_size=rows.size(0))
        pooled = torch.zeros(lengths.numel(), rows.size(1), dtype=rows.dtype, device=rows.device).index_add(0, bags, rows)
        if self.pooling is Pooling.MEAN:
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        return pooled

    # ----- planning -----
    @classmethod
    def size_config(cls, features, config, budget_bytes):
        if config.num_partitions is not None:
            return cls._size_partitions(features, config, budget_bytes)
        if config.num_collisions is not None or budget_bytes is None:
            return cls._size_partitions(features, dataclasses.replace(config, num_partitions=2), budget_bytes)
        # auto: the smallest k that fits (k = 2, the quotient-remainder trick, whenever it can)
        top = MAX_PARTITIONS
        if config.combiner == "concat":  # every partition needs a dim of at least 1
            top = max(2, min(top, min(f.embedding_dim for f in features)))
        smallest = []
        for k in range(2, top + 1):
            try:
                return cls._size_partitions(features, dataclasses.replace(config, num_partitions=k), budget_bytes)
            except BudgetError as err:
                smallest.append((err.smallest_bytes, k))
        need, k = min(smallest)
        raise smallest_budget_error(
            "qr", need, budget_bytes, features,
            f"num_partitions chosen automatically, k = 2..{top}: the fewest bytes at k = {k}",
        )

    @classmethod
    def _size_partitions(cls, features, config, budget_bytes):
        if config.num_partitions == 1:
            full = sum(f.full_table_bytes for f in features)
            if budget_bytes is not None and full > budget_bytes:
                raise smallest_budget_error(
                    "qr", full, budget_bytes, features,
                    "num_partitions=1 keeps the full tables; use num_partitions >= 2 or None (automatic)",
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
            raise smallest_budget_error(
                "qr", total(1), budget_bytes, features,
                f"the smallest tables, {k} partitions of about n**(1/{k}) rows each; or use more num_partitions, "
                "or num_partitions=None to let the planner choose",
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
        # a full feature is written as m = n (at least 2, the smallest valid radix: m >= n keeps it full)
        return dataclasses.replace(config, num_collisions={f.name: max(2, chosen[f.name][0]) for f in features})

    @classmethod
    def describe(cls, features, config):
        if config.num_partitions is None:
            config = dataclasses.replace(config, num_partitions=2)
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
