"""What a step hands the library: per layer the gradient arrays and, on a refresh, the batch —
the union of the accumulated micro-batches (sequences of different lengths padded and masked)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..arrays import aligned_empty
from . import modules
if TYPE_CHECKING:  # annotations only
    from .capture import _Layer


class Batches:
    """Mixed into TENGraD."""

    def _grad_scale(self, batch: int) -> float:
        if self.fisher == "sampled":
            return 1.0  # sample_fisher's loss is sum-reduced
        if self.loss_reduction == "mean":
            return float(batch)
        if self.loss_reduction == "sum":
            return 1.0
        return float(self.loss_reduction)

    def _capture_scales(self, done) -> list:
        """The per-sample scale of each capture of a refresh. With ``loss_reduction="mean"``: k
        backward passes (accumulation, each micro-batch's mean loss divided by k) give a sample
        of a micro-batch of size b the scale k·b; several forwards in one backward (k = 1) give
        each forward's own batch size."""
        if self.fisher == "sampled" or self.loss_reduction != "mean":
            return [self._grad_scale(0)] * len(done)
        k = len({c.backward for c in done})
        return [float(k * c.inputs.shape[0]) for c in done]

    def _update_arrays(self, layer: _Layer):
        """(flat, weight, bias): where the library writes a layer's whole update before ``.grad``
        when it cannot write over ``.grad`` itself (grafting, the one-call path, a ``.grad`` not
        contiguous on the CPU, the data-parallel owner) — one float32 array of the weight's and
        bias's numbers (a data-parallel step broadcasts it) and the two as views into it (bias None
        without one) — kept from step to step: new arrays every step cost fresh pages above glibc's
        32 MiB mmap threshold (4096², m = 32: 14 ms of a 33 ms step of two layers; RESULTS.md).
        Made at a layer's first such step; their memory is the layer's parameters' size."""
        shapes = self._pre.array_shapes(layer.id)
        if layer.updates is None or layer.updates[1].shape != shapes.weight:
            n = int(np.prod(shapes.weight, dtype=np.int64))
            flat = aligned_empty((n + (int(np.prod(shapes.bias, dtype=np.int64)) if shapes.bias is not None else 0),))
            layer.updates = (flat, flat[:n].reshape(shapes.weight),
                             None if shapes.bias is None else flat[n:].reshape(shapes.bias))
        return layer.updates

    @staticmethod
    def _array(t: torch.Tensor, layer: _Layer, what: str) -> np.ndarray:
        if t.dtype != torch.float32:
            raise TypeError(f"TENGraD: layer {layer.name!r}: {what} must be a float32 tensor, got {t.dtype}")
        # The library runs on the CPU: tensors elsewhere are copied here (and updates copied back).
        return np.ascontiguousarray(t.detach().cpu().numpy())  # no copy for contiguous CPU tensors

    def _plan(self, refresh: bool):
        """Everything step() needs, checked before any call or .grad write: per layer the gradient
        arrays and, on a refresh, the batch (micro-batches joined)."""
        plans = []
        self._window_pending = {}  # window > 1: this step's batches, joining the windows if it succeeds
        for layer in self._layers:
            weight = layer.module.weight
            if not weight.requires_grad or weight.grad is None or layer.plain is not None:
                continue  # no gradient this step (no update, no KL term), or the plain gradient kept
            if layer.id is None or (refresh and not any(c.grads is not None for c in layer.captures)):
                b = modules.bias_of(layer.module)
                if not bool(weight.grad.any()) and (b is None or b.grad is None or not bool(b.grad.any())):
                    continue  # an unused layer whose .grad zero_grad(set_to_none=False) left at zero
                raise RuntimeError(
                    f"TENGraD: no curvature captured for layer {layer.name!r} in this refresh step: was the model in "
                    "eval mode or under no_grad during the forward, or did its backward not reach this layer"
                    + (", or was sample_fisher not called" if self.fisher == "sampled" else "") + "?")
            bias = None
            if layer.spec.bias:
                if modules.bias_of(layer.module).grad is None:
                    raise RuntimeError(f"TENGraD: layer {layer.name!r} has a weight gradient but no bias gradient")
                bias = self._array(modules.bias_of(layer.module).grad, layer, "bias .grad").reshape(layer.spec.bias_shape)
            w = self._array(weight.grad, layer, "weight .grad").reshape(layer.spec.weight_shape)
            batch = None
            if refresh:
                done = [c for c in layer.captures if c.grads is not None]
                inputs = [self._array(c.inputs, layer, "input") for c in done]
                grads = [self._array(c.grads, layer, "output gradient") for c in done]
                scales = self._capture_scales(done)
                layer.step_scale = scales[0]
                if any(sc != scales[0] for sc in scales):  # one scale per call: fold the others in
                    grads = [g * np.float32(sc / scales[0]) if sc != scales[0] else g for g, sc in zip(grads, scales)]
                masks = None
                if any(c.mask is not None for c in done):  # the union's mask: unmasked captures are all tokens
                    masks = [np.ascontiguousarray((c.mask if c.mask is not None else
                                                   torch.ones(modules.token_shape(layer.module, c.inputs)))
                                                  .detach().cpu().numpy() != 0).view(np.uint8) for c in done]
                if len({x.shape[1:] for x in inputs}) > 1:
                    inputs, grads, masks = self._pad_tokens(layer, inputs, grads, masks)
                if self.window > 1 and not self._data_parallel():  # the earlier batches first (window.py; the
                    # data-parallel owner joins the gathered global batches)
                    inputs, grads, masks = self._windowed(layer, inputs, grads, masks, scales[0])
                    if len({x.shape[1:] for x in inputs}) > 1:
                        inputs, grads, masks = self._pad_tokens(layer, inputs, grads, masks)
                batch = (inputs[0], grads[0]) if len(inputs) == 1 else (np.concatenate(inputs), np.concatenate(grads))
                if masks is not None:
                    batch = batch + (masks[0] if len(masks) == 1 else np.concatenate(masks),)
            plans.append((layer, w, bias, batch))
        return plans

    @staticmethod
    def _pad_tokens(layer: _Layer, inputs, grads, masks):
        """Micro-batches of one refresh with different sequence lengths ([batch, T_k, features]):
        padded to the longest T with zeros and masked, so the union is one batch whose padding
        counts for nothing."""
        rank = 2 + modules.feature_dims(layer.module)  # [batch, tokens, features]; an embedding's ids [batch, tokens]
        if not modules.can_join_lengths(layer.module) or any(x.ndim != rank for x in inputs):
            raise ValueError(f"TENGraD: layer {layer.name!r}: the accumulated micro-batches have different shapes "
                             f"{sorted({x.shape[1:] for x in inputs})}; only [batch, tokens, features] sequences of "
                             "different lengths can be joined")
        longest = max(x.shape[1] for x in inputs)
        if masks is None:
            masks = [np.ones(x.shape[:2], np.uint8) for x in inputs]

        def pad(x, fill=0):
            out = np.full((x.shape[0], longest) + x.shape[2:], fill, dtype=x.dtype)
            out[:, :x.shape[1]] = x
            return out
        return [pad(x) for x in inputs], [pad(g) for g in grads], [pad(k) for k in masks]
