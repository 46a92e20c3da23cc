"""Train a method's row storage with FBGEMM's fused optimizers (the update runs inside the backward kernel).

By default every table trains through sparse COO gradients and a Python optimizer
(:class:`embtable.RowWiseAdagrad`): autograd materialises a gradient per looked-up id, the optimizer
coalesces it and updates the rows. FBGEMM's table-batched embedding (TBE) kernel instead does the lookup
of all tables of a collection in one call and, in its backward, deduplicates the ids and applies SGD,
Adagrad or row-wise Adagrad to the touched rows in place -- no gradient tensor, no optimizer step.

:func:`fuse_storage` replaces each storage ``EmbeddingBagCollection`` of a method (the children
:func:`embtable.module.storage_collection` builds) by a :class:`FusedEmbeddingBagStorage` holding the same
tables and weights in one ``SplitTableBatchedEmbeddingBagsCodegen``. Dense parts of the method
(projections, MLP decoders, scales) are untouched and stay with the dense optimizer.

Why TBE directly and not TorchRec's ``FusedEmbeddingBagCollection`` (which wraps the same kernel): that
module splits the batch per feature (``KeyedJaggedTensor.to_dict()``) and concatenates it back and casts the
ids to int32 on every call, which on a 2-core CPU costs about as much as the lookup; our storage inputs
already arrive in table order, so the KJT's values and offsets go to the kernel as they are (int64 ids,
so tables over 2**31 rows stay exact). The parameters keep ``EmbeddingBagCollection``'s names
(``embedding_bags.<table>.weight``, views of the kernel's weights), so ``state_dict``, checkpoints,
:func:`embtable.memory_report` and the methods' ``storage.embedding_bags[name].weight`` accesses are unchanged.

What is not fused (it keeps sparse gradients and the Python optimizer): a method that sets
``fused_storage_unsupported`` (a reason: its storage is not plain tables, or it updates rows itself);
``EmbeddingCollection`` (unpooled) storage; a collection whose tables are not all fp32 or all fp16 (one
``weights_precision`` per kernel; int8 rows have no CPU backward kernel in FBGEMM 1.8), or with a dim that is
not a multiple of 4 (FBGEMM's requirement). fp16 tables (``EmbeddingBagConfig(data_type=DataType.FP16)``) run
the kernel at ``weights_precision=SparseType.FP16``: rows are read as fp16, pooled in fp32 (the output is
fp32), and the update is computed in fp32 and written back rounded to nearest (the CPU kernel ignores
FBGEMM's ``stochastic_rounding``), as a Python optimizer on an fp16 parameter does. For
DistributedModelParallel, shard the unfused module (:func:`embtable.sharding.shard` installs TorchRec's own
fused optimizer on the shards); :func:`unfuse_storage` turns a fused module back into plain collections with
the trained weights.

Bytes: the weights are the same tensors at the same size; the optimizer state is the kernel's own
(``sgd`` none, ``adagrad`` one fp32 float per weight -- also for fp16 tables, ``rowwise_adagrad`` one fp32
float per row), counted exactly by
:func:`embtable.optimizer_state_bytes`. Results are bitwise reproducible at a fixed thread count.

>>> import embtable, torch
>>> from torchrec import KeyedJaggedTensor
>>> m = embtable.build([embtable.FeatureSpec("a", 1000, 8)], embtable.HashConfig(), "1/4", seed=0)
>>> fuse_storage(m, "rowwise_adagrad", lr=0.1)
1
>>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([3, 7, 3]), torch.tensor([2, 1]))
>>> before = m(kjt).values().detach()
>>> m(kjt).values().sum().backward()   # the rows of ids 3 and 7 are updated here, no optimizer step
>>> bool((m(kjt).values() != before).all())
True
>>> embtable.optimizer_state_bytes(m, "rowwise_adagrad", tables_only=True)  # one float per row (248 rows)
992
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

__all__ = ["FUSED_OPTIMIZERS", "FusedEmbeddingBagStorage", "FusedTableOptimizer", "fuse_storage", "unfuse_storage",
           "fused_storages"]

FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
#: eps of the unfused optimizers the trainer uses (torch.optim.Adagrad: 1e-10, embtable.RowWiseAdagrad: 1e-8)
_EPS = {"sgd": 1e-8, "adagrad": 1e-10, "rowwise_adagrad": 1e-8}
#: table data types the CPU kernel trains, and its ``SparseType`` (weights_precision) for each
_PRECISIONS = {DataType.FP32: "FP32", DataType.FP16: "FP16"}


def _optim_type(optimizer: str):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
            "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}[optimizer]


class FusedEmbeddingBagStorage(EmbeddingBagCollectionInterface):
    """An ``EmbeddingBagCollection``'s tables in one FBGEMM TBE kernel that applies ``optimizer`` in backward.

    Same forward contract (KJT in, ``KeyedTensor`` of the tables' features in config order out) and same
    parameter names as the collection it replaces. Build it with :func:`fuse_storage`.
    """

    def __init__(self, ebc: EmbeddingBagCollection, optimizer: str, lr: float, eps: float | None = None) -> None:
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        if optimizer not in FUSED_OPTIMIZERS:
            raise ValueError(f"no fused kernel for optimizer {optimizer!r}; choose one of {FUSED_OPTIMIZERS}")
        configs = ebc.embedding_bag_configs()
        poolings = {c.pooling for c in configs}
        if len(poolings) != 1 or next(iter(poolings)) not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"fused storage needs one sum or mean pooling for all tables, got {poolings}")
        precisions = {c.data_type for c in configs}
        if len(precisions) != 1 or next(iter(precisions)) not in _PRECISIONS:
            raise ValueError(f"fused storage needs all tables fp32 or all fp16, got {sorted(p.value for p in precisions)}")
        device = ebc.embedding_bags[configs[0].name].weight.device
        cuda = device.type == "cuda"
        self.optimizer, self.lr = optimizer, float(lr)
        self._configs = list(configs)
        self._is_weighted = ebc.is_weighted()
        self._feature_names = [n for c in configs for n in c.feature_names]
        self._length_per_key = [c.embedding_dim for c in configs for _ in c.feature_names]
        table_map = [t for t, c in enumerate(configs) for _ in c.feature_names]
        self._permutes: dict[tuple[str, ...], list[int]] = {}
        # a plain attribute, not a submodule: its buffers (the packed weights, the optimizer state) must not
        # appear twice in named_buffers / state_dict; the weights appear once, as the parameters below
        self.__dict__["tbe"] = SplitTableBatchedEmbeddingBagsCodegen(
            [(c.num_embeddings, c.embedding_dim, EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
              ComputeDevice.CUDA if cuda else ComputeDevice.CPU) for c in configs],
            feature_table_map=table_map,
            optimizer=_optim_type(optimizer),
            learning_rate=self.lr,
            eps=_EPS[optimizer] if eps is None else eps,
            pooling_mode=PoolingMode.SUM if configs[0].pooling == PoolingType.SUM else PoolingMode.MEAN,
            weights_precision=getattr(SparseType, _PRECISIONS[configs[0].data_type]),
            device=device,
        )
        self.embedding_bags = nn.ModuleDict()
        with torch.no_grad():
            for c, w in zip(configs, self.tbe.split_embedding_weights()):
                w.copy_(ebc.embedding_bags[c.name].weight)
                holder = nn.Module()
                holder.register_parameter("weight", nn.Parameter(w, requires_grad=False))
                self.embedding_bags[c.name] = holder

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys = features.keys()
        if keys != self._feature_names:
            key = tuple(keys)
            if key not in self._permutes:
                index = {k: i for i, k in enumerate(keys)}
                self._permutes[key] = [index[k] for k in self._feature_names]
            features = features.permute(self._permutes[key])
        weights = features.weights() if self._is_weighted else None
        values = self.tbe(features.values(), features.offsets(), per_sample_weights=weights)
        return KeyedTensor(keys=self._feature_names, length_per_key=self._length_per_key, values=values)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def optimizer_states(self) -> dict[str, torch.Tensor]:
        """The kernel's optimizer state per table (``<table>.momentum_1``), views of its buffers."""
        out = {}
        for c, states in zip(self._configs, self.tbe.split_optimizer_states()):
            for i, s in enumerate(states):
                out[f"{c.name}.momentum_{i + 1}"] = s
        return out

    def optimizer_state_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.optimizer_states().values())

    def set_learning_rate(self, lr: float) -> None:
        self.lr = float(lr)
        self.tbe.set_learning_rate(self.lr)

    def to_collection(self) -> EmbeddingBagCollection:
        """A plain ``EmbeddingBagCollection`` with the current weights (what DMP shards and export serves)."""
        ebc = EmbeddingBagCollection(tables=self._configs, is_weighted=self._is_weighted, device=self.tbe.current_device)
        with torch.no_grad():
            for c in self._configs:
                ebc.embedding_bags[c.name].weight.copy_(self.embedding_bags[c.name].weight)
        return ebc

    def extra_repr(self) -> str:
        return f"tables={len(self._configs)}, optimizer={self.optimizer}, lr={self.lr}"


