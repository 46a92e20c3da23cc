"""Wide & Deep (Cheng et al., 2016, "Wide & Deep Learning for Recommender Systems").

    logit = wide (linear over dense features and pooled vectors)  +  deep (MLP over the same input)

As in ``deepfm``, all per-id parameters stay in the embedding module (the budget counts them): the wide
part is linear in the pooled vectors instead of reading a second, uncompressed one-hot weight table.
Features may have different dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctr_models.blocks import MLP
from ctr_models.layout import PooledLayout

__all__ = ["WideDeep"]


class WideDeep(nn.Module):
    """Wide & Deep over any ``EmbeddingBagCollectionInterface``; features may have different dims.

    Args:
        embedding: the embedding module.
        num_dense: number of dense input features.
        hidden_sizes: hidden layer widths of the deep part (a last layer of width 1 is added).
        device: where the dense parameters live.

    Shape:
        ``dense_features [B, num_dense]``, ``sparse_features`` a KJT of batch size ``B`` -> logits ``[B]``.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[
        ...     EmbeddingBagConfig(name="t_a", num_embeddings=10, embedding_dim=4, feature_names=["a"]),
        ...     EmbeddingBagConfig(name="t_b", num_embeddings=10, embedding_dim=2, feature_names=["b"])])
        >>> model = WideDeep(ebc, num_dense=3, hidden_sizes=[8])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]))
        >>> model(torch.zeros(2, 3), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding: EmbeddingBagCollectionInterface,
        num_dense: int,
        hidden_sizes: Sequence[int] = (64, 32),
        *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.layout = PooledLayout.of(embedding)
        width = num_dense + self.layout.total_dim
        self.embedding = embedding
        self.wide = nn.Linear(width, 1, device=device)
        self.deep = MLP(width, [*hidden_sizes, 1], activate_last=False, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding(sparse_features)
        self.layout.check(pooled)
        x = torch.cat([dense_features, pooled.values()], dim=1)  # [B, num_dense + sum(dims)]
        return (self.wide(x) + self.deep(x)).squeeze(1)  # [B]
