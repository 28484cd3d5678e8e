"""Curvature over a window (``window=k``): each refresh's block is the exact Fisher of the union of
this refresh's batch and the batches of the last k − 1 refreshes, ``F = (1/km) Σ u uᵀ`` over all
km samples, still inverted through one km × km system (Woodbury). A batch of m samples spans at
most m directions of a layer's parameters; the window keeps curvature the earlier batches found
(their per-sample gradients taken at the weights of their own step, as KFAC's running factors
are). The cost: a refresh's Gram grows as (km)², its factorization as (km)³.

Kept here per layer: the last k − 1 refreshes' library arrays (inputs, output gradients, token
masks) and their per-sample scales, copied; a step's own batch joins the window only when the
step succeeds. Sequences of other lengths are padded and masked (a layer's other shapes are
fixed). In ``state_dict``."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from . import modules


def joined(arrays: List[np.ndarray]) -> np.ndarray:
    """One array of the list's rows, owned here (a lone array may view a torch tensor: copied)."""
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0].copy()


def padded_join(arrays: List[np.ndarray]) -> np.ndarray:
    """The arrays' rows in one array; [rows, tokens, ...] arrays of different token counts
    padded with zeros to the longest."""
    if len({x.shape[1:] for x in arrays}) > 1:
        longest = max(x.shape[1] for x in arrays)
        arrays = [np.pad(x, [(0, 0), (0, longest - x.shape[1])] + [(0, 0)] * (x.ndim - 2)) for x in arrays]
    return np.concatenate(arrays)


class Windows:
    """Mixed into TENGraD."""

    def _pend(self, layer, entry) -> list:
        """The layer's window so far; ``entry`` (this refresh's batch) joins its last k − 2 as the
        pending window, installed when the step succeeds."""
        past = self._window_batches.get(layer.name, [])
        self._window_pending[layer.name] = past[-(self.window - 2):] + [entry] if self.window > 2 else [entry]
        return past

    def _windowed(self, layer, inputs: List[np.ndarray], grads: List[np.ndarray], masks: Optional[List[np.ndarray]],
                  scale: float):
        """This refresh's arrays (one scale, ``scale``) with the window's earlier batches put
        first; the refresh's own batch is kept pending until the step succeeds."""
        own = (joined(inputs), joined(grads), None if masks is None else joined(masks), scale)
        past = self._pend(layer, own)
        if not past:
            return inputs, grads, masks
        grads = [g if s == scale else g * np.float32(s / scale) for _, g, _, s in past] + grads
        if masks is not None or any(e[2] is not None for e in past):
            ones = lambda x: np.ones(modules.token_shape(layer.module, torch.from_numpy(x)), np.uint8)  # noqa: E731
            masks = [ones(x) if k is None else k for x, _, k, _ in past] + \
                (masks if masks is not None else [ones(x) for x in inputs])
        inputs = [x for x, _, _, _ in past] + inputs
        return inputs, grads, masks

    def _windowed_rows(self, layer, own: tuple) -> tuple:
        """A data-parallel refresh on the layer's owner: the gathered global batch — (inputs,
        output gradients) raw rows, their per-sample scale folded in, or (per-sample gradients,)
        — with the window's earlier batches put first; this one kept pending until the step
        succeeds. An embedding's ids of another length are padded with id 0 and a zero gradient,
        which add nothing to a per-sample gradient."""
        entry = (own[0], own[1], None, 1.0) if len(own) == 2 else (None, own[0], None, 1.0)
        past = self._pend(layer, entry)
        if not past:
            return own
        if len(own) == 2:
            return (padded_join([x for x, _, _, _ in past] + [own[0]]),
                    padded_join([g for _, g, _, _ in past] + [own[1]]))
        return (np.concatenate([g for _, g, _, _ in past] + [own[0]]),)

    def _commit_window(self) -> None:
        """The step succeeded: its refresh batches join their layers' windows."""
        self._window_batches.update(self._window_pending)
        self._window_pending = {}

    def _window_state(self) -> Dict[str, list]:
        as_tensor = lambda x: None if x is None else torch.from_numpy(x.copy())  # noqa: E731
        return {name: [[as_tensor(x), as_tensor(g), as_tensor(k), float(s)] for x, g, k, s in entries]
                for name, entries in self._window_batches.items()}

    def _load_window_state(self, saved) -> None:
        as_array = lambda t: None if t is None else np.ascontiguousarray(torch.as_tensor(t).numpy())  # noqa: E731
        keep = self.window - 1
        if self._refresh_after_load:  # data parallel: windows live on the owners; they restart with the refresh
            keep = 0
        self._window_batches = {
            name: [(as_array(x), as_array(g), as_array(k), float(s)) for x, g, k, s in entries][-keep:]
            for name, entries in saved.items()
            # an owner's gradient rows (no inputs) do not join a single process's window
            if keep > 0 and name in self._by_name and all(x is not None for x, *_ in entries)}
        self._window_pending = {}
