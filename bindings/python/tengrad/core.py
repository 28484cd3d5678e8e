"""numpy API over libtengrad: the Preconditioner class (a handle, its settings, layers, state and
calls).

Arrays go in and out as float32, C-contiguous numpy arrays in the layouts of include/tengrad.h
(linear: activations [batch, in], output_grads [batch, out], weight [out, in], bias [out]),
checked and described by ``arrays``; layer descriptions and shapes are in ``specs``, per-layer
settings in ``layer_settings``, the handle-free data-parallel helpers in ``parallel``.
"""
from __future__ import annotations

import ctypes
from typing import List, Optional

import numpy as np

from . import _lib
from ._lib import TengradError
from .arrays import check, described_batch, parameter_pair, ptr, update_arrays
from .layer_settings import _REPRESENTATIONS, LayerSettings
from .specs import AffineSpec, ArrayShapes, Conv2dSpec, EmbeddingSpec, LinearSpec, _integer, _pair




class Preconditioner(LayerSettings):
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

    def add_affine(self, features: int, bias: bool = True) -> int:
        """Register a per-feature scale and shift y = γ ∘ x̂ (+ β), γ and β [features]: the affine
        part of LayerNorm (bias) or RMSNorm (none). Its calls take the normalized inputs x̂ as
        activations. Returns its id."""
        out = ctypes.c_int32()
        features = _integer(features, "features")
        _lib.tengrad_add_affine(self._h, features, int(bool(bias)), ctypes.byref(out))
        self._layers.append(AffineSpec(features, bool(bias)))
        self._shapes.append(self._query_shapes(out.value))
        return out.value

    def add_embedding(self, num_embeddings: int, embedding_dim: int) -> int:
        """Register a lookup table y_t = W[id_t], W [num_embeddings, embedding_dim] (nn.Embedding;
        num_embeddings ≤ 2**24). Its calls take the token ids as activations ([batch] or [batch,
        tokens...], integer or float32 arrays); ids outside [0, num_embeddings) are refused. The
        one-hots are never formed. Returns its id."""
        out = ctypes.c_int32()
        vocabulary, features = _integer(num_embeddings, "num_embeddings"), _integer(embedding_dim, "embedding_dim")
        _lib.tengrad_add_embedding(self._h, vocabulary, features, ctypes.byref(out))
        self._layers.append(EmbeddingSpec(vocabulary, features))
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

    def _sync_layers(self) -> None:
        """Rebuild the Python-side layer specs from the library (after loading state)."""
        specs, shapes = [], []
        for layer in range(self.num_layers):
            shapes.append(self._query_shapes(layer))
            stats = _lib.LayerStats(size=ctypes.sizeof(_lib.LayerStats))
            _lib.tengrad_get_layer_stats(self._h, layer, ctypes.byref(stats))
            kind = stats.kind
            if kind == _lib.LAYER_LINEAR:
                i, o, b = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int32()
                _lib.tengrad_get_linear_shape(self._h, layer, ctypes.byref(i), ctypes.byref(o), ctypes.byref(b))
                specs.append(LinearSpec(i.value, o.value, bool(b.value)))
            elif kind == _lib.LAYER_AFFINE:
                specs.append(AffineSpec(shapes[-1].weight[0], shapes[-1].bias is not None))
            elif kind == _lib.LAYER_EMBEDDING:
                specs.append(EmbeddingSpec(*shapes[-1].weight))
            else:
                c = _lib.Conv2dShape(size=ctypes.sizeof(_lib.Conv2dShape))
                _lib.tengrad_get_conv2d_shape(self._h, layer, ctypes.byref(c))
                specs.append(Conv2dSpec(c.in_channels, c.out_channels, (c.in_height, c.in_width),
                                        (c.kernel_height, c.kernel_width), (c.stride_height, c.stride_width),
                                        (c.padding_height, c.padding_width), (c.dilation_height, c.dilation_width),
                                        c.groups, bool(c.has_bias)))
        self._layers, self._shapes = specs, shapes

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

    def _described(self, layer, activations, output_grads, mask, grad_scale):
        """(batch, tengrad_batch) of a batch call on a registered layer (``arrays.described_batch``)."""
        spec = self.layer_spec(layer)
        return described_batch(spec, self._shapes[int(layer)], activations, output_grads, mask, grad_scale)

    # -- preconditioning -----------------------------------------------------------------------
    def update_curvature(self, layer: int, activations: np.ndarray, output_grads: np.ndarray,
                         grad_scale: float, mask: Optional[np.ndarray] = None) -> None:
        """Take this layer's curvature snapshot from a batch (replaces the previous one).
        grad_scale: batch size for a mean-reduced loss, 1 for a sum-reduced one.

        A linear layer also takes sequences: activations [batch, T..., in] and output gradients
        [batch, T..., out] (token dimensions between batch and features), with an optional
        ``mask`` [batch, T...] (bool or uint8; 0 = padding, which contributes nothing). See
        ``set_token_mode``."""
        _, described = self._described(layer, activations, output_grads, mask, grad_scale)
        _lib.tengrad_update_curvature_v2(self._h, int(layer), ctypes.byref(described))

    def per_sample_gradients(self, layer: int, activations: np.ndarray, output_grads: np.ndarray,
                             grad_scale: float, mask: Optional[np.ndarray] = None) -> np.ndarray:
        """The batch's per-sample gradients as a [batch, d] array (d = weight + bias numbers; row i
        = grad_scale × sample i's gradient, the weight flattened as ``weight_grad`` then the bias).
        No state changes. Rows from several processes, concatenated, go to
        ``update_curvature_from_gradients`` (data-parallel training, docs/DESIGN.md §11). A linear
        layer takes sequences ([batch, T..., features], ``mask=``): one row per sequence."""
        batch, described = self._described(layer, activations, output_grads, mask, grad_scale)
        rows = np.empty((batch, self._shapes[int(layer)].parameters), dtype=np.float32)
        _lib.tengrad_per_sample_gradients_v2(self._h, int(layer), ctypes.byref(described), ptr(rows))
        return rows

    def update_curvature_from_gradients(self, layer: int, rows: np.ndarray) -> None:
        """Take this layer's curvature snapshot from per-sample gradient rows ([batch, d], already
        scaled, as ``per_sample_gradients`` returns them): the snapshot ``update_curvature`` takes
        from the batch the rows came from. The rows are kept (per-sample representation)."""
        self.layer_spec(layer)  # a known id
        if not isinstance(rows, np.ndarray) or rows.ndim != 2:
            raise TypeError("rows must be a 2-D numpy.ndarray [batch, weight + bias numbers]")
        check("rows", rows, (rows.shape[0], self._shapes[int(layer)].parameters))
        _lib.tengrad_update_curvature_from_gradients(self._h, int(layer), rows.shape[0], ptr(rows))

    def precondition(self, layer: int, weight_grad: np.ndarray, bias_grad: Optional[np.ndarray] = None,
                     out=None):
        """(F + λI)^-1 grad with F from the layer's snapshot. Returns (weight_update, bias_update);
        ``out=(w, b)`` writes into given arrays, which may be the gradients themselves."""
        shapes = self.array_shapes(layer)
        parameter_pair(shapes, weight_grad, bias_grad, ("weight_grad", "bias_grad"))
        weight, bias = update_arrays(shapes, out)
        _lib.tengrad_precondition(self._h, int(layer), ptr(weight_grad), ptr(bias_grad), ptr(weight), ptr(bias))
        return weight, bias

    def precondition_prepare(self, layer: int, weight_grad: np.ndarray, bias_grad: Optional[np.ndarray] = None) -> None:
        """``precondition`` in two phases, first: all that can fail (NaN/Inf, the solve, the float32
        bound); ⟨update, grad⟩ recorded for ``kl_clip_factor``; nothing written. Then, once every
        layer is prepared, ``precondition_finish`` writes each update times one factor (KL
        clipping's ν) — e.g. in place into the gradients: a step writes nothing until every layer
        succeeded, without a copy."""
        parameter_pair(self.array_shapes(layer), weight_grad, bias_grad, ("weight_grad", "bias_grad"))
        _lib.tengrad_precondition_prepare(self._h, int(layer), ptr(weight_grad), ptr(bias_grad))

    def precondition_finish(self, layer: int, weight_grad: np.ndarray, bias_grad: Optional[np.ndarray] = None,
                            scale: float = 1.0, out=None):
        """The second phase: ``scale`` · (F + λI)^-1 grad for the gradient ``precondition_prepare``
        read (the same arrays, unchanged; ``scale`` 1 gives ``precondition``'s bits). Returns
        (weight_update, bias_update); ``out=(w, b)`` writes into given arrays, which may be the
        gradients themselves."""
        shapes = self.array_shapes(layer)
        parameter_pair(shapes, weight_grad, bias_grad, ("weight_grad", "bias_grad"))
        weight, bias = update_arrays(shapes, out)
        _lib.tengrad_precondition_finish(self._h, int(layer), ptr(weight_grad), ptr(bias_grad), float(scale),
                                         ptr(weight), ptr(bias))
        return weight, bias

    def natural_gradient(self, layer: int, activations: np.ndarray, output_grads: np.ndarray,
                         grad_scale: float, out=None, mask: Optional[np.ndarray] = None):
        """Empirical Fisher in one call: snapshot from this batch and (F + λI)^-1 of the batch's
        mean gradient. Returns (weight_update, bias_update); ``out=(w, b)`` writes into given arrays.
        Linear layers take sequences and masks as in ``update_curvature``."""
        _, described = self._described(layer, activations, output_grads, mask, grad_scale)
        weight, bias = update_arrays(self._shapes[int(layer)], out)
        _lib.tengrad_natural_gradient_v2(self._h, int(layer), ctypes.byref(described), ptr(weight), ptr(bias))
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
