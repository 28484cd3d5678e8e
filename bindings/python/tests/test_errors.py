"""Bad input through the binding: each status is raised as TengradError with the handle's message,
or caught in Python before the call (naming the argument); a rejected call changes nothing."""
import ctypes

import numpy as np
import pytest

import tengrad
from tengrad import _lib


@pytest.fixture
def ready():
    """A preconditioner with one linear layer (5 -> 3, bias) holding a snapshot, and the update
    it gives for a fixed gradient, to check that rejected calls leave the state intact."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((6, 5)).astype(np.float32)
    g = rng.standard_normal((6, 3)).astype(np.float32)
    v = (rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
    p = tengrad.Preconditioner(damping=0.1)
    layer = p.add_linear(5, 3, bias=True)
    p.update_curvature(layer, a, g, 1.0)
    before = p.precondition(layer, *v)
    yield p, layer, a, g, v, before
    p.close()


def assert_unchanged(p, layer, v, before):
    after = p.precondition(layer, *v)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["activations", "output_grads"])
def test_non_finite_inputs_are_rejected_and_change_nothing(ready, bad, where):
    p, layer, a, g, v, before = ready
    a2, g2 = a.copy() * 3, g.copy()
    (a2 if where == "activations" else g2)[2, 1] = bad
    with pytest.raises(tengrad.TengradError) as e:
        p.update_curvature(layer, a2, g2, 1.0)
    assert e.value.status == tengrad.ERROR_NOT_FINITE and where in e.value.message
    w = np.full((3, 5), 7, np.float32)
    b = np.full(3, 7, np.float32)
    with pytest.raises(tengrad.TengradError):
        p.natural_gradient(layer, a2, g2, 1.0, out=(w, b))
    assert (w == 7).all() and (b == 7).all()  # outputs are written only on success
    assert_unchanged(p, layer, v, before)


def test_non_finite_gradient_is_rejected(ready):
    p, layer, a, g, v, before = ready
    w = v[0].copy()
    w[0, 0] = np.nan
    with pytest.raises(tengrad.TengradError) as e:
        p.precondition(layer, w, v[1])
    assert e.value.status == tengrad.ERROR_NOT_FINITE and "weight_grad" in e.value.message
    assert_unchanged(p, layer, v, before)


def test_precondition_before_curvature_is_a_state_error():
    with tengrad.Preconditioner() as p:
        layer = p.add_linear(4, 2, bias=False)
        with pytest.raises(tengrad.TengradError) as e:
            p.precondition(layer, np.zeros((2, 4), np.float32))
        assert e.value.status == tengrad.ERROR_STATE


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_damping_is_rejected(ready, value):
    p, layer, a, g, v, before = ready
    with pytest.raises(tengrad.TengradError) as e:
        p.damping = value
    assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT and "damping" in e.value.message
    assert p.damping == 0.1
    assert_unchanged(p, layer, v, before)


@pytest.mark.parametrize("scale", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_grad_scale_is_rejected(ready, scale):
    p, layer, a, g, v, before = ready
    with pytest.raises(tengrad.TengradError) as e:
        p.update_curvature(layer, a * 2, g, scale)
    assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT and "grad_scale" in e.value.message
    assert_unchanged(p, layer, v, before)


def test_bad_layer_definitions():
    with tengrad.Preconditioner() as p:
        for args, status in [((0, 3), tengrad.ERROR_INVALID_ARGUMENT),
                             ((3, -1), tengrad.ERROR_INVALID_ARGUMENT),
                             ((2**40, 2**40), tengrad.ERROR_SHAPE),   # in·out overflows
                             ((2**33, 1), tengrad.ERROR_SHAPE)]:     # beyond 32-bit BLAS
            with pytest.raises(tengrad.TengradError) as e:
                p.add_linear(*args)
            assert e.value.status == status
        assert p.num_layers == 0


def test_unknown_layer_id_and_overflowing_batch_through_the_c_functions(ready):
    p, layer, a, g, v, before = ready
    f = ctypes.POINTER(ctypes.c_float)
    ptr = a.ctypes.data_as(f)
    with pytest.raises(tengrad.TengradError) as e:
        _lib.tengrad_update_curvature(p._h, 7, 6, ptr, ptr, 1.0)
    assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT and "layer" in e.value.message
    with pytest.raises(tengrad.TengradError) as e:
        _lib.tengrad_update_curvature(p._h, layer, 2**62, ptr, ptr, 1.0)
    assert e.value.status == tengrad.ERROR_SHAPE
    with pytest.raises(tengrad.TengradError) as e:
        _lib.tengrad_update_curvature(p._h, layer, 0, ptr, ptr, 1.0)
    assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT
    with pytest.raises(tengrad.TengradError) as e:
        _lib.tengrad_update_curvature(p._h, layer, 6, None, ptr, 1.0)
    assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT and "activations" in e.value.message
    with pytest.raises(tengrad.TengradError) as e:  # bias pointers must match the layer
        _lib.tengrad_precondition(p._h, layer, ptr, None, ptr, None)
    assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT and "bias" in e.value.message
    assert_unchanged(p, layer, v, before)


def test_overflow_inside_is_numerical_and_changes_nothing(ready):
    p, layer, a, g, v, before = ready
    with pytest.raises(tengrad.TengradError) as e:
        p.update_curvature(layer, a * np.float32(1e30), g, 1.0)
    assert e.value.status == tengrad.ERROR_NUMERICAL
    assert_unchanged(p, layer, v, before)


def test_memory_limit(ready):
    p, layer, a, g, v, before = ready
    p.memory_limit = 1
    with pytest.raises(tengrad.TengradError) as e:
        p.update_curvature(layer, np.ones((50, 5), np.float32), np.ones((50, 3), np.float32), 1.0)
    assert e.value.status == tengrad.ERROR_OUT_OF_MEMORY and "bytes" in e.value.message
    p.memory_limit = 0
    assert_unchanged(p, layer, v, before)


def test_python_side_checks_name_the_argument(ready):
    p, layer, a, g, v, before = ready
    with pytest.raises(TypeError, match="activations"):
        p.update_curvature(layer, a.astype(np.float64), g, 1.0)
    with pytest.raises(ValueError, match="output_grads"):
        p.update_curvature(layer, a, g[:, :2].copy(), 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        p.precondition(layer, np.asfortranarray(v[0]), v[1])
    with pytest.raises(ValueError, match="bias_grad"):
        p.precondition(layer, v[0], None)
    with pytest.raises(tengrad.TengradError) as e:
        p.precondition(9, *v)
    assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT
    assert_unchanged(p, layer, v, before)


def test_close_is_idempotent_and_closed_handles_refuse_calls():
    p = tengrad.Preconditioner()
    p.close()
    p.close()
    with pytest.raises(ValueError, match="closed"):
        p.add_linear(2, 2)


def test_status_strings_and_version():
    for status in range(8):
        assert _lib.tengrad_status_string(status)
    assert _lib.tengrad_status_string(99) == b"unknown status"
    assert tengrad.version().count(".") == 2


def test_versions_agree():
    """The header's macros (the one place), the loaded library and the Python package's build-time
    version source agree (the installed package's metadata, SONAME, pkg-config and CMake files are
    checked by make test-wheel and test-install)."""
    import os
    import re
    import sys
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
    header = open(os.path.join(root, "include", "tengrad.h")).read()
    parts = [re.search(rf"#define TENGRAD_VERSION_{k} (\d+)", header).group(1) for k in ("MAJOR", "MINOR", "PATCH")]
    sys.path.insert(0, os.path.join(root, "bindings", "python"))
    try:
        import version_from_header
    finally:
        sys.path.pop(0)
    assert tengrad.version() == ".".join(parts) == version_from_header.__version__ == tengrad.__version__


def test_blas_threads_setting():
    with tengrad.Preconditioner(blas_threads=1) as p:
        assert p.blas_threads == 1
        p.blas_threads = 0
        assert p.blas_threads == 0
        for bad in (-1, 1025):
            with pytest.raises(tengrad.TengradError) as e:
                p.blas_threads = bad
            assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT and "threads" in e.value.message
        assert p.blas_threads == 0
        # Calls with a thread count give the same update as without (one thread here).
        rng = np.random.default_rng(3)
        layer = p.add_conv2d(2, 3, 3, (8, 8), padding=1)
        x = rng.standard_normal((6, 2, 8, 8), dtype=np.float32)
        g = rng.standard_normal((6, 3, 8, 8), dtype=np.float32)
        w0, b0 = p.natural_gradient(layer, x, g, 6.0)
        p.blas_threads = 1
        w1, b1 = p.natural_gradient(layer, x, g, 6.0)
        np.testing.assert_allclose(w1, w0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b1, b0, rtol=1e-5, atol=1e-6)


def test_handles_with_their_own_blas_threads_in_two_threads_leave_the_count_as_found():
    """OpenBLAS's thread count is process-wide: two handles with counts 1 and found + 1, called
    from two Python threads at once (ctypes releases the GIL), may see each other's count while
    their calls overlap, but must not leave it changed (each call used to restore the count it
    found, so the later of two overlapping calls could restore the other's)."""
    import threading
    found = tengrad.blas_info()["threads"]
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 16), dtype=np.float32)
    g = rng.standard_normal((6, 8), dtype=np.float32)
    v = rng.standard_normal((8, 16), dtype=np.float32)
    errors = []

    def run(count):
        try:
            with tengrad.Preconditioner(damping=0.1, blas_threads=count) as p:
                layer = p.add_linear(16, 8, bias=False)
                for _ in range(3000):
                    p.update_curvature(layer, a, g, 6.0)
                    p.precondition(layer, v)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(count,)) for count in (1, found + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert tengrad.blas_info()["threads"] == found


def test_python_integers_are_checked_before_ctypes_cuts_them():
    with tengrad.Preconditioner() as p:
        p.add_linear(3, 2)
        with pytest.raises(tengrad.TengradError, match="unknown layer id"):
            p.layer_stats(2**32)                       # used to return layer 0
        with pytest.raises(tengrad.TengradError, match="unknown layer id"):
            p.snapshot_info(True)
        with pytest.raises(ValueError, match="memory_limit"):
            p.memory_limit = 2**64 + 5                 # used to set 5 bytes
        assert p.memory_limit == 0
        with pytest.raises(TypeError, match="in_features"):
            p.add_linear(2.7, 3)                       # used to register in_features 2
        with pytest.raises(TypeError, match="kernel_size"):
            p.add_conv2d(1, 1, 2.5, (4, 4))
        with pytest.raises(ValueError, match="blas_threads"):
            p.blas_threads = 2**40
        assert p.num_layers == 1
        p.add_linear(np.int64(3), np.int32(2))         # numpy integers are integers


def test_overlapping_update_buffers_are_refused_and_change_nothing():
    """Outputs that overlap each other, or the gradients without being them, used to return OK with
    garbage (issue 18): refused; the exact in-place call still works."""
    p = tengrad.Preconditioner(damping=0.1)
    layer = p.add_linear(4, 3, bias=True)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 4), dtype=np.float32)
    g = rng.standard_normal((5, 3), dtype=np.float32)
    p.update_curvature(layer, a, g, 5.0)
    v = rng.standard_normal((3, 4), dtype=np.float32)
    vb = rng.standard_normal(3, dtype=np.float32)
    want = p.precondition(layer, v, vb)
    buf = np.zeros(20, np.float32)
    joint = np.zeros(15, np.float32)
    joint[12:] = vb
    cases = [
        lambda: p.precondition(layer, v, vb, out=(buf[:12].reshape(3, 4), buf[10:13])),       # bias inside weight
        lambda: p.natural_gradient(layer, a, g, 5.0, out=(buf[:12].reshape(3, 4), buf[0:3])),  # both at one start
        lambda: p.precondition(layer, v, vb, out=(np.zeros((3, 4), np.float32), v.reshape(-1)[1:4])),  # over v
        lambda: p.precondition(layer, v, joint[12:], out=(joint[3:15].reshape(3, 4), np.zeros(3, np.float32))),
    ]
    before = (v.copy(), vb.copy(), p.save_state())
    for call in cases:
        with pytest.raises(tengrad.TengradError, match="overlaps"):
            call()
        assert np.array_equal(v, before[0]) and np.array_equal(vb, before[1]) and p.save_state() == before[2]
    shifted = np.zeros(13, np.float32)
    shifted[1:13] = v.reshape(-1)
    with pytest.raises(tengrad.TengradError, match="overlaps weight_grad"):
        p.precondition(layer, shifted[1:13].reshape(3, 4), vb, out=(shifted[0:12].reshape(3, 4), np.zeros(3, np.float32)))
    w2, b2 = v.copy(), vb.copy()
    p.precondition(layer, w2, b2, out=(w2, b2))                                                 # in place: fine
    np.testing.assert_array_equal(w2, want[0])
    np.testing.assert_array_equal(b2, want[1])


