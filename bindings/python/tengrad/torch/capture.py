"""Captures: the forward hooks that keep each layer's input (and padding mask), the tensor hooks
that keep the gradient of the loss with respect to its output, forward numbering (a new forward
replaces a capture that got no backward; a checkpoint's recomputation is not a forward), and
registration of a layer with the library at its first forward."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.nn as nn
from torch.autograd.graph import get_gradient_edge

from ..core import LinearSpec
from . import modules


class _Capture:
    """One forward's input of a layer and, once its backward ran, the output gradient."""

    __slots__ = ("inputs", "grads", "mask", "edge")

    def __init__(self, inputs: torch.Tensor, mask: Optional[torch.Tensor] = None):
        self.inputs = inputs
        self.grads: Optional[torch.Tensor] = None
        self.mask = mask  # [batch, tokens...] of a sequence input, 1 = token, 0 = padding
        # For the sampled Fisher: where autograd delivers the output's gradient (the sampled
        # backward asks for these only, so no weight gradient is computed).
        self.edge = None


class _Layer:
    """Bookkeeping of one hooked module."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.id: Optional[int] = None
        self.spec = None
        # Captures of this step: one per forward (several with gradient accumulation).
        self.captures: List[_Capture] = []
        # The capture the running forward made (until its forward hook takes it).
        self.pending: Optional[_Capture] = None
        # The root forward that made the last capture.
        self.forward_id = -1
        # A linear layer whose inputs are sequences ([batch, tokens..., features]).
        self.sequence = False

    @property
    def has_bias(self) -> bool:
        bias = self.module.bias
        return bias is not None and bias.requires_grad

# Hooks run eagerly under torch.compile (Dynamo cannot trace their side effects).
_eager = getattr(getattr(torch, "compiler", None), "disable", lambda fn: fn)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (activation checkpointing recomputes the
    forward then: that is not a new forward)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


class Capturing:
    """The capture side of TENGraD, mixed into it."""

    # -- hooks ---------------------------------------------------------------------------------
    def _refresh_step(self) -> bool:
        return self.steps % self.update_freq == 0

    def _capturing_inputs(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self._refresh_step() and not self._sampling

    @_eager
    def _root_pre_hook(self, module, inputs):
        if not _in_backward():
            self._forward_id += 1
            if module.training and torch.is_grad_enabled() and inputs and isinstance(inputs[0], torch.Tensor) \
                    and inputs[0].dim() > 0:
                self._batch = int(inputs[0].shape[0])  # the training batch (the global-mean weights)

    def _make_pre_hook(self, layer: _Layer):
        @_eager
        def hook(module, inputs):
            if not self._capturing_inputs(module) or _in_backward():
                return  # eval, no_grad, a reuse step, or a checkpoint's recomputation
            x = inputs[0]
            self._check_tensor(layer, x, "input")
            self._ensure_registered(layer, x)
            layer.sequence = modules.is_sequence(module, x)
            last = layer.captures[-1] if layer.captures else None
            if last is not None and last.grads is None:
                if layer.forward_id == self._forward_id:
                    raise RuntimeError(
                        f"TENGraD: layer {layer.name!r} ran twice in one forward pass: a layer used more than "
                        f"once per forward has no single per-sample block (skip=[{layer.name!r}])")
                layer.captures.pop()  # that forward got no backward (a skipped batch): a new capture
            capture = _Capture(x.detach(), self._mask_for(layer, x))
            layer.captures.append(capture)
            layer.pending = capture
            layer.forward_id = self._forward_id
        return hook

    def _make_forward_hook(self, layer: _Layer):
        @_eager
        def hook(module, inputs, output):
            capture, layer.pending = layer.pending, None
            if capture is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return

            def grad_hook(grad):
                if self.fisher == "sampled" and not self._sampling:
                    return None  # the real loss's backward: curvature comes from sample_fisher
                capture.grads = grad.detach()
                return None
            output.register_hook(grad_hook)
            if self.fisher == "sampled":
                capture.edge = get_gradient_edge(output)
        return hook

    def _check_tensor(self, layer: _Layer, t: torch.Tensor, what: str):
        if t.dtype != torch.float32:
            raise TypeError(f"TENGraD: layer {layer.name!r}: {what} has dtype {t.dtype}; only float32 is supported")

    def _ensure_registered(self, layer: _Layer, x: torch.Tensor):
        spec = self._spec_for(layer, x)
        if layer.id is not None:
            if spec != layer.spec:
                raise ValueError(f"TENGraD: layer {layer.name!r} changed shape or bias trainability ({layer.spec} -> "
                                 f"{spec}); a conv layer's input size must stay fixed")
            return
        if isinstance(spec, LinearSpec):
            layer.id = self._pre.add_linear(spec.in_features, spec.out_features, spec.bias)
            self._pre.set_token_mode(layer.id, self.token_mode)
        else:
            layer.id = self._pre.add_conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, spec.input_size,
                                            spec.stride, spec.padding, spec.dilation, spec.groups, spec.bias)
            self._pre.set_conv_strategy(layer.id, self.conv_strategy)
        layer.spec = spec
        self._registered.append(layer)

    # -- padding masks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def token_mask(self, mask: torch.Tensor):
        """Forwards inside this context carry a padding mask for the sequence layers:
        ``mask`` [batch, tokens...] (bool or 0/1), 0 marking padding, which then contributes
        nothing to their curvature (docs/DESIGN.md §12). It applies to every hooked ``nn.Linear``
        whose input is [batch, tokens..., features] with those leading dimensions::

            with pre.token_mask(attention_mask):
                logits = model(x)
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
            raise ValueError("token_mask needs a [batch, tokens...] tensor")
        previous, self._token_mask = self._token_mask, mask.detach()
        try:
            yield
        finally:
            self._token_mask = previous

    def _mask_for(self, layer: _Layer, x: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self._token_mask
        if mask is None or not modules.is_sequence(layer.module, x):
            return None
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"TENGraD: layer {layer.name!r}: token_mask has shape {tuple(mask.shape)}, its input "
                             f"{tuple(x.shape)} needs {tuple(x.shape[:-1])}")
        return mask

