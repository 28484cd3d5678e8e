"""TENGraD: exact natural-gradient preconditioning (Soori et al., 2021) over libtengrad.so.

``Preconditioner`` (numpy) is the public API; ``TengradError`` is the one exception type.
"""
from ._lib import TengradError, library_path, status_name
from ._lib import (ERROR_CORRUPT, ERROR_INVALID_ARGUMENT, ERROR_NOT_FINITE, ERROR_NUMERICAL,
                   ERROR_OUT_OF_MEMORY, ERROR_SHAPE, ERROR_STATE, OK)
from .core import Preconditioner

__all__ = [
    "Preconditioner", "TengradError", "library_path", "status_name", "version",
    "OK", "ERROR_INVALID_ARGUMENT", "ERROR_SHAPE", "ERROR_NOT_FINITE", "ERROR_NUMERICAL",
    "ERROR_OUT_OF_MEMORY", "ERROR_STATE", "ERROR_CORRUPT",
]


def version() -> str:
    """Version of the loaded library, "MAJOR.MINOR.PATCH"."""
    from ._lib import tengrad_version_number
    n = tengrad_version_number()
    return f"{n // 10000}.{n // 100 % 100}.{n % 100}"


__version__ = version()
