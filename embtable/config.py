"""Method configs and the registry that maps each config type to the module that implements it.

A method is chosen by a typed config object (``HashConfig()``, ``QRConfig(...)``, ...). Each config class
names its method (``HashConfig.method == "hash"``) and is registered once, with the module class that
builds it, by :func:`register_method`. A new method is one new file plus one registration.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "MethodConfig",
    "Pooling",
    "OutOfRange",
    "register_method",
    "registered_methods",
    "method_class",
    "config_class",
    "method_config_from_dict",
]


class Pooling(enum.StrEnum):
    """How the ids of one bag are reduced to one vector (TorchRec's ``PoolingType``)."""

    SUM = "sum"
    MEAN = "mean"


class OutOfRange(enum.StrEnum):
    """What a module does with an id outside ``[0, num_embeddings)``.

    - ``ERROR`` (default): raise a ``ValueError`` naming the feature, the id and the table size.
    - ``WRAP``: map the id into range with ``id mod num_embeddings`` (negative ids too).
    - ``RESERVED``: the logical table gets one extra row, id ``num_embeddings``, that every
      out-of-range id uses (an explicit "unknown" row).
    """

    ERROR = "error"
    WRAP = "wrap"
    RESERVED = "reserved"


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of every method's config. Subclasses are frozen dataclasses with a ``method`` name."""

    method: ClassVar[str] = ""

    def replace(self, **changes: Any) -> MethodConfig:
        """A copy with some fields changed (configs are immutable: nothing mutates the caller's)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for YAML / JSON results): ``{"method": name, field: value, ...}``."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


_REGISTRY: dict[type[MethodConfig], type] = {}
_BY_NAME: dict[str, type[MethodConfig]] = {}


def register_method(config_cls: type[MethodConfig]):
    """Class decorator: register the module class that implements ``config_cls``.

    Registering a config type or a method name twice is an error, except the same classes defined again
    by a reload of their module (``importlib.reload``, a notebook's autoreload), which replace the old ones.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"register_method expects a MethodConfig subclass, got {config_cls!r}")
    if not config_cls.method:
        raise ValueError(f"{config_cls.__name__} must set the class attribute `method` (its name)")

    def decorator(module_cls: type) -> type:
        previous = _BY_NAME.get(config_cls.method)
        if previous is not None and previous is not config_cls and _reloaded(previous, config_cls) \
                and _reloaded(_REGISTRY[previous], module_cls):
            del _REGISTRY[previous]  # the defining module was reloaded (importlib.reload, autoreload)
            del _BY_NAME[config_cls.method]
        if config_cls in _REGISTRY:
            raise ValueError(f"{config_cls.__name__} is already registered to {_REGISTRY[config_cls].__name__}")
        if config_cls.method in _BY_NAME:
            raise ValueError(f"method name {config_cls.method!r} is already registered")
        _REGISTRY[config_cls] = module_cls
        _BY_NAME[config_cls.method] = config_cls
        module_cls.config_cls = config_cls
        return module_cls

    return decorator


def _reloaded(old: type, new: type) -> bool:
    """``new`` is ``old`` defined again by a reload of its module (same module and qualified name)."""
    return (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)


def registered_methods() -> dict[str, type[MethodConfig]]:
    """All registered methods: name -> config class, in registration order."""
    return dict(_BY_NAME)


def method_class(config: MethodConfig | type[MethodConfig]) -> type:
    """The module class registered for ``config``'s type (or for the config class itself)."""
    key = config if isinstance(config, type) else type(config)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise TypeError(
            f"{key.__name__} is not a registered method config; registered: {sorted(_BY_NAME)}"
        ) from None


def config_class(name: str) -> type[MethodConfig]:
    """The config class registered under a method name (``"hash"`` -> ``HashConfig``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown embedding method {name!r}; choose one of {sorted(_BY_NAME)}") from None


def method_config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> MethodConfig:
    """Build a method config from plain data, e.g. parsed YAML: ``{"method": "hash", "hash_fn": "modulo"}``.

    Unknown keys are errors that list the valid ones.

    >>> import embtable
    >>> embtable.method_config_from_dict({"method": "hash", "hash_fn": "modulo"})
    HashConfig(num_buckets=None, hash_fn='modulo', seed=0)
    """
    data = dict(data)
    if "method" not in data:
        raise ValueError(f"{source}: an embedding method needs a 'method' key; choose one of {sorted(_BY_NAME)}")
    cls = config_class(data.pop("method"))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown} for method {cls.method!r}; valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        if isinstance(hint, type) and issubclass(hint, enum.Enum) and not isinstance(value, hint):
            value = hint(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
