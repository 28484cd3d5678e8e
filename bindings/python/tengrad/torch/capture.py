"""Captures: the forward hooks that keep each layer's input (and padding mask), the tensor hooks
that keep the gradient of the loss with respect to its output, forward numbering (a new forward
replaces a capture that got no backward; a checkpoint's recomputation is not a forward), and
registration of a layer with the library at its first forward. Tensor hooks on the output rather
than ``register_full_backward_hook``, which fails when an in-place op (``nn.ReLU(inplace=True)``)
follows the layer; inputs and gradients reach libtengrad as numpy views, without copies."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import warnings
from typing import List, Optional

import torch
import torch.nn as nn
from torch.autograd.graph import get_gradient_edge

from . import modules


class _Capture:
    """One forward's input of a layer and, once its backward ran, the output gradient."""

    __slots__ = ("inputs", "grads", "mask", "edge", "backward")

    def __init__(self, inputs: torch.Tensor, mask: Optional[torch.Tensor] = None):
        self.inputs = inputs
        self.grads: Optional[torch.Tensor] = None
        self.mask = mask  # [batch, tokens...] of a sequence input, 1 = token, 0 = padding
        # For the sampled Fisher: where autograd delivers the output's gradient (the sampled
        # backward asks for these only, so no weight gradient is computed).
        self.edge = None
        # Which backward pass delivered `grads` (several forwards may share one backward).
        self.backward = -1


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
        # The per-sample scale of this step's batch (set by the step's plan).
        self.step_scale = 1.0
        # A layer whose inputs are sequences ([batch, tokens..., features]).
        self.sequence = False
        # 1: its inputs are [tokens, batch, ...] (inside a transformer layer with batch_first=False).
        self.batch_dim = 0
        # Why the layer keeps its plain gradient (an embedding called with ids shared by the
        # batch), or None.
        self.plain: Optional[str] = None
        # Where the library writes this layer's update, kept from step to step
        # (Batches._update_arrays).
        self.updates = None

    @property
    def has_bias(self) -> bool:
        bias = modules.bias_of(self.module)
        return bias is not None and bias.requires_grad


def _eager(fn):
    """Hooks run eagerly under torch.compile (Dynamo cannot trace their side effects). Without
    importing Dynamo: ``torch.compiler.disable`` imports it (2 s, most of ``import tengrad.torch``
    and of every data-parallel worker's start), and a process that never compiles never loads it,
    so nothing can be tracing the hook; once it is loaded the hook goes through torch's own lazy
    disable (``torch._disable_dynamo``, which imports Dynamo at its first call)."""
    lazy = getattr(torch, "_disable_dynamo", None)
    if lazy is None:  # an older torch: the eager disable
        return getattr(getattr(torch, "compiler", None), "disable", lambda f: f)(fn)
    disabled = lazy(fn)

    @functools.wraps(fn)
    def hook(*args, **kwargs):
        if "torch._dynamo" in sys.modules:
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)
    return hook


def _detached(*args):
    """What a hook becomes in a copy of the model (``copy.deepcopy``, ``torch.save``): nothing."""
    return None


def _detached_hook():
    return _detached


