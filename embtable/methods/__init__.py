"""One file per method. Importing this package registers every method."""

from . import full, hash  # noqa: F401  (registration side effect is the point of this package)
from . import optembed  # noqa: F401
from . import unified  # noqa: F401
from . import qr  # noqa: F401
from . import mixed_dim  # noqa: F401
