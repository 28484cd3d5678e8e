"""The module types tengrad.torch preconditions — ``nn.Linear`` (over features or token sequences),
``nn.Conv2d``, the affine part of ``nn.LayerNorm`` / ``nn.RMSNorm``, ``nn.Embedding`` and
``nn.MultiheadAttention``'s projections (attention.py) — and everything that depends on the type: what is refused at
construction, the library's layer spec, what the library is handed as a layer's activations and
output gradients, and the row a data-parallel refresh sends per sample. The only module of
tengrad.torch that tests those types."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..specs import AffineSpec, Conv2dSpec, EmbeddingSpec, LinearSpec
from . import attention
if TYPE_CHECKING:  # annotations only
    from .capture import _Layer

NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
SUPPORTED = (nn.Linear, nn.Conv2d, attention.InProjection, nn.Embedding) + NORMS


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def bias_of(module: nn.Module) -> Optional[nn.Parameter]:
    """The module's bias parameter (RMSNorm has none)."""
    return getattr(module, "bias", None)


def write_grad(param: torch.Tensor, update: torch.Tensor, nu: float) -> None:
    """``param.grad`` ← ν · update (``update`` any tensor of the parameter's size): scaled straight
    into ``.grad``, one pass and no temporary."""
    update = update.view_as(param)
    if nu == 1:
        param.grad.copy_(update)
    else:
        torch.mul(update, nu, out=param.grad)


def grad_parts(layer, w=None, b=None) -> List[Tuple[str, torch.Tensor]]:
    """A hooked layer's gradient as [(parameter key "<layer>.weight"/".bias", float64 tensor in
    the parameter's shape)]: its ``.grad`` or, in a data-parallel step, the reduced global
    gradient ``w``, ``b`` (library arrays; ``b`` None when the layer has no bias block)."""
    parts = []
    for suffix, param, given in (("weight", layer.module.weight, w), ("bias", bias_of(layer.module), b)):
        if w is None and param is not None and param.grad is not None:
            parts.append((f"{layer.name}.{suffix}", param.grad.detach().to(torch.float64)))
        elif w is not None and given is not None:
            parts.append((f"{layer.name}.{suffix}", torch.from_numpy(given).reshape(param.shape).to(torch.float64)))
    return parts


def never_called(model: nn.Module) -> Dict[str, str]:
    """{name: reason} of supported modules never preconditioned whatever ``skip`` says: norms
    without affine parameters, and the projections of an ``nn.MultiheadAttention`` that
    attention.py cannot run explicitly (their gradients are left as they are)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, NORMS) and getattr(module, "weight", None) is None:
            found[name] = "a norm without affine parameters (elementwise_affine=False): nothing to precondition"
        if isinstance(module, nn.Embedding):
            why = embedding_unsupported(module)
            if why:
                found[name] = why
        if isinstance(module, nn.MultiheadAttention):
            why = attention.unsupported(module)
            if why:
                for child, sub in module.named_modules():
                    if child and isinstance(sub, SUPPORTED):
                        found[f"{name}.{child}" if name else child] = f"inside nn.MultiheadAttention: {why}"
    return found


def embedding_unsupported(module: nn.Embedding) -> Optional[str]:
    """Why an nn.Embedding has no exact per-sample block, or None."""
    if module.sparse:
        return "an embedding with sparse=True (sparse gradients): left to its optimizer"
    if module.scale_grad_by_freq:
        return ("an embedding with scale_grad_by_freq=True: its gradient divides by the batch's id counts, "
                "which is not a sum of per-sample gradients")
    if module.max_norm is not None:
        return "an embedding with max_norm (it renormalizes its weight in the forward): left to its optimizer"
    return None


def shared_ids(module: nn.Module, x: torch.Tensor, root) -> bool:
    """An embedding called with ids shared by the whole batch — position ids [T] or [1, T] added to
    [B, T, d] token embeddings (nanoGPT, Hugging Face) — whose gradient reaches its hooks already
    summed over the batch: no per-sample block exists. `root`: (shape, integer dtype) of the
    model's first tensor argument of this forward (the batch), or None. A 1-D input as long as
    both the batch and the root's token dimension is ambiguous and counts as shared (the plain
    gradient is never wrong; a block from summed gradients would be)."""
    if not isinstance(module, nn.Embedding) or root is None or x.dim() == 0:
        return False
    shape, ids = root
    if not shape:
        return False
    if int(x.shape[0]) != int(shape[0]):
        return True
    return x.dim() == 1 and ids and len(shape) >= 2 and int(shape[1]) == int(x.shape[0]) and int(shape[0]) > 1


def takes_ids(module: nn.Module) -> bool:
    """Its input is integer ids (an embedding), not float32 activations."""
    return isinstance(module, nn.Embedding)


def feature_dims(module: nn.Module) -> int:
    """Trailing feature dimensions of the library's activations: 0 for an embedding's ids
    ([batch, tokens...]), 1 for every other layer ([batch, tokens..., features])."""
    return 0 if isinstance(module, nn.Embedding) else 1


def token_shape(module: nn.Module, x: torch.Tensor) -> Tuple[int, ...]:
    """[batch, tokens...] of the library's activations `x` (a mask's shape)."""
    return tuple(x.shape[:x.dim() - feature_dims(module)])


def padding_mask(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """An embedding's padding_idx tokens as a mask (1 = token): they get no gradient and add
    nothing to the curvature. None when there is no padding_idx."""
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        return x != module.padding_idx
    return None


def features_of(module: nn.Module) -> int:
    """A norm's features: the numbers of its normalized shape."""
    return int(math.prod(module.normalized_shape))


