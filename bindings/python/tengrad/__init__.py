"""TENGraD: exact natural-gradient preconditioning (Soori et al., 2021) over libtengrad.so.

``Preconditioner`` (numpy) is the public API; ``TengradError`` is the one exception type.
"""
from ._lib import TengradError, library_path, status_name
from ._lib import (ERROR_CORRUPT, ERROR_INVALID_ARGUMENT, ERROR_NOT_FINITE, ERROR_NUMERICAL,
                   ERROR_OUT_OF_MEMORY, ERROR_SHAPE, ERROR_STATE, OK)
from .blas import blas_info, blas_summary
from .core import Preconditioner

__all__ = [
    "Preconditioner", "TengradError", "blas_info", "blas_summary", "library_path", "status_name", "version",
    "OK", "ERROR_INVALID_ARGUMENT", "ERROR_SHAPE", "ERROR_NOT_FINITE", "ERROR_NUMERICAL",
    "ERROR_OUT_OF_MEMORY", "ERROR_STATE", "ERROR_CORRUPT",
]


def version() -> str:
    """Version of the loaded library, "MAJOR.MINOR.PATCH"."""
    from ._lib import tengrad_version_number
    n = tengrad_version_number()
    return f"{n // 10000}.{n // 100 % 100}.{n % 100}"


__version__ = version()

# Once per process, at import: say so when the BLAS runs generic kernels on a newer CPU.
from .blas import warn_if_generic as _warn_if_generic  # noqa: E402

_warn_if_generic(stacklevel=3)
