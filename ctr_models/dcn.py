"""DCN-v2 (Wang et al., 2021, "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale
Learning to Rank Systems"), stacked structure: cross network, then a deep MLP, then the logit.

    x0 = [dense features, pooled vectors of every feature]  (per-feature dims are fine: only widths add)
    x0 ──► cross network (x_{l+1} = x0 * (W_l x_l + b_l) + x_l) ──► MLP ──► logit
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctr_models.blocks import MLP, CrossNetV2
from ctr_models.layout import PooledLayout

__all__ = ["DCNv2"]


class DCNv2(nn.Module):
    """DCN-v2 over any ``EmbeddingBagCollectionInterface``; features may have different dims.

    Args:
        embedding: the embedding module.
        num_dense: number of dense input features.
        num_cross_layers: number of cross layers.
        low_rank: rank of each cross layer's matrix (``None``: full ``N x N``).
        hidden_sizes: hidden layer widths of the deep part after the cross network (a last layer of width
            1 is added).
        device: where the dense parameters live.

    Shape:
        ``dense_features [B, num_dense]``, ``sparse_features`` a KJT of batch size ``B`` -> logits ``[B]``.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[
        ...     EmbeddingBagConfig(name="t_a", num_embeddings=10, embedding_dim=4, feature_names=["a"]),
        ...     EmbeddingBagConfig(name="t_b", num_embeddings=10, embedding_dim=2, feature_names=["b"])])
        >>> model = DCNv2(ebc, num_dense=3, num_cross_layers=2, hidden_sizes=[8])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]))
        >>> model(torch.zeros(2, 3), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding: EmbeddingBagCollectionInterface,
        num_dense: int,
        num_cross_layers: int = 3,
        low_rank: int | None = None,
        hidden_sizes: Sequence[int] = (64, 32),
        *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.layout = PooledLayout.of(embedding)
        width = num_dense + self.layout.total_dim
        self.embedding = embedding
        self.cross = CrossNetV2(width, num_cross_layers, low_rank, device=device)
        self.deep = MLP(width, [*hidden_sizes, 1], activate_last=False, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding(sparse_features)
        self.layout.check(pooled)
        x0 = torch.cat([dense_features, pooled.values()], dim=1)  # [B, num_dense + sum(dims)]
        return self.deep(self.cross(x0)).squeeze(1)  # [B]
