"""Per-layer step-size grafting (Shampoo's practice): each layer's preconditioned update keeps its
direction and takes the norm of a reference optimizer's step on the same gradient, so TENGraD
inherits a learning rate and schedule tuned for that optimizer:

* ``"sgd"``: the gradient itself (‖update‖ = ‖grad‖ per layer);
* ``"adam"``: ``g / (√v̂ + ε)``, v Adam's running average of g² (β₂ = 0.999, bias-corrected,
  ε = 1e-8) kept per parameter here (and in ``state_dict``) — the norm of an Adam step without
  momentum, which the user's optimizer adds.

A layer is weight and bias together (one block, one norm). KL clipping then uses the grafted
updates' ⟨update, grad⟩. The moments advance only when a step succeeds."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..parallel import kl_clip_from_sum
from .modules import grad_parts

GRAFTS = (None, "sgd", "adam")
BETA2, EPS = 0.999, 1e-8


class Grafting:
    """Mixed into TENGraD."""

    def _reference_norm2(self, parts, moments) -> float:
        """‖the reference optimizer's step‖² over a layer's gradient parts; ``graft="adam"``
        advances their second moments into ``moments`` (installed by the step on success)."""
        reference = 0.0
        for key, g in parts:
            if self.graft == "adam":
                v, t = self._moments.get(key, (torch.zeros_like(g), 0))
                v = BETA2 * v + (1 - BETA2) * g * g
                t += 1
                g = g / ((v / (1 - BETA2 ** t)).sqrt() + EPS)
                moments[key] = (v, t)
            reference += float(g.square().sum())
        return reference

    @staticmethod
    def _graft_scale(reference: float, ups) -> float:
        """Scales the layer's updates (numpy, in place) to the reference norm; returns the scale."""
        # In torch, not numpy: np.dot runs on numpy's own OpenBLAS, whose threads then spin against
        # torch's on the next forward (measured: the demo's forward and backward took 2× as long).
        norm = sum(float(torch.from_numpy(u).double().square().sum()) for u in ups if u is not None)
        scale = math.sqrt(reference / norm) if norm > 0 else 0.0
        for u in ups:
            if u is not None:
                u *= np.float32(scale)
        return scale

    def _grafted(self, updates) -> Tuple[list, float, Dict[str, Tuple[torch.Tensor, int]]]:
        """The updates scaled per layer to the reference step's norm, the KL sum
        Σ_l scale_l ⟨u_l, g_l⟩, and the new Adam moments (installed by step() on success)."""
        moments: Dict[str, Tuple[torch.Tensor, int]] = {}
        total = 0.0
        for layer, w_up, b_up in updates:
            reference = self._reference_norm2(grad_parts(layer), moments)
            scale = self._graft_scale(reference, (w_up, b_up))
            total += scale * self._pre.layer_stats(layer.id)["update_dot_grad"]
        return updates, total, moments

    def _nu_from_sum(self, total: float) -> float:
        if self.kl_clip is None or self.lr == 0:
            return 1.0
        return kl_clip_from_sum(self.lr, self.kl_clip, total)

    def _graft_state(self) -> Dict[str, List]:
        return {key: [v.clone(), t] for key, (v, t) in self._moments.items()}

    def _load_graft_state(self, saved) -> None:
        self._moments = {key: (torch.as_tensor(v, dtype=torch.float64).clone(), int(t)) for key, (v, t) in saved.items()}
