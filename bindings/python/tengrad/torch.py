"""TENGraD for PyTorch: exact natural-gradient preconditioning of ``nn.Linear`` and ``nn.Conv2d``.

    import tengrad.torch as tt

    precond = tt.TENGraD(model, damping=0.1, fisher="sampled", update_freq=1, kl_clip=1e-3, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in loader:
        optimizer.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        precond.sample_fisher(logits)     # only for fisher="sampled": curvature backward, .grad untouched
        loss.backward()
        precond.step()                    # rewrites each layer's .grad with (F + λI)⁻¹ .grad, in place
        optimizer.step()                  # momentum, weight decay ... as usual

How it works. A forward-pre hook keeps each layer's input and a forward hook puts a tensor hook
on its output, which keeps the gradient of the loss with respect to that output; both hand CPU
float32 tensors to libtengrad without copies (through numpy views). Tensor hooks on the output are
used rather than ``register_full_backward_hook`` because the latter fails when an in-place op
(``nn.ReLU(inplace=True)``) follows the layer, which is common.

Fisher types:

* ``"empirical"`` — curvature from the real loss's output gradients. With ``update_freq=1`` each
  layer takes the one-call path (``natural_gradient``): the update of the batch's mean gradient,
  which is ``.grad`` for a standard loss; set ``fast_path=False`` to precondition ``.grad`` as it
  is instead (e.g. when the loss has extra terms that reach these layers).
* ``"sampled"`` — the true Fisher of the paper: ``sample_fisher(logits)`` draws labels from the
  model's softmax and backpropagates their (sum-reduced) cross-entropy with ``torch.autograd.grad``
  — hooks capture the output gradients, ``.grad`` stays untouched — and ``step()`` preconditions
  ``.grad`` with that curvature (reuse path).

``update_freq`` T refreshes the curvature every T steps and reuses the snapshot in between.

Ordinary PyTorch habits work:

* every forward in train mode with gradients on starts a new capture: a forward that gets no
  backward (a skipped batch, a validation forward in train mode) is simply replaced;
* gradient accumulation (k forward/backward passes before ``step()``): a refresh uses the union
  of the micro-batches; with ``loss_reduction="mean"`` the standard recipe is assumed (each
  micro-batch's mean loss divided by k, so ``.grad`` is the mean over the union and s = the union's
  size); otherwise pass the per-sample scale as a number. ``.grad`` is preconditioned as it is;
* activation checkpointing (``use_reentrant=False``): the recomputation is not a new forward;
* ``torch.compile(model)``: the hooks run eagerly (``torch.compiler.disable``);
* ``channels_last`` models and frozen biases (a weight-only block) are handled;
* ``step()`` is atomic: all updates are computed before any ``.grad`` is written; when it raises,
  every ``.grad`` is as it was and the captures are kept, so a retry after fixing the cause is a
  clean step. KL clipping counts only the layers updated in this step; ``lr = 0`` means ν = 1.

Refused with an error naming the layer and the way out (usually ``skip=[name]``): a layer run
twice in one forward, a parameter shared by two hooked layers (tied weights), non-zero padding
modes, ``padding='same'`` with an even kernel span, inputs that are not float32 on the CPU.
``kl_clip`` scales all updates of a step by ``ν = min(1, sqrt(kl_clip / (lr² Σ⟨update, grad⟩)))``.
``loss_reduction`` ("mean" or "sum", or a number) gives the per-sample scale of the real loss's
output gradients (``grad_scale``): mean-reduced losses hand out 1/m of each sample's gradient.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .core import Conv2dSpec, LinearSpec, Preconditioner

__all__ = ["TENGraD"]


class _Capture:
    """One forward's input of a layer and, once its backward ran, the output gradient."""

    __slots__ = ("inputs", "grads", "mask")

    def __init__(self, inputs: torch.Tensor, mask: Optional[torch.Tensor] = None):
        self.inputs = inputs
        self.grads: Optional[torch.Tensor] = None
        self.mask = mask  # [batch, tokens...] of a sequence input, 1 = token, 0 = padding


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


