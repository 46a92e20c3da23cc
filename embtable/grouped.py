"""Tables that serve several features, pooled or not, over any embtable method.

TorchRec lets one table serve several features (``EmbeddingBagConfig(feature_names=["f1", "f2"])``) and
one feature feed several tables (its outputs are then named ``feature@table``). An embtable method embeds
one *logical table per feature*, so these modules give it one logical feature per **table** and stack the
bags of the table's features along the batch::

    input  (B = 2)   key   f1 (table t)   f2 (table t)   f3 (table u)
                     bag   b0    b1       b0    b1       b0    b1
    inner  (S = 4)   key   t                             u
                     bag   f1:b0 f1:b1 f2:b0 f2:b1       f3:b0 f3:b1 [] []     (padded with empty bags)
    output           rows [0, B) of t's columns -> f1, rows [B, 2B) -> f2, rows [0, B) of u's -> f3

so the ids of every feature of a table hit the same compressed rows, exactly as they hit the same rows
of the shared TorchRec table. :class:`GroupedEmbeddingBagCollection` returns the ``KeyedTensor`` of an
``EmbeddingBagCollection``; :class:`GroupedEmbeddingCollection` returns the ``Dict[str, JaggedTensor]`` of
an ``EmbeddingCollection`` (each id is looked up as a bag of one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from .module import EmbeddingModule

__all__ = ["TableFeatures", "GroupedEmbeddingBagCollection", "GroupedEmbeddingCollection"]


@dataclasses.dataclass(frozen=True)
class TableFeatures:
    """One logical table of the inner module and the input features it serves.

    Args:
        table: the inner module's feature name for this table.
        feature_names: the input features looked up in it, in output order.
        embedding_names: the output key of each feature (TorchRec's ``feature@table`` when a feature feeds
            several tables, else the feature name).
    """

    table: str
    feature_names: tuple[str, ...]
    embedding_names: tuple[str, ...]


def _stack(
    kjt: KeyedJaggedTensor, tables: Sequence[TableFeatures], pooled: bool
) -> tuple[KeyedJaggedTensor, list[list[tuple[int, int]]]]:
    """The inner KJT (one key per table, bags of all its features stacked) and each feature's rows in it."""
    jts = kjt.to_dict()
    missing = sorted({f for t in tables for f in t.feature_names} - set(jts))
    if missing:
        raise KeyError(f"the KeyedJaggedTensor lacks feature(s) {missing}; it has {kjt.keys()}")
    values, lengths, weights, spans = [], [], [], []
    any_weights = kjt.weights_or_none() is not None
    device = kjt.values().device
    per_table = []
    for t in tables:
        table_lengths, table_spans, start = [], [], 0
        for f in t.feature_names:
            jt = jts[f]
            v = jt.values()
            values.append(v)
            if any_weights:
                weights.append(jt.weights())
            bag_lengths = jt.lengths() if pooled else torch.ones(v.numel(), dtype=torch.int64, device=device)
            table_lengths.append(bag_lengths.to(torch.int64))
            table_spans.append((start, bag_lengths.numel()))
            start += bag_lengths.numel()
        per_table.append(table_lengths)
        spans.append(table_spans)
    stride = max(sum(s for _, s in sp) for sp in spans)
    for table_lengths, sp in zip(per_table, spans):
        pad = stride - sum(s for _, s in sp)
        lengths.extend(table_lengths)
        if pad:
            lengths.append(torch.zeros(pad, dtype=torch.int64, device=device))
    inner = KeyedJaggedTensor(
        keys=[t.table for t in tables],
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64, device=device),
        weights=torch.cat(weights) if any_weights else None,
        lengths=torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int64, device=device),
        stride=stride,
    )
    return inner, spans


class GroupedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A drop-in for an ``EmbeddingBagCollection`` whose tables serve several features.

    Args:
        inner: an embtable module with one feature per table (named ``TableFeatures.table``).
        tables: the tables, in the order of the replaced collection's configs.
        configs: the replaced collection's ``embedding_bag_configs()`` (what this module reports).

    Shape:
        input ``KeyedJaggedTensor`` with stride ``B``; output ``KeyedTensor`` ``[B, sum(dims)]`` keyed by
        embedding names in table order.

    Example:
        >>> import embtable
        >>> inner = embtable.build([embtable.FeatureSpec("t", 1000, 4)], embtable.HashConfig(num_buckets=50))
        >>> ebc = GroupedEmbeddingBagCollection(inner, [TableFeatures("t", ("f1", "f2"), ("f1", "f2"))])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f1", "f2"], torch.tensor([1, 2, 3]),
        ...                                           torch.tensor([1, 1, 0, 1]))
        >>> out = ebc(kjt)
        >>> out.keys(), out.values().shape
        (['f1', 'f2'], torch.Size([2, 8]))
        >>> torch.equal(out["f2"][1], inner(KeyedJaggedTensor.from_lengths_sync(
        ...     ["t"], torch.tensor([3]), torch.tensor([1]))).values()[0])
        True
    """

    def __init__(
        self,
        inner: EmbeddingModule,
        tables: Sequence[TableFeatures],
        configs: Sequence[EmbeddingBagConfig] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.tables = list(tables)
        dims = dict(zip(inner.feature_names, inner.embedding_dims))
        unknown = [t.table for t in self.tables if t.table not in dims]
        if unknown:
            raise ValueError(f"tables {unknown} are not features of the inner module ({inner.feature_names})")
        self._dims = [dims[t.table] for t in self.tables]
        self._keys = [n for t in self.tables for n in t.embedding_names]
        self._lengths = [d for t, d in zip(self.tables, self._dims) for _ in t.feature_names]
        if configs is None:
            configs = [
                EmbeddingBagConfig(num_embeddings=f.num_embeddings, embedding_dim=f.embedding_dim, name=t.table,
                                   feature_names=list(t.feature_names))
                for t in self.tables
                for f in inner.logical_features
                if f.name == t.table
            ]
        self._configs = list(configs)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        batch = features.stride()
        order = {n: i for i, n in enumerate(self.inner.feature_names)}
        inner_kjt, spans = _stack(features, self.tables, pooled=True)
        pooled = self.inner(inner_kjt)  # columns in the inner module's feature order
        columns = torch.split(pooled.values(), self.inner.embedding_dims, dim=1)
        parts = []
        for t, table_spans in zip(self.tables, spans):
            block = columns[order[t.table]]  # [S, D_t]
            parts.extend(block[start : start + batch] for start, _ in table_spans)
        values = torch.cat(parts, dim=1) if parts else torch.zeros(batch, 0)
        return KeyedTensor(keys=self._keys, length_per_key=self._lengths, values=values)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self.inner.is_weighted()

    def auxiliary_loss(self) -> torch.Tensor | None:
        return self.inner.auxiliary_loss()

    def extra_repr(self) -> str:
        return f"tables={[(t.table, list(t.feature_names)) for t in self.tables]}"


class GroupedEmbeddingCollection(nn.Module):
    """A drop-in for TorchRec's ``EmbeddingCollection`` (unpooled lookups) over any embtable method.

    Each id becomes a bag of one in ``inner``, so every method embeds sequences unchanged.

    Args:
        inner: an embtable module (sum pooling, unweighted) with one feature per table.
        tables: the tables, in the order of the replaced collection's configs.
        configs: the replaced collection's ``embedding_configs()``.
        need_indices: as in ``EmbeddingCollection``: each output ``JaggedTensor`` carries the ids as weights.

    Shape:
        feature ``f`` with ``N_f`` ids -> ``JaggedTensor`` values ``[N_f, D]`` with the input's lengths.

    Example:
        >>> import embtable
        >>> inner = embtable.build([embtable.FeatureSpec("t", 100, 4)], embtable.FullConfig())
        >>> ec = GroupedEmbeddingCollection(inner, [TableFeatures("t", ("f",), ("f",))])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 2, 3]), torch.tensor([2, 1]))
        >>> out = ec(kjt)["f"]
        >>> out.values().shape, out.lengths().tolist()
        (torch.Size([3, 4]), [2, 1])
    """

    def __init__(
        self,
        inner: EmbeddingModule,
        tables: Sequence[TableFeatures],
        configs: Sequence[EmbeddingConfig] | None = None,
        need_indices: bool = False,
    ) -> None:
        super().__init__()
        if inner.is_weighted():
            raise ValueError("an EmbeddingCollection looks ids up one by one: build its inner module unweighted")
        self.inner = inner
        self.tables = list(tables)
        dims = dict(zip(inner.feature_names, inner.embedding_dims))
        self._dims = [dims[t.table] for t in self.tables]
        if configs is None:
            configs = [
                EmbeddingConfig(num_embeddings=f.num_embeddings, embedding_dim=f.embedding_dim, name=t.table,
                                feature_names=list(t.feature_names))
                for t in self.tables
                for f in inner.logical_features
                if f.name == t.table
            ]
        self._configs = list(configs)
        self._need_indices = bool(need_indices)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        jts = features.to_dict()
        order = {n: i for i, n in enumerate(self.inner.feature_names)}
        inner_kjt, spans = _stack(features, self.tables, pooled=False)
        columns = torch.split(self.inner(inner_kjt).values(), self.inner.embedding_dims, dim=1)
        out: dict[str, JaggedTensor] = {}
        for t, table_spans in zip(self.tables, spans):
            block = columns[order[t.table]]
            for f, name, (start, size) in zip(t.feature_names, t.embedding_names, table_spans):
                jt = jts[f]
                out[name] = JaggedTensor(
                    values=block[start : start + size],
                    lengths=jt.lengths(),
                    weights=jt.values() if self._need_indices else None,
                )
        return out

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._dims[0]

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return self._configs

    def embedding_names_by_table(self) -> list[list[str]]:
        return [list(t.embedding_names) for t in self.tables]

    def auxiliary_loss(self) -> torch.Tensor | None:
        return self.inner.auxiliary_loss()

    def extra_repr(self) -> str:
        return f"tables={[(t.table, list(t.feature_names)) for t in self.tables]}"
