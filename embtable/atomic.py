"""The one atomic file writer of the project: a kill or a power cut leaves the old file or the new one.

The data goes to a temporary file in the target's folder, which is flushed and ``fsync``-ed, renamed over
the target with ``os.replace`` (atomic on POSIX filesystems), and then the folder itself is ``fsync``-ed so
the rename survives a power cut. A failure removes the temporary file and leaves the target untouched.
Exports, checkpoints, results, dataset metadata and reports all write through here. Standard library only.

Example:
    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_write(folder / "a" / "x.txt", "w") as f:
    ...     _ = f.write("hello")
    >>> (folder / "a" / "x.txt").read_text()
    'hello'
    >>> atomic_write_json(folder / "r.json", {"b": 1, "a": [1, 2]}, indent=None)
    >>> (folder / "r.json").read_text()
    '{"a": [1, 2], "b": 1}\\n'
    >>> sorted(p.name for p in folder.iterdir())   # no temporary file left behind
    ['a', 'r.json']
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "fsync_dir"]


def _umask() -> int:
    """This process's umask, read without changing it where the system allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read (set and put back)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` (creating its folder) when the block ends without error.

    Args:
        path: the file to write.
        mode: ``"wb"`` (default) or ``"w"`` (text; ``open_kwargs`` such as ``encoding`` go to ``open``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole new file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the machine's other users
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as key-sorted JSON (``indent``), ending with a newline, atomically and durably."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())
