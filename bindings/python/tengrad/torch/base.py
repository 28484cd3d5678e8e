"""The diagonal base of ``base="adam"`` (docs/DESIGN.md §15): each layer's block becomes F + λE
with E from Adam's second moment — v, the running average of the squared mean gradient
(β₂ = 0.999, bias-corrected), kept per parameter here (and in ``state_dict``). Per layer (weight
and bias together) e = √v̂ / mean(√v̂), clamped to [0.1, 10]: a relative shape, so λ keeps its
meaning and its tuned value. Directions the batch's gradients do not span then move like an Adam
step scaled by 1/λ instead of all alike; the exact block still rules the span. The clamp keeps a
coordinate whose gradient was rare from stepping more than 10× as far as the plain block would
(measured: with [10⁻³, 10³] the demo ConvNet diverged in its first seconds at the tuned lr and λ).

v advances with every successful step; e is handed to the library at each refresh (it takes
effect with that refresh's snapshot)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch


BASES = (None, "adam")
BETA2 = 0.999
LOW, HIGH = 0.1, 10.0


class DiagonalBases:
    """Mixed into TENGraD."""

    def _base_moments_of(self, parts) -> Dict[str, Tuple[torch.Tensor, int]]:
        """A layer's advanced moments {key: (v, t)} from its gradient parts (``grad_parts``: its
        .grad, or the data-parallel step's reduced gradient); not installed."""
        out = {}
        for key, g in parts:
            v, t = self._base_moments.get(key, (torch.zeros_like(g), 0))
            out[key] = (BETA2 * v + (1 - BETA2) * g * g, t + 1)
        return out

    def _set_layer_base(self, layer, moments) -> None:
        """Hands the layer's e (from the advanced moments) to the library before its refresh; a
        part without a gradient (a frozen bias) gets e = 1."""
        shapes = self._pre.array_shapes(layer.id)
        roots = {}
        for suffix in ("weight", "bias"):
            entry = moments.get(f"{layer.name}.{suffix}")
            if entry is not None:
                v, t = entry
                roots[suffix] = (v / (1 - BETA2 ** t)).sqrt()
        mean = float(sum(r.sum() for r in roots.values())) / max(sum(r.numel() for r in roots.values()), 1)
        if not mean > 0:  # no gradient yet: the plain block
            self._pre.set_base(layer.id, None)
            return
        arrays = []
        for suffix, shape in (("weight", shapes.weight), ("bias", shapes.bias)):
            if shape is None:
                arrays.append(None)
            elif suffix in roots:
                e = (roots[suffix] / mean).clamp(LOW, HIGH).to(torch.float32).numpy()
                arrays.append(np.ascontiguousarray(e).reshape(shape))
            else:
                arrays.append(np.ones(shape, np.float32))
        self._pre.set_base(layer.id, *arrays)

    def _base_state(self) -> Dict[str, List]:
        return {key: [v.clone(), t] for key, (v, t) in self._base_moments.items()}

    def _load_base_state(self, saved) -> None:
        self._base_moments = {key: (torch.as_tensor(v, dtype=torch.float64).clone(), int(t))
                              for key, (v, t) in saved.items()}
