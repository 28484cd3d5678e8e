"""numpy API over libtengrad: the Preconditioner class.

Arrays go in and out as float32, C-contiguous numpy arrays in the layouts of include/tengrad.h
(linear: activations [batch, in], output_grads [batch, out], weight [out, in], bias [out]).
They are checked (dtype, contiguity, shape) before the call, naming the offending argument, and
handed to the library without copies.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from . import _lib
from ._lib import TengradError


@dataclass(frozen=True)
class LinearSpec:
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def bias_shape(self) -> Optional[Tuple[int, ...]]:
        return (self.out_features,) if self.bias else None


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

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups) + tuple(self.kernel_size)

    @property
    def bias_shape(self) -> Optional[Tuple[int, ...]]:
        return (self.out_channels,) if self.bias else None

    def c_shape(self) -> _lib.Conv2dShape:
        return _lib.Conv2dShape(ctypes.sizeof(_lib.Conv2dShape), self.in_channels, self.out_channels, *self.input_size, *self.kernel_size,
                                *self.stride, *self.padding, *self.dilation, self.groups, int(self.bias))


def assign_owners(costs, ranks: int) -> List[int]:
    """Layer → owner rank for data-parallel training (``tengrad_assign_owners``: by cost,
    descending, each layer to the least-loaded rank), identical on every rank."""
    costs = [_integer(c, "cost", 0) for c in costs]
    owners = (ctypes.c_int32 * max(len(costs), 1))()
    _lib.tengrad_assign_owners((ctypes.c_int64 * max(len(costs), 1))(*costs), len(costs),
                               _integer(ranks, "ranks", 1, 2**31 - 1), owners)
    return list(owners[:len(costs)])


def kl_clip_from_sum(learning_rate: float, kl_clip: float, total: float) -> float:
    """ν = min(1, sqrt(kl_clip / (lr² · total))) for a global sum of ⟨update, grad⟩
    (``tengrad_kl_clip_from_sum``; 1 when the sum is not positive or lr is 0)."""
    out = ctypes.c_double()
    _lib.tengrad_kl_clip_from_sum(float(learning_rate), float(kl_clip), float(total), ctypes.byref(out))
    return out.value


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


_STRATEGIES = {"auto": _lib.CONV_AUTO, "factored": _lib.CONV_FACTORED, "explicit": _lib.CONV_EXPLICIT}
_REPRESENTATIONS = {"auto": _lib.SNAPSHOT_AUTO, "raw": _lib.SNAPSHOT_RAW, "per-sample": _lib.SNAPSHOT_PER_SAMPLE}
_TOKEN_MODES = {"per-sequence": _lib.TOKENS_PER_SEQUENCE, "per-token": _lib.TOKENS_PER_TOKEN}


def _ptr(array: Optional[np.ndarray]):
    return None if array is None else array.ctypes.data


def _check(name: str, array, shape: Tuple[int, ...]) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def _check_out(name: str, array, shape: Tuple[int, ...]) -> np.ndarray:
    _check(name, array, shape)
    if not array.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return array


class Preconditioner:
    """Exact block-diagonal natural-gradient preconditioner (TENGraD).

    >>> with Preconditioner(damping=0.1) as p:
    ...     layer = p.add_linear(784, 128, bias=True)
    ...     dw, db = p.natural_gradient(layer, activations, output_grads, grad_scale=batch)

    The object owns one C handle; ``close()`` releases it (idempotent; also on garbage collection
    and at interpreter exit). A Preconditioner is used by one thread at a time.
    """

    def __init__(self, damping: float = 0.1, memory_limit: int = 0, blas_threads: int = 0):
        handle = ctypes.c_void_p()
        _lib.tengrad_create(ctypes.byref(handle))
        self._handle = handle
        self._layers = []
        self._shapes: List[ArrayShapes] = []  # the library's sizes of each layer's arrays
        try:
            self.damping = damping
            self.memory_limit = memory_limit
            self.blas_threads = blas_threads
        except BaseException:
            self.close()
            raise

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            destroy = getattr(_lib, "tengrad_destroy", None)  # None during interpreter teardown
            if destroy is not None:
                destroy(handle)

    def __enter__(self) -> "Preconditioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def _h(self):
        if not self._handle:
            raise ValueError("this Preconditioner is closed")
        return self._handle

    # -- settings ------------------------------------------------------------------------------
    @property
    def damping(self) -> float:
        """λ of F + λI (finite, > 0; default 0.1). Setting it keeps the snapshots."""
        out = ctypes.c_double()
        _lib.tengrad_get_damping(self._h, ctypes.byref(out))
        return out.value

    @damping.setter
    def damping(self, value: float) -> None:
        _lib.tengrad_set_damping(self._h, float(value))

    @property
    def blas_threads(self) -> int:
        """OpenBLAS threads for this handle's calls; 0 leaves OpenBLAS's own setting (see the
        README's "Threads": one thread is faster for short calls right after PyTorch's ops)."""
        out = ctypes.c_int32()
        _lib.tengrad_get_blas_threads(self._h, ctypes.byref(out))
        return out.value

    @blas_threads.setter
    def blas_threads(self, value: int) -> None:
        _lib.tengrad_set_blas_threads(self._h, _integer(value, "blas_threads", -2**31, 2**31 - 1))

    @property
    def memory_limit(self) -> int:
        """Cap on the bytes the handle holds; 0 = no cap (default)."""
        out = ctypes.c_int64()
        _lib.tengrad_get_memory_limit(self._h, ctypes.byref(out))
        return out.value

    @memory_limit.setter
    def memory_limit(self, value: int) -> None:
        _lib.tengrad_set_memory_limit(self._h, _integer(value, "memory_limit"))

    @property
    def memory_in_use(self) -> int:
        """Bytes the handle holds now (snapshots, m×m systems, workspace)."""
        out = ctypes.c_int64()
        _lib.tengrad_get_memory_usage(self._h, ctypes.byref(out))
        return out.value

    # -- layers --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        out = ctypes.c_int32()
        _lib.tengrad_layer_count(self._h, ctypes.byref(out))
        return out.value

    def add_linear(self, in_features: int, out_features: int, bias: bool = True) -> int:
        """Register a linear layer (weight [out, in], bias [out]); returns its id."""
        out = ctypes.c_int32()
        in_features, out_features = _integer(in_features, "in_features"), _integer(out_features, "out_features")
        _lib.tengrad_add_linear(self._h, in_features, out_features, int(bool(bias)),
                                ctypes.byref(out))
        self._layers.append(LinearSpec(int(in_features), int(out_features), bool(bias)))
        self._shapes.append(self._query_shapes(out.value))
        return out.value

    def add_conv2d(self, in_channels: int, out_channels: int, kernel_size, input_size, stride=1, padding=0,
                   dilation=1, groups: int = 1, bias: bool = True) -> int:
        """Register a 2-D convolution (nn.Conv2d semantics) applied to inputs of spatial size
        ``input_size`` = (H, W); weight [C_out, C_in/groups, kh, kw]. Returns its id."""
        spec = Conv2dSpec(_integer(in_channels, "in_channels"), _integer(out_channels, "out_channels"),
                          _pair(input_size, "input_size"), _pair(kernel_size, "kernel_size"), _pair(stride, "stride"),
                          _pair(padding, "padding"), _pair(dilation, "dilation"), _integer(groups, "groups"), bool(bias))
        out = ctypes.c_int32()
        shape = spec.c_shape()
        _lib.tengrad_add_conv2d(self._h, ctypes.byref(shape), ctypes.byref(out))
        self._layers.append(spec)
        self._shapes.append(self._query_shapes(out.value))
        return out.value

    def set_conv_strategy(self, layer: int, strategy: str) -> None:
        """Force a layer's Gram strategy: "auto" (default), "factored" or "explicit" — for a
        convolution, or a linear layer called over tokens (T > 1)."""
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(_STRATEGIES)}, got {strategy!r}")
        self._set_param(layer, _lib.LAYER_PARAM_CONV_STRATEGY, _STRATEGIES[strategy])

    def set_snapshot_representation(self, layer: int, representation: str) -> None:
        """What the layer's curvature snapshots keep for ``precondition``: "auto" (default: the
        cost model picks at each refresh), "raw" (copies of the batch) or "per-sample" (the
        per-sample gradients U, making each reuse step two matrix-vector products)."""
        if representation not in _REPRESENTATIONS:
            raise ValueError(f"representation must be one of {sorted(_REPRESENTATIONS)}, got {representation!r}")
        self._set_param(layer, _lib.LAYER_PARAM_SNAPSHOT_REPRESENTATION, _REPRESENTATIONS[representation])

    def set_token_mode(self, layer: int, mode: str) -> None:
        """How a linear layer called over sequences defines its samples: "per-sequence" (default:
        the exact Fisher block of per-sequence gradients, a sequence's gradient summing its
        tokens') or "per-token" (every unmasked token a sample, as KFAC's "expand" view; the same
        as flattening the tokens into the batch). Takes effect at the next curvature update."""
        if mode not in _TOKEN_MODES:
            raise ValueError(f"mode must be one of {sorted(_TOKEN_MODES)}, got {mode!r}")
        self._set_param(layer, _lib.LAYER_PARAM_TOKEN_MODE, _TOKEN_MODES[mode])

    def token_mode(self, layer: int) -> str:
        return {v: k for k, v in _TOKEN_MODES.items()}[self._get_param(layer, _lib.LAYER_PARAM_TOKEN_MODE)]

    def conv_strategy(self, layer: int) -> str:
        """The layer's Gram-strategy setting ("auto", "factored" or "explicit")."""
        return {v: k for k, v in _STRATEGIES.items()}[self._get_param(layer, _lib.LAYER_PARAM_CONV_STRATEGY)]

    def snapshot_representation(self, layer: int) -> str:
        """The layer's representation setting ("auto", "raw" or "per-sample")."""
        code = self._get_param(layer, _lib.LAYER_PARAM_SNAPSHOT_REPRESENTATION)
        return {v: k for k, v in _REPRESENTATIONS.items()}[code]

    # Every per-layer setting goes through the library's one keyed pair (tengrad_set_layer_param).
    def _set_param(self, layer: int, key: int, value: int) -> None:
        _lib.tengrad_set_layer_param(self._h, self._id(layer), key, value)

    def _get_param(self, layer: int, key: int) -> int:
        out = ctypes.c_int64()
        _lib.tengrad_get_layer_param(self._h, self._id(layer), key, ctypes.byref(out))
        return out.value

    def _sync_layers(self) -> None:
        """Rebuild the Python-side layer specs from the library (after loading state)."""
        specs = []
        for layer in range(self.num_layers):
            i, o, b = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int32()
            try:
                _lib.tengrad_get_linear_shape(self._h, layer, ctypes.byref(i), ctypes.byref(o), ctypes.byref(b))
                specs.append(LinearSpec(i.value, o.value, bool(b.value)))
                continue
            except TengradError:
                pass
            c = _lib.Conv2dShape(size=ctypes.sizeof(_lib.Conv2dShape))
            _lib.tengrad_get_conv2d_shape(self._h, layer, ctypes.byref(c))
            specs.append(Conv2dSpec(c.in_channels, c.out_channels, (c.in_height, c.in_width),
                                    (c.kernel_height, c.kernel_width), (c.stride_height, c.stride_width),
                                    (c.padding_height, c.padding_width), (c.dilation_height, c.dilation_width),
                                    c.groups, bool(c.has_bias)))
        self._layers = specs
        self._shapes = [self._query_shapes(layer) for layer in range(len(specs))]

    # -- state ---------------------------------------------------------------------------------
    def save_state(self) -> bytes:
        """Everything a resumed run needs for bit-identical updates, as bytes (versioned,
        checksummed, portable): settings, layers, curvature snapshots."""
        size = ctypes.c_size_t()
        _lib.tengrad_save_state(self._h, None, 0, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        _lib.tengrad_save_state(self._h, buffer, size.value, ctypes.byref(size))
        return buffer.raw[:size.value]

    def load_state(self, data: bytes) -> None:
        """Restore ``save_state`` bytes. A Preconditioner without layers takes the saved layers;
        one with layers must match them. Raises TengradError(ERROR_CORRUPT) for damaged or
        mismatched state, leaving this object unchanged."""
        data = bytes(data)
        _lib.tengrad_load_state(self._h, data, len(data))
        self._sync_layers()

    def _id(self, layer) -> int:
        """A registered layer's id, checked (type and range) before it reaches ctypes."""
        self.layer_spec(layer)
        return int(layer)

    def layer_spec(self, layer: int):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < len(self._layers):
            raise TengradError(_lib.ERROR_INVALID_ARGUMENT,
                               f"unknown layer id {layer!r} ({len(self._layers)} layers registered)")
        return self._layers[int(layer)]

    def _query_shapes(self, layer: int) -> ArrayShapes:
        c = _lib.LayerArrays(size=ctypes.sizeof(_lib.LayerArrays))
        _lib.tengrad_get_layer_arrays(self._h, layer, ctypes.byref(c))
        dims = lambda d, r: tuple(int(x) for x in d[:r])  # noqa: E731
        return ArrayShapes(dims(c.activation_dims, c.activation_rank), dims(c.output_grad_dims, c.output_grad_rank),
                           dims(c.weight_dims, c.weight_rank), dims(c.bias_dims, c.bias_rank) if c.bias_rank else None)

    def array_shapes(self, layer: int) -> ArrayShapes:
        """The shapes of a layer's arrays as the library sizes them (one sample's activations and
        output gradients, e.g. a convolution's output size; the weight and bias)."""
        self.layer_spec(layer)
        return self._shapes[int(layer)]

    def _inputs(self, layer, activations, output_grads):
        spec = self.layer_spec(layer)
        if not isinstance(activations, np.ndarray) or activations.ndim < 1:
            raise TypeError("activations must be a numpy.ndarray with a leading batch dimension")
        batch = activations.shape[0]
        shapes = self._shapes[int(layer)]
        _check("activations", activations, (batch,) + shapes.activations)
        _check("output_grads", output_grads, (batch,) + shapes.output_grads)
        return spec, batch

    def _batch(self, layer, activations, output_grads, mask):
        """(spec, batch, tokens, mask) of a batch call: plain arrays ([batch, features], NCHW) are
        one token per sample; a linear layer's [batch, T..., features] arrays or a mask make it a
        sequence call. Every batch call goes through the C descriptor entry points (`tengrad_batch`)."""
        if mask is not None or (isinstance(activations, np.ndarray) and activations.ndim > 2
                                and isinstance(self.layer_spec(layer), LinearSpec)):
            return self._sequence(layer, activations, output_grads, mask)
        spec, batch = self._inputs(layer, activations, output_grads)
        return spec, batch, 1, None

    def _sequence(self, layer, activations, output_grads, mask):
        """(spec, batch, tokens, mask array or None) of a call on a linear layer whose inputs have
        token dimensions between the batch and the features: [batch, T..., in]."""
        spec = self.layer_spec(layer)
        if not isinstance(activations, np.ndarray) or activations.ndim < 2:
            raise TypeError("activations must be a numpy.ndarray [batch, tokens..., features]")
        if not isinstance(spec, LinearSpec):
            raise ValueError("token dimensions and masks apply to linear layers")
        batch, positions = activations.shape[0], activations.shape[1:-1]
        tokens = int(np.prod(positions)) if positions else 1
        _check("activations", activations, (batch,) + positions + (spec.in_features,))
        _check("output_grads", output_grads, (batch,) + positions + (spec.out_features,))
        if mask is not None:
            if not isinstance(mask, np.ndarray) or mask.shape != (batch,) + positions:
                raise ValueError(f"mask must be a numpy.ndarray of shape {(batch,) + positions}, got "
                                 f"{getattr(mask, 'shape', type(mask).__name__)}")
            if mask.dtype == np.bool_:
                mask = mask.view(np.uint8)
            elif mask.dtype != np.uint8:
                raise TypeError(f"mask must have dtype bool or uint8, got {mask.dtype}")
            mask = np.ascontiguousarray(mask)
        return spec, batch, tokens, mask

    def _outputs(self, spec, out):
        if out is None:
            weight = np.empty(spec.weight_shape, dtype=np.float32)
            bias = np.empty(spec.bias_shape, dtype=np.float32) if spec.bias else None
            return weight, bias
        weight, bias = out
        _check_out("weight_update", weight, spec.weight_shape)
        if spec.bias:
            if bias is None:
                raise ValueError("bias_update is required: the layer has a bias")
            _check_out("bias_update", bias, spec.bias_shape)
        elif bias is not None:
            raise ValueError("bias_update must be None: the layer has no bias")
        return weight, bias

    # -- preconditioning -----------------------------------------------------------------------
    def update_curvature(self, layer: int, activations: np.ndarray, output_grads: np.ndarray,
                         grad_scale: float, mask: Optional[np.ndarray] = None) -> None:
        """Take this layer's curvature snapshot from a batch (replaces the previous one).
        grad_scale: batch size for a mean-reduced loss, 1 for a sum-reduced one.

        A linear layer also takes sequences: activations [batch, T..., in] and output gradients
        [batch, T..., out] (token dimensions between batch and features), with an optional
        ``mask`` [batch, T...] (bool or uint8; 0 = padding, which contributes nothing). See
        ``set_token_mode``."""
        _, batch, tokens, mask = self._batch(layer, activations, output_grads, mask)
        described = _lib.batch(batch, tokens, _ptr(activations), _ptr(output_grads), _ptr(mask), float(grad_scale))
        _lib.tengrad_update_curvature_v2(self._h, int(layer), ctypes.byref(described))

    def per_sample_gradients(self, layer: int, activations: np.ndarray, output_grads: np.ndarray,
                             grad_scale: float, mask: Optional[np.ndarray] = None) -> np.ndarray:
        """The batch's per-sample gradients as a [batch, d] array (d = weight + bias numbers; row i
        = grad_scale × sample i's gradient, the weight flattened as ``weight_grad`` then the bias).
        No state changes. Rows from several processes, concatenated, go to
        ``update_curvature_from_gradients`` (data-parallel training, docs/DESIGN.md §11). A linear
        layer takes sequences ([batch, T..., features], ``mask=``): one row per sequence."""
        _, batch, tokens, mask = self._batch(layer, activations, output_grads, mask)
        rows = np.empty((batch, self._shapes[int(layer)].parameters), dtype=np.float32)
        described = _lib.batch(batch, tokens, _ptr(activations), _ptr(output_grads), _ptr(mask), float(grad_scale))
        _lib.tengrad_per_sample_gradients_v2(self._h, int(layer), ctypes.byref(described), _ptr(rows))
        return rows

    def update_curvature_from_gradients(self, layer: int, rows: np.ndarray) -> None:
        """Take this layer's curvature snapshot from per-sample gradient rows ([batch, d], already
        scaled, as ``per_sample_gradients`` returns them): the snapshot ``update_curvature`` takes
        from the batch the rows came from. The rows are kept (per-sample representation)."""
        self.layer_spec(layer)  # a known id
        if not isinstance(rows, np.ndarray) or rows.ndim != 2:
            raise TypeError("rows must be a 2-D numpy.ndarray [batch, weight + bias numbers]")
        _check("rows", rows, (rows.shape[0], self._shapes[int(layer)].parameters))
        _lib.tengrad_update_curvature_from_gradients(self._h, int(layer), rows.shape[0], _ptr(rows))

    def precondition(self, layer: int, weight_grad: np.ndarray, bias_grad: Optional[np.ndarray] = None,
                     out=None):
        """(F + λI)^-1 grad with F from the layer's snapshot. Returns (weight_update, bias_update);
        ``out=(w, b)`` writes into given arrays, which may be the gradients themselves."""
        spec = self.layer_spec(layer)
        _check("weight_grad", weight_grad, spec.weight_shape)
        if spec.bias:
            if bias_grad is None:
                raise ValueError("bias_grad is required: the layer has a bias")
            _check("bias_grad", bias_grad, spec.bias_shape)
        elif bias_grad is not None:
            raise ValueError("bias_grad must be None: the layer has no bias")
        weight, bias = self._outputs(spec, out)
        _lib.tengrad_precondition(self._h, int(layer), _ptr(weight_grad), _ptr(bias_grad),
                                  _ptr(weight), _ptr(bias))
        return weight, bias

    def natural_gradient(self, layer: int, activations: np.ndarray, output_grads: np.ndarray,
                         grad_scale: float, out=None, mask: Optional[np.ndarray] = None):
        """Empirical Fisher in one call: snapshot from this batch and (F + λI)^-1 of the batch's
        mean gradient. Returns (weight_update, bias_update); ``out=(w, b)`` writes into given arrays.
        Linear layers take sequences and masks as in ``update_curvature``."""
        spec, batch, tokens, mask = self._batch(layer, activations, output_grads, mask)
        weight, bias = self._outputs(spec, out)
        described = _lib.batch(batch, tokens, _ptr(activations), _ptr(output_grads), _ptr(mask), float(grad_scale))
        _lib.tengrad_natural_gradient_v2(self._h, int(layer), ctypes.byref(described), _ptr(weight), _ptr(bias))
        return weight, bias

    # -- KL clipping and diagnostics -----------------------------------------------------------
    def kl_clip_factor(self, learning_rate: float, kl_clip: float) -> float:
        """ν = min(1, sqrt(kl_clip / (lr² Σ_layers ⟨update, grad⟩))) over each layer's last update."""
        out = ctypes.c_double()
        _lib.tengrad_kl_clip_factor(self._h, float(learning_rate), float(kl_clip), ctypes.byref(out))
        return out.value

    def clear_updates(self) -> None:
        """Forget every layer's last ⟨update, grad⟩, so ``kl_clip_factor`` sums only the layers
        updated afterwards (call at the start of a step in which some layers may get no update)."""
        _lib.tengrad_clear_updates(self._h)

    def layer_stats(self, layer: int) -> dict:
        """Diagnostics of one layer as a dict (fields of tengrad_layer_stats; conv_strategy as
        "factored"/"explicit", None for linear layers)."""
        out = _lib.LayerStats(size=ctypes.sizeof(_lib.LayerStats))
        _lib.tengrad_get_layer_stats(self._h, self._id(layer), ctypes.byref(out))
        stats = {name: getattr(out, name) for name, _ in _lib.LayerStats._fields_ if name != "size"}
        stats["conv_strategy"] = {1: "factored", 2: "explicit"}.get(stats["conv_strategy"])
        return stats

    def snapshot_info(self, layer: int) -> dict:
        """The layer's snapshot and the representation cost model as a dict (fields of
        tengrad_snapshot_info; representations as "raw"/"per-sample", None without a snapshot)."""
        out = _lib.SnapshotInfo(size=ctypes.sizeof(_lib.SnapshotInfo))
        _lib.tengrad_get_snapshot_info(self._h, self._id(layer), ctypes.byref(out))
        info = {name: getattr(out, name) for name, _ in _lib.SnapshotInfo._fields_ if name != "size"}
        names = {v: k for k, v in _REPRESENTATIONS.items()}
        info["representation"] = None if out.representation == _lib.SNAPSHOT_AUTO else names[out.representation]
        info["representation_setting"] = names[out.representation_setting]
        return info
