"""What the numpy API says about a layer: the descriptions a caller registers (``LinearSpec``,
``Conv2dSpec``, ``AffineSpec``, ``EmbeddingSpec``, PyTorch's terms), the array shapes the library gives back for them
(``ArrayShapes``: the one size authority), and the checks of integer arguments before ctypes
could cut them."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import _lib


_INT64_MAX = 2**63 - 1


def _integer(value, name: str, low: int = -_INT64_MAX - 1, high: int = _INT64_MAX) -> int:
    """A Python or numpy integer within [low, high]: ctypes would silently cut 2**32 to 0 and
    2.7 to 2, so anything else is refused here, naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if not low <= v <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {v}")
    return v


def _pair(value, name):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        v = _integer(value, name)
        return v, v
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    return _integer(a, name), _integer(b, name)


@dataclass(frozen=True)
class LinearSpec:
    in_features: int
    out_features: int
    bias: bool
    takes_tokens = True  # inputs [batch, tokens..., features] are sequences

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def bias_shape(self) -> Optional[Tuple[int, ...]]:
        return (self.out_features,) if self.bias else None


@dataclass(frozen=True)
class Conv2dSpec:
    """A 2-D convolution in PyTorch's terms; activations [batch, C_in, H, W]."""

    in_channels: int
    out_channels: int
    input_size: Tuple[int, int]
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    bias: bool
    takes_tokens = False

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups) + tuple(self.kernel_size)

    @property
    def bias_shape(self) -> Optional[Tuple[int, ...]]:
        return (self.out_channels,) if self.bias else None

    def c_shape(self) -> _lib.Conv2dShape:
        return _lib.Conv2dShape(ctypes.sizeof(_lib.Conv2dShape), self.in_channels, self.out_channels, *self.input_size,
                                *self.kernel_size, *self.stride, *self.padding, *self.dilation, self.groups,
                                int(self.bias))


@dataclass(frozen=True)
class AffineSpec:
    """A per-feature scale and shift y = γ ∘ x̂ (+ β): the affine part of LayerNorm (bias) or
    RMSNorm (none). Its calls take the normalized inputs x̂ as activations, [batch, features] or
    [batch, tokens..., features]."""

    features: int
    bias: bool
    takes_tokens = True

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.features,)

    @property
    def bias_shape(self) -> Optional[Tuple[int, ...]]:
        return (self.features,) if self.bias else None


@dataclass(frozen=True)
class EmbeddingSpec:
    """A lookup table y_t = W[id_t], W [num_embeddings, embedding_dim] (nn.Embedding). Its calls
    take the token ids as activations, [batch] or [batch, tokens...] (integers, or float32 holding
    integers), and output gradients [batch, tokens..., embedding_dim]."""

    num_embeddings: int
    embedding_dim: int
    takes_tokens = True
    bias = False

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.num_embeddings, self.embedding_dim)

    @property
    def bias_shape(self) -> Optional[Tuple[int, ...]]:
        return None


@dataclass(frozen=True)
class ArrayShapes:
    """A layer's array shapes as the library sizes them (``tengrad_get_layer_arrays``): one
    sample's (and token's) activations and output gradients, the weight, the bias (None: none)."""

    activations: Tuple[int, ...]
    output_grads: Tuple[int, ...]
    weight: Tuple[int, ...]
    bias: Optional[Tuple[int, ...]]

    @property
    def parameters(self) -> int:
        """Numbers in one per-sample gradient row: weight + bias."""
        return int(np.prod(self.weight)) + (int(np.prod(self.bias)) if self.bias else 0)
