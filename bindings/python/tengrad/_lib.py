"""ctypes declarations of every C function of include/tengrad.h, next to its C prototype.

The shared library is found through, in order: the ``TENGRAD_LIBRARY`` environment variable (a
path to libtengrad.so), the copy bundled in the installed package (``pip install
./bindings/python``), the build output of the repository this binding lives in
(``.build/release`` then ``.build/debug``), then the system's library path. A library built
on PyPI's scipy-openblas32 (the wheel's and ``make build``'s BLAS) finds it through its rpath;
where that fails (the two packages in different site directories), the copy the
``scipy_openblas32`` package reports is loaded first.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from ctypes import POINTER, c_char_p, c_double, c_float, c_int32, c_int64, c_void_p

OK = 0
ERROR_INVALID_ARGUMENT = 1
ERROR_SHAPE = 2
ERROR_NOT_FINITE = 3
ERROR_NUMERICAL = 4
ERROR_OUT_OF_MEMORY = 5
ERROR_STATE = 6
ERROR_CORRUPT = 7

LAYER_LINEAR = 1
LAYER_CONV2D = 2
LAYER_AFFINE = 3
LAYER_EMBEDDING = 4

CONV_AUTO = 0
CONV_FACTORED = 1
CONV_EXPLICIT = 2

SNAPSHOT_AUTO = 0
SNAPSHOT_RAW = 1
SNAPSHOT_PER_SAMPLE = 2
TOKENS_PER_SEQUENCE = 0
TOKENS_PER_TOKEN = 1

# The keys of tengrad_set_layer_param / tengrad_get_layer_param (values: the sets above).
LAYER_PARAM_CONV_STRATEGY = 1
LAYER_PARAM_SNAPSHOT_REPRESENTATION = 2
LAYER_PARAM_TOKEN_MODE = 3
LAYER_PARAM_DAMPING_MODE = 4
DAMPING_ABSOLUTE, DAMPING_RELATIVE = 0, 1


class Batch(ctypes.Structure):
    """typedef struct tengrad_batch { size_t size; ... } tengrad_batch; (set size to sizeof)."""

    _fields_ = [
        ("size", ctypes.c_size_t), ("batch", c_int64), ("tokens", c_int64),
        ("activations", c_void_p), ("output_grads", c_void_p), ("mask", c_void_p),
        ("grad_scale", ctypes.c_double),
    ]


def batch(batch: int, tokens: int, activations, output_grads, mask, grad_scale: float) -> Batch:
    """A filled tengrad_batch (pointers as integers or None)."""
    return Batch(ctypes.sizeof(Batch), batch, tokens, activations, output_grads, mask, grad_scale)


class Conv2dShape(ctypes.Structure):
    """typedef struct tengrad_conv2d_shape { size_t size; ... } tengrad_conv2d_shape;"""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("in_channels", c_int64), ("out_channels", c_int64),
        ("in_height", c_int64), ("in_width", c_int64),
        ("kernel_height", c_int64), ("kernel_width", c_int64),
        ("stride_height", c_int64), ("stride_width", c_int64),
        ("padding_height", c_int64), ("padding_width", c_int64),
        ("dilation_height", c_int64), ("dilation_width", c_int64),
        ("groups", c_int64),
        ("has_bias", c_int32),
    ]


class LayerArrays(ctypes.Structure):
    """typedef struct tengrad_layer_arrays { size_t size; ... } tengrad_layer_arrays;"""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("activation_rank", c_int32), ("output_grad_rank", c_int32), ("weight_rank", c_int32), ("bias_rank", c_int32),
        ("activation_dims", c_int64 * 4), ("output_grad_dims", c_int64 * 4),
        ("weight_dims", c_int64 * 4), ("bias_dims", c_int64 * 4),
    ]


class LayerStats(ctypes.Structure):
    """typedef struct tengrad_layer_stats { size_t size; ... } tengrad_layer_stats;"""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("kind", c_int32), ("conv_strategy", c_int32),
        ("batch", c_int64), ("parameters", c_int64),
        ("snapshot_bytes", c_int64), ("workspace_bytes", c_int64),
        ("damping", c_double), ("jitter", c_double), ("rcond", c_double),
        ("curvature_flops", c_double), ("curvature_seconds", c_double),
        ("update_flops", c_double), ("update_seconds", c_double),
        ("update_dot_grad", c_double),
        ("conv_factored_flops", c_double), ("conv_explicit_flops", c_double),
    ]


class SnapshotInfo(ctypes.Structure):
    """typedef struct tengrad_snapshot_info { size_t size; ... } tengrad_snapshot_info;"""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("representation", c_int32), ("representation_setting", c_int32),
        ("batch", c_int64), ("representation_bytes", c_int64), ("snapshot_bytes", c_int64),
        ("raw_bytes", c_double), ("per_sample_bytes", c_double),
        ("raw_reuse_cost", c_double), ("per_sample_reuse_cost", c_double),
    ]


class BlasInfo(ctypes.Structure):
    """typedef struct tengrad_blas_info { size_t size; ... } tengrad_blas_info;"""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("library", ctypes.c_char * 16), ("build", ctypes.c_char * 32), ("version", ctypes.c_char * 32),
        ("core", ctypes.c_char * 32), ("config", ctypes.c_char * 160),
        ("threads", c_int32), ("core_isa", c_int32), ("cpu_isa", c_int32), ("generic_fallback", c_int32),
        ("cpu_model", ctypes.c_char * 64), ("cpu_family", c_int32), ("cpu_model_number", c_int32),
    ]


ISA_NAMES = {0: "unknown", 1: "SSE", 2: "AVX", 3: "AVX2", 4: "AVX-512"}  # TENGRAD_ISA_*


class TengradError(Exception):
    """Any failure reported by libtengrad: ``status`` is the tengrad_status value, ``message`` the
    handle's explanation (tengrad_last_error) or the static text of the status."""

    def __init__(self, status: int, message: str):
        self.status = int(status)
        self.message = message
        super().__init__(f"{status_name(status)}: {message}")


