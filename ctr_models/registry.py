"""Models by name: ``build_model("dlrm", embedding, num_dense, **model_kwargs)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from ctr_models.dcn import DCNv2
from ctr_models.deepfm import DeepFM
from ctr_models.dlrm import DLRM
from ctr_models.wide_deep import WideDeep

__all__ = ["MODELS", "build_model", "model_names", "model_options"]

#: name -> constructor ``(embedding, num_dense, **kwargs) -> nn.Module`` returning logits ``[B]``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "dlrm": DLRM,
    "deepfm": DeepFM,
    "dcn_v2": DCNv2,
    "wide_deep": WideDeep,
}


def model_names() -> list[str]:
    """Names ``build_model`` accepts."""
    return sorted(MODELS)


def model_options(name: str) -> list[str]:
    """The keyword arguments model ``name`` takes besides the embedding module and ``num_dense``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {model_names()}")
    skip = {"self", "embedding", "num_dense", "device"}
    return [p for p in inspect.signature(MODELS[name]).parameters if p not in skip]


def build_model(
    name: str, embedding: EmbeddingBagCollectionInterface, num_dense: int, **model_kwargs: object
) -> nn.Module:
    """Build the CTR model called ``name`` over ``embedding``.

    Args:
        name: one of ``model_names()``.
        embedding: the embedding module the model reads its pooled vectors from.
        num_dense: number of dense input features.
        **model_kwargs: the model's own settings (e.g. ``dense_hidden_sizes`` for DLRM); an unknown one is
            an error listing those the model takes.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(tables=[
        ...     EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["a", "b"])])
        >>> type(build_model("dlrm", ebc, num_dense=3, over_hidden_sizes=[8])).__name__
        'DLRM'
    """
    accepted = model_options(name) + ["device"]
    unknown = sorted(set(model_kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} does not take {unknown}; it takes {accepted}")
    return MODELS[name](embedding, num_dense, **model_kwargs)
