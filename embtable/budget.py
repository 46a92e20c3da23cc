"""Byte budgets and budget planning: pure functions from (features, method config, budget) to a sized config.

Planning allocates nothing: it works on integers only, so planning the Criteo 1TB cardinalities
(882,774,559 ids) takes microseconds. Each method supplies two pure class methods, ``size_config``
(budget -> sized config) and ``describe`` (sized config -> exact bytes per feature); :func:`plan`
checks the result against the budget before any tensor exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from .config import MethodConfig, OutOfRange, method_class
from .features import FeatureSpec, check_features

__all__ = [
    "Budget",
    "BudgetError",
    "smallest_budget_error",
    "FeaturePlan",
    "Plan",
    "as_budget",
    "plan",
    "largest_feasible",
    "FP32",
]

FP32 = 4  # bytes per stored weight; every method stores fp32 rows (quantized export is separate)

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class BudgetError(ValueError):
    """The byte budget cannot be met by this method (raised before any tensor is allocated).

    ``smallest_bytes``: the smallest budget the method can meet for these features, where the planner
    knows it (its message states it too), else ``None``.
    """

    def __init__(self, message: str, smallest_bytes: int | None = None) -> None:
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


def smallest_budget_error(method: str, smallest_bytes: int, budget_bytes: int, features: Sequence[FeatureSpec],
                          what: str) -> BudgetError:
    """The :class:`BudgetError` of a planner that cannot fit: it names the smallest budget it can meet.

    >>> err = smallest_budget_error("hash", 400, 100, [FeatureSpec("a", 100, 8)], "one row per feature")
    >>> str(err)
    'hash: the smallest budget it can meet here is 400 bytes (12.5000% of the full tables; one row per feature), over the budget of 100 bytes; give a budget of at least 400 bytes'
    >>> err.smallest_bytes
    400
    """
    full = sum(f.full_table_bytes for f in features)
    share = f"{smallest_bytes / full:.4%} of the full tables; " if full else ""
    return BudgetError(
        f"{method}: the smallest budget it can meet here is {smallest_bytes:,} bytes ({share}{what}), over the "
        f"budget of {budget_bytes:,} bytes; give a budget of at least {smallest_bytes:,} bytes",
        smallest_bytes,
    )


@dataclasses.dataclass(frozen=True)
class Budget:
    """A memory budget for the embedding tables: absolute bytes, or a fraction of the full fp32 tables.

    >>> Budget(fraction=0.25).resolve([FeatureSpec("a", 1000, 16)])
    16000
    >>> as_budget("1/16"), as_budget("64MiB"), as_budget(0.5), as_budget(10_000)
    (Budget(bytes=None, fraction=0.0625), Budget(bytes=67108864, fraction=None), Budget(bytes=None, fraction=0.5), Budget(bytes=10000, fraction=None))
    """

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.fraction is None):
            raise ValueError("a Budget takes exactly one of bytes=... or fraction=...")
        if self.bytes is not None and (int(self.bytes) != self.bytes or self.bytes <= 0):
            raise ValueError(f"budget bytes must be a positive integer, got {self.bytes!r}")
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise ValueError(
                f"budget fraction must be in (0, 1] (a share of the full fp32 tables), got {self.fraction!r}"
            )

    def resolve(self, features: Sequence[FeatureSpec]) -> int:
        """The budget in bytes for these features."""
        if self.bytes is not None:
            return int(self.bytes)
        full = sum(f.full_table_bytes for f in features)
        return int(math.floor(full * self.fraction))

    def __str__(self) -> str:
        if self.bytes is not None:
            return f"{self.bytes} B"
        inv = 1 / self.fraction
        return f"1/{inv:g}" if abs(inv - round(inv)) < 1e-9 and inv >= 1 else f"{self.fraction:g}"


def as_budget(value: Budget | int | float | str | None) -> Budget | None:
    """Read a budget from user input.

    int -> bytes; float in (0, 1] -> fraction of the full tables; str: ``"1/16"``, ``"25%"``,
    ``"0.25"``, ``"64MiB"``, ``"2GB"``, ``"1000000"``; ``None`` -> no budget.
    """
    if value is None or isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise TypeError(f"a budget cannot be a bool ({value!r})")
    if isinstance(value, int):
        return Budget(bytes=value)
    if isinstance(value, float):
        if 0 < value <= 1:
            return Budget(fraction=value)
        if value > 1 and value.is_integer():
            return Budget(bytes=int(value))
        raise ValueError(f"budget {value!r}: a float budget is a fraction in (0, 1]; use an int for bytes")
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if m := re.fullmatch(r"(\d+)/(\d+)", text):
            return Budget(fraction=int(m[1]) / int(m[2]))
        if m := re.fullmatch(r"([\d.]+)%", text):
            return Budget(fraction=float(m[1]) / 100)
        if m := re.fullmatch(r"([\d.e+]+)([kmgt]i?b|b)?", text):
            number = float(m[1])
            if m[2] is None:
                return as_budget(int(number) if number > 1 and number.is_integer() else number)
            return Budget(bytes=int(number * _UNITS[m[2]]))
    raise ValueError(
        f"cannot read budget {value!r}; examples: 1048576 (bytes), 0.25 or '1/4' or '25%' (of the full "
        "tables), '64MiB', '2GB'"
    )


@dataclasses.dataclass(frozen=True)
class FeaturePlan:
    """How one feature is stored: rows and dim of its storage, and its exact inference bytes."""

    name: str
    num_embeddings: int
    embedding_dim: int
    rows: int
    dim: int
    bytes: int
    compressed: bool
    detail: str = ""

    @property
    def full_bytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * FP32


@dataclasses.dataclass(frozen=True)
class Plan:
    """A method sized for some features: the sized config and the exact bytes it will need at inference.

    ``total_bytes`` equals ``memory_report(build(...)).inference_bytes`` byte for byte.
    """

    method: str
    config: MethodConfig
    budget_bytes: int | None
    features: tuple[FeaturePlan, ...]
    shared_bytes: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.features) + sum(self.shared_bytes.values())

    @property
    def full_bytes(self) -> int:
        return sum(f.full_bytes for f in self.features)

    @property
    def ratio(self) -> float:
        """Inference bytes as a share of the full fp32 tables."""
        return self.total_bytes / self.full_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config.to_dict(),
            "budget_bytes": self.budget_bytes,
            "total_bytes": self.total_bytes,
            "full_bytes": self.full_bytes,
            "features": [dataclasses.asdict(f) for f in self.features],
            "shared_bytes": dict(self.shared_bytes),
        }

    def table(self) -> str:
        """A readable per-feature table."""
        lines = [f"{'feature':<16}{'ids':>14}{'dim':>5}{'rows':>14}{'sdim':>5}{'bytes':>16}  detail"]
        for f in self.features:
            mark = "" if f.compressed else " (full)"
            lines.append(
                f"{f.name:<16}{f.num_embeddings:>14,}{f.embedding_dim:>5}{f.rows:>14,}{f.dim:>5}"
                f"{f.bytes:>16,}  {f.detail}{mark}"
            )
        for name, nbytes in self.shared_bytes.items():
            lines.append(f"{name:<16}{'':>14}{'':>5}{'':>14}{'':>5}{nbytes:>16,}  shared")
        budget = "none" if self.budget_bytes is None else f"{self.budget_bytes:,}"
        lines.append(
            f"total {self.total_bytes:,} B = {self.ratio:.4%} of the full {self.full_bytes:,} B; budget {budget}"
        )
        return "\n".join(lines)


def effective_features(features: Sequence[FeatureSpec], out_of_range: OutOfRange) -> list[FeatureSpec]:
    """The features as the method stores them: with ``OutOfRange.RESERVED`` each gets one extra row."""
    features = check_features(features)
    if OutOfRange(out_of_range) is not OutOfRange.RESERVED:
        return features
    out = []
    for f in features:
        counts = None
        if f.counts is not None:
            import numpy as np

            counts = np.concatenate([f.counts, np.zeros(1, dtype=np.int64)])
        out.append(dataclasses.replace(f, num_embeddings=f.num_embeddings + 1, counts=counts))
    return out


def plan(
    features: Sequence[FeatureSpec],
    method: MethodConfig,
    budget: Budget | int | float | str | None = None,
    *,
    out_of_range: OutOfRange | str = OutOfRange.ERROR,
) -> Plan:
    """Size ``method`` for ``features`` within ``budget``; pure: allocates no tensor.

    Features too small to be worth compressing stay full. The plan never exceeds the budget and uses at
    least 95% of it when the method can; an unreachable budget raises :class:`BudgetError`.

    >>> import embtable
    >>> feats = [FeatureSpec("small", 10, 8), FeatureSpec("big", 100_000, 8)]
    >>> p = plan(feats, embtable.HashConfig(), budget="1/10")
    >>> [(f.name, f.rows, f.compressed) for f in p.features]
    [('small', 10, False), ('big', 9988, True)]
    >>> p.total_bytes <= p.budget_bytes
    True
    """
    features = effective_features(features, out_of_range)
    budget_obj = as_budget(budget)
    budget_bytes = budget_obj.resolve(features) if budget_obj is not None else None
    cls = method_class(method)
    sized = cls.size_config(features, method, budget_bytes)
    feature_plans, shared = cls.describe(features, sized)
    result = Plan(method.method, sized, budget_bytes, tuple(feature_plans), dict(shared))
    if budget_bytes is not None and result.total_bytes > budget_bytes:
        raise BudgetError(
            f"{method.method}: the configuration needs {result.total_bytes:,} bytes, over the budget of "
            f"{budget_bytes:,} bytes ({budget_obj}); give a larger budget or let the planner size the "
            "method (leave its size fields unset)"
        )
    return result


def largest_feasible(total_bytes: Callable[[int], int], budget_bytes: int, lo: int, hi: int) -> int | None:
    """The largest integer ``t`` in ``[lo, hi]`` with ``total_bytes(t) <= budget_bytes``, or ``None``.

    ``total_bytes`` must be non-decreasing in ``t``. Binary search: O(log(hi - lo)) calls.

    >>> largest_feasible(lambda t: 10 * t, 95, 1, 100)
    9
    """
    if total_bytes(lo) > budget_bytes:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total_bytes(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
