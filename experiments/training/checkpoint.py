"""Atomic training checkpoints: a kill at any moment leaves the previous checkpoint loadable.

A checkpoint is one ``torch.save`` file written to a temporary name in the same directory, flushed to
disk, then renamed over the old one with ``os.replace`` (atomic on POSIX filesystems). It holds only
tensors and plain Python data, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embtable.atomic import atomic_write

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


class CheckpointError(RuntimeError):
    """A file where a checkpoint should be that is not one of this version: the message says what to do."""

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably (:func:`embtable.atomic.atomic_write`).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> save_checkpoint(d / "c.pt", {"step": 3, "w": torch.ones(2)})
        >>> load_checkpoint(d / "c.pt")["step"]
        3
    """
    try:
        with atomic_write(path) as f:
            torch.save({"format": _FORMAT, **state}, f)
    except RuntimeError as err:  # torch's zip writer reports a short write (full disk) as a RuntimeError
        if "unexpected pos" not in str(err) and "failed writing" not in str(err):
            raise
        raise OSError(errno.ENOSPC, f"writing the checkpoint failed ({str(err).splitlines()[0][:120]}); "
                      "the previous checkpoint is intact", str(path)) from err


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The state saved at ``path``, or ``None`` when there is no checkpoint there."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a checkpoint is only ever replaced whole, so this is not a torn write
        raise CheckpointError(f"{path}: cannot read checkpoint ({err}); delete it to start the run afresh") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(state).__name__}, not a dict); "
                           "delete it to start the run afresh")
    if state.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this version (format {state.get('format')!r}, expected "
                           f"{_FORMAT}); delete it to start the run afresh")
    return state


def rng_state() -> dict[str, Any]:
    """States of the torch, NumPy and Python global generators, as checkpointable plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from :func:`rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
