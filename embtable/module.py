"""The contract every embtable module obeys, and the machinery the methods share.

Every method is three steps around ordinary TorchRec storage (see DESIGN.md)::

    KJT (logical ids) ──► id mapping ──► storage lookup + pooling ──► combine ──► KeyedTensor
                          (a leaf module)  (child EmbeddingBagCollection  (per method)
                                            / EmbeddingCollection)

:class:`EmbeddingModule` implements TorchRec's ``EmbeddingBagCollectionInterface``: it takes the
``KeyedJaggedTensor`` an ``EmbeddingBagCollection`` takes and returns the ``KeyedTensor`` it returns (same
keys, order and per-key dims), and ``embedding_bag_configs()`` describes the logical, uncompressed tables.
Before a method sees the ids, the base class selects and orders the module's features and applies the
out-of-range policy, so each method only implements :meth:`EmbeddingModule.pooled`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .budget import FeaturePlan
from .config import MethodConfig, OutOfRange, Pooling
from .features import FeatureSpec
from .memory import MemoryReport, memory_report

if TYPE_CHECKING:
    from .stages import Pipeline

__all__ = [
    "EmbeddingModule",
    "IdRangePolicy",
    "device_constants",
    "is_tracing",
    "per_id",
    "with_values",
    "storage_collection",
    "storage_values",
    "torchrec_pooling",
]


_FX_NOTICE = "is_fx_tracing will return true"
_fx_notice_done = False


class _DropFxNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_FX_NOTICE)


def _quiet_fx_tracing_notice() -> None:
    """Consume torch's one-per-process ``is_fx_tracing will return true ...`` notice without printing it.

    torch logs it at the first ``KeyedJaggedTensor`` a process builds (its metaclass asks ``is_fx_tracing()``);
    it is advice about torch's own API, which nothing here calls. torch prints it once per process (a
    cached function), so emitting it here, with only that message filtered, silences it for good while every
    other log record of torch passes. Called when an embtable module is built, before its first batch.
    """
    global _fx_notice_done
    if _fx_notice_done:
        return
    _fx_notice_done = True
    from torch.fx import _symbolic_trace

    notice = getattr(_symbolic_trace, "is_fx_tracing_warning", None)
    if notice is None:  # another torch release: nothing to do
        return
    logger, drop = logging.getLogger(_symbolic_trace.__name__), _DropFxNotice()
    logger.addFilter(drop)
    try:
        notice()
    finally:
        logger.removeFilter(drop)


def torchrec_pooling(pooling: Pooling) -> PoolingType:
    return PoolingType.SUM if Pooling(pooling) is Pooling.SUM else PoolingType.MEAN


def with_values(kjt: KeyedJaggedTensor, values: torch.Tensor, keys: list[str] | None = None) -> KeyedJaggedTensor:
    """The same jagged layout (keys, lengths, weights) with new ``values`` (and optionally renamed keys)."""
    return KeyedJaggedTensor(
        keys=kjt.keys() if keys is None else keys,
        values=values,
        weights=kjt.weights_or_none(),
        lengths=kjt.lengths(),
        offsets=kjt.offsets(),
        stride=kjt.stride(),
        length_per_key=kjt.length_per_key(),
        offset_per_key=kjt.offset_per_key(),
    )


def storage_collection(
    tables: Sequence[tuple[str, int, int, list[str]]],
    pooling: Pooling,
    is_weighted: bool,
    device: torch.device | None,
) -> EmbeddingBagCollection:
    """A plain TorchRec ``EmbeddingBagCollection`` holding a method's storage.

    Args:
        tables: ``(table name, rows, dim, feature names)`` per table.
    """
    configs = [
        EmbeddingBagConfig(
            name=name,
            num_embeddings=rows,
            embedding_dim=dim,
            feature_names=list(feature_names),
            pooling=torchrec_pooling(pooling),
        )
        for name, rows, dim, feature_names in tables
    ]
    return EmbeddingBagCollection(tables=configs, is_weighted=is_weighted, device=device)


def storage_values(pooled: KeyedTensor, keys: list[str]) -> torch.Tensor:
    """The pooled storage output as ``[B, sum of dims]`` with its columns in ``keys`` order.

    An unsharded ``EmbeddingBagCollection`` returns its features in config order; a sharded one
    (DistributedModelParallel) returns them grouped by sharding, so methods must not rely on the order.
    """
    if pooled.keys() == keys:
        return pooled.values()
    per_key = pooled.to_dict()
    return torch.cat([per_key[k] for k in keys], dim=1)


def is_tracing() -> bool:
    """True while ``torch.compile`` / ``torch.export`` / FX / TorchScript tracing runs the code.

    Hot paths use it to choose between an eager check (a Python branch on data, with a precise error) and
    a traceable form (masks, ``torch.where``, ``torch._assert_async``) that never reads data back to Python.
    """
    if torch.jit.is_scripting():
        return False
    return bool(
        torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    )


_T = TypeVar("_T")


def _drop_device_constants(module: nn.Module, *_: Any) -> None:
    module.__dict__.pop("_device_constants", None)


def device_constants(owner: nn.Module, name: str, device: torch.device, build: Callable[[torch.device], _T]) -> _T:
    """``build(device)``, cached on ``owner`` per ``(name, device)``: layout tensors a hot path needs on the ids'
    device (built from Python integers of the config or copied from buffers), made once instead of every call.

    The cache is not state: it is not in ``state_dict``, holds no bytes the memory report must count (copies of
    constants), is dropped when ``owner`` loads a state dict (a buffer it was built from may change), and is
    bypassed while a trace runs (a cached tensor would become a fake constant of the traced program; the trace
    records how it is built instead).

    >>> m = nn.Module()
    >>> calls = []
    >>> build = lambda device: calls.append(device) or torch.arange(3, device=device)
    >>> a = device_constants(m, "ranks", torch.device("cpu"), build)
    >>> b = device_constants(m, "ranks", torch.device("cpu"), build)
    >>> a is b, len(calls)
    (True, 1)
    >>> _ = m.load_state_dict({})
    >>> _ = device_constants(m, "ranks", torch.device("cpu"), build); len(calls)
    2
    """
    if is_tracing():
        return build(device)
    cache = owner.__dict__.get("_device_constants")
    if cache is None:
        if "_device_constants_hook" not in owner.__dict__:
            owner.__dict__["_device_constants_hook"] = owner.register_load_state_dict_pre_hook(_drop_device_constants)
        cache = owner.__dict__["_device_constants"] = {}
    key = (name, torch.device(device))
    if key not in cache:
        cache[key] = build(device)
    return cache[key]


def per_id(kjt: KeyedJaggedTensor, per_key: torch.Tensor, num_ids: int) -> torch.Tensor:
    """Row ``f`` of ``per_key [F, ...]`` for each id of feature ``f``: ``[N, ...]``.

    Built from the lengths (bag f * B + b belongs to feature f), not from ``kjt.length_per_key()``, whose
    Python ints need a host read-back (a graph break under ``torch.compile``).
    """
    if kjt.variable_stride_per_key():
        per_bag = per_key.repeat_interleave(torch.tensor(kjt.stride_per_key(), device=per_key.device), dim=0)
    else:
        # [F * B, ...] in the KJT's key-major bag order; a gather, not an expand: a traced batch of 1 stays valid
        lengths, stride = kjt.lengths(), kjt.stride()
        if not is_tracing() and stride == 0:  # an empty batch has no ids
            return per_key[:0]
        feature = torch.div(torch.arange(lengths.shape[0], device=lengths.device), stride, rounding_mode="floor")
        per_bag = per_key[feature]
    return torch.repeat_interleave(per_bag, kjt.lengths(), dim=0, output_size=num_ids)


class IdRangePolicy(nn.Module):
    """Checks or maps ids outside ``[0, num_embeddings)`` per feature (see :class:`OutOfRange`).

    Holds no tensors: the bounds are rebuilt per call from Python ints (a few dozen elements).
    In eager mode an out-of-range id under ``ERROR`` raises a ``ValueError`` naming the feature and id;
    under tracing (``torch.compile``, ``torch.export``) the same policy is a runtime assertion in the graph
    (``torch._assert_async``), and ``WRAP``/``RESERVED`` are masks: no data-dependent Python branch.
    """

    def __init__(self, feature_names: list[str], num_embeddings: list[int], policy: OutOfRange) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.num_embeddings = list(num_embeddings)
        self.policy = OutOfRange(policy)

    def bounds(self, kjt: KeyedJaggedTensor, values: torch.Tensor) -> torch.Tensor:
        """``num_embeddings`` of each id's feature, ``[N]``."""
        return per_id(kjt, torch.tensor(self.num_embeddings, dtype=torch.int64, device=values.device), values.shape[0])

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values = kjt.values()
        if values.dtype != torch.int64:
            if values.is_floating_point():
                raise TypeError(f"ids must be integers, got a {values.dtype} tensor of values")
            values = values.to(torch.int64)
        if is_tracing():
            return with_values(kjt, self._traced(kjt, values))
        if values.numel() == 0:
            return with_values(kjt, values)
        bounds = self.bounds(kjt, values)
        bad = (values < 0) | (values >= bounds)
        if not bool(bad.any()):
            return with_values(kjt, values)
        if self.policy is OutOfRange.ERROR:
            first = int(bad.nonzero()[0, 0])
            ends = torch.cumsum(torch.tensor(kjt.length_per_key(), device=values.device), 0)
            feature = int((ends <= first).sum())
            name, size = self.feature_names[feature], self.num_embeddings[feature]
            raise ValueError(
                f"feature {name!r}: id {int(values[first])} is outside the table's range [0, {size}) "
                f"({int(bad.sum())} out-of-range id(s) in this batch); fix the ids, or build the module with "
                "out_of_range='wrap' (id mod num_embeddings) or 'reserved' (one shared extra row)"
            )
        if self.policy is OutOfRange.WRAP:
            return with_values(kjt, torch.remainder(values, bounds))
        return with_values(kjt, torch.where(bad, bounds, values))

    def _traced(self, kjt: KeyedJaggedTensor, values: torch.Tensor) -> torch.Tensor:
        bounds = self.bounds(kjt, values)
        if self.policy is OutOfRange.WRAP:
            return torch.remainder(values, bounds)
        bad = (values < 0) | (values >= bounds)
        if self.policy is OutOfRange.RESERVED:
            return torch.where(bad, bounds, values)
        torch._assert_async(
            torch.logical_not(bad.any()),
            "an id is outside its table's range [0, num_embeddings); fix the ids, or build the module with "
            "out_of_range='wrap' or 'reserved'",
        )
        return values

    def extra_repr(self) -> str:
        return f"policy={self.policy.value}"