def test_extensible_structs_take_any_size_from_theirs_up_to_size_max():
    """A caller whose struct is a later, longer version (size up to SIZE_MAX) gets the fields of
    ours; it was refused at SIZE_MAX (read as a negative size)."""
    p = tengrad.Preconditioner(damping=0.1)
    layer = p.add_linear(3, 2)
    p.update_curvature(layer, np.ones((4, 3), np.float32), np.ones((4, 2), np.float32), 4.0)
    for size in (None, 2 ** 63 - 1, 2 ** 64 - 1):
        info = _lib.SnapshotInfo()
        info.size = size or ctypes.sizeof(_lib.SnapshotInfo)
        assert _lib.lib.tengrad_get_snapshot_info(p._h, layer, ctypes.byref(info)) == _lib.OK
        assert info.size == ctypes.sizeof(_lib.SnapshotInfo) and info.batch == 4
        blas = _lib.BlasInfo()
        blas.size = size or ctypes.sizeof(_lib.BlasInfo)
        assert _lib.lib.tengrad_get_blas_info(ctypes.byref(blas)) == _lib.OK
        assert blas.size == ctypes.sizeof(_lib.BlasInfo) and blas.threads >= 1


def test_layer_settings_through_the_keyed_pair():
    """Every per-layer setting goes through tengrad_set_layer_param / _get_layer_param: the
    setters and getters round-trip, and bad values and keys are refused with nothing changed."""
    with tengrad.Preconditioner() as p:
        lin = p.add_linear(4, 3)
        conv = p.add_conv2d(1, 2, 2, (3, 3))
        assert (p.conv_strategy(conv), p.snapshot_representation(conv), p.token_mode(lin)) == \
            ("auto", "auto", "per-sequence")
        p.set_conv_strategy(conv, "factored")
        p.set_snapshot_representation(conv, "raw")
        p.set_token_mode(lin, "per-token")
        assert (p.conv_strategy(conv), p.snapshot_representation(conv), p.token_mode(lin)) == \
            ("factored", "raw", "per-token")
        before = p.save_state()
        with pytest.raises(_lib.TengradError, match="token modes apply to layers over sequences"):
            p.set_token_mode(conv, "per-token")
        for key, value in ((0, 1), (5, 1), (_lib.LAYER_PARAM_DAMPING_MODE, 2), (_lib.LAYER_PARAM_CONV_STRATEGY, 3),
                           (_lib.LAYER_PARAM_CONV_STRATEGY, 1 << 33), (_lib.LAYER_PARAM_SNAPSHOT_REPRESENTATION, -1)):
            with pytest.raises(_lib.TengradError):
                _lib.tengrad_set_layer_param(p._h, conv, key, value)
        out = ctypes.c_int64(-5)
        with pytest.raises(_lib.TengradError, match="unknown layer parameter"):
            _lib.tengrad_get_layer_param(p._h, conv, 9, ctypes.byref(out))
        assert p.save_state() == before


