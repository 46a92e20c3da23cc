"""What a model needs to know about its embedding module: the keys and dims of the pooled output."""

from __future__ import annotations

import dataclasses

from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedTensor

__all__ = ["PooledLayout"]


@dataclasses.dataclass(frozen=True)
class PooledLayout:
    """Keys and per-key dims of the ``KeyedTensor`` an embedding module returns, in output order.

    Read from ``embedding_bag_configs()`` exactly as ``EmbeddingBagCollection`` names its outputs (a
    feature served by several tables is named ``feature@table``).

    Args:
        keys: output keys (TorchRec's embedding names), in the order of the pooled values.
        dims: ``embedding_dim`` of each key.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(tables=[
        ...     EmbeddingBagConfig(name="t0", num_embeddings=10, embedding_dim=4, feature_names=["a"]),
        ...     EmbeddingBagConfig(name="t1", num_embeddings=10, embedding_dim=8, feature_names=["b"])])
        >>> PooledLayout.of(ebc)
        PooledLayout(keys=('a', 'b'), dims=(4, 8))
    """

    keys: tuple[str, ...]
    dims: tuple[int, ...]

    @classmethod
    def of(cls, embedding: EmbeddingBagCollectionInterface) -> PooledLayout:
        configs = list(embedding.embedding_bag_configs())
        if not configs:
            raise ValueError(f"{type(embedding).__name__} has no embedding tables; a CTR model needs at least one")
        keys: list[str] = []
        dims: list[int] = []
        for config, names in zip(configs, get_embedding_names_by_table(configs), strict=True):
            keys.extend(names)
            dims.extend([int(config.embedding_dim)] * len(names))
        return cls(tuple(keys), tuple(dims))

    @property
    def total_dim(self) -> int:
        """Width of the concatenated pooled vectors: ``sum(dims)``."""
        return sum(self.dims)

    def common_dim(self, model: str) -> int:
        """The one dim shared by all keys; a clear error naming the odd keys when there is none.

        Args:
            model: the model's name, for the error message.
        """
        dims = set(self.dims)
        if len(dims) == 1:
            return self.dims[0]
        by_dim: dict[int, list[str]] = {}
        for key, dim in zip(self.keys, self.dims):
            by_dim.setdefault(dim, []).append(key)
        majority = max(by_dim, key=lambda d: len(by_dim[d]))
        odd = {d: names for d, names in sorted(by_dim.items()) if d != majority}
        raise ValueError(
            f"{model} needs one embedding_dim for all features (its interaction takes dot products), "
            f"but most features have dim {majority} and these differ: "
            + "; ".join(f"dim {d}: {names}" for d, names in odd.items())
            + ". Give every feature the same embedding_dim (a method whose combine step projects to a "
            "common dim works too), or use a model that accepts per-feature dims (dcn_v2, wide_deep)."
        )

    def check(self, pooled: KeyedTensor) -> None:
        """Raise if the module returned other keys than its configs announced (cheap: compares names)."""
        if tuple(pooled.keys()) != self.keys:
            raise ValueError(
                f"embedding module returned keys {pooled.keys()}, but its embedding_bag_configs() announce "
                f"{list(self.keys)}; the pooled output must follow the configs' order"
            )
