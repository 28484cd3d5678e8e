"""The module types tengrad.torch preconditions — ``nn.Linear`` (over features or token sequences),
``nn.Conv2d``, the affine part of ``nn.LayerNorm`` / ``nn.RMSNorm``, and ``nn.MultiheadAttention``'s
projections (attention.py) — and everything that depends on the type: what is refused at
construction, the library's layer spec, what the library is handed as a layer's activations and
output gradients, and the row a data-parallel refresh sends per sample. The only module of
tengrad.torch that tests those types."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..specs import AffineSpec, Conv2dSpec, LinearSpec
from . import attention
if TYPE_CHECKING:  # annotations only
    from .capture import _Layer

NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
SUPPORTED = (nn.Linear, nn.Conv2d, attention.InProjection) + NORMS


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def bias_of(module: nn.Module) -> Optional[nn.Parameter]:
    """The module's bias parameter (RMSNorm has none)."""
    return getattr(module, "bias", None)


def never_called(model: nn.Module) -> Dict[str, str]:
    """{name: reason} of supported modules never preconditioned whatever ``skip`` says: norms
    without affine parameters, and the projections of an ``nn.MultiheadAttention`` that
    attention.py cannot run explicitly (their gradients are left as they are)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, NORMS) and getattr(module, "weight", None) is None:
            found[name] = "a norm without affine parameters (elementwise_affine=False): nothing to precondition"
        if isinstance(module, nn.MultiheadAttention):
            why = attention.unsupported(module)
            if why:
                for child, sub in module.named_modules():
                    if child and isinstance(sub, SUPPORTED):
                        found[f"{name}.{child}" if name else child] = f"inside nn.MultiheadAttention: {why}"
    return found


def features_of(module: nn.Module) -> int:
    """A norm's features: the numbers of its normalized shape."""
    return int(math.prod(module.normalized_shape))


def is_sequence(module: nn.Module, x: torch.Tensor) -> bool:
    """A layer over tokens whose input is [batch, tokens..., features]."""
    if isinstance(module, NORMS):
        return x.dim() > 1 + len(module.normalized_shape)
    return isinstance(module, (nn.Linear, attention.InProjection)) and x.dim() > 2


def can_join_lengths(module: nn.Module) -> bool:
    """Micro-batches of different sequence lengths can be padded into one batch."""
    return not isinstance(module, nn.Conv2d)


def same_kind(spec, module: nn.Module) -> bool:
    """A saved spec and a module are the same kind of layer."""
    kind = AffineSpec if isinstance(module, NORMS) else Conv2dSpec if isinstance(module, nn.Conv2d) else LinearSpec
    return isinstance(spec, kind)


def sequence_first(model: nn.Module) -> Set[str]:
    """Name prefixes of PyTorch's transformer layers (and stacks) with ``batch_first=False``: the
    linear layers and norms inside see [tokens, batch, features] (their attention's projections
    are made batch-first by attention.py)."""
    found = set()
    for name, module in model.named_modules():
        stack = isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder))
        attn = getattr(module.layers[0], "self_attn", None) if stack and len(module.layers) else \
            getattr(module, "self_attn", None)
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) or stack:
            if isinstance(attn, nn.MultiheadAttention) and not attn.batch_first:
                found.add(f"{name}." if name else "")
    return found


def batch_dim(name: str, module: nn.Module, seq_first: Set[str]) -> int:
    """1 for a linear layer or norm of a sequence-first transformer layer, else 0."""
    if isinstance(module, (nn.Linear,) + NORMS) and not name.endswith("out_proj"):
        if any(name.startswith(prefix) for prefix in seq_first):
            return 1
    return 0


