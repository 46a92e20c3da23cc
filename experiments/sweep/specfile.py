"""Strict reading of the small YAML spec files of sweeps and searches: unknown keys name file and line.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.yaml"
    >>> _ = p.write_text("name: x\\nseeds: [0, 1]\\n")
    >>> read_spec(p, {"name": str, "seeds": list})
    {'name': 'x', 'seeds': [0, 1]}
    >>> _ = p.write_text("name: x\\nseed: [0, 1]\\n")
    >>> read_spec(p, {"name": str, "seeds": list})
    Traceback (most recent call last):
    ...
    experiments.training.config.ConfigError: ...s.yaml:2: unknown key 'seed'; valid keys: ['name', 'seeds']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from experiments.training.config import ConfigError

__all__ = ["read_spec", "resolve_spec", "where_of", "Where"]


class Where:
    """``where("budgets")`` -> ``"file.yaml:7"``: the line of a top-level key, for error messages."""

    def __init__(self, source: str, lines: Mapping[str, int]) -> None:
        self.source = source
        self.lines = dict(lines)

    def __call__(self, key: str | None = None) -> str:
        line = self.lines.get(key) if key else None
        return f"{self.source}:{line}" if line else self.source


def resolve_spec(name_or_path: str | os.PathLike, folder: Path, kind: str) -> Path:
    """A YAML path as given, or ``folder/<name>.yaml``; an error listing the shipped ones otherwise."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    shipped = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"no {kind} spec {str(name_or_path)!r}: not a YAML file, nor one of {shipped} in {folder}")


def read_spec(path: str | os.PathLike, fields: Mapping[str, type | tuple[type, ...]],
              required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a YAML mapping and check its top-level keys and their types.

    Args:
        path: the YAML file.
        fields: allowed keys and their types (``None`` is always accepted: "use the default").
        required: keys that must be present.

    Returns:
        The mapping as loaded (use :func:`where_of` for the line of a key).

    Raises:
        ConfigError: not YAML, not a mapping, an unknown key, a missing required key or a wrong type,
            naming the file and the line.
    """
    data, where = _read(path)
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where(key)}: unknown key {key!r}; valid keys: {sorted(fields)}")
        if value is not None and not isinstance(value, fields[key]):
            kinds = fields[key] if isinstance(fields[key], tuple) else (fields[key],)
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{where(key)}: {key} must be {names}, got {value!r}")
    for key in required:
        if data.get(key) is None:
            raise ConfigError(f"{where()}: missing required key {key!r}")
    return data


def where_of(path: str | os.PathLike) -> Where:
    """Line numbers of the top-level keys of a YAML file (for messages about their values)."""
    return _read(path)[1]


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], Where]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    lines = {}
    if isinstance(root, yaml.MappingNode):
        lines = {str(k.value): k.start_mark.line + 1 for k, _ in root.value}
    where = Where(str(path), lines)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a spec must be a mapping of keys, got {type(data).__name__}")
    return data, where