def fused_storages(module: nn.Module) -> list[FusedEmbeddingBagStorage]:
    return [m for m in module.modules() if isinstance(m, FusedEmbeddingBagStorage)]


def _refusal(module: nn.Module) -> str | None:
    for m in module.modules():
        reason = getattr(m, "fused_storage_unsupported", None)
        if reason:
            return reason
    return None


def _fusable(configs: list[EmbeddingBagConfig]) -> bool:
    # FBGEMM's kernels need one precision (fp32 or fp16) and one pooling per kernel, and dims that are multiples of 4
    precisions = {c.data_type for c in configs}
    return (all(c.embedding_dim % 4 == 0 for c in configs) and len({c.pooling for c in configs}) == 1
            and len(precisions) == 1 and next(iter(precisions)) in _PRECISIONS)


def fuse_storage(module: nn.Module, optimizer: str = "rowwise_adagrad", lr: float = 0.01,
                 eps: float | None = None) -> int:
    """Replace every plain ``EmbeddingBagCollection`` in ``module`` by a :class:`FusedEmbeddingBagStorage`.

    Call it after moving ``module`` to its device. Modules (or sub-modules) that set a truthy
    ``fused_storage_unsupported`` are left as they are. Returns the number of collections fused.
    """
    if optimizer not in FUSED_OPTIMIZERS:
        raise ValueError(f"no fused kernel for optimizer {optimizer!r}; choose one of {FUSED_OPTIMIZERS}")
    if _refusal(module):
        return 0
    targets = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is EmbeddingBagCollection:
                configs = child.embedding_bag_configs()
                if _fusable(configs):
                    targets.append((parent, name, child))
    for parent, name, child in targets:
        setattr(parent, name, FusedEmbeddingBagStorage(child, optimizer, lr, eps))
    return len(targets)


