"""One file per method. Importing this package registers every method."""

from . import (  # noqa: F401  (registration side effect is the point of this package)
    cafe,  # noqa: F401
    full,
    hash,
    low_rank,  # noqa: F401
    mixed_dim,  # noqa: F401
    optembed,  # noqa: F401
    qr,  # noqa: F401
    robe,  # noqa: F401
    unified,  # noqa: F401
)
