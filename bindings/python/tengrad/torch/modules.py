"""The module types tengrad.torch preconditions — ``nn.Linear`` (over features or token sequences)
and ``nn.Conv2d`` — and everything that depends on the type: what is refused at construction,
the library's layer spec, and the row a data-parallel refresh sends per sample. The only module of
tengrad.torch that tests those types."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..specs import Conv2dSpec, LinearSpec
if TYPE_CHECKING:  # annotations only
    from .capture import _Layer

SUPPORTED = (nn.Linear, nn.Conv2d)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def never_called(model: nn.Module) -> Dict[str, str]:
    """{name: reason} of supported modules that their parent uses without calling them, so no hook
    ever sees their input: ``nn.MultiheadAttention``'s ``out_proj`` (the attention reads its
    weight inside ``F.multi_head_attention_forward``). Skipped automatically; their gradients are
    left as they are."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child, sub in module.named_modules():
                if child and isinstance(sub, SUPPORTED):
                    found[f"{name}.{child}" if name else child] = (
                        "inside nn.MultiheadAttention, which uses its weights without calling it (not supported yet)")
    return found


def is_sequence(module: nn.Module, x: torch.Tensor) -> bool:
    """A linear layer whose input is [batch, tokens..., features]."""
    return isinstance(module, nn.Linear) and x.dim() > 2


def can_join_lengths(module: nn.Module) -> bool:
    """Micro-batches of different sequence lengths can be padded into one batch."""
    return isinstance(module, nn.Linear)


def same_kind(spec, module: nn.Module) -> bool:
    """A saved spec and a module are the same kind of layer."""
    return isinstance(spec, LinearSpec) == isinstance(module, nn.Linear)


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

    def _add_layer(self, spec) -> int:
        """Registers a layer of this spec with the library, with its kind's settings; its id."""
        if isinstance(spec, LinearSpec):
            layer_id = self._pre.add_linear(spec.in_features, spec.out_features, spec.bias)
            self._pre.set_token_mode(layer_id, self.token_mode)
        else:
            layer_id = self._pre.add_conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, spec.input_size,
                                            spec.stride, spec.padding, spec.dilation, spec.groups, spec.bias)
            self._pre.set_conv_strategy(layer_id, self.conv_strategy)
        return layer_id

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

    def _rows(self, layer: _Layer) -> Tuple[str, int]:
        """What a refresh sends of each sample of this layer (docs/DESIGN.md §11): the raw row
        (inputs + output gradients) or, when it is shorter, the per-sample gradient (weight + bias
        numbers) — a convolution with many output positions. A linear layer over sequences always
        sends per-sequence gradients: one width whatever the ranks' sequence lengths and masks.
        Returns (kind, floats per sample)."""
        shapes = self._pre.array_shapes(layer.id)  # the library's sizes (a conv's output size)
        d = shapes.parameters
        if isinstance(layer.spec, LinearSpec) and layer.sequence:  # one row per sequence, whatever its length
            return "per-sample", d
        raw = int(np.prod(shapes.activations)) + int(np.prod(shapes.output_grads))
        return ("per-sample", d) if d < raw and not isinstance(layer.spec, LinearSpec) else ("raw", raw)