def _check_lr(lr) -> float:
    lr = float(lr)
    if not (lr >= 0 and lr != float("inf")):
        raise ValueError(f"lr must be finite and >= 0, got {lr}")
    return lr


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class TENGraD:
    """Exact block-diagonal natural-gradient preconditioner for a PyTorch model.

    Args:
        model: the network; every ``nn.Linear`` and ``nn.Conv2d`` in it is preconditioned unless
            skipped.
        damping: λ of ``F + λI`` (> 0). Change it later with ``set_damping`` (schedules).
        fisher: ``"empirical"`` or ``"sampled"`` (see the module docstring).
        update_freq: refresh the curvature every this many steps (reuse path in between).
        kl_clip: KL clipping constant κ, or None for no clipping; needs ``lr``.
        lr: the learning rate KL clipping assumes (update it with ``set_lr`` when it changes).
        loss_reduction: ``"mean"``, ``"sum"`` or a per-sample scale for the real loss: the number
            the layers' output gradients are multiplied by to give one sample's gradient
            (``"mean"`` = the batch size; for a loss averaged over all tokens of a batch, in
            per-sequence mode, pass batch · T; in per-token mode, the number of tokens).
        skip: module names (as in ``named_modules``) or module types not to precondition.
        fast_path: allow the one-call path for the empirical Fisher refreshed every step.
        memory_limit: byte cap of the underlying handle (0: none).
        conv_strategy: ``"auto"``, ``"factored"`` or ``"explicit"`` for every conv layer.
        blas_threads: OpenBLAS threads of the library's calls. ``"auto"`` (default): refreshes
            use OpenBLAS's setting; reuse steps (``precondition`` between refreshes) use one
            thread: they are short and sit between torch's passes, where two pools spin against
            each other — torch's OpenMP workers (~5 ms after each op, unless ``GOMP_SPINCOUNT``
            is lowered) slow a second BLAS thread, and OpenBLAS's idle workers spin after every
            call and slow torch's next pass (a ViT with 19 layers: 65 → 52 ms per step with one
            thread; README, "Threads").
            An int n uses n threads for every call (0: OpenBLAS's setting).
        token_mode: for ``nn.Linear`` applied to sequences (inputs [batch, T..., d]; the
            dimensions between batch and features are positions): ``"per-sequence"`` (default) —
            the exact Fisher block of per-sequence gradients, a sequence's gradient summing its
            tokens' — or ``"per-token"``, every token a sample (KFAC's "expand" view, for losses
            that are sums over tokens). docs/DESIGN.md §12.
        process_group: a ``torch.distributed`` process group (gloo; NCCL/MPI backends take the same
            calls) for data-parallel training with exact global-batch blocks (docs/DESIGN.md §11):
            every rank runs the same model on its own samples and calls ``step()``; each layer's
            curvature lives on one owner rank, which gathers the layer's per-sample rows (raw
            inputs and output gradients, or a convolution's per-sample gradients when shorter),
            preconditions the global mean gradient (each rank's mean weighted by its share of the
            samples) and broadcasts the update, so every rank gets the update one process would
            compute on the concatenated batch. ``step()`` replaces the gradient allreduce of the
            preconditioned layers: pass the ``DistributedDataParallel`` module itself as ``model``
            and ``ddp_comm_hook`` is registered so DDP averages only the other parameters (norms,
            embeddings, skipped layers), or use no DDP. A failure on any rank (bad input, NaN, a
            layer without gradient) raises on every rank and changes no ``.grad``. KL clipping uses
            the global sum of ⟨update, grad⟩.
    """

    def __init__(self, model: nn.Module, damping: float = 0.1, fisher: str = "empirical", update_freq: int = 1,
                 kl_clip: Optional[float] = None, lr: Optional[float] = None,
                 loss_reduction: Union[str, float] = "mean",
                 skip: Iterable[Union[str, type]] = (), fast_path: bool = True, memory_limit: int = 0,
                 conv_strategy: str = "auto", blas_threads: Union[str, int] = "auto", process_group=None,
                 token_mode: str = "per-sequence"):
        if fisher not in ("empirical", "sampled"):
            raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
        if int(update_freq) < 1:
            raise ValueError(f"update_freq must be >= 1, got {update_freq}")
        if kl_clip is not None and (lr is None or not kl_clip > 0):
            raise ValueError("kl_clip needs a positive kl_clip and a learning rate lr (>= 0; at 0 nothing is clipped)")
        if not (blas_threads == "auto" or (isinstance(blas_threads, int) and 0 <= blas_threads <= 1024)):
            raise ValueError(f"blas_threads must be 'auto' or an int in 0..1024, got {blas_threads!r}")
        if token_mode not in ("per-sequence", "per-token"):
            raise ValueError(f"token_mode must be 'per-sequence' or 'per-token', got {token_mode!r}")
        if token_mode == "per-token" and process_group is not None:
            raise ValueError("TENGraD: token_mode='per-token' with a process_group is not supported yet")
        if not (loss_reduction in ("mean", "sum") or isinstance(loss_reduction, (int, float))):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or a number, got {loss_reduction!r}")
        self.model = model
        self.fisher = fisher
        self.update_freq = int(update_freq)
        self.kl_clip = kl_clip
        self.loss_reduction = loss_reduction
        self.fast_path = fast_path
        self.conv_strategy = conv_strategy
        self.token_mode = token_mode
        self.blas_threads = blas_threads
        self.process_group = process_group
        self._owners: Optional[List[int]] = None
        self.steps = 0
        self.last_nu = 1.0
        self._sampling = False
        self._removed = False
        self._forward_id = 0
        self._batch = 0
        self._token_mask: Optional[torch.Tensor] = None
        if lr is not None:
            lr = _check_lr(lr)
        self.lr = lr
        skip = tuple(skip)
        skip_names = {s for s in skip if isinstance(s, str)}
        skip_types = tuple(s for s in skip if isinstance(s, type))
        self._layers: List[_Layer] = []
        self._by_name: Dict[str, _Layer] = {}
        self._handles = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or name in skip_names:
                continue
            if skip_types and isinstance(module, skip_types):
                continue
            self._check_supported(name, module)
            layer = _Layer(name, module)
            self._layers.append(layer)
            self._by_name[name] = layer
        if not self._layers:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to precondition")
        owners: Dict[int, str] = {}
        for layer in self._layers:
            for kind in ("weight", "bias"):
                param = getattr(layer.module, kind)
                if param is None:
                    continue
                if id(param) in owners:
                    raise ValueError(
                        f"TENGraD: layers {owners[id(param)]!r} and {layer.name!r} share one {kind} (tied weights): "
                        "the exact block of a parameter used by two layers is not supported; precondition one of "
                        f"them only (skip=[{layer.name!r}])")
                owners[id(param)] = layer.name
        self._preconditioned = set(owners)  # ids of the parameters step() replaces
        if process_group is not None and isinstance(model, nn.parallel.DistributedDataParallel):
            model.register_comm_hook(process_group, self.ddp_comm_hook)
        self._pre = Preconditioner(damping=damping, memory_limit=memory_limit)
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook))
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_pre_hook(self._make_pre_hook(layer)))
            self._handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer)))
        self._registered: List[_Layer] = []  # in registration (= first forward) order

    # -- settings ------------------------------------------------------------------------------
    @property
    def damping(self) -> float:
        return self._pre.damping

    def set_damping(self, damping: float) -> None:
        """Set λ; snapshots are kept and re-factorized at their next use."""
        self._pre.damping = damping

    def set_lr(self, lr: float) -> None:
        """The learning rate KL clipping assumes (call when a scheduler changes it). Finite and
        >= 0; at 0 (the end of a cosine schedule) the step is not clipped (ν = 1)."""
        self.lr = _check_lr(lr)

    def parameters(self) -> List[nn.Parameter]:
        """The parameters whose gradients ``step()`` preconditions (weights and trainable biases of
        the hooked layers), e.g. to give them and the others (norms, embeddings) different
        optimizers or parameter groups."""
        return [p for layer in self._layers for p in (layer.module.weight, layer.module.bias)
                if p is not None and p.requires_grad]

    @property
    def layer_names(self) -> List[str]:
        return [layer.name for layer in self._layers]

    def layer_stats(self, name: str) -> dict:
        """Diagnostics of a hooked layer (see ``Preconditioner.layer_stats``)."""
        layer = self._by_name[name]
        if layer.id is None:
            raise ValueError(f"layer {name!r} has not run a forward pass yet")
        return self._pre.layer_stats(layer.id)

    def remove(self) -> None:
        """Remove the hooks and release the native handle (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pre.close()
        self._removed = True

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError("TENGraD: this preconditioner was removed (remove() released its hooks and handle)")

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
            layer.sequence = isinstance(module, nn.Linear) and x.dim() > 2
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
        return hook

    def _check_tensor(self, layer: _Layer, t: torch.Tensor, what: str):
        if t.dtype != torch.float32:
            raise TypeError(f"TENGraD: layer {layer.name!r}: {what} has dtype {t.dtype}; only float32 is supported")

    @staticmethod
    def _check_supported(name: str, module: nn.Module) -> None:
        """Refuse at construction what no forward can fix."""
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(f"TENGraD: conv layer {name!r} uses padding_mode={module.padding_mode!r}; only 'zeros' "
                                 f"padding is supported: skip it (skip=[{name!r}])")
            if module.padding == "same":
                k, d = _pair(module.kernel_size), _pair(module.dilation)
                if any(d[i] * (k[i] - 1) % 2 for i in (0, 1)):
                    raise ValueError(f"TENGraD: conv layer {name!r}: padding='same' with an even kernel span pads "
                                     f"asymmetrically, which is not supported: skip it (skip=[{name!r}])")

    @staticmethod
    def _module_spec(module: nn.Module, input_size=None, bias: Optional[bool] = None):
        """The layer's spec from the module; a conv's input size from the first input (or given)."""
        has_bias = module.bias is not None and module.bias.requires_grad if bias is None else bias
        if isinstance(module, nn.Linear):
            return LinearSpec(module.in_features, module.out_features, has_bias)
        k, d = _pair(module.kernel_size), _pair(module.dilation)
        if isinstance(module.padding, str):
            pad = (0, 0) if module.padding == "valid" else (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        else:
            pad = _pair(module.padding)
        return Conv2dSpec(module.in_channels, module.out_channels, tuple(input_size or (0, 0)), k,
                          _pair(module.stride), pad, d, module.groups, has_bias)

    def _spec_for(self, layer: _Layer, x: torch.Tensor):
        m = layer.module
        if isinstance(m, nn.Linear):
            if x.dim() < 2:
                raise ValueError(f"TENGraD: linear layer {layer.name!r} got a {x.dim()}-D input; it needs a batch "
                                 "dimension first ([batch, features] or [batch, tokens..., features])")
            return self._module_spec(m)
        if x.dim() != 4:
            raise ValueError(f"TENGraD: conv layer {layer.name!r} needs NCHW input, got {x.dim()}-D")
        return self._module_spec(m, (x.shape[2], x.shape[3]))

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
        if mask is None or not isinstance(layer.module, nn.Linear) or x.dim() < 3:
            return None
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"TENGraD: layer {layer.name!r}: token_mask has shape {tuple(mask.shape)}, its input "
                             f"{tuple(x.shape)} needs {tuple(x.shape[:-1])}")
        return mask

    # -- the sampled-label Fisher --------------------------------------------------------------
    def sample_fisher(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """For ``fisher="sampled"``: draw labels from softmax(logits) and backpropagate their
        sum-reduced cross-entropy to capture the curvature, leaving ``.grad`` untouched. Call it
        after the forward and before ``loss.backward()`` (it keeps the graph)."""
        self._check_alive()
        if self.fisher != "sampled":
            raise RuntimeError("sample_fisher is for fisher='sampled'")
        if not self._refresh_step():
            return
        if not any(layer.captures and layer.captures[-1].grads is None for layer in self._layers):
            raise RuntimeError("TENGraD: no layer captured its input in a forward since the last curvature pass "
                               "(eval mode, no_grad, or sample_fisher called twice for one forward?)")
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._sampling = True
        try:
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        except RuntimeError as e:
            if "second time" in str(e) or "freed" in str(e):
                raise RuntimeError("TENGraD: sample_fisher must run before loss.backward(), which frees the graph "
                                   "(or call loss.backward(retain_graph=True))") from e
            raise
        finally:
            self._sampling = False

    # -- the step ------------------------------------------------------------------------------
    def _grad_scale(self, batch: int) -> float:
        if self.fisher == "sampled":
            return 1.0  # sample_fisher's loss is sum-reduced
        if self.loss_reduction == "mean":
            return float(batch)
        if self.loss_reduction == "sum":
            return 1.0
        return float(self.loss_reduction)

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
        for layer in self._layers:
            weight = layer.module.weight
            if not weight.requires_grad or weight.grad is None:
                continue  # no gradient this step: no update, no KL term
            if layer.id is None or (refresh and not any(c.grads is not None for c in layer.captures)):
                raise RuntimeError(
                    f"TENGraD: no curvature captured for layer {layer.name!r} in this refresh step: was the model in "
                    "eval mode or under no_grad during the forward, or did its backward not reach this layer"
                    + (", or was sample_fisher not called" if self.fisher == "sampled" else "") + "?")
            bias = None
            if layer.spec.bias:
                if layer.module.bias.grad is None:
                    raise RuntimeError(f"TENGraD: layer {layer.name!r} has a weight gradient but no bias gradient")
                bias = self._array(layer.module.bias.grad, layer, "bias .grad")
            w = self._array(weight.grad, layer, "weight .grad").reshape(layer.spec.weight_shape)
            batch = None
            if refresh:
                done = [c for c in layer.captures if c.grads is not None]
                inputs = [self._array(c.inputs, layer, "input") for c in done]
                grads = [self._array(c.grads, layer, "output gradient") for c in done]
                masks = None
                if any(c.mask is not None for c in done):  # the union's mask: unmasked captures are all tokens
                    masks = [np.ascontiguousarray((c.mask if c.mask is not None else torch.ones(c.inputs.shape[:-1]))
                                                  .detach().cpu().numpy() != 0).view(np.uint8) for c in done]
                if len({x.shape[1:] for x in inputs}) > 1:
                    inputs, grads, masks = self._pad_tokens(layer, inputs, grads, masks)
                batch = (inputs[0], grads[0]) if len(done) == 1 else (np.concatenate(inputs), np.concatenate(grads))
                if masks is not None:
                    batch = batch + (masks[0] if len(masks) == 1 else np.concatenate(masks),)
            plans.append((layer, w, bias, batch))
        return plans

    @staticmethod
    def _pad_tokens(layer: _Layer, inputs, grads, masks):
        """Micro-batches of one refresh with different sequence lengths ([batch, T_k, features]):
        padded to the longest T with zeros and masked, so the union is one batch whose padding
        counts for nothing."""
        if not isinstance(layer.module, nn.Linear) or any(x.ndim != 3 for x in inputs):
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

    @torch.no_grad()
    def step(self) -> None:
        """Replace ``.grad`` of every hooked layer with its preconditioned update, apply KL clipping,
        and advance the step counter. Call after ``loss.backward()``.

        Atomic: all updates are computed first; ``.grad`` is written only when every layer
        succeeded. If step() raises, every ``.grad`` is as it was and the captured batches are
        kept, so fixing the cause (e.g. ``set_lr``) and calling step() again gives the same result
        as a first call. Gradient accumulation (several forward/backward passes before step()) is
        supported: a refresh uses the union of the micro-batches (see ``loss_reduction``)."""
        self._check_alive()
        refresh = self._refresh_step()
        if self.process_group is not None and self._world_size() > 1:
            return self._distributed_step(refresh)
        plans = self._plan(refresh)
        if self.blas_threads == "auto":
            self._pre.blas_threads = 0 if refresh else 1
        else:
            self._pre.blas_threads = self.blas_threads
        self._pre.clear_updates()  # KL clipping sums only this step's layers
        updates = []
        for layer, w, b, batch in plans:
            if batch is not None:
                a, g, mask = batch if len(batch) == 3 else batch + (None,)
                scale = self._grad_scale(a.shape[0])
                single = len([c for c in layer.captures if c.grads is not None]) == 1
                if self.fisher == "empirical" and self.update_freq == 1 and self.fast_path and single:
                    # The one-call path does not read .grad: check it as precondition would.
                    if not (np.isfinite(w).all() and (b is None or np.isfinite(b).all())):
                        raise ValueError(f"TENGraD: layer {layer.name!r}: .grad contains NaN or Inf")
                    updates.append((layer, *self._pre.natural_gradient(layer.id, a, g, scale, mask=mask)))
                    continue
                self._pre.update_curvature(layer.id, a, g, scale, mask=mask)
            updates.append((layer, *self._pre.precondition(layer.id, w, b)))
        nu = 1.0
        if self.kl_clip is not None and self.lr > 0 and updates:
            nu = self._pre.kl_clip_factor(self.lr, self.kl_clip)
        # Every call succeeded: write.
        for layer, w_up, b_up in updates:
            for param, update in ((layer.module.weight, w_up), (layer.module.bias, b_up)):
                if update is not None:
                    new = torch.from_numpy(update).view(param.shape)
                    param.grad.copy_(new if nu == 1 else new * nu)
        self.last_nu = nu
        for layer in self._layers:
            layer.captures = []
            layer.pending = None
        self.steps += 1

    # -- data parallel (docs/DESIGN.md §11) -------------------------------------------------------
    def _rows(self, layer: _Layer) -> Tuple[str, int]:
        """What a refresh sends of each sample of this layer (docs/DESIGN.md §11): the raw row
        (inputs + output gradients) or, when it is shorter, the per-sample gradient (weight + bias
        numbers) — a convolution with many output positions. A linear layer over sequences always
        sends per-sequence gradients: one width whatever the ranks' sequence lengths and masks.
        Returns (kind, floats per sample)."""
        spec = layer.spec
        if isinstance(spec, LinearSpec):
            if layer.sequence:  # one row per sequence, whatever its length and mask
                return "per-sample", spec.out_features * (spec.in_features + int(spec.bias))
            return "raw", spec.in_features + spec.out_features
        h, w = spec.input_size
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.kernel_size, spec.stride, spec.padding, spec.dilation
        positions = ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        raw = spec.in_channels * h * w + spec.out_channels * positions
        d = spec.out_channels * (spec.in_channels // spec.groups * kh * kw + int(spec.bias))
        return ("per-sample", d) if d < raw else ("raw", raw)

    def _owner_map(self) -> List[int]:
        """Layer → owner rank, identical on every rank without communication: layers by estimated
        refresh cost (descending, ties by index), each to the least-loaded rank (ties: lowest)."""
        import torch.distributed as dist
        if self._owners is None:
            size = dist.get_world_size(self.process_group)
            costs = []
            for i, layer in enumerate(self._layers):
                spec = layer.spec
                weights = int(np.prod(spec.weight_shape)) + (spec.bias_shape[0] if spec.bias else 0)
                costs.append((-(self._rows(layer)[1] + 4 * weights), i))
            load = [0] * size
            owners = [0] * len(self._layers)
            for cost, i in sorted(costs):
                rank = min(range(size), key=lambda r: (load[r], r))
                owners[i] = rank
                load[rank] += -cost
            self._owners = owners
        return self._owners

    def _world_size(self) -> int:
        """Ranks of the process group (one rank: the single-process step, with its fast path)."""
        import torch.distributed as dist
        return dist.get_world_size(self.process_group)

    def _comm_device(self) -> torch.device:
        """Where collective buffers live: NCCL needs the current GPU, gloo and MPI take CPU tensors."""
        import torch.distributed as dist
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def ddp_comm_hook(self, group, bucket):
        """A ``DistributedDataParallel`` communication hook that allreduces (averages) only the
        gradients TENGraD does not precondition; preconditioned layers keep their local gradients,
        which ``step()`` reduces to each layer's owner (docs/DESIGN.md §11). Registered
        automatically when the model given to ``TENGraD`` is the DDP module; otherwise
        ``ddp_model.register_comm_hook(process_group, pre.ddp_comm_hook)``."""
        import torch.distributed as dist
        buffer = bucket.buffer()
        others, offset = [], 0
        for param in bucket.parameters():
            n = param.numel()
            if id(param) not in self._preconditioned:
                others.append((offset, n))
            offset += n
        if not others:
            done = torch.futures.Future()
            done.set_result(buffer)
            return done
        flat = torch.cat([buffer[o:o + n] for o, n in others]) / dist.get_world_size(group)  # DDP's average
        future = dist.all_reduce(flat, group=group, async_op=True).get_future()

        def write(fut):
            total, at = fut.value()[0], 0
            for o, n in others:
                buffer[o:o + n].copy_(total[at:at + n])
                at += n
            return buffer
        return future.then(write)

    def _distributed_step(self, refresh: bool) -> None:
        import torch.distributed as dist
        group = self.process_group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        device = self._comm_device()
        # Local checks first; their outcome travels with the sample counts (one small allgather),
        # so a rank that cannot take part makes every rank raise instead of leaving them waiting.
        error = None
        try:
            if any(layer.id is None for layer in self._layers):
                raise RuntimeError("TENGraD: every layer must have run a forward pass before a distributed step")
            owners = self._owner_map()
            plans = self._plan(refresh)
            if len(plans) != len(self._layers):
                raise RuntimeError("TENGraD: with a process_group every hooked layer needs a gradient in every step")
            local = plans[0][3][0].shape[0] if refresh else self._batch
        except Exception as e:  # noqa: BLE001 — reported collectively below
            error, local = e, 0
        counts = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(size)]
        dist.all_gather(counts, torch.tensor([local, error is not None], dtype=torch.int64, device=device), group=group)
        failed = [r for r, c in enumerate(counts) if c[1].item()]
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(f"TENGraD: the distributed step failed on rank(s) {failed} before any exchange; "
                               "no .grad was changed (the failing ranks raised the cause)")
        counts = [int(c[0].item()) for c in counts]
        m_total = sum(counts)
        weight = counts[rank] / m_total
        status, updates = 0, []
        # Samples of every rank: the global mean gradient weights each rank's mean by its share; a
        # refresh gathers that many rows from each rank to the layer's owner.
        for (layer, w, b, batch), owner in zip(plans, owners):
            grad = np.concatenate([w.ravel(), b.ravel()]) if b is not None else w.ravel().copy()
            g_sum = torch.from_numpy(grad * weight).to(device)
            dist.reduce(g_sum, dst=owner, group=group)
            kind, width = self._rows(layer)
            if refresh:
                a, g = batch[:2]
                mask = batch[2] if len(batch) == 3 else None
                pad = torch.zeros((max(counts), width), dtype=torch.float32)
                if kind == "raw":  # inputs and per-sample output gradients, written into place
                    n, cut = a.shape[0], a[0].size
                    pad[:n, :cut] = torch.from_numpy(a.reshape(n, -1))
                    pad[:n, cut:] = torch.from_numpy(g.reshape(n, -1))
                    pad[:n, cut:].mul_(self._grad_scale(n))
                else:
                    try:
                        pad[:a.shape[0]] = torch.from_numpy(
                            self._pre.per_sample_gradients(layer.id, a, g, self._grad_scale(a.shape[0]), mask=mask))
                    except Exception as e:  # noqa: BLE001 — NaN rows make the owner refuse too
                        status, error = 1, e
                        pad.fill_(float("nan"))
                pad = pad.to(device)
                gathered = [torch.zeros_like(pad) for _ in range(size)] if rank == owner else None
                dist.gather(pad, gathered, dst=owner, group=group)
            out = torch.zeros(grad.size, dtype=torch.float32, device=device)
            if rank == owner:
                try:
                    if refresh:
                        full = torch.cat([blk[:n] for blk, n in zip(gathered, counts)]).cpu().numpy()
                        if kind == "raw":
                            cut = a[0].size
                            fa = np.ascontiguousarray(full[:, :cut]).reshape((m_total,) + a.shape[1:])
                            fg = np.ascontiguousarray(full[:, cut:]).reshape((m_total,) + batch[1].shape[1:])
                            self._pre.update_curvature(layer.id, fa, fg, 1.0)
                        else:
                            self._pre.update_curvature_from_gradients(layer.id, np.ascontiguousarray(full))
                    reduced = g_sum.cpu().numpy()
                    gw = reduced[:w.size].reshape(w.shape).copy()
                    gb = reduced[w.size:].copy() if b is not None else None
                    uw, ub = self._pre.precondition(layer.id, gw, gb)
                    out = torch.from_numpy(np.concatenate([uw.ravel(), ub.ravel()]) if ub is not None
                                           else uw.ravel().copy()).to(device)
                except Exception as e:  # noqa: BLE001 — every rank learns of it below
                    status, error = 1, e
            dist.broadcast(out, src=owner, group=group)
            updates.append((layer, out))
        # One allreduce: a failure flag per rank and this rank's ⟨update, grad⟩ terms of the layers
        # it owns (the global KL sum).
        dots = sum(self._pre.layer_stats(layer.id)["update_dot_grad"]
                   for (layer, *_), owner in zip(plans, owners) if owner == rank) if status == 0 else 0.0
        summary = torch.zeros(size + 1, dtype=torch.float64, device=device)
        summary[rank], summary[size] = float(status), dots
        dist.all_reduce(summary, group=group)
        summary = summary.cpu()
        failed = [r for r in range(size) if summary[r].item() != 0]
        if failed:
            message = (f"TENGraD: the distributed step failed on layer owner rank(s) {failed}; no .grad was changed "
                       "and the captures are kept (a retry after fixing the cause equals a clean step)")
            if error is not None:
                raise RuntimeError(f"{message}: {error}") from error
            raise RuntimeError(message)
        nu, total = 1.0, float(summary[size].item())
        if self.kl_clip is not None and self.lr > 0 and total > 0:
            nu = min(1.0, (self.kl_clip / (self.lr * self.lr * total)) ** 0.5)
        for layer, out in updates:
            n = layer.module.weight.numel()
            if nu != 1:
                out = out * nu
            layer.module.weight.grad.copy_(out[:n].view_as(layer.module.weight))
            if layer.spec.bias:
                layer.module.bias.grad.copy_(out[n:].view_as(layer.module.bias))
        self.last_nu = nu
        for layer in self._layers:
            layer.captures = []
            layer.pending = None
        self.steps += 1

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Settings, step counter, layer order and the native state (snapshots included)."""
        return {
            "format": 1,
            "steps": self.steps,
            "fisher": self.fisher,
            "update_freq": self.update_freq,
            "kl_clip": self.kl_clip,
            "lr": self.lr,
            "layers": [layer.name for layer in self._registered],
            "native": self._pre.save_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``: the next updates are bit-identical to the saved run's."""
        if state.get("format") != 1:
            raise ValueError("not a TENGraD state_dict (format 1)")
        names = list(state["layers"])
        unknown = [n for n in names if n not in self._by_name]
        if unknown:
            raise ValueError(f"state_dict has layers this model lacks: {unknown}")
        self._check_alive()
        fresh = Preconditioner()
        fresh.load_state(state["native"])  # validates the blob before this object changes
        for i, name in enumerate(names):
            saved = fresh.layer_spec(i)
            module = self._by_name[name].module
            kind_ok = isinstance(saved, LinearSpec) == isinstance(module, nn.Linear)
            mine = self._module_spec(module, getattr(saved, "input_size", None)) if kind_ok else None
            if mine != saved:
                fresh.close()
                raise ValueError(f"state_dict layer {name!r} is {saved}; this model's {name!r} is "
                                 f"{mine if kind_ok else type(module).__name__}")
        self._pre.close()
        self._pre = fresh
        for layer in self._layers:
            layer.id, layer.spec = None, None
        self._registered = []
        for i, name in enumerate(names):
            layer = self._by_name[name]
            layer.id, layer.spec = i, fresh.layer_spec(i)
            self._registered.append(layer)
        self.steps = int(state["steps"])
        self.fisher = state["fisher"]
        self.update_freq = int(state["update_freq"])
        self.kl_clip = state["kl_clip"]
        self.lr = state["lr"]