class EmbeddingModule(EmbeddingBagCollectionInterface):
    """Base class of every embtable module: a drop-in for ``torchrec.EmbeddingBagCollection``.

    Subclasses register with :func:`embtable.register_method`, build their id mapping and storage in
    ``__init__``, and implement:

    - :meth:`pooled`: ``KeyedJaggedTensor`` (validated, in this module's feature order) -> ``[B, sum(dims)]``;
    - :meth:`size_config` (pure): fill the config's size fields for a byte budget;
    - :meth:`describe` (pure): exact per-feature bytes of a sized config, equal to the built module's.

    Args:
        features: the logical features, in output order.
        config: the method's config, sized (see :func:`embtable.plan`).
        pooling: ``"sum"`` or ``"mean"``.
        is_weighted: bags carry per-id weights (``KeyedJaggedTensor.weights()``); sum pooling only.
        out_of_range: policy for ids outside ``[0, num_embeddings)``.
        device: where to allocate the tensors (``"meta"`` allocates nothing).
    """

    config_cls: ClassVar[type[MethodConfig]]

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        config: MethodConfig,
        *,
        pooling: Pooling | str = Pooling.SUM,
        is_weighted: bool = False,
        out_of_range: OutOfRange | str = OutOfRange.ERROR,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _quiet_fx_tracing_notice()
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.pooling = Pooling(pooling)
        self.out_of_range = OutOfRange(out_of_range)
        if is_weighted and self.pooling is Pooling.MEAN:
            raise ValueError(
                "weighted bags need pooling='sum' (as in nn.EmbeddingBag, per-sample weights are only defined "
                "for sum); use pooling='sum', or normalise the weights yourself to get a weighted mean"
            )
        self._is_weighted = bool(is_weighted)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        # the features as stored: OutOfRange.RESERVED adds one row (id = num_embeddings) per feature
        self.logical_features = list(features)
        self.features = _with_reserved_row(self.logical_features, self.out_of_range)
        self.feature_names = [f.name for f in self.features]
        self.embedding_dims = [f.embedding_dim for f in self.features]
        self.id_policy = IdRangePolicy(
            self.feature_names, [f.num_embeddings for f in self.logical_features], self.out_of_range
        )
        self._embedding_bag_configs = [
            EmbeddingBagConfig(
                name=f.name,
                num_embeddings=f.num_embeddings,
                embedding_dim=f.embedding_dim,
                feature_names=[f.name],
                pooling=torchrec_pooling(self.pooling),
            )
            for f in self.features
        ]

    @property
    def device(self) -> torch.device:
        """Where this module's tensors are (after ``.to(...)`` too); the constructor's device before any exists."""
        for t in itertools.chain(self.parameters(), self.buffers()):
            return t.device
        return self._device

    @device.setter
    def device(self, value: torch.device | str) -> None:
        self._device = torch.device(value)

    # ----- the TorchRec contract -----
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kjt = self.id_policy(self._select(features))
        if kjt.stride() == 0:  # an empty batch: TorchRec's storage cannot split zero-length lengths
            values = torch.zeros(0, sum(self.embedding_dims), device=kjt.values().device)
            return KeyedTensor(keys=self.feature_names, length_per_key=self.embedding_dims, values=values)
        if self._is_weighted and kjt.weights_or_none() is None:
            raise ValueError("this module was built with is_weighted=True but the KeyedJaggedTensor has no weights")
        values = self.pooled(kjt)  # [B, sum(D_f)]
        return KeyedTensor(keys=self.feature_names, length_per_key=self.embedding_dims, values=values)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    # ----- what a method implements -----
    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def size_config(cls, features: Sequence[FeatureSpec], config: MethodConfig, budget_bytes: int | None) -> MethodConfig:
        raise NotImplementedError

    @classmethod
    def describe(
        cls, features: Sequence[FeatureSpec], config: MethodConfig
    ) -> tuple[list[FeaturePlan], dict[str, int]]:
        raise NotImplementedError

    # ----- shared services -----
    def memory(self) -> MemoryReport:
        """Exact bytes of every tensor this module needs at inference."""
        return memory_report(self)

    # ----- optional hooks: each has a default here; the trainer, compress() and export call these, and
    # nothing outside embtable/methods/ names a method or tests a method's class -----
    def auxiliary_loss(self) -> torch.Tensor | None:
        """A regulariser the trainer adds to the loss (methods that learn their own size); default none."""
        return None

    def init_from_weights(self, name: str, weight: torch.Tensor) -> str:
        """Initialise feature ``name`` from a trained full table ``weight`` ``[n, d]`` (used by ``compress``).

        Runs under ``torch.no_grad()``. Returns a short description of what was done (it goes into the
        compression report). The default raises ``NotImplementedError``: the method starts at random.
        """
        raise NotImplementedError(f"{type(self).__name__} has no initialisation from a trained table")

    def inference_module(self) -> nn.Module:
        """The module a server loads (used by ``embtable.export``): by default this module itself.

        A method whose training state differs from its serving state (a supernet, a query table behind
        codes, a sketch) returns the compact module, with the same ``forward`` contract.
        """
        return self

    @classmethod
    def training_pipelines(cls) -> Sequence[Pipeline]:
        """Multi-stage ways to train this method's tables (:mod:`embtable.stages`); default none.

        E.g. supernet -> search -> retrain, or train full tables -> compress -> fine-tune. Each
        :class:`~embtable.stages.Pipeline` names its stages and what each builds from the previous one's
        result; a trainer (``experiments.training.stages``) runs, checkpoints and resumes them.
        """
        return ()

    def train_step_end(self, step: int) -> None:
        """Per-step work after the optimizer step of training step ``step`` (0-based); default none.

        The trainer calls it on every ``EmbeddingModule`` in the model, e.g. CAFE's hot-id migration or PEP's
        stop of pruning once the target sparsity is reached. It must not run in ``forward``'s traced path.
        """

    def register_training_buffer(self, name: str, tensor: torch.Tensor | None) -> None:
        """Register a buffer that training needs and serving does not (a sketch, counters).

        It is saved in ``state_dict`` (so a resumed run equals an uninterrupted one) and counted by
        :func:`embtable.training_bytes`, not by :func:`embtable.memory_report`'s inference bytes.
        """
        self.register_buffer(name, tensor)
        self.training_only_tensors = tuple(self.training_only_tensors) + (name,)

    def register_training_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """Register a parameter only training needs (DPQ's query table): counted as training bytes only."""
        self.register_parameter(name, param)
        self.training_only_tensors = tuple(self.training_only_tensors) + (name,)

    #: names of this module's own (direct) parameters/buffers that only training needs
    training_only_tensors: tuple[str, ...] = ()

    #: why DistributedModelParallel cannot shard this module (None: it can); :func:`embtable.sharding.shard`
    #: raises it as its error. A method whose storage is not TorchRec tables sets it (class or instance).
    sharding_unsupported: str | None = None

    #: why :func:`embtable.fuse_storage` must leave this module's storage unfused (None: it may fuse it); a
    #: method whose storage is not plain TorchRec tables, or that updates rows itself, sets it
    fused_storage_unsupported: str | None = None

    def _select(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        if keys == self.feature_names:
            return features
        index = {k: i for i, k in enumerate(keys)}
        missing = [k for k in self.feature_names if k not in index]
        if missing:
            raise KeyError(
                f"the KeyedJaggedTensor lacks feature(s) {missing} that this {type(self).__name__} embeds; "
                f"it has {keys}"
            )
        return features.permute([index[k] for k in self.feature_names])

    def extra_repr(self) -> str:
        parts = [f"features={len(self.features)}", f"config={self.config}"]
        if self.pooling is not Pooling.SUM:
            parts.append(f"pooling={self.pooling.value}")
        if self._is_weighted:
            parts.append("is_weighted=True")
        if self.out_of_range is not OutOfRange.ERROR:
            parts.append(f"out_of_range={self.out_of_range.value}")
        return ", ".join(parts)


def _with_reserved_row(features: list[FeatureSpec], policy: OutOfRange) -> list[FeatureSpec]:
    from .budget import effective_features

    return effective_features(features, policy)


def config_field_per_feature(
    value: Any, features: Sequence[FeatureSpec], field: str, method: str
) -> dict[str, Any] | None:
    """Read a config field that is one value for all features, a mapping per feature name, or None."""
    if value is None:
        return None
    names = [f.name for f in features]
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        missing = [n for n in names if n not in value]
        if unknown or missing:
            raise ValueError(
                f"{method}: {field} must give a value for every feature; unknown {unknown}, missing {missing}"
            )
        return dict(value)
    return {n: value for n in names}


def replace_config(config: MethodConfig, **changes: Any) -> MethodConfig:
    return dataclasses.replace(config, **changes)