class _Hook:
    """A hook of one TENGraD. A copy of the model (an EMA teacher, a best-model snapshot,
    ``torch.save(model)``) gets a hook that does nothing instead: the copy is not preconditioned,
    must not feed this TENGraD's captures, and the TENGraD (with its native handle) cannot be
    copied or pickled."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __reduce__(self):
        return _detached_hook, ()


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (activation checkpointing recomputes the
    forward then: that is not a new forward)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


class Capturing:
    """The capture side of TENGraD, mixed into it."""

    # -- hooks ---------------------------------------------------------------------------------
    def _refresh_step(self) -> bool:
        return self.steps % self.update_freq == 0 or self._refresh_after_load

    def _capturing_inputs(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self._refresh_step() and not self._sampling

    # Forwards without a backward kept per layer at most (the oldest is dropped beyond): several
    # forwards before one backward form one batch, and a loop of forwards that never get a
    # backward (train-mode evaluation) must not grow without bound.
    MAX_WAITING = 16

    @_eager
    def _root_pre_hook(self, module, inputs, kwargs=None):
        if not _in_backward():
            self._forward_id += 1
            # The training batch (the global-mean weights): the first tensor argument, positional
            # or keyword (model(x=...)).
            first = next((t for t in list(inputs) + list((kwargs or {}).values()) if isinstance(t, torch.Tensor)), None)
            # The batch as embeddings compare it (modules.shared_ids): shape, and whether it is ids.
            self._root = None if first is None else \
                (tuple(first.shape), not (first.dtype.is_floating_point or first.is_complex()))
            if module.training and torch.is_grad_enabled():
                if self._recount:  # the last step() raised: this forward starts a new batch
                    self._train_forwards, self._batch, self._recount = 0, 0, False
                self._train_forwards += 1  # data-parallel ranks must agree on it (a skipped step())
                if first is not None and first.dim() > 0:
                    # Every micro-batch since the last step: a reuse step weights this rank's
                    # gradient by all of them (it used to take the last micro-batch's size).
                    self._batch += int(first.shape[0])

    def _make_pre_hook(self, layer: _Layer):
        @_eager
        def hook(module, inputs):
            if not self._capturing_inputs(module) or _in_backward():
                return  # eval, no_grad, a reuse step, or a checkpoint's recomputation
            x = inputs[0]
            if layer.plain is not None:
                return
            if modules.shared_ids(module, x, self._root):
                return self._use_plain_gradient(layer, x)
            if not modules.takes_ids(module):
                self._check_tensor(layer, x, "input")
            self._ensure_registered(layer, x)
            layer.sequence = modules.is_sequence(module, x)
            last = layer.captures[-1] if layer.captures else None
            if last is not None and last.grads is None and layer.forward_id == self._forward_id:
                raise RuntimeError(
                    f"TENGraD: layer {layer.name!r} ran twice in one forward pass: a layer used more than "
                    f"once per forward has no single per-sample block (skip=[{layer.name!r}])")
            waiting = [i for i, c in enumerate(layer.captures) if c.grads is None]
            if len(waiting) >= self.MAX_WAITING:
                del layer.captures[waiting[0]]
            inputs = modules.activations(module, x, layer.batch_dim)  # a norm's normalized input, batch first
            capture = _Capture(inputs, self._mask_for(layer, inputs))
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
                if self._failed_step:
                    self._drop_failed_batch()
                capture.grads = modules.batch_first(layer.module, grad.detach(), layer.batch_dim)
                capture.backward = torch._C._current_graph_task_id()
                return None
            output.register_hook(grad_hook)
            if self.fisher == "sampled":
                capture.edge = get_gradient_edge(output)
        return hook

    def _finish_step(self):
        """A step succeeded (either path): its captures are spent and the per-step counts restart."""
        for layer in self._layers:
            layer.captures = []
            layer.pending = None
        self.steps += 1
        self._train_forwards, self._batch, self._recount = 0, 0, False
        self._failed_step = False
        self._refresh_after_load = False

    def _drop_failed_batch(self):
        """The last step() raised and a new backward arrives: a new batch. The failed batch's
        captures (those with gradients) would otherwise join it as accumulation, so one NaN batch
        would fail every later step. Without a new backward, step() retries the same batch."""
        for layer in self._layers:
            layer.captures = [c for c in layer.captures if c.grads is None]
        self._failed_step = False

    def _use_plain_gradient(self, layer: _Layer, x: torch.Tensor):
        """An embedding called with ids the whole batch shares: its gradient reaches any hook
        already summed over the batch, so no per-sample block exists; it keeps its plain gradient
        (for every later step too) and the user is told once. Its parameters leave the
        preconditioned set, so DistributedDataParallel averages them again."""
        layer.plain = (f"called with ids shared by the whole batch (input {tuple(x.shape)}, e.g. position ids): its "
                       "gradient is summed over the batch before any hook sees it, so no per-sample block exists")
        layer.captures, layer.pending = [], None
        for param in (layer.module.weight, modules.bias_of(layer.module)):
            if param is not None:
                self._preconditioned.discard(id(param))
        warnings.warn(f"TENGraD: embedding {layer.name!r} is {layer.plain}; it keeps its plain gradient (give it to "
                      f"your other optimizer, or skip=[{layer.name!r}] to silence this)", stacklevel=3)

    def _check_tensor(self, layer: _Layer, t: torch.Tensor, what: str):
        if t.dtype != torch.float32:
            raise TypeError(f"TENGraD: layer {layer.name!r}: {what} has dtype {t.dtype}; only float32 is supported")

    def _ensure_registered(self, layer: _Layer, x: torch.Tensor):
        spec = self._spec_for(layer, x)
        if layer.id is not None:
            if spec != layer.spec:
                if dataclasses.replace(spec, bias=layer.spec.bias) == layer.spec:
                    raise ValueError(
                        f"TENGraD: layer {layer.name!r}: its bias was {'frozen' if layer.spec.bias else 'unfrozen'} "
                        "after its first forward; the block's parameters are fixed then. Set requires_grad before "
                        f"the first forward with this TENGraD, or make a new one (or skip=[{layer.name!r}])")
                raise ValueError(f"TENGraD: layer {layer.name!r} changed its input size ({layer.spec} -> {spec}); a "
                                 "conv layer's input size must stay fixed")
            return
        layer.id = self._add_layer(spec)
        layer.spec = spec
        self._registered.append(layer)

    # -- padding masks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def token_mask(self, mask: torch.Tensor):
        """Forwards inside this context carry a padding mask for the sequence layers:
        ``mask`` [batch, tokens...] (bool or 0/1), 1 / True marking a token and 0 / False padding,
        which then contributes nothing to their curvature (docs/DESIGN.md §12). This is the
        inverse of PyTorch's ``key_padding_mask`` (True = padding): pass ``~key_padding_mask``.
        Other values (0.5, 2, NaN, additive 0 / -inf masks) and a mask without any token are
        refused. It applies to every hooked layer over tokens
        (``nn.Linear``, norms, attention projections) whose input is [batch, tokens..., features]
        with those leading dimensions::

            with pre.token_mask(attention_mask):
                logits = model(x)
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
            raise ValueError("token_mask needs a [batch, tokens...] tensor")
        mask = mask.detach()
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(
                    "token_mask takes 1 for a token and 0 for padding (bool or 0/1); got other values. PyTorch's "
                    "additive attention masks (0 / -inf) mark tokens with 0: pass (mask == 0)")
        if not bool((mask != 0).any()):
            raise ValueError(
                "token_mask marks no token at all (1 / True = token, 0 / False = padding). PyTorch's "
                "key_padding_mask marks padding with True: pass ~key_padding_mask")
        previous, self._token_mask = self._token_mask, mask
        try:
            yield
        finally:
            self._token_mask = previous

    def _mask_for(self, layer: _Layer, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The capture's mask: the token_mask of a layer over tokens, and an embedding's
        padding_idx tokens. x: the layer's activations, [batch, tokens..., features] (ids:
        [batch, tokens...])."""
        mask = self._token_mask if layer.sequence else None
        tokens = modules.token_shape(layer.module, x)
        if mask is not None and tuple(mask.shape) != tokens:
            raise ValueError(f"TENGraD: layer {layer.name!r}: token_mask has shape {tuple(mask.shape)}, its input "
                             f"{tuple(x.shape)} needs {tokens}")
        padding = modules.padding_mask(layer.module, x)
        if padding is not None:
            mask = padding if mask is None else padding & (mask != 0)
        return mask

