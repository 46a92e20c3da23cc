"""Building blocks shared by the CTR models: an MLP and three feature interactions.

Every model in this package is assembled from these; none of them is written twice.
Shapes use: ``B`` batch size, ``F`` number of fields (vectors that interact), ``D`` their common dim,
``N`` width of a flat input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "DotInteraction", "FMInteraction", "CrossNetV2"]


class MLP(nn.Sequential):
    """Stack of ``Linear`` layers with ReLU after every layer (optionally not after the last).

    Args:
        in_features: width of the input.
        layer_sizes: output width of each layer, in order; may be empty (then the MLP is the identity).
        activate_last: apply ReLU after the last layer too (DLRM's bottom MLP does; a layer that produces
            logits must not).
        device: where the parameters live.

    Shape:
        input ``[B, in_features]`` -> output ``[B, layer_sizes[-1]]`` (``[B, in_features]`` when empty).

    Example:
        >>> mlp = MLP(13, [32, 16])
        >>> mlp(torch.zeros(4, 13)).shape
        torch.Size([4, 16])
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        *,
        activate_last: bool = True,
        device: torch.device | None = None,
    ) -> None:
        sizes = [int(s) for s in layer_sizes]
        if any(s < 1 for s in sizes):
            raise ValueError(f"MLP layer sizes must be positive integers, got {list(layer_sizes)}")
        layers: list[nn.Module] = []
        width = int(in_features)
        for i, size in enumerate(sizes):
            layers.append(nn.Linear(width, size, device=device))
            if activate_last or i < len(sizes) - 1:
                layers.append(nn.ReLU())
            width = size
        super().__init__(*layers)
        self.in_features = int(in_features)
        self.out_features = width


class DotInteraction(nn.Module):
    """Pairwise dot products between ``F`` vectors of one dim (DLRM's interaction).

    Returns the ``F * (F - 1) / 2`` dot products of distinct pairs (upper triangle, no diagonal), in
    row-major order of the pairs ``(i, j), i < j``.

    Args:
        num_fields: ``F``, the number of vectors per example.

    Shape:
        input ``[B, F, D]`` -> output ``[B, F * (F - 1) / 2]``.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]]])
        >>> DotInteraction(3)(x)
        tensor([[2., 0., 3.]])
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"DotInteraction needs at least 2 fields, got {num_fields}")
        self.num_fields = int(num_fields)
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        # Flat positions of the upper triangle in the [F, F] Gram matrix: one gather instead of 2-D indexing.
        self.register_buffer("pair_index", rows * num_fields + cols, persistent=False)

    @property
    def num_pairs(self) -> int:
        return self.num_fields * (self.num_fields - 1) // 2

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(fields, fields.transpose(1, 2))  # [B, F, F]
        return gram.flatten(1).index_select(1, self.pair_index)  # [B, F*(F-1)/2]

    def extra_repr(self) -> str:
        return f"num_fields={self.num_fields}"


class FMInteraction(nn.Module):
    """Second-order factorization machine term: the sum of dot products of all distinct pairs.

    Uses Rendle's identity ``sum_{i<j} <v_i, v_j> = 1/2 * sum_d ((sum_i v_id)^2 - sum_i v_id^2)``,
    which costs ``O(F * D)`` instead of ``O(F^2 * D)``.

    Shape:
        input ``[B, F, D]`` -> output ``[B]``.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]]])
        >>> FMInteraction()(x)  # 2 + 0 + 3
        tensor([5.])
    """

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        square_of_sum = fields.sum(dim=1).pow(2)  # [B, D]
        sum_of_squares = fields.pow(2).sum(dim=1)  # [B, D]
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)  # [B]


class CrossNetV2(nn.Module):
    """DCN-v2 cross network (Wang et al., 2021, "DCN V2: Improved Deep & Cross Network").

    Each layer computes ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with a full ``N x N`` matrix ``W_l``,
    or with ``W_l = U_l V_l^T`` of rank ``low_rank`` when given (the paper's cheaper variant).

    Args:
        in_features: ``N``, the width of ``x_0``.
        num_layers: number of cross layers.
        low_rank: rank of each ``W_l``; ``None`` for full rank.
        device: where the parameters live.

    Shape:
        input ``[B, N]`` -> output ``[B, N]``.

    Example:
        >>> net = CrossNetV2(8, num_layers=2, low_rank=4)
        >>> net(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        low_rank: int | None = None,
        *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"CrossNetV2 needs num_layers >= 1, got {num_layers}")
        if low_rank is not None and not 1 <= low_rank <= in_features:
            raise ValueError(f"CrossNetV2 low_rank must be in [1, {in_features}] or None, got {low_rank}")
        self.in_features = int(in_features)
        self.num_layers = int(num_layers)
        self.low_rank = low_rank
        if low_rank is None:
            self.layers = nn.ModuleList(
                nn.Linear(in_features, in_features, device=device) for _ in range(num_layers)
            )
        else:
            self.layers = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(in_features, low_rank, bias=False, device=device),
                    nn.Linear(low_rank, in_features, device=device),
                )
                for _ in range(num_layers)
            )

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x  # [B, N]
        return x

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_layers={self.num_layers}, low_rank={self.low_rank}"
