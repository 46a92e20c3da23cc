"""Measurement scripts (not tests, not installed): ratios measured side by side in one run.

Run them from a checkout, e.g. ``python -m experiments.benchmarks.bench_models --preset demo``; the results
and their commands are in ``experiments/BENCHMARKS.md``. The package is left out of the built wheel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads, then give the caller back its own thread count.

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    import torch  # here: importing the package stays free of torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
