"""One process's step: each hooked layer's captured batch into the library (curvature on refresh
steps, or the one-call path), its ``.grad`` preconditioned, the step-size rule (grafting or KL
clipping) applied, and ``.grad`` written only when every layer succeeded. Mixed into ``TENGraD``
(the data-parallel step is ``distributed.py``'s)."""
from __future__ import annotations

import numpy as np
import torch

from .modules import bias_of, grad_parts, write_grad


class LocalStep:
    """Mixin: ``_local_step(refresh)`` (the host supplies ``_plan``, ``_pre``, the options, the
    graft and base moments and ``_finish_step``)."""

    def _local_step(self, refresh: bool) -> None:
        plans = self._plan(refresh)
        if self.blas_threads == "auto":
            self._pre.blas_threads = 0 if refresh or self._short_host_spin else 1
        else:
            self._pre.blas_threads = self.blas_threads
        self._pre.clear_updates()  # KL clipping sums only this step's layers
        updates = []  # (layer, weight update, bias update) computed whole: one-call layers, grafting
        prepared = []  # (layer, weight .grad, bias .grad) of precondition_prepare, finished once ν is known
        bases = {}  # base="adam": the moments this step advances (installed on success)
        if self.base is not None:
            for layer, *_ in plans:
                bases.update(self._base_moments_of(grad_parts(layer)))
        for layer, w, b, batch in plans:
            if batch is not None:
                if self.base is not None:
                    self._set_layer_base(layer, bases)
                a, g, mask = batch if len(batch) == 3 else batch + (None,)
                if self._one_call(layer, a):
                    # The one-call path does not read .grad: check it as precondition would.
                    if not (np.isfinite(w).all() and (b is None or np.isfinite(b).all())):
                        raise ValueError(f"TENGraD: layer {layer.name!r}: .grad contains NaN or Inf")
                    updates.append((layer, *self._pre.natural_gradient(layer.id, a, g, layer.step_scale, mask=mask,
                                                                        out=self._update_arrays(layer)[1:])))
                    continue
                self._pre.update_curvature(layer.id, a, g, layer.step_scale, mask=mask)
            if self.graft is None:  # the update is written below, times ν, once every layer succeeded
                self._pre.precondition_prepare(layer.id, w, b)
                prepared.append((layer, w, b))
            else:  # grafting scales each layer by its update's norm: computed whole first
                updates.append((layer, *self._pre.precondition(layer.id, w, b, out=self._update_arrays(layer)[1:])))
        nu, moments = 1.0, {}
        if self.graft is not None and updates:
            updates, total, moments = self._grafted(updates)
            nu = self._nu_from_sum(total)
        elif self.kl_clip is not None and self.lr > 0 and (updates or prepared):
            nu = self._pre.kl_clip_factor(self.lr, self.kl_clip)
        # Every call succeeded: write.
        for layer, w, b in prepared:
            self._finish_prepared(layer, w, b, nu)
        for layer, w_up, b_up in updates:
            for param, update in ((layer.module.weight, w_up), (bias_of(layer.module), b_up)):
                if update is not None:
                    write_grad(param, torch.from_numpy(update), nu)
        self._moments.update(moments)
        self._base_moments.update(bases)
        self._commit_window()
        self.last_nu = nu
        self._finish_step()

    def _finish_prepared(self, layer, w, b, nu: float) -> None:
        """A prepared layer's ν · update, written by the library straight over ``.grad`` when ``w``
        and ``b`` are ``.grad``'s own memory (contiguous CPU tensors): no update array, no copy;
        else into the kept update arrays and copied. At 4096², m = 32, a reuse step of two layers:
        31 ms, 0.91× the library's out-of-place calls alone; 59–64 ms with new update arrays and a
        copy (benchmarks/RESULTS.md)."""
        params = (layer.module.weight, bias_of(layer.module) if b is not None else None)
        if all(param is None or _is_memory_of(array, param.grad) for array, param in zip((w, b), params)):
            self._pre.precondition_finish(layer.id, w, b, nu, out=(w, b))
            return
        _, w_up, b_up = self._update_arrays(layer)
        self._pre.precondition_finish(layer.id, w, b, nu, out=(w_up, b_up))
        for param, update in zip(params, (w_up, b_up)):
            if update is not None:
                write_grad(param, torch.from_numpy(update), 1.0)

    def _one_call(self, layer, a) -> bool:
        """The fast path (``natural_gradient`` in one call): the empirical Fisher refreshed every
        step, allowed by ``fast_path``, one captured backward, no window, not a sequence layer, a
        mean loss."""
        single = len([c for c in layer.captures if c.grads is not None]) == 1
        return (self.fisher == "empirical" and self.update_freq == 1 and self.fast_path and single
                and self.window == 1 and not layer.sequence and layer.step_scale == a.shape[0])


def _is_memory_of(array: np.ndarray, grad: torch.Tensor) -> bool:
    """Whether ``array`` (from ``Batches._array``: no copy of a contiguous CPU tensor) is ``grad``'s
    own memory, in its order."""
    return grad.device.type == "cpu" and grad.is_contiguous() and array.ctypes.data == grad.data_ptr() \
        and array.size == grad.numel()
