"""What BLAS libtengrad runs on (tengrad_get_blas_info), and the one-time warning when it runs a
generic fallback on a CPU that has AVX2 or AVX-512 (docs/DESIGN.md §14)."""
from __future__ import annotations

import ctypes
import os
import warnings

from . import _lib

_warned = False


def blas_info() -> dict:
    """The loaded library's BLAS and the CPU: ``library``, ``build`` ("system" or
    "scipy-openblas32"), ``version``, ``core`` (the kernel set in use, e.g. "SkylakeX"),
    ``config``, ``threads``, ``core_isa`` and ``cpu_isa`` ("SSE" … "AVX-512"), ``generic_fallback``
    (True: kernels below AVX2 on a CPU with AVX2 or AVX-512), ``cpu_model``, ``cpu_family``,
    ``cpu_model_number``."""
    info = _lib.BlasInfo()
    info.size = ctypes.sizeof(_lib.BlasInfo)
    _lib.tengrad_get_blas_info(ctypes.byref(info))
    text = lambda field: getattr(info, field).decode("utf-8", "replace")  # noqa: E731
    return {
        "library": text("library"), "build": text("build"), "version": text("version"), "core": text("core"),
        "config": text("config"), "threads": int(info.threads),
        "core_isa": _lib.ISA_NAMES.get(info.core_isa, "unknown"), "cpu_isa": _lib.ISA_NAMES.get(info.cpu_isa, "unknown"),
        "generic_fallback": bool(info.generic_fallback), "cpu_model": text("cpu_model"),
        "cpu_family": int(info.cpu_family), "cpu_model_number": int(info.cpu_model_number),
    }


def blas_summary(info: dict | None = None) -> str:
    """One line for logs and benchmark headers: CPU, ISA, BLAS build, version, kernel set, threads."""
    i = info or blas_info()
    cpu = i["cpu_model"] or "unknown CPU"
    if i["cpu_family"]:
        cpu += f" (family {i['cpu_family']} model {i['cpu_model_number']}, {i['cpu_isa']})"
    fallback = ", GENERIC FALLBACK" if i["generic_fallback"] else ""
    return (f"{cpu}; {i['library']} {i['version']} ({i['build']}), core {i['core']} ({i['core_isa']}{fallback}), "
            f"{i['threads']} thread(s)")


def generic_warning(info: dict, user_coretype: str | None) -> str | None:
    """The warning text when ``info`` (a ``blas_info()``) describes kernels below AVX2 on a CPU with
    AVX2 or AVX-512 and the user has not chosen the kernels (``user_coretype``: the value of
    OPENBLAS_CORETYPE, or None); else None."""
    if user_coretype or not info["generic_fallback"]:
        return None
    suggestion = "SkylakeX" if info["cpu_isa"] == "AVX-512" else "Haswell"
    return (f"libtengrad's BLAS ({info['library']} {info['version']}, {info['build']} build) does not know this "
            f"{info['cpu_isa']} CPU ({info['cpu_model'] or 'unknown model'}) and runs its generic {info['core']} "
            f"kernels: matrix products run several times slower. Use the build on PyPI's scipy-openblas32 "
            f"(`pip install ./bindings/python`, or `make build` with the default BLAS=scipy-openblas), or choose the "
            f"kernels yourself: start the process with the environment variable OPENBLAS_CORETYPE holding "
            f"{suggestion} (the library never sets it).")


def warn_if_generic(stacklevel: int = 2) -> bool:
    """Warns once per process (``warnings.warn``, RuntimeWarning) with ``generic_warning``'s text,
    read against this process's OPENBLAS_CORETYPE (never set or changed here). Returns whether it
    warned now."""
    global _warned
    if _warned:
        return False
    text = generic_warning(blas_info(), os.environ.get("OPENBLAS_CORETYPE"))
    if text is None:
        return False
    _warned = True
    warnings.warn(text, RuntimeWarning, stacklevel=stacklevel)
    return True
