"""Typed configs of one training run, loaded from small named YAML files (a base plus overrides).

``load_config("tiny_hash")`` reads ``configs/base.yaml``, then ``configs/tiny_hash.yaml`` on top of it.
Every key is checked against the dataclasses below; an unknown key or a value of the wrong type is an
error naming the key, the file and the line. A later file replaces the fields it names; the
free-form mappings (``embedding.method``, ``model.options``) are replaced whole, never merged key by key,
so that switching method or model never inherits knobs of the previous one.

    name: hashed_dlrm          # optional; defaults to the override names joined by "+"
    data:      {preset: tiny}
    model:     {name: dlrm, embedding_dim: 16, options: {over_hidden_sizes: [64, 32]}}
    embedding: {method: {method: hash}, budget: 1/8}
    train:     {epochs: 1, batch_size: 256, embedding_optimizer: rowwise_adagrad}
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import embtable
from ctr_models import MODELS, model_names, model_options

__all__ = [
    "CONFIG_DIR",
    "EMBEDDING_OPTIMIZERS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "EmbeddingConfig",
    "TrainConfig",
    "RunConfig",
    "load_config",
    "config_names",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

#: Optimizers that take sparse gradients, for the embedding rows (dense layers always use Adam).
EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key, the file and the line."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which prepared dataset to train on.

    Args:
        preset: name of a data_prep generator preset ("tiny", "demo", ...), generated into
            ``data_dir/<preset>`` the first time it is needed. Used when ``path`` is not given.
        path: directory of a dataset prepared by data_prep (real Criteo/Avazu, or a generated one).
        data_dir: where generated presets are written.
    """

    preset: str | None = "tiny"
    path: str | None = None
    data_dir: str = "data"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The CTR model on top of the embedding module.

    Args:
        name: a ``ctr_models.model_names()`` entry: dlrm, deepfm, dcn_v2, wide_deep.
        embedding_dim: dim of every feature's pooled vector (the dim the model sees).
        options: the model's own keyword arguments, e.g. ``{"over_hidden_sizes": [64, 32]}`` for DLRM.
    """

    name: str = "dlrm"
    embedding_dim: int = 16
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    """The embedding method and its memory budget.

    Args:
        method: the method config as plain data, ``{"method": "hash", ...}`` (see
            ``embtable.method_config_from_dict``).
        budget: byte budget of the embedding tables: bytes (``1000000``), a string with units
            (``"64MiB"``), or a fraction of the full fp32 tables (``0.125`` or ``"1/8"``); ``None``: the
            method's own default size.
        pooling: how the ids of one bag are reduced ("sum" or "mean").
    """

    method: dict[str, Any] = dataclasses.field(default_factory=lambda: {"method": "full"})
    budget: int | float | str | None = None
    pooling: str = "sum"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train and when to stop, checkpoint and give up.

    Args:
        seed: seeds the model init, the embedding method and the batch order (same seed, same result).
        epochs: passes over the training split.
        max_steps: stop after this many optimizer steps in total (``None``: run all epochs).
        batch_size: training examples per step.
        eval_batch_size: examples per forward pass when evaluating (affects speed only).
        dense_lr: Adam learning rate of the dense layers (and any dense part of the embedding module).
        embedding_optimizer: optimizer of the embedding rows, which get sparse gradients: one of
            ``EMBEDDING_OPTIMIZERS``. Row-wise Adagrad is DLRM practice: one accumulator per row.
        embedding_lr: learning rate of the embedding optimizer.
        fused_tables: train the method's plain TorchRec tables with FBGEMM's fused kernel for
            ``embedding_optimizer`` (:func:`embtable.fuse_storage`; same update, several times faster);
            ``False``: sparse gradients and a Python optimizer.
        num_threads: torch intra-op threads; ``None`` (default): every core this process may use
            (``os.sched_getaffinity``; a sweep with ``--jobs N`` gives each worker its share). The count
            is recorded in the result; a run is bitwise reproducible for the same count.
        checkpoint_every: write a checkpoint every this many steps (also at every epoch end);
            ``None``: only at epoch ends. Only when the run has an ``out_dir``.
        eval_every: also evaluate on the validation split every this many steps (for pruning by
            intermediate AUC); ``None``: at epoch ends only.
        max_loss: the run has diverged, and is marked failed, when the smoothed training loss exceeds
            this. A constant guess at the base rate costs at most ln 2 = 0.69, a fresh model 1 to 3 (DeepFM
            reads raw log-counts linearly); a smoothed loss of 10 means confident logits of about 10 that
            are wrong: the updates blew up.
        log_every: steps between updates of the progress bar's loss.
    """

    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 256
    eval_batch_size: int = 4096
    dense_lr: float = 1e-3
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    fused_tables: bool = True
    num_threads: int | None = None
    checkpoint_every: int | None = 500
    eval_every: int | None = None
    max_loss: float = 10.0
    log_every: int = 20


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on.

    Example:
        >>> config = load_config()
        >>> config.model.name, config.train.embedding_optimizer
        ('dlrm', 'rowwise_adagrad')
        >>> config.with_overrides({"train": {"seed": 3}}).train.seed
        3
    """

    name: str = "base"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = dataclasses.field(default_factory=EmbeddingConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML / JSON), the same shape the YAML files have."""
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> RunConfig:
        """Build a config from plain data alone (all defaults from the dataclasses), strictly checked."""
        return _Builder().add(data, source).build()

    def with_overrides(self, overrides: Mapping[str, Any], *, source: str = "<overrides>") -> RunConfig:
        """A new config with some fields replaced (same rules as an override file)."""
        return _Builder().add(self.to_dict(), "<config>").add(overrides, source).build()


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "embedding": EmbeddingConfig,
    "train": TrainConfig,
}