_STATUS_NAMES = {
    OK: "TENGRAD_OK",
    ERROR_INVALID_ARGUMENT: "TENGRAD_ERROR_INVALID_ARGUMENT",
    ERROR_SHAPE: "TENGRAD_ERROR_SHAPE",
    ERROR_NOT_FINITE: "TENGRAD_ERROR_NOT_FINITE",
    ERROR_NUMERICAL: "TENGRAD_ERROR_NUMERICAL",
    ERROR_OUT_OF_MEMORY: "TENGRAD_ERROR_OUT_OF_MEMORY",
    ERROR_STATE: "TENGRAD_ERROR_STATE",
    ERROR_CORRUPT: "TENGRAD_ERROR_CORRUPT",
}


def status_name(status: int) -> str:
    return _STATUS_NAMES.get(int(status), f"status {int(status)}")


_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.normpath(os.path.join(_HERE, "..", "..", ".."))


def library_path() -> str:
    """Path of the libtengrad.so this binding loads (see the module docstring for the order)."""
    env = os.environ.get("TENGRAD_LIBRARY")
    if env:
        if not os.path.isfile(env):
            raise OSError(f"TENGRAD_LIBRARY={env!r} is not a file")
        return env
    candidates = [os.path.join(_HERE, "libtengrad.so")]
    candidates += [os.path.join(_REPO, ".build", config, "libtengrad.so") for config in ("release", "debug")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    found = ctypes.util.find_library("tengrad")
    if found:
        return found
    raise OSError(
        "libtengrad.so not found: build it with `swift build -c release` (or `make build`) "
        "or set TENGRAD_LIBRARY to its path")


# OpenBLAS's idle workers spin for 2^THREAD_TIMEOUT cycles after each threaded call (default 2^28,
# about 0.1 s) before they sleep: after a refresh they held a core through the host framework's
# next forward and backward (the demo's torch passes 15 % slower). 2^20 cycles (~0.4 ms) keeps
# them awake between the calls of one step. OpenBLAS reads the variable once, when it is loaded:
# it is set only while we load it (unless the user set it) and the environment is restored.
_BLAS_THREAD_TIMEOUT = "20"


@contextlib.contextmanager
def _blas_thread_timeout():
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        yield
        return
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = _BLAS_THREAD_TIMEOUT
    try:
        yield
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]


