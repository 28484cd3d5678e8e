"""The data-parallel owner map (docs/DESIGN.md §11): each layer's m×m system lives on one rank,
chosen identically on every rank without communication — KAISA's greedy assignment with
TENGraD's costs."""
from __future__ import annotations

from typing import List, Sequence


def owner_map(costs: Sequence[int], size: int) -> List[int]:
    """Layer → owner rank: layers by cost (descending, ties by index), each to the least-loaded
    rank (ties: the lowest)."""
    load = [0] * size
    owners = [0] * len(costs)
    for cost, i in sorted((-c, i) for i, c in enumerate(costs)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += -cost
    return owners