def test_batch_descriptor_size_rule():
    """tengrad_batch: a size below this version's struct, an uninitialized size, and a newer
    struct with an unknown field set are refused with nothing changed; the binding's own
    descriptor calls give the same snapshot as the plain call."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 4), dtype=np.float32)
    g = rng.standard_normal((5, 3), dtype=np.float32)
    ptr_a, ptr_g = a.ctypes.data, g.ctypes.data
    with tengrad.Preconditioner() as p, tengrad.Preconditioner() as q:
        lp, lq = p.add_linear(4, 3), q.add_linear(4, 3)
        p.update_curvature(lp, a, g, 5.0)
        _lib.tengrad_update_curvature(q._h, lq, 5, ptr_a, ptr_g, 5.0)
        assert p.save_state() == q.save_state()
        before = p.save_state()
        for size in (ctypes.sizeof(_lib.Batch) - 8, 0, 1 << 40):
            described = _lib.batch(5, 1, ptr_a, ptr_g, None, 5.0)
            described.size = size
            with pytest.raises(_lib.TengradError):
                _lib.tengrad_update_curvature_v2(p._h, lp, ctypes.byref(described))

        class Newer(ctypes.Structure):
            _fields_ = [("known", _lib.Batch), ("newer_field", ctypes.c_int64)]
        newer = Newer(_lib.batch(5, 1, ptr_a, ptr_g, None, 5.0), 1)
        newer.known.size = ctypes.sizeof(Newer)
        with pytest.raises(_lib.TengradError, match="does not know"):
            _lib.tengrad_update_curvature_v2(p._h, lp, ctypes.byref(newer.known))
        assert p.save_state() == before
        newer.newer_field = 0
        _lib.tengrad_update_curvature_v2(p._h, lp, ctypes.byref(newer.known))
        assert p.save_state() == before
