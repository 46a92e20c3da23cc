"""DLRM (Naumov et al., 2019, "Deep Learning Recommendation Model for Personalization and
Recommendation Systems"): bottom MLP on dense features, dot products between all pooled vectors, top MLP.

    dense [B, num_dense] ──► dense arch ──► [B, D] ─┐
    KJT ──► embedding module ──► [B, F, D] ─────────┴─► dot interaction [B, (F+1)F/2] ──┐
                                    dense arch output [B, D] ───────────────────────────┴─► over arch ──► [B]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctr_models.blocks import MLP, DotInteraction
from ctr_models.layout import PooledLayout

__all__ = ["DLRM"]


class DLRM(nn.Module):
    """DLRM over any ``EmbeddingBagCollectionInterface`` whose features all have one dim ``D``.

    Args:
        embedding: the embedding module (a full ``EmbeddingBagCollection`` or any compressed drop-in).
        num_dense: number of dense input features.
        dense_hidden_sizes: hidden layer widths of the dense (bottom) arch; a last layer of width ``D`` is
            added so that the dense vector can take part in the dot products.
        over_hidden_sizes: hidden layer widths of the over (top) arch; a last layer of width 1 (the logit)
            is added.
        device: where the dense parameters live.

    Shape:
        ``dense_features [B, num_dense]``, ``sparse_features`` a KJT of batch size ``B`` -> logits ``[B]``.

    Raises:
        ValueError: at construction, when the features do not share one dim (naming those that differ).

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[
        ...     EmbeddingBagConfig(name=f"t_{f}", num_embeddings=10, embedding_dim=4, feature_names=[f])
        ...     for f in ("a", "b")])
        >>> model = DLRM(ebc, num_dense=3, dense_hidden_sizes=[8], over_hidden_sizes=[8])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]))
        >>> model(torch.zeros(2, 3), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding: EmbeddingBagCollectionInterface,
        num_dense: int,
        dense_hidden_sizes: Sequence[int] = (64,),
        over_hidden_sizes: Sequence[int] = (64, 32),
        *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.layout = PooledLayout.of(embedding)
        dim = self.layout.common_dim("DLRM")
        num_fields = len(self.layout.keys) + 1  # the dense vector is one more field
        self.embedding = embedding
        self.embedding_dim = dim
        self.dense_arch = MLP(num_dense, [*dense_hidden_sizes, dim], device=device)
        self.interaction = DotInteraction(num_fields)
        self.over_arch = MLP(
            dim + self.interaction.num_pairs, [*over_hidden_sizes, 1], activate_last=False, device=device
        )

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding(sparse_features)
        self.layout.check(pooled)
        dense = self.dense_arch(dense_features)  # [B, D]
        sparse = pooled.values().view(dense.shape[0], -1, self.embedding_dim)  # [B, F, D]
        fields = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # [B, F + 1, D]
        pairs = self.interaction(fields)  # [B, (F + 1) F / 2]
        return self.over_arch(torch.cat([dense, pairs], dim=1)).squeeze(1)  # [B]