def unfuse_storage(module: nn.Module) -> int:
    """Turn every :class:`FusedEmbeddingBagStorage` in ``module`` back into a plain collection (same weights)."""
    targets = [(parent, name, child) for _, parent in module.named_modules()
               for name, child in parent.named_children() if isinstance(child, FusedEmbeddingBagStorage)]
    for parent, name, child in targets:
        setattr(parent, name, child.to_collection())
    return len(targets)


class FusedTableOptimizer:
    """The optimizer-shaped handle the trainer keeps for fused tables: ``step``/``zero_grad`` do nothing (the
    update ran in backward); ``state_dict``/``load_state_dict`` save and restore the kernels' state."""

    def __init__(self, storages: list[FusedEmbeddingBagStorage]) -> None:
        self.storages = storages

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self, closure: Any = None) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"fused": [{k: v.detach().clone() for k, v in s.optimizer_states().items()} for s in self.storages],
                "lr": [s.lr for s in self.storages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("fused", ())) != len(self.storages):
            raise ValueError("the saved optimizer state is not of fused tables of this model")
        with torch.no_grad():
            for s, saved, lr in zip(self.storages, state["fused"], state["lr"]):
                for k, v in s.optimizer_states().items():
                    v.copy_(saved[k])
                s.set_learning_rate(lr)
