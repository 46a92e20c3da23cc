"""Recommenders written the way users write them, for the compress() and export tests.

Importable by name (``compress_models``) so a fresh process can unpickle exported models.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

CARDINALITIES = [20_000, 5_000, 800, 30, 7]


class DeepFMStyle(nn.Module):
    """DeepFM as in the tutorials: one nn.Embedding per field (dim D) and one of dim 1 (first order)."""

    def __init__(self, cardinalities=CARDINALITIES, dim: int = 8) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList([nn.Embedding(n, dim) for n in cardinalities])
        self.first_order = nn.ModuleList([nn.Embedding(n, 1) for n in cardinalities])
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = nn.Sequential(nn.Linear(len(cardinalities) * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, F] ids
        emb = torch.stack([e(x[:, i]) for i, e in enumerate(self.embeddings)], dim=1)  # [B, F, D]
        first = sum(e(x[:, i]) for i, e in enumerate(self.first_order)).squeeze(-1)  # [B]
        fm = 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)  # [B]
        return self.bias + first + fm + self.mlp(emb.flatten(1)).squeeze(-1)


class MultiHotBags(nn.Module):
    """One nn.EmbeddingBag per multi-hot feature (1-D ids + offsets), one with per-sample weights."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.genres = nn.EmbeddingBag(50, dim, mode="mean")
        self.history = nn.EmbeddingBag(30_000, dim, mode="sum")
        self.tags = nn.EmbeddingBag(8_000, dim, mode="sum", include_last_offset=True)
        self.head = nn.Sequential(nn.Linear(3 * dim, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [
            self.genres(batch["genres"], batch["genres_offsets"]),
            self.history(batch["history"], batch["history_offsets"], per_sample_weights=batch["history_weights"]),
            self.tags(batch["tags"], batch["tags_offsets"]),
        ]
        return self.head(torch.cat(parts, dim=1)).squeeze(-1)


DLRM_TABLES = [("user", 40_000), ("item", 10_000), ("city", 300), ("device", 12)]


def dlrm(dim: int = 8, dense_in: int = 4) -> DLRM:
    """torchrec's DLRM over an EmbeddingBagCollection with one table per feature."""
    tables = [EmbeddingBagConfig(name=f"t_{n}", embedding_dim=dim, num_embeddings=rows, feature_names=[n])
              for n, rows in DLRM_TABLES]
    ebc = EmbeddingBagCollection(tables=tables)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=dense_in, dense_arch_layer_sizes=[16, dim],
                over_arch_layer_sizes=[16, 1])


# ----- data: labels from a hidden rule, so a model that learns lowers its loss -----
def deepfm_batch(gen: torch.Generator, batch: int = 256, cardinalities=CARDINALITIES):
    x = torch.stack([torch.randint(0, n, (batch,), generator=gen) for n in cardinalities], dim=1)
    y = ((x[:, 0] % 7 < 3) ^ (x[:, 2] % 2 == 0)).float()
    return x, y


def bags_batch(gen: torch.Generator, batch: int = 128):
    out = {}
    for name, rows, extra in (("genres", 50, 0), ("history", 30_000, 0), ("tags", 8_000, 1)):
        lengths = torch.randint(1, 5, (batch,), generator=gen)
        out[name] = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        out[f"{name}_offsets"] = offsets if extra else offsets[:-1]
    out["history_weights"] = torch.rand(out["history"].numel(), generator=gen)
    first_genre = out["genres"][out["genres_offsets"]]
    return out, (first_genre % 3 == 0).float()


def dlrm_batch(gen: torch.Generator, batch: int = 128, dense_in: int = 4):
    dense = torch.randn(batch, dense_in, generator=gen)
    values, lengths = [], []
    for _, rows in DLRM_TABLES:
        n = torch.randint(1, 3, (batch,), generator=gen)
        lengths.append(n)
        values.append(torch.randint(0, rows, (int(n.sum()),), generator=gen))
    kjt = KeyedJaggedTensor.from_lengths_sync([n for n, _ in DLRM_TABLES], torch.cat(values), torch.cat(lengths))
    first_item = kjt["item"].values()[kjt["item"].offsets()[:-1]]
    y = ((first_item % 5 < 2) ^ (dense[:, 0] > 0)).float()
    return (dense, kjt), y
