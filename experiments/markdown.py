"""One Markdown table writer for every report, benchmark and check in ``experiments``.

>>> print(table(["method", "bytes"], [["hash", "1,024"], ["a|b", 3]], align="lr"))
| method | bytes |
|---|---:|
| hash | 1,024 |
| a\\|b | 3 |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as a table cell: ``|`` escaped, line breaks flattened, ``None`` as an empty cell."""
    if value is None:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table.

    Args:
        header: the column names.
        rows: one sequence of values per row; shorter rows are padded with empty cells (a row that only
            says why a run is missing), longer ones are an error.
        align: one letter per column, ``l`` (default) or ``r``; ``None`` aligns every column left.
    """
    width = len(header)
    align = align or "l" * width
    if len(align) != width or set(align) - {"l", "r"}:
        raise ValueError(f"align must be {width} letters of 'l' or 'r', got {align!r}")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        row = list(row)
        if len(row) > width:
            raise ValueError(f"a row has {len(row)} cells for {width} columns: {row!r}")
        lines.append("| " + " | ".join(cell(v) for v in row + [""] * (width - len(row))) + " |")
    return "\n".join(lines)
