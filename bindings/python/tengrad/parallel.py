"""The data-parallel helpers of the library (handle-free; docs/DESIGN.md §11): what every rank
computes identically without communication, in the library's one implementation."""
from __future__ import annotations

import ctypes
from typing import List

from . import _lib
from .specs import _integer


def assign_owners(costs, ranks: int) -> List[int]:
    """Layer → owner rank for data-parallel training (``tengrad_assign_owners``: by cost,
    descending, each layer to the least-loaded rank), identical on every rank."""
    costs = [_integer(c, "cost", 0) for c in costs]
    owners = (ctypes.c_int32 * max(len(costs), 1))()
    _lib.tengrad_assign_owners((ctypes.c_int64 * max(len(costs), 1))(*costs), len(costs),
                               _integer(ranks, "ranks", 1, 2**31 - 1), owners)
    return list(owners[:len(costs)])


def kl_clip_from_sum(learning_rate: float, kl_clip: float, total: float) -> float:
    """ν = min(1, sqrt(kl_clip / (lr² · total))) for a global sum of ⟨update, grad⟩
    (``tengrad_kl_clip_from_sum``; 1 when the sum is not positive or lr is 0)."""
    out = ctypes.c_double()
    _lib.tengrad_kl_clip_from_sum(float(learning_rate), float(kl_clip), float(total), ctypes.byref(out))
    return out.value