def _load(path: str) -> ctypes.CDLL:
    with _blas_thread_timeout():
        return _load_library(path)


def _load_library(path: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(path)
    except OSError as error:
        if "libscipy_openblas" not in str(error):
            raise
        try:
            import scipy_openblas32
        except ImportError:
            raise OSError(f"{path} links scipy-openblas32's BLAS: pip install scipy-openblas32") from error
        # Loaded once under its SONAME, it satisfies libtengrad's dependency whatever the rpath says.
        ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)),
                    mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(path)


lib = _load(library_path())

_handle = c_void_p
# `float *` arguments take the array's address (numpy's ``.ctypes.data``, an int): half the cost
# of ``data_as(POINTER(c_float))`` per array; core.py has checked dtype, contiguity and shape.
_f32p = c_void_p


def _check_status(status, fn, args):
    """errcheck of every status-returning function: raise TengradError unless TENGRAD_OK.
    Functions whose first argument is a handle report the handle's message."""
    if status == OK:
        return status
    message = None
    if fn.argtypes and fn.argtypes[0] is _handle and args and args[0]:
        message = lib.tengrad_last_error(args[0])
    if not message:
        message = lib.tengrad_status_string(status)
    raise TengradError(status, message.decode("utf-8", "replace"))


def _declare(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    if restype is c_int32 and name != "tengrad_version_number" and name != "tengrad_status_string":
        fn.errcheck = _check_status
    return fn


# int32_t tengrad_version_number(void);
tengrad_version_number = _declare("tengrad_version_number", c_int32)
# const char *tengrad_last_error(const tengrad_preconditioner *p);
tengrad_last_error = _declare("tengrad_last_error", c_char_p, _handle)
# const char *tengrad_status_string(tengrad_status status);
tengrad_status_string = _declare("tengrad_status_string", c_char_p, c_int32)
# tengrad_status tengrad_get_blas_info(tengrad_blas_info *info);
tengrad_get_blas_info = _declare("tengrad_get_blas_info", c_int32, POINTER(BlasInfo))
# tengrad_status tengrad_create(tengrad_preconditioner **out);
tengrad_create = _declare("tengrad_create", c_int32, POINTER(c_void_p))
# void tengrad_destroy(tengrad_preconditioner *p);
tengrad_destroy = _declare("tengrad_destroy", None, _handle)
# tengrad_status tengrad_set_damping(tengrad_preconditioner *p, double damping);
tengrad_set_damping = _declare("tengrad_set_damping", c_int32, _handle, c_double)
# tengrad_status tengrad_get_damping(const tengrad_preconditioner *p, double *out);
tengrad_get_damping = _declare("tengrad_get_damping", c_int32, _handle, POINTER(c_double))
# tengrad_status tengrad_set_memory_limit(tengrad_preconditioner *p, int64_t bytes);
tengrad_set_memory_limit = _declare("tengrad_set_memory_limit", c_int32, _handle, c_int64)
# tengrad_status tengrad_get_memory_limit(const tengrad_preconditioner *p, int64_t *out);
tengrad_get_memory_limit = _declare("tengrad_get_memory_limit", c_int32, _handle, POINTER(c_int64))
# tengrad_status tengrad_get_memory_usage(const tengrad_preconditioner *p, int64_t *out);
tengrad_get_memory_usage = _declare("tengrad_get_memory_usage", c_int32, _handle, POINTER(c_int64))
# tengrad_status tengrad_set_blas_threads(tengrad_preconditioner *p, int32_t threads);
tengrad_set_blas_threads = _declare("tengrad_set_blas_threads", c_int32, _handle, c_int32)
# tengrad_status tengrad_get_blas_threads(const tengrad_preconditioner *p, int32_t *out);
tengrad_get_blas_threads = _declare("tengrad_get_blas_threads", c_int32, _handle, POINTER(c_int32))
# tengrad_status tengrad_add_linear(p, int64_t in_features, int64_t out_features,
#                                   int32_t has_bias, int32_t *out_layer);
tengrad_add_linear = _declare(
    "tengrad_add_linear", c_int32, _handle, c_int64, c_int64, c_int32, POINTER(c_int32))
# tengrad_status tengrad_add_affine(p, int64_t features, int32_t has_bias, int32_t *out_layer);
tengrad_add_affine = _declare("tengrad_add_affine", c_int32, _handle, c_int64, c_int32, POINTER(c_int32))
# tengrad_status tengrad_add_embedding(p, int64_t vocabulary, int64_t features, int32_t *out_layer);
tengrad_add_embedding = _declare("tengrad_add_embedding", c_int32, _handle, c_int64, c_int64, POINTER(c_int32))
# tengrad_status tengrad_add_conv2d(p, const tengrad_conv2d_shape *shape, int32_t *out_layer);
tengrad_add_conv2d = _declare(
    "tengrad_add_conv2d", c_int32, _handle, POINTER(Conv2dShape), POINTER(c_int32))
# tengrad_status tengrad_get_linear_shape(p, int32_t layer, int64_t *in_features, int64_t *out_features,
#                                         int32_t *has_bias);
tengrad_get_linear_shape = _declare(
    "tengrad_get_linear_shape", c_int32, _handle, c_int32, POINTER(c_int64), POINTER(c_int64), POINTER(c_int32))
# tengrad_status tengrad_get_conv2d_shape(p, int32_t layer, tengrad_conv2d_shape *out);
tengrad_get_conv2d_shape = _declare("tengrad_get_conv2d_shape", c_int32, _handle, c_int32, POINTER(Conv2dShape))
# tengrad_status tengrad_save_state(const tengrad_preconditioner *p, void *buffer, size_t capacity,
#                                   size_t *size);
tengrad_save_state = _declare("tengrad_save_state", c_int32, _handle, c_void_p, ctypes.c_size_t,
                              POINTER(ctypes.c_size_t))
# tengrad_status tengrad_load_state(tengrad_preconditioner *p, const void *buffer, size_t size);
tengrad_load_state = _declare("tengrad_load_state", c_int32, _handle, c_char_p, ctypes.c_size_t)
# tengrad_status tengrad_get_layer_arrays(const tengrad_preconditioner *p, int32_t layer, tengrad_layer_arrays *out);
tengrad_get_layer_arrays = _declare("tengrad_get_layer_arrays", c_int32, _handle, c_int32, POINTER(LayerArrays))
# tengrad_status tengrad_layer_count(const tengrad_preconditioner *p, int32_t *out);
tengrad_layer_count = _declare("tengrad_layer_count", c_int32, _handle, POINTER(c_int32))
# tengrad_status tengrad_update_curvature(p, int32_t layer, int64_t batch, const float *activations,
#                                         const float *output_grads, float grad_scale);
tengrad_update_curvature = _declare(
    "tengrad_update_curvature", c_int32, _handle, c_int32, c_int64, _f32p, _f32p, c_float)
# tengrad_status tengrad_update_curvature_v2(p, int32_t layer, const tengrad_batch *batch);
tengrad_update_curvature_v2 = _declare("tengrad_update_curvature_v2", c_int32, _handle, c_int32, POINTER(Batch))
# tengrad_status tengrad_natural_gradient_v2(p, int32_t layer, const tengrad_batch *batch,
#                                            float *weight_update, float *bias_update);
tengrad_natural_gradient_v2 = _declare(
    "tengrad_natural_gradient_v2", c_int32, _handle, c_int32, POINTER(Batch), _f32p, _f32p)
# tengrad_status tengrad_per_sample_gradients_v2(p, int32_t layer, const tengrad_batch *batch, float *out_rows);
tengrad_per_sample_gradients_v2 = _declare(
    "tengrad_per_sample_gradients_v2", c_int32, _handle, c_int32, POINTER(Batch), _f32p)
# tengrad_status tengrad_set_layer_param(p, int32_t layer, int32_t param, int64_t value);
tengrad_set_layer_param = _declare("tengrad_set_layer_param", c_int32, _handle, c_int32, c_int32, c_int64)
# tengrad_status tengrad_get_layer_param(const tengrad_preconditioner *p, int32_t layer, int32_t param,
#                                        int64_t *out_value);
tengrad_get_layer_param = _declare("tengrad_get_layer_param", c_int32, _handle, c_int32, c_int32, POINTER(c_int64))
# tengrad_status tengrad_update_curvature_from_gradients(p, int32_t layer, int64_t batch,
#                                                        const float *per_sample_gradients);
tengrad_update_curvature_from_gradients = _declare(
    "tengrad_update_curvature_from_gradients", c_int32, _handle, c_int32, c_int64, _f32p)
# tengrad_status tengrad_set_layer_base(p, int32_t layer, const float *weight_base, const float *bias_base);
tengrad_set_layer_base = _declare("tengrad_set_layer_base", c_int32, _handle, c_int32, _f32p, _f32p)
# tengrad_status tengrad_get_layer_base(const tengrad_preconditioner *p, int32_t layer, int32_t *out_has_base);
tengrad_get_layer_base = _declare("tengrad_get_layer_base", c_int32, _handle, c_int32, POINTER(c_int32))
# tengrad_status tengrad_precondition(p, int32_t layer, const float *weight_grad,
#                                     const float *bias_grad, float *weight_update, float *bias_update);
tengrad_precondition = _declare(
    "tengrad_precondition", c_int32, _handle, c_int32, _f32p, _f32p, _f32p, _f32p)
# tengrad_status tengrad_precondition_prepare(p, int32_t layer, const float *weight_grad,
#                                             const float *bias_grad);
tengrad_precondition_prepare = _declare(
    "tengrad_precondition_prepare", c_int32, _handle, c_int32, _f32p, _f32p)
# tengrad_status tengrad_precondition_finish(p, int32_t layer, const float *weight_grad,
#                                            const float *bias_grad, double scale,
#                                            float *weight_update, float *bias_update);
tengrad_precondition_finish = _declare(
    "tengrad_precondition_finish", c_int32, _handle, c_int32, _f32p, _f32p, c_double, _f32p, _f32p)
# tengrad_status tengrad_kl_clip_factor(const tengrad_preconditioner *p, double learning_rate,
#                                       double kl_clip, double *out_nu);
tengrad_kl_clip_factor = _declare(
    "tengrad_kl_clip_factor", c_int32, _handle, c_double, c_double, POINTER(c_double))
# tengrad_status tengrad_assign_owners(const int64_t *costs, int32_t layers, int32_t ranks, int32_t *out_owners);
tengrad_assign_owners = _declare("tengrad_assign_owners", c_int32, POINTER(c_int64), c_int32, c_int32, POINTER(c_int32))
# tengrad_status tengrad_kl_clip_from_sum(double learning_rate, double kl_clip, double sum, double *out_nu);
tengrad_kl_clip_from_sum = _declare("tengrad_kl_clip_from_sum", c_int32, c_double, c_double, c_double, POINTER(c_double))
# tengrad_status tengrad_clear_updates(tengrad_preconditioner *p);
tengrad_clear_updates = _declare("tengrad_clear_updates", c_int32, _handle)
# tengrad_status tengrad_get_layer_stats(const tengrad_preconditioner *p, int32_t layer,
#                                        tengrad_layer_stats *out);
tengrad_get_layer_stats = _declare(
    "tengrad_get_layer_stats", c_int32, _handle, c_int32, POINTER(LayerStats))
# tengrad_status tengrad_get_snapshot_info(const tengrad_preconditioner *p, int32_t layer,
#                                          tengrad_snapshot_info *info);
tengrad_get_snapshot_info = _declare(
    "tengrad_get_snapshot_info", c_int32, _handle, c_int32, POINTER(SnapshotInfo))
