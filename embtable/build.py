"""The builder: (features, method config, optional byte budget) -> a drop-in ``EmbeddingBagCollection``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .budget import Budget, plan
from .config import MethodConfig, OutOfRange, Pooling, method_class
from .features import FeatureSpec, check_features
from .module import EmbeddingModule

__all__ = ["build", "seeded"]


def build(
    features: Sequence[FeatureSpec],
    method: MethodConfig,
    budget: Budget | int | float | str | None = None,
    *,
    pooling: Pooling | str = Pooling.SUM,
    is_weighted: bool = False,
    out_of_range: OutOfRange | str = OutOfRange.ERROR,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> EmbeddingModule:
    """Build the module for ``method`` over ``features``, sized to ``budget``.

    The budget is planned first (:func:`embtable.plan`, pure): an unreachable budget raises
    :class:`embtable.BudgetError` before any tensor is allocated. The result implements TorchRec's
    ``EmbeddingBagCollectionInterface``: it stands wherever an ``EmbeddingBagCollection`` over the same
    features stood.

    Args:
        features: the features to embed, in output order.
        method: a registered method config, e.g. ``HashConfig()``; size fields left unset are planned.
        budget: bytes (int), a fraction of the full fp32 tables (float or ``"1/16"``), or a :class:`Budget`.
        pooling: ``"sum"`` or ``"mean"``.
        is_weighted: bags carry per-id weights.
        out_of_range: ``"error"`` (default), ``"wrap"`` or ``"reserved"`` (see :class:`OutOfRange`).
        device: where to allocate (``"meta"`` allocates nothing).
        seed: if given, the weights are initialised from this seed (the global RNG is left untouched).

    Example:
        >>> import embtable, torch
        >>> from torchrec import KeyedJaggedTensor
        >>> feats = [embtable.FeatureSpec("user", 100_000, 16), embtable.FeatureSpec("item", 5_000, 16)]
        >>> ebc = embtable.build(feats, embtable.HashConfig(), budget="1/8", seed=0)
        >>> embtable.memory_report(ebc).inference_bytes <= embtable.Budget(fraction=1/8).resolve(feats)
        True
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([5, 99_999, 42]),
        ...                                           torch.tensor([2, 0, 1, 0]))
        >>> out = ebc(kjt)
        >>> out.keys(), out.values().shape
        (['user', 'item'], torch.Size([2, 32]))
    """
    features = check_features(features)
    if not isinstance(method, MethodConfig):
        raise TypeError(
            f"method must be a method config such as embtable.HashConfig(), got {type(method).__name__}; "
            "from plain data use embtable.method_config_from_dict({'method': 'hash', ...})"
        )
    sized = plan(features, method, budget, out_of_range=out_of_range).config
    cls = method_class(method)
    kwargs = dict(pooling=pooling, is_weighted=is_weighted, out_of_range=out_of_range, device=device)
    if seed is None:
        return cls(features, sized, **kwargs)
    with seeded(seed, device):
        return cls(features, sized, **kwargs)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the body with the generators seeded from ``seed``, and leave every generator as it was.

    The CPU generator is always forked; CUDA generators only when CUDA is in use (initialised, or the
    body allocates on a CUDA ``device``): they are then seeded and restored too. ``torch.manual_seed``
    alone would also reseed (or queue a reseed of) every CUDA generator for good.
    """
    device = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available() and (torch.cuda.is_initialized() or (device is not None and device.type == "cuda"))
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for i in devices:
            torch.cuda.default_generators[i].manual_seed(seed)
        yield