def config_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Names of the YAML configs shipped in ``config_dir`` (``base`` included)."""
    return sorted(p.stem for p in Path(config_dir).glob("*.yaml"))


def load_config(
    *names: str | Path,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    config_dir: Path = CONFIG_DIR,
) -> RunConfig:
    """Load ``base.yaml`` and then each named override on top of it.

    Args:
        *names: config names in ``config_dir`` (``"tiny_hash"``) or paths to YAML files, applied in order.
        overrides: applied last: a nested mapping, or ``"section.key=value"`` strings (values parsed as
            YAML, e.g. ``"train.seed=3"``, ``"embedding.method={method: hash}"``).
        config_dir: where names are looked up.

    Raises:
        ConfigError: unknown name, unknown key, wrong type; the message names the file and the line.
    """
    builder = _Builder()
    builder.add_file(_resolve(Path(config_dir) / "base.yaml", "base", config_dir))
    shown: list[str] = []
    for name in names:
        path = _resolve(Path(name), str(name), config_dir)
        builder.add_file(path)
        shown.append(path.stem)
    if overrides:
        if isinstance(overrides, Mapping):
            builder.add(overrides, "<overrides>")
        else:
            for item in overrides:
                builder.add(_parse_assignment(item), f"override {item!r}")
    if shown and not builder.explicit_name:
        builder.data["name"] = "+".join(shown)
    return builder.build()


def _resolve(path: Path, name: str, config_dir: Path) -> Path:
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = Path(config_dir) / f"{name}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"no config named {name!r}: neither a YAML file nor one of {config_names(config_dir)}")


def _parse_assignment(item: str) -> dict[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.seed=3")
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key in a YAML document, by key path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = (*prefix, str(key_node.value))
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


class _Builder:
    """Layers plain-data sources into one dict, remembering where each key came from."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.where: dict[tuple[str, ...], str] = {}
        self.explicit_name = False

    def add_file(self, path: Path) -> _Builder:
        text = path.read_text()
        try:
            data = yaml.safe_load(text)
            lines = _key_lines(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if data is None:
            data = {}
        return self.add(data, str(path), lines)

    def add(
        self, data: Mapping[str, Any], source: str, lines: Mapping[tuple[str, ...], int] | None = None
    ) -> _Builder:
        def at(*path: str) -> str:
            line = (lines or {}).get(path)
            return f"{source}:{line}" if line else source

        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a run config must be a mapping of sections, got {type(data).__name__}")
        for key, value in data.items():
            if key == "name":
                self.data["name"] = _check_value(value, str, f"{at('name')}: name")
                self.where[("name",)] = at("name")
                self.explicit_name = True
                continue
            if key not in _SECTIONS:
                raise ConfigError(
                    f"{at(key)}: unknown key {key!r}; a run config has name and the sections {list(_SECTIONS)}"
                )
            if not isinstance(value, Mapping):
                raise ConfigError(f"{at(key)}: section {key!r} must be a mapping, got {value!r}")
            cls = _SECTIONS[key]
            hints = typing.get_type_hints(cls)
            section = self.data.setdefault(key, {})
            for field, field_value in value.items():
                if field not in hints:
                    raise ConfigError(
                        f"{at(key, field)}: unknown key '{key}.{field}'; valid keys of {key}: {sorted(hints)}"
                    )
                where = at(key, field)
                section[field] = copy.deepcopy(_check_value(field_value, hints[field], f"{where}: {key}.{field}"))
                self.where[(key, field)] = where
        return self

    def build(self) -> RunConfig:
        sections = {name: cls(**self.data.get(name, {})) for name, cls in _SECTIONS.items()}
        config = RunConfig(name=self.data.get("name", "base"), **sections)
        _validate(config, lambda *path: self.where.get(path, "<defaults>"))
        return config


def _check_value(value: Any, hint: Any, what: str) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin is dict and isinstance(value, Mapping):
            return dict(value)
    names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{what} must be {names}, got {value!r}")


def _validate(config: RunConfig, where: typing.Callable[..., str]) -> None:
    """Checks that need more than one field, or other packages (models, methods, budgets)."""
    if config.data.path is None and config.data.preset is None:
        raise ConfigError(f"{where('data', 'preset')}: give data.preset (a generated preset) or data.path")
    if config.model.name not in MODELS:
        raise ConfigError(f"{where('model', 'name')}: unknown model {config.model.name!r}; choose one of {model_names()}")
    accepted = set(model_options(config.model.name))
    unknown = sorted(set(config.model.options) - accepted)
    if unknown:
        raise ConfigError(
            f"{where('model', 'options')}: model {config.model.name!r} does not take option(s) {unknown}; "
            f"it takes {sorted(accepted)}"
        )
    positive = {
        ("model", "embedding_dim"): config.model.embedding_dim,
        ("train", "epochs"): config.train.epochs,
        ("train", "batch_size"): config.train.batch_size,
        ("train", "eval_batch_size"): config.train.eval_batch_size,
        ("train", "num_threads"): config.train.num_threads,
        ("train", "log_every"): config.train.log_every,
        ("train", "max_steps"): config.train.max_steps,
        ("train", "checkpoint_every"): config.train.checkpoint_every,
        ("train", "eval_every"): config.train.eval_every,
    }
    for path, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{where(*path)}: {'.'.join(path)} must be >= 1, got {value}")
    for path in (("train", "dense_lr"), ("train", "embedding_lr"), ("train", "max_loss")):
        value = getattr(config.train, path[1])
        if not value > 0:
            raise ConfigError(f"{where(*path)}: {'.'.join(path)} must be > 0, got {value}")
    if config.train.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ConfigError(
            f"{where('train', 'embedding_optimizer')}: embedding_optimizer {config.train.embedding_optimizer!r} "
            f"is not one of {list(EMBEDDING_OPTIMIZERS)} (embedding rows get sparse gradients)"
        )
    if config.embedding.pooling not in ("sum", "mean"):
        raise ConfigError(f"{where('embedding', 'pooling')}: pooling must be 'sum' or 'mean', got {config.embedding.pooling!r}")
    source = where("embedding", "method")
    try:
        embtable.method_config_from_dict(config.embedding.method, source=source)
    except (ValueError, TypeError) as err:
        message = str(err) if str(err).startswith(source) else f"{source}: embedding.method: {err}"
        raise ConfigError(message) from None
    try:
        embtable.as_budget(config.embedding.budget)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where('embedding', 'budget')}: embedding.budget: {err}") from None
