"""Declarative Optuna search spaces, one per method, read from ``configs/search/spaces.yaml``.

A method's space is the ``common`` entry (learning rates) plus its own knobs (probes, partitions,
combiner, alpha ...). Size fields are never searched: the budget planner sets them, so that every trial
of a study uses the same memory.

Example:
    >>> space = search_space("hash")
    >>> [p.path for p in space]
    ['train.dense_lr', 'train.embedding_lr', 'method.hash_fn']
    >>> import optuna
    >>> trial = optuna.trial.FixedTrial({"train.dense_lr": 0.001, "train.embedding_lr": 0.05,
    ...                                  "method.hash_fn": "modulo"})
    >>> apply_params({"method": "hash"}, suggest(space, trial))
    ({'method': 'hash', 'hash_fn': 'modulo'}, {'train': {'dense_lr': 0.001, 'embedding_lr': 0.05}})
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import embtable
from experiments.training.config import CONFIG_DIR, ConfigError, ModelConfig, TrainConfig

__all__ = ["SPACES_FILE", "Param", "load_spaces", "search_space", "suggest", "apply_params"]

SPACES_FILE = CONFIG_DIR / "search" / "spaces.yaml"


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched value: where it goes (``path``) and its distribution."""

    path: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Ask an ``optuna.Trial`` for this parameter's value."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=self.step or 1, log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), log=self.log)


def _parse(path: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: {path}: a distribution is a mapping ({{low, high}} or {{choices}}), got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise ConfigError(f"{where}: {path}: unknown key(s) {unknown}; use low/high/log/step or choices")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or set(spec) != {"choices"}:
            raise ConfigError(f"{where}: {path}: choices must be a non-empty list, alone, got {spec!r}")
        return Param(path, "categorical", choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"{where}: {path}: {name} must be a number, got {value!r} (YAML reads 1e-4 as text: write 1.0e-4)"
            )
    if not low < high:
        raise ConfigError(f"{where}: {path}: low ({low}) must be below high ({high})")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: {path}: a log-scale range needs low > 0, got {low}")
    kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    step = spec.get("step")
    if step is not None and kind != "int":
        raise ConfigError(f"{where}: {path}: step is only for integer ranges")
    return Param(path, kind, low, high, log, step)


def _check_path(path: str, method: str | None, where: str) -> None:
    section, dot, field = path.partition(".")
    if not dot:
        raise ConfigError(f"{where}: parameter {path!r} must be train.<field>, model.<field> or method.<knob>")
    if section == "train":
        valid = {f.name for f in dataclasses.fields(TrainConfig)}
    elif section == "model":
        valid = {f.name for f in dataclasses.fields(ModelConfig) if f.name != "options"}
    elif section == "method":
        if method is None:
            raise ConfigError(f"{where}: common parameters cannot set method knobs ({path})")
        valid = {f.name for f in dataclasses.fields(embtable.config_class(method))}
    else:
        raise ConfigError(f"{where}: parameter {path!r}: unknown section {section!r}; use train, model or method")
    if field not in valid:
        raise ConfigError(f"{where}: parameter {path!r}: {section} has no field {field!r}; valid: {sorted(valid)}")


def load_spaces(path: str | os.PathLike = SPACES_FILE) -> dict[str, tuple[Param, ...]]:
    """Every method's full space (``common`` + its own), checked against the registered configs.

    Entries of methods that are not registered in this installation are skipped.

    Raises:
        ConfigError: a malformed distribution, or a path that names no config field (file and line).
    """
    path = Path(path)
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in root.value} if isinstance(root, yaml.MappingNode) else {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: search spaces must be a mapping of method name -> parameters")

    def params(name: str, method: str | None) -> tuple[Param, ...]:
        where = f"{path}:{lines.get(name, '?')}"
        entry = data.get(name) or {}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: {name}: expected a mapping of parameter -> distribution")
        out = []
        for key, spec in entry.items():
            _check_path(str(key), method, where)
            out.append(_parse(str(key), spec, where))
        return tuple(out)

    common = params("common", None)
    registered = embtable.registered_methods()
    return {name: common + params(name, name) for name in data if name != "common" and name in registered}


def search_space(method: str, spaces: Mapping[str, Sequence[Param]] | None = None) -> tuple[Param, ...]:
    """The space of ``method``; an actionable error when the spaces file has no entry for it."""
    spaces = load_spaces() if spaces is None else spaces
    if method not in spaces:
        raise ConfigError(
            f"no search space for method {method!r} in {SPACES_FILE}; add an entry "
            f"`{method}: {{method.<knob>: {{choices: [...]}}}}` (or `{method}: {{}}` for learning rates only)"
        )
    return tuple(spaces[method])


def suggest(space: Sequence[Param], trial: Any) -> dict[str, Any]:
    """``{path: value}`` for every parameter of ``space``, asked of ``trial``."""
    return {p.path: p.suggest(trial) for p in space}


def apply_params(method: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split suggested values into (the method config dict with its knobs set, run config overrides)."""
    method_out = dict(method)
    overrides: dict[str, dict[str, Any]] = {}
    for path, value in params.items():
        section, _, field = path.partition(".")
        if section == "method":
            method_out[field] = value
        elif section != "budget":
            overrides.setdefault(section, {})[field] = value
    return method_out, overrides

