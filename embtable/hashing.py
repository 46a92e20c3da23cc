"""Salted universal hashing of int64 ids, stable across processes, platforms and runs.

We use a Carter-Wegman family over the prime ``p = 2**31 - 1``: the id (``0 <= id < 2**63``) is cut into
31-bit digits ``x0, x1, x2`` (``x2 <= 1``) and ``h(id) = ((a0*x0 + a1*x1 + a2*x2 + b) mod p) mod m``. The sum
stays below ``2**63``, so the arithmetic is exact in int64 (no float, no overflow). The coefficients come from a
salt derived with SHA-256 from (seed, feature name, probe), never from Python's randomized ``hash``.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["PRIME", "hash_coefficients", "universal_hash"]

PRIME = 2**31 - 1
_DIGIT = 2**31 - 1  # mask of one 31-bit digit


def hash_coefficients(seed: int, *salt: object) -> list[int]:
    """Four coefficients ``[a0, a1, a2, b]`` (``1 <= a < p``, ``0 <= b < p``) for one salt.

    >>> hash_coefficients(0, "C1") == hash_coefficients(0, "C1")
    True
    >>> hash_coefficients(0, "C1") != hash_coefficients(0, "C2")
    True
    """
    digest = hashlib.sha256(repr((int(seed),) + tuple(salt)).encode()).digest()
    words = [int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8)]
    return [1 + w % (PRIME - 1) for w in words[:3]] + [words[3] % PRIME]


def universal_hash(ids: torch.Tensor, coefficients: torch.Tensor, num_buckets: torch.Tensor | int) -> torch.Tensor:
    """Hash non-negative int64 ``ids`` into ``[0, num_buckets)``.

    Args:
        ids: int64 tensor of non-negative ids, shape ``[N]``.
        coefficients: int64 ``[4]`` (one salt for all ids) or ``[N, 4]`` (a salt per id).
        num_buckets: int, or int64 tensor ``[N]`` (a bucket count per id); at most ``2**31 - 1``.

    Returns:
        int64 tensor ``[N]``.

    >>> c = torch.tensor(hash_coefficients(0, "f"))
    >>> h = universal_hash(torch.tensor([0, 1, 2**40, 2**62]), c, 1000)
    >>> bool(((h >= 0) & (h < 1000)).all())
    True
    """
    ids = ids.to(torch.int64)
    x0 = ids & _DIGIT
    x1 = (ids >> 31) & _DIGIT
    x2 = ids >> 62
    if coefficients.dim() == 1:
        a0, a1, a2, b = coefficients.unbind(0)
    else:
        a0, a1, a2, b = coefficients.unbind(1)
    # a0*x0 and a1*x1 are each at most (2**31 - 2)**2 < 2**62 - 2**32, and a2*x2 + b < 2**32 (x2 <= 1):
    # the sum stays below 2**63, so one reduction at the end is exact
    return ((a0 * x0 + a1 * x1 + a2 * x2 + b) % PRIME) % num_buckets
