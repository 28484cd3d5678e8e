"""Per-layer settings of a Preconditioner (mixed into core.Preconditioner): Gram strategy, snapshot
representation, token mode — through the library's one keyed pair (tengrad_set_layer_param) — and
the diagonal base (tengrad_set_layer_base)."""
from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np

from . import _lib
from .arrays import parameter_pair, ptr

_STRATEGIES = {"auto": _lib.CONV_AUTO, "factored": _lib.CONV_FACTORED, "explicit": _lib.CONV_EXPLICIT}
_REPRESENTATIONS = {"auto": _lib.SNAPSHOT_AUTO, "raw": _lib.SNAPSHOT_RAW, "per-sample": _lib.SNAPSHOT_PER_SAMPLE}
_TOKEN_MODES = {"per-sequence": _lib.TOKENS_PER_SEQUENCE, "per-token": _lib.TOKENS_PER_TOKEN}
_DAMPING_MODES = {"absolute": _lib.DAMPING_ABSOLUTE, "relative": _lib.DAMPING_RELATIVE}


class LayerSettings:
    """Mixed into Preconditioner (which provides ``_h``, ``_id`` and ``array_shapes``)."""

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

    def set_damping_mode(self, layer: int, mode: str) -> None:
        """How the layer reads λ: "absolute" (default: F + λI) or "relative" (λ · tr(F)/min(m, d),
        λ times the batch block's average nonzero eigenvalue, computed at each refresh; λ itself
        when F is zero). Takes effect at the next curvature update."""
        if mode not in _DAMPING_MODES:
            raise ValueError(f"mode must be one of {sorted(_DAMPING_MODES)}, got {mode!r}")
        self._set_param(layer, _lib.LAYER_PARAM_DAMPING_MODE, _DAMPING_MODES[mode])

    def damping_mode(self, layer: int) -> str:
        return {v: k for k, v in _DAMPING_MODES.items()}[self._get_param(layer, _lib.LAYER_PARAM_DAMPING_MODE)]

    def set_base(self, layer: int, weight_base: Optional[np.ndarray], bias_base: Optional[np.ndarray] = None) -> None:
        """The layer's diagonal base E: its block becomes F + λE instead of F + λI (one positive
        number per parameter, shaped like the weight and the bias; ``None`` clears it). Takes
        effect at the next curvature update; the current snapshot keeps its own."""
        if weight_base is None:
            if bias_base is not None:
                raise ValueError("bias_base without weight_base")
            _lib.tengrad_set_layer_base(self._h, self._id(layer), None, None)
            return
        shapes = self.array_shapes(layer)
        parameter_pair(shapes, weight_base, bias_base, ("weight_base", "bias_base"))
        _lib.tengrad_set_layer_base(self._h, int(layer), ptr(weight_base), ptr(bias_base))

    def has_base(self, layer: int) -> bool:
        """Whether a diagonal base is set for the layer's next snapshot."""
        out = ctypes.c_int32()
        _lib.tengrad_get_layer_base(self._h, self._id(layer), ctypes.byref(out))
        return bool(out.value)

    # Every per-layer setting goes through the library's one keyed pair (tengrad_set_layer_param).
    def _set_param(self, layer: int, key: int, value: int) -> None:
        _lib.tengrad_set_layer_param(self._h, self._id(layer), key, value)

    def _get_param(self, layer: int, key: int) -> int:
        out = ctypes.c_int64()
        _lib.tengrad_get_layer_param(self._h, self._id(layer), key, ctypes.byref(out))
        return out.value
