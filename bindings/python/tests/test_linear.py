"""Linear layers through the numpy binding, against the dense float64 oracle.

Tolerance: relative error ≤ 1e-3 in the 2-norm, the contract's bound for float32 inputs with
λ ≥ 0.01 on unit-scale data. The library computes the Grams and GEMMs in float32 (rounding
≈ 6e-8 · √k per entry) and the m×m system in float64; observed errors are ~1e-6.
"""
import numpy as np
import pytest

import tengrad
from oracle import damped_solve, join, linear_per_sample, relative_error

TOL = 1e-3

# (batch m, in, out): m < d, m > d, batch 1, square.
SHAPES = [(4, 6, 5), (40, 5, 3), (1, 7, 4), (16, 16, 16), (3, 1, 1)]


def make_batch(rng, m, n_in, n_out):
    a = rng.standard_normal((m, n_in)).astype(np.float32)
    g = rng.standard_normal((m, n_out)).astype(np.float32)  # per-sample output gradients
    return a, g


@pytest.mark.parametrize("m,n_in,n_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damping", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_natural_gradient_matches_oracle(m, n_in, n_out, bias, damping, reduction):
    rng = np.random.default_rng(1000 * m + 10 * n_in + n_out)
    a, g = make_batch(rng, m, n_in, n_out)
    # A mean-reduced loss hands out g_i / m; the caller passes grad_scale = m.
    given, scale = (g, 1.0) if reduction == "sum" else ((g / m).astype(np.float32), float(m))
    U = linear_per_sample(a, given.astype(np.float64) * scale, bias)
    want = damped_solve(U, damping, U.mean(axis=1))
    with tengrad.Preconditioner(damping=damping) as p:
        layer = p.add_linear(n_in, n_out, bias=bias)
        w, b = p.natural_gradient(layer, a, given, scale)
        assert (b is None) == (not bias)
        assert relative_error(join(w, b), want) <= TOL


@pytest.mark.parametrize("m,n_in,n_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damping", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_precondition_matches_oracle(m, n_in, n_out, bias, damping, scale):
    rng = np.random.default_rng(7 + m + n_in * n_out)
    a, g = make_batch(rng, m, n_in, n_out)
    U = linear_per_sample(a, g.astype(np.float64) * scale, bias)
    vw = rng.standard_normal((n_out, n_in)).astype(np.float32)
    vb = rng.standard_normal(n_out).astype(np.float32) if bias else None
    want = damped_solve(U, damping, join(vw, vb))
    with tengrad.Preconditioner(damping=damping) as p:
        layer = p.add_linear(n_in, n_out, bias=bias)
        p.update_curvature(layer, a, g, scale)
        w, b = p.precondition(layer, vw, vb)
        assert relative_error(join(w, b), want) <= TOL
        # In place: the update may overwrite the gradient it reads.
        w2, b2 = vw.copy(), (vb.copy() if bias else None)
        p.precondition(layer, w2, b2, out=(w2, b2))
        np.testing.assert_array_equal(w2, w)
        if bias:
            np.testing.assert_array_equal(b2, b)


def test_precondition_of_mean_gradient_equals_natural_gradient():
    rng = np.random.default_rng(3)
    a, g = make_batch(rng, 12, 9, 4)
    with tengrad.Preconditioner(damping=0.05) as p:
        layer = p.add_linear(9, 4, bias=True)
        w, b = p.natural_gradient(layer, a, g, 1.0)
        mean_w = (g.T.astype(np.float64) @ a / 12).astype(np.float32)
        mean_b = g.mean(axis=0).astype(np.float32)
        w2, b2 = p.precondition(layer, mean_w, mean_b)
        assert relative_error(join(w2, b2), join(w, b).astype(np.float64)) <= TOL


def test_changing_damping_refactorizes_the_kept_gram():
    rng = np.random.default_rng(4)
    a, g = make_batch(rng, 10, 6, 6)
    v = rng.standard_normal((6, 6)).astype(np.float32)
    U = linear_per_sample(a, g, False)
    with tengrad.Preconditioner(damping=1.0) as p:
        layer = p.add_linear(6, 6, bias=False)
        p.update_curvature(layer, a, g, 1.0)
        for damping in (0.5, 0.02, 3.0):
            p.damping = damping
            w, _ = p.precondition(layer, v)
            assert relative_error(w.ravel(), damped_solve(U, damping, v.ravel().astype(np.float64))) <= TOL
            assert p.layer_stats(layer)["damping"] == damping


def test_reuse_path_keeps_the_snapshot_until_refresh():
    rng = np.random.default_rng(5)
    a1, g1 = make_batch(rng, 8, 5, 3)
    a2, g2 = make_batch(rng, 6, 5, 3)
    v = rng.standard_normal((3, 5)).astype(np.float32)
    with tengrad.Preconditioner(damping=0.1) as p:
        layer = p.add_linear(5, 3, bias=False)
        p.update_curvature(layer, a1, g1, 1.0)
        first, _ = p.precondition(layer, v)
        again, _ = p.precondition(layer, v)
        np.testing.assert_array_equal(first, again)
        p.update_curvature(layer, a2, g2, 1.0)  # a different batch size replaces the snapshot
        second, _ = p.precondition(layer, v)
        want = damped_solve(linear_per_sample(a2, g2, False), 0.1, v.ravel().astype(np.float64))
        assert relative_error(second.ravel(), want) <= TOL
        assert p.layer_stats(layer)["batch"] == 6


def test_kl_clip_factor_matches_its_definition():
    rng = np.random.default_rng(6)
    a, g = make_batch(rng, 16, 8, 4)
    v = rng.standard_normal((4, 8)).astype(np.float32)
    lr, kappa = 0.1, 1e-3
    with tengrad.Preconditioner(damping=0.1) as p:
        l0 = p.add_linear(8, 4, bias=True)
        l1 = p.add_linear(8, 4, bias=False)
        assert p.kl_clip_factor(lr, kappa) == 1.0  # nothing preconditioned yet
        w0, b0 = p.natural_gradient(l0, a, g, 1.0)
        p.update_curvature(l1, a, g, 1.0)
        w1, _ = p.precondition(l1, v)
        mean = join(g.T.astype(np.float64) @ a / 16, g.mean(axis=0).astype(np.float64))
        total = join(w0, b0) @ mean + w1.ravel().astype(np.float64) @ v.ravel()
        want = min(1.0, np.sqrt(kappa / (lr * lr * total)))
        assert abs(p.kl_clip_factor(lr, kappa) - want) <= 1e-4 * want
        assert p.kl_clip_factor(lr, 1e9) == 1.0


def test_large_batch_and_wide_layer():
    # m > in·out + bias and a realistic width, at the smallest damping of the contract.
    rng = np.random.default_rng(8)
    for m, n_in, n_out in ((200, 6, 4), (64, 60, 20)):
        a, g = make_batch(rng, m, n_in, n_out)
        U = linear_per_sample(a, g, True)
        with tengrad.Preconditioner(damping=0.01) as p:
            layer = p.add_linear(n_in, n_out, bias=True)
            w, b = p.natural_gradient(layer, a, g, 1.0)
            assert relative_error(join(w, b), damped_solve(U, 0.01, U.mean(axis=1))) <= TOL


def woodbury_float64(a, g, scale, damping, vw, vb):
    """(F + λI)⁻¹ v for a linear layer in float64 without forming F: with ã = [a | 1],
    Uᵀv = s (g_i · (V a_i + b)), K = s² (ÃÃᵀ) ∘ (GGᵀ), U x = s Σ x_i g_i ã_iᵀ, and
    (F + λI)⁻¹ v = (1/λ)(v − U (K + mλI)⁻¹ Uᵀv) (the identity; every term evaluated in float64)."""
    a64, g64 = a.astype(np.float64), g.astype(np.float64)
    v64, b64 = vw.astype(np.float64), vb.astype(np.float64)
    m = a.shape[0]
    utv = scale * np.einsum("io,io->i", g64, a64 @ v64.T + b64)
    gram = scale * scale * (a64 @ a64.T + 1) * (g64 @ g64.T)
    x = np.linalg.solve(gram + m * damping * np.eye(m), utv)
    weight = (v64 - scale * (g64 * x[:, None]).T @ a64) / damping
    bias = (b64 - scale * g64.T @ x) / damping
    return weight, bias


@pytest.mark.parametrize("blas_threads", [1, 2])
def test_layer_past_the_fused_kernels_threshold_matches_float64(blas_threads):
    # 2050 × 2049 weights: past the 512K-weight threshold of the kernels of our own on AVX2 CPUs
    # (docs/DESIGN.md §10), where the validation is folded into the first product and (1/λ)v into
    # the second; elsewhere the OpenBLAS path, checked the same way. Rows and features past the
    # kernels' tiles (2050 rows: 42 tiles of 48 and 4; 2049 features: 128 panels of 16 and 1).
    rng = np.random.default_rng(21)
    m, n_in, n_out, damping = 24, 2049, 2050, 0.1
    a, g = make_batch(rng, m, n_in, n_out)
    vw = rng.standard_normal((n_out, n_in)).astype(np.float32)
    vb = rng.standard_normal(n_out).astype(np.float32)
    want_w, want_b = woodbury_float64(a, g, 0.5, damping, vw, vb)
    with tengrad.Preconditioner(damping=damping, blas_threads=blas_threads) as p:
        layer = p.add_linear(n_in, n_out, bias=True)
        p.update_curvature(layer, a, g, 0.5)
        w, b = p.precondition(layer, vw, vb)
        assert relative_error(join(w, b), join(want_w, want_b)) <= TOL
        # In place: the same bits.
        iw, ib = vw.copy(), vb.copy()
        p.precondition(layer, iw, ib, out=(iw, ib))
        assert np.array_equal(iw, w) and np.array_equal(ib, b)
        # A NaN anywhere is refused before anything is written, in place too.
        for index in [(0, 0), (n_out - 1, n_in - 1), (1234, 777)]:
            bad = vw.copy()
            bad[index] = np.nan
            kept = bad.copy()
            with pytest.raises(tengrad.TengradError):
                p.precondition(layer, bad, vb.copy(), out=(bad, ib))
            assert np.array_equal(bad, kept, equal_nan=True)


@pytest.mark.parametrize("n_in", [1024, 1000])
def test_outputs_off_a_cache_line_get_the_same_bits(n_in):
    # The fused kernels shift their column panels to the output's alignment (docs/DESIGN.md §10):
    # an update written at every float offset within a 64-byte line must have the same bits, and
    # so must the in-place call. 1024 × 520 weights: past the fused threshold.
    rng = np.random.default_rng(33)
    m, n_out = 32, 520
    a, g = make_batch(rng, m, n_in, n_out)
    vw = rng.standard_normal((n_out, n_in)).astype(np.float32)
    vb = rng.standard_normal(n_out).astype(np.float32)
    with tengrad.Preconditioner(damping=0.1, blas_threads=2) as p:
        layer = p.add_linear(n_in, n_out, bias=True)
        p.update_curvature(layer, a, g, 1.0)
        w, b = p.precondition(layer, vw, vb)
        want_w, want_b = woodbury_float64(a, g, 1.0, 0.1, vw, vb)
        assert relative_error(join(w, b), join(want_w, want_b)) <= TOL
        buffer = np.empty(vw.size + 16, dtype=np.float32)
        for offset in range(16):
            out = buffer[offset:offset + vw.size].reshape(vw.shape)
            p.precondition(layer, vw, vb, out=(out, np.empty_like(vb)))
            assert np.array_equal(out, w), offset
            inplace = out
            inplace[...] = vw
            p.precondition(layer, inplace, vb.copy(), out=(inplace, np.empty_like(vb)))
            assert np.array_equal(inplace, w), offset
