"""Exact memory accounting: the bytes a module needs to serve, and what training adds.

Inference bytes are the bytes of every parameter and buffer the module holds (weights, hash
coefficients, remap tables, masks), each storage counted once, found by walking the module's tensors,
never by matching names. Training bytes add the optimizer state of the optimizer actually used.
Gradients are not counted: they are transient, and for sparse table updates their size depends on the
batch, not the table.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = [
    "MemoryReport",
    "memory_report",
    "table_parameters",
    "sparse_parameters",
    "dense_parameters",
    "optimizer_state_bytes",
    "training_bytes",
    "training_only_names",
    "OPTIMIZERS",
]

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of every tensor a module needs at inference.

    Attributes:
        inference_bytes: the total, each storage counted once.
        tensors: qualified tensor name -> bytes.
    """

    inference_bytes: int
    tensors: dict[str, int]

    def __str__(self) -> str:
        lines = [f"{name:<60}{nbytes:>16,}" for name, nbytes in self.tensors.items()]
        lines.append(f"{'total':<60}{self.inference_bytes:>16,}")
        return "\n".join(lines)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(module: nn.Module) -> MemoryReport:
    """Exact inference bytes of ``module``: all its parameters and buffers, shared tensors counted once.

    >>> import embtable
    >>> m = embtable.build([embtable.FeatureSpec("a", 100, 8)], embtable.FullConfig())
    >>> memory_report(m).inference_bytes
    3200
    """
    return _report(module, training=False)


def training_only_names(module: nn.Module) -> set[str]:
    """Qualified names of the tensors only training needs (a module lists its own in
    ``training_only_tensors``; see :meth:`embtable.EmbeddingModule.register_training_buffer`)."""
    out: set[str] = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name in getattr(sub, "training_only_tensors", ()):
            out.add(f"{prefix}.{name}" if prefix else name)
    return out


def _report(module: nn.Module, training: bool) -> MemoryReport:
    tensors: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    named = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )
    skip = set() if training else training_only_names(module)
    for name, t in named:
        if name in skip:
            continue
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        tensors[name] = _tensor_bytes(t)
    return MemoryReport(sum(tensors.values()), tensors)


def table_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weights of every embedding table (``nn.Embedding`` / ``nn.EmbeddingBag``, and the tables of
    :func:`embtable.fuse_storage`'s fused storage) inside ``module``."""
    from .fused import fused_storages

    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag) and id(sub.weight) not in seen:
            seen.add(id(sub.weight))
            out.append(sub.weight)
    for storage in fused_storages(module):
        for p in storage.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Switch every embedding table in ``module`` to sparse gradients and return their weights.

    Only the rows a batch touched then receive a gradient, so a large table does not cost a dense
    update each step. Put these parameters in a sparse-capable optimizer (``torch.optim.SGD``,
    ``torch.optim.Adagrad`` or :class:`embtable.RowWiseAdagrad`) and the rest
    (:func:`dense_parameters`) in any dense optimizer such as Adam.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag):
            sub.sparse = True
    return table_parameters(module)


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of ``module`` that are not embedding-table weights."""
    tables = {id(p) for p in table_parameters(module)}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in tables]


def optimizer_state_bytes(module: nn.Module, optimizer: str, *, tables_only: bool = False) -> int:
    """Bytes of optimizer state for the trainable parameters of ``module``.

    Per parameter ``p`` with ``n`` elements of ``s`` bytes (matching PyTorch's optimizers, which keep a
    4-byte ``step`` tensor per parameter for Adagrad and Adam):

    - ``sgd`` (no momentum): 0
    - ``adagrad``: ``n*s + 4`` (sum of squared gradients, step)
    - ``rowwise_adagrad``: table weights ``rows*4`` (one accumulator per row, :class:`embtable.RowWiseAdagrad`),
      other parameters as ``adagrad``
    - ``adam``: ``2*n*s + 4`` (two moments, step)

    Tables in fused storage (:func:`embtable.fuse_storage`) count the kernel's own state, exactly: ``sgd`` 0,
    ``adagrad`` ``n*s`` (no step tensor), ``rowwise_adagrad`` ``rows*4``; ``optimizer`` must be the one
    they were fused with.
    """
    from .fused import fused_storages

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    table_ids = {id(p) for p in table_parameters(module)}
    total = 0
    seen: set[int] = set()
    for storage in fused_storages(module):
        if storage.optimizer != optimizer:
            raise ValueError(f"tables fused with {storage.optimizer!r} cannot be counted as trained with {optimizer!r}")
        total += storage.optimizer_state_bytes()
        seen.update(id(p) for p in storage.parameters())
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if tables_only and id(p) not in table_ids:
            continue
        n, s = p.numel(), p.element_size()
        if optimizer == "adagrad" or (optimizer == "rowwise_adagrad" and id(p) not in table_ids):
            total += n * s + 4
        elif optimizer == "rowwise_adagrad":
            total += p.shape[0] * 4
        elif optimizer == "adam":
            total += 2 * n * s + 4
    return total


def training_bytes(module: nn.Module, optimizer: str) -> int:
    """Every tensor training holds (inference bytes plus training-only tensors such as sketches or query
    tables) plus the optimizer state for training ``module`` with ``optimizer``."""
    return _report(module, training=True).inference_bytes + optimizer_state_bytes(module, optimizer)
