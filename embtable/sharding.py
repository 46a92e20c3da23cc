"""Sharding embtable modules with TorchRec's DistributedModelParallel (DMP).

Every method keeps its big storage as child TorchRec ``EmbeddingBagCollection`` /
``EmbeddingCollection`` modules (of exactly those types, which is what DMP shards); the id mapping and the
combine step are ordinary modules that run locally on each rank, and their dense parameters are
synchronised by DMP's data-parallel wrapper. So sharding needs no code of our own beyond choosing
sharders, constraints and the optimizer, which this module does:

- :func:`storage_modules` lists the storage collections a model holds;
- :func:`plan_sharding` asks TorchRec's planner for a plan (the planner sees the compressed sizes);
- :func:`shard` wraps a model in DMP with a fused sparse optimizer and loads its weights into the shards.

Facts this relies on (torch 2.13 CPU, torchrec 1.8, gloo): DMP on CPU does not copy the wrapped model's
weights into the shards, so :func:`shard` loads them after wrapping; with no optimizer DMP silently
applies SGD at lr 0.01, so :func:`shard` always installs one; the stock sharders do not offer row-wise
sharding on CPU, although it runs, so :func:`sharders` advertises it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import optim as trec_optim
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

__all__ = ["storage_modules", "sharders", "plan_sharding", "shard", "SHARDING_TYPES"]

SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "data_parallel")
_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": trec_optim.RowWiseAdagrad}


def storage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every storage collection DMP can shard (exact types only)."""
    return [(name, m) for name, m in model.named_modules() if type(m) in (EmbeddingBagCollection, EmbeddingCollection)]


class _CpuRowWiseMixin:
    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


class _EBCSharder(_CpuRowWiseMixin, EmbeddingBagCollectionSharder):
    pass


class _ECSharder(_CpuRowWiseMixin, EmbeddingCollectionSharder):
    pass


def sharders() -> list[ModuleSharder[nn.Module]]:
    """TorchRec's stock sharders, with row-wise sharding also offered on CPU."""
    return [_EBCSharder(), _ECSharder()]


def _constraints(model: nn.Module, sharding_types: Sequence[str] | None) -> dict[str, ParameterConstraints] | None:
    if sharding_types is None:
        return None
    unknown = sorted(set(sharding_types) - set(SHARDING_TYPES))
    if unknown:
        raise ValueError(f"unknown sharding type(s) {unknown}; choose from {SHARDING_TYPES}")
    out: dict[str, ParameterConstraints] = {}
    for _, module in storage_modules(model):
        configs = module.embedding_bag_configs() if isinstance(module, EmbeddingBagCollection) else module.embedding_configs()
        for config in configs:
            out[config.name] = ParameterConstraints(sharding_types=list(sharding_types))
    return out


def plan_sharding(
    model: nn.Module,
    *,
    world_size: int,
    memory_per_rank: int | None = None,
    sharding_types: Sequence[str] | None = None,
    compute_device: str = "cpu",
    process_group: torch.distributed.ProcessGroup | None = None,
) -> ShardingPlan:
    """A TorchRec sharding plan for the storage tables of ``model`` (which may live on the meta device).

    Args:
        world_size: number of ranks (processes; one per host or per GPU).
        memory_per_rank: bytes each rank may hold (host DDR on CPU, HBM on GPU); TorchRec's default if None.
        sharding_types: restrict the planner, e.g. ``["table_wise"]``; all types if None.
        process_group: when given, the plan is computed collectively (identical on every rank).
    """
    if not storage_modules(model):
        raise ValueError("the model holds no EmbeddingBagCollection / EmbeddingCollection storage to shard")
    if compute_device == "cpu":
        topology = Topology(world_size=world_size, compute_device="cpu", ddr_cap=memory_per_rank)
    else:
        topology = Topology(world_size=world_size, compute_device=compute_device, hbm_cap=memory_per_rank)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=_constraints(model, sharding_types))
    if process_group is not None:
        return planner.collective_plan(model, sharders(), process_group)
    return planner.plan(model, sharders())


def shard(
    model: nn.Module,
    *,
    optimizer: str = "sgd",
    lr: float = 0.01,
    sharding_types: Sequence[str] | None = None,
    plan: ShardingPlan | None = None,
    device: torch.device | None = None,
) -> nn.Module:
    """Wrap ``model`` in ``DistributedModelParallel``: storage tables sharded, the rest data-parallel.

    Must be called on every rank of an initialised default process group, with the same model (same
    seed) on each. The storage tables get a fused sparse optimizer (``"sgd"``, ``"adagrad"`` or
    ``"rowwise_adagrad"``, applied in
    backward, as TorchRec does); optimise the remaining (dense) parameters yourself, e.g. with
    ``torchrec.optim.optimizers.in_backward_optimizer_filter(dmp.named_parameters())``.
    The model's weights are loaded into the shards after wrapping. A module whose class sets
    ``sharding_unsupported`` (a reason) is refused with a ``ValueError`` that gives it. Storage fused by
    :func:`embtable.fuse_storage` is turned back into plain collections (same weights) first.
    """
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    for path, sub in model.named_modules():
        reason = getattr(sub, "sharding_unsupported", None)  # a method that cannot be sharded says why
        if reason:
            raise ValueError(f"{path or 'model'} ({type(sub).__name__}) cannot be sharded by shard(): {reason}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(
            f"fused optimizer {optimizer!r} is not available on CPU; choose one of {sorted(_OPTIMIZERS)} "
            "(TorchRec's fused Adam needs a GPU)"
        )
    if not torch.distributed.is_initialized():
        raise RuntimeError("shard() needs an initialised process group (torch.distributed.init_process_group)")
    device = device or torch.device("cpu")
    from .fused import unfuse_storage

    unfuse_storage(model)  # DMP shards plain collections and installs its own fused optimizer on the shards
    _check_dims(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _, module in storage_modules(model):
        apply_optimizer_in_backward(_OPTIMIZERS[optimizer], module.parameters(), {"lr": lr})
    if plan is None:
        plan = plan_sharding(
            model,
            world_size=torch.distributed.get_world_size(),
            sharding_types=sharding_types,
            compute_device=device.type,
            process_group=torch.distributed.GroupMember.WORLD,
        )
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders())
    missing, unexpected = dmp.load_state_dict(_prefixed(state, dmp), strict=False)
    if unexpected:
        raise RuntimeError(f"could not load weights into the sharded model: unexpected keys {unexpected}")
    return dmp


def _check_dims(model: nn.Module) -> None:
    for path, module in storage_modules(model):
        configs = module.embedding_bag_configs() if isinstance(module, EmbeddingBagCollection) else module.embedding_configs()
        odd = [f"{c.name} (dim {c.embedding_dim})" for c in configs if c.embedding_dim % 4]
        if odd:
            raise ValueError(
                f"{path or 'model'}: TorchRec's sharded kernels need table dims divisible by 4, but {odd} are not; "
                "build the method with dims that are multiples of 4 (e.g. MixedDimConfig(dim_multiple=4), a "
                "low-rank rank or OptEmbed dims that are multiples of 4, unified chunks of 4 or more)"
            )


def _prefixed(state: dict[str, torch.Tensor], dmp: nn.Module) -> dict[str, torch.Tensor]:
    keys = set(dmp.state_dict().keys())
    if all(k in keys for k in state):
        return state
    return {f"_dmp_wrapped_module.{k}": v for k, v in state.items()}
