"""The numpy arrays of a call: checked (dtype, contiguity, and shape against the library's sizes,
``ArrayShapes``) before they reach ctypes, naming the offending argument, and handed over without
copies — a batch as one ``tengrad_batch`` descriptor."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import _lib
from .specs import ArrayShapes, EmbeddingSpec


def ptr(array: Optional[np.ndarray]):
    return None if array is None else array.ctypes.data


def check(name: str, array, shape: Tuple[int, ...]) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def check_out(name: str, array, shape: Tuple[int, ...]) -> np.ndarray:
    check(name, array, shape)
    if not array.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return array


def token_ids(activations):
    """An embedding's ids as the library takes them: float32 (exact for every id it accepts; an
    integer id too large for float32 rounds to one it still refuses)."""
    if isinstance(activations, np.ndarray) and (np.issubdtype(activations.dtype, np.integer)
                                                or activations.dtype == np.bool_):
        return np.ascontiguousarray(activations, dtype=np.float32)
    return activations


def described_batch(spec, shapes: ArrayShapes, activations, output_grads, mask, grad_scale) -> Tuple[int, _lib.Batch]:
    """(batch, tengrad_batch) of a batch call: plain arrays ([batch, features], NCHW) are one token
    per sample; [batch, T..., features] arrays of a layer over tokens (linear, affine; an
    embedding's ids [batch, T...]) or a mask make it a sequence call.
    The descriptor points into the arrays (and a mask made contiguous uint8, ids made float32),
    which the caller keeps alive through the call."""
    if isinstance(spec, EmbeddingSpec):
        activations = token_ids(activations)
    rank = len(shapes.activations)
    sequence = mask is not None or (isinstance(activations, np.ndarray) and activations.ndim > rank + 1
                                    and spec.takes_tokens)
    if not sequence:
        if not isinstance(activations, np.ndarray) or activations.ndim < 1:
            raise TypeError("activations must be a numpy.ndarray with a leading batch dimension")
        batch = activations.shape[0]
        check("activations", activations, (batch,) + shapes.activations)
        check("output_grads", output_grads, (batch,) + shapes.output_grads)
        described = _lib.batch(batch, 1, ptr(activations), ptr(output_grads), None, float(grad_scale))
        described._activations = activations
        return batch, described
    if not isinstance(activations, np.ndarray) or activations.ndim < rank + 1:
        raise TypeError("activations must be a numpy.ndarray [batch, tokens..., features]")
    if not spec.takes_tokens:
        raise ValueError("token dimensions and masks apply to linear, affine and embedding layers")
    batch, positions = activations.shape[0], activations.shape[1:activations.ndim - rank]
    tokens = int(np.prod(positions)) if positions else 1
    check("activations", activations, (batch,) + positions + shapes.activations)
    check("output_grads", output_grads, (batch,) + positions + shapes.output_grads)
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.shape != (batch,) + positions:
            raise ValueError(f"mask must be a numpy.ndarray of shape {(batch,) + positions}, got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        if mask.dtype == np.bool_:
            mask = mask.view(np.uint8)
        elif mask.dtype != np.uint8:
            raise TypeError(f"mask must have dtype bool or uint8, got {mask.dtype}")
        mask = np.ascontiguousarray(mask)
    described = _lib.batch(batch, tokens, ptr(activations), ptr(output_grads), ptr(mask), float(grad_scale))
    described._mask = mask  # copies made here live as long as the descriptor
    described._activations = activations
    return batch, described


def parameter_pair(shapes: ArrayShapes, weight, bias, names: Tuple[str, str], checker=check):
    """A (weight, bias) pair of a layer, checked: the bias present exactly when the layer has one."""
    checker(names[0], weight, shapes.weight)
    if shapes.bias is not None:
        if bias is None:
            raise ValueError(f"{names[1]} is required: the layer has a bias")
        checker(names[1], bias, shapes.bias)
    elif bias is not None:
        raise ValueError(f"{names[1]} must be None: the layer has no bias")
    return weight, bias


def aligned_empty(shape: Tuple[int, ...], alignment: int = 64) -> np.ndarray:
    """An uninitialized float32 array whose data starts on an ``alignment``-byte boundary (numpy's
    start anywhere 16 bytes apart; a row of an output that starts on a cache line is written in
    whole lines)."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count + alignment // 4, dtype=np.float32)
    start = (-raw.ctypes.data % alignment) // 4
    return raw[start:start + count].reshape(shape)


def update_arrays(shapes: ArrayShapes, out):
    """The (weight, bias) update arrays: new ones, or the caller's ``out`` checked writeable."""
    if out is None:
        return (np.empty(shapes.weight, dtype=np.float32),
                np.empty(shapes.bias, dtype=np.float32) if shapes.bias is not None else None)
    weight, bias = out
    return parameter_pair(shapes, weight, bias, ("weight_update", "bias_update"), check_out)