def is_sequence(module: nn.Module, x: torch.Tensor) -> bool:
    """A layer over tokens whose input is [batch, tokens..., features]."""
    if isinstance(module, NORMS):
        return x.dim() > 1 + len(module.normalized_shape)
    if isinstance(module, nn.Embedding):
        return x.dim() > 1
    return isinstance(module, (nn.Linear, attention.InProjection)) and x.dim() > 2


def can_join_lengths(module: nn.Module) -> bool:
    """Micro-batches of different sequence lengths can be padded into one batch."""
    return not isinstance(module, nn.Conv2d)


def same_kind(spec, module: nn.Module) -> bool:
    """A saved spec and a module are the same kind of layer."""
    kind = AffineSpec if isinstance(module, NORMS) else Conv2dSpec if isinstance(module, nn.Conv2d) else \
        EmbeddingSpec if isinstance(module, nn.Embedding) else LinearSpec
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
    """What the library takes as the layer's activations, batch first: the input itself, a
    norm's normalized input x̂ ([batch, tokens..., features], the normalized shape flattened), or
    an embedding's ids as float32 ([batch, tokens...]; exact for every id below 2**24)."""
    if isinstance(module, nn.Embedding):
        x = x.to(torch.float32)
    elif isinstance(module, nn.LayerNorm):
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
        if isinstance(module, nn.Embedding):
            return EmbeddingSpec(module.num_embeddings, module.embedding_dim)
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
        elif isinstance(spec, EmbeddingSpec):
            layer_id = self._pre.add_embedding(spec.num_embeddings, spec.embedding_dim)
        else:
            layer_id = self._pre.add_conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, spec.input_size,
                                            spec.stride, spec.padding, spec.dilation, spec.groups, spec.bias)
            self._pre.set_conv_strategy(layer_id, self.conv_strategy)
        if spec.takes_tokens:
            self._pre.set_token_mode(layer_id, self.token_mode)
        self._pre.set_damping_mode(layer_id, self.damping_mode)
        return layer_id

    def _spec_for(self, layer: _Layer, x: torch.Tensor):
        m = layer.module
        if isinstance(m, NORMS):
            k = len(m.normalized_shape)
            if x.dim() < k + 1 or tuple(x.shape[-k:]) != tuple(m.normalized_shape):
                raise ValueError(f"TENGraD: norm layer {layer.name!r} got a {tuple(x.shape)} input; it needs a batch "
                                 f"dimension first and {tuple(m.normalized_shape)} last")
            return self._module_spec(m)
        if isinstance(m, nn.Embedding):
            if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool or x.dim() < 1:
                raise ValueError(f"TENGraD: embedding {layer.name!r} got a {x.dtype} {tuple(x.shape)} input; it needs "
                                 "integer ids with a batch dimension first ([batch] or [batch, tokens...])")
            return self._module_spec(m)
        if isinstance(m, (nn.Linear, attention.InProjection)):
            if x.dim() < 2:
                raise ValueError(f"TENGraD: linear layer {layer.name!r} got a {x.dim()}-D input; it needs a batch "
                                 "dimension first ([batch, features] or [batch, tokens..., features])")
            return self._module_spec(m)
        if x.dim() != 4:
            raise ValueError(f"TENGraD: conv layer {layer.name!r} needs NCHW input, got {x.dim()}-D")
        return self._module_spec(m, (x.shape[2], x.shape[3]))

    def _rows(self, layer: _Layer, tokens: int = 1) -> Tuple[str, int]:
        """What a refresh sends of each sample of this layer (docs/DESIGN.md §11): the raw row
        (inputs + output gradients) or, when it is shorter, the per-sample gradient (weight + bias
        numbers) — a convolution with many output positions. A layer over sequences sends
        per-sequence gradients (one width whatever the ranks' sequence lengths and masks), except
        an embedding, whose gradient rows (vocabulary × dim) are longer than its raw sequence
        (ids + output gradients of `tokens` tokens, masked ones zeroed) unless the vocabulary is
        tiny: every rank then needs the same `tokens` (part of the ranks' agreement).
        Returns (kind, floats per sample)."""
        shapes = self._pre.array_shapes(layer.id)  # the library's sizes (a conv's output size)
        d = shapes.parameters
        raw = int(np.prod(shapes.activations)) + int(np.prod(shapes.output_grads))
        if isinstance(layer.spec, EmbeddingSpec):
            raw *= tokens
        elif layer.spec.takes_tokens and layer.sequence:
            return "per-sample", d
        return ("per-sample", d) if d < raw else ("raw", raw)
