"""One file per method. Importing this package registers every method."""

from . import (  # noqa: F401  (registration side effect is the point of this package)
    cafe,  # noqa: F401
    dhe,  # noqa: F401
    dpq,  # noqa: F401
    full,
    hash,
    low_precision,  # noqa: F401
    low_rank,  # noqa: F401
    managed_collision,  # noqa: F401
    mgqe,  # noqa: F401
    mixed_dim,  # noqa: F401
    optembed,  # noqa: F401
    pep,  # noqa: F401
    qr,  # noqa: F401
    robe,  # noqa: F401
    tt_rec,  # noqa: F401
    unified,  # noqa: F401
)