@torch.no_grad()
def activations(module: nn.Module, x: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """What the library takes as the layer's activations, batch first: the input itself, or a
    norm's normalized input x̂ ([batch, tokens..., features], the normalized shape flattened)."""
    if isinstance(module, nn.LayerNorm):
        x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    elif isinstance(module, NORMS):  # RMSNorm
        x = F.rms_norm(x, module.normalized_shape, eps=module.eps)
    return batch_first(module, x.detach(), batch_dim)


def batch_first(module: nn.Module, g: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """A layer's activations or output gradient in the library's layout: batch first, a norm's
    normalized shape flattened."""
    if batch_dim:
        g = g.transpose(0, batch_dim)
    if isinstance(module, NORMS):
        return g.reshape(g.shape[:g.dim() - len(module.normalized_shape)] + (features_of(module),))
    return g


class ModuleAdapter:
    """Per-type knowledge, mixed into TENGraD (methods keep their names of before the split)."""

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
        b = bias_of(module)
        has_bias = b is not None and b.requires_grad if bias is None else bias
        if isinstance(module, NORMS):
            return AffineSpec(features_of(module), has_bias)
        if isinstance(module, (nn.Linear, attention.InProjection)):
            return LinearSpec(module.in_features, module.out_features, has_bias)
        k, d = _pair(module.kernel_size), _pair(module.dilation)
        if isinstance(module.padding, str):
            pad = (0, 0) if module.padding == "valid" else (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        else:
            pad = _pair(module.padding)
        return Conv2dSpec(module.in_channels, module.out_channels, tuple(input_size or (0, 0)), k,
                          _pair(module.stride), pad, d, module.groups, has_bias)

    def _add_layer(self, spec) -> int:
        """Registers a layer of this spec with the library, with its kind's settings; its id."""
        if isinstance(spec, LinearSpec):
            layer_id = self._pre.add_linear(spec.in_features, spec.out_features, spec.bias)
        elif isinstance(spec, AffineSpec):
            layer_id = self._pre.add_affine(spec.features, spec.bias)
        else:
            layer_id = self._pre.add_conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, spec.input_size,
                                            spec.stride, spec.padding, spec.dilation, spec.groups, spec.bias)
            self._pre.set_conv_strategy(layer_id, self.conv_strategy)
        if spec.takes_tokens:
            self._pre.set_token_mode(layer_id, self.token_mode)
        return layer_id

    def _spec_for(self, layer: _Layer, x: torch.Tensor):
        m = layer.module
        if isinstance(m, NORMS):
            k = len(m.normalized_shape)
            if x.dim() < k + 1 or tuple(x.shape[-k:]) != tuple(m.normalized_shape):
                raise ValueError(f"TENGraD: norm layer {layer.name!r} got a {tuple(x.shape)} input; it needs a batch "
                                 f"dimension first and {tuple(m.normalized_shape)} last")
            return self._module_spec(m)
        if isinstance(m, (nn.Linear, attention.InProjection)):
            if x.dim() < 2:
                raise ValueError(f"TENGraD: linear layer {layer.name!r} got a {x.dim()}-D input; it needs a batch "
                                 "dimension first ([batch, features] or [batch, tokens..., features])")
            return self._module_spec(m)
        if x.dim() != 4:
            raise ValueError(f"TENGraD: conv layer {layer.name!r} needs NCHW input, got {x.dim()}-D")
        return self._module_spec(m, (x.shape[2], x.shape[3]))

    def _rows(self, layer: _Layer) -> Tuple[str, int]:
        """What a refresh sends of each sample of this layer (docs/DESIGN.md §11): the raw row
        (inputs + output gradients) or, when it is shorter, the per-sample gradient (weight + bias
        numbers) — a convolution with many output positions. A layer over sequences always
        sends per-sequence gradients: one width whatever the ranks' sequence lengths and masks.
        Returns (kind, floats per sample)."""
        shapes = self._pre.array_shapes(layer.id)  # the library's sizes (a conv's output size)
        d = shapes.parameters
        if layer.spec.takes_tokens and layer.sequence:  # one row per sequence, whatever its length
            return "per-sample", d
        raw = int(np.prod(shapes.activations)) + int(np.prod(shapes.output_grads))
        return ("per-sample", d) if d < raw else ("raw", raw)
