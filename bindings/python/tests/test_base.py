"""The diagonal base (docs/DESIGN.md §13): ``set_base`` makes a layer's block F + λE, E = diag(e),
instead of F + λI. Every kind, both representations, both Gram strategies as set, in place, the
one-call natural gradient, rows from other processes, a new damping, saved state — each against
the dense float64 oracle solve(UUᵀ/m + λE, v) with U from the independent per-kind oracles; bad
bases are refused and change nothing."""
import numpy as np
import pytest

import tengrad
from conv_oracle import conv_output_size, conv_per_sample, join_conv
from oracle import join, linear_per_sample, relative_error

TOL = 2e-4


def solve(U, e, damping, v):
    """(UUᵀ/m + λ diag(e))⁻¹ v with U = d × m, formed densely in float64."""
    d, m = U.shape
    return np.linalg.solve(U @ U.T / m + damping * np.diag(e), v)


def base_like(rng, shape):
    """A positive base spanning three orders of magnitude (as a normalized second moment does)."""
    return (10.0 ** rng.uniform(-1.5, 1.5, shape)).astype(np.float32)


def linear_case(rng, bias=True, tokens=None):
    m, n_in, n_out = 6, 5, 3
    shape = (m, n_in) if tokens is None else (m, tokens, n_in)
    a = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (n_out,)).astype(np.float32)
    if tokens is None:
        U = linear_per_sample(a, 2.0 * g, bias)
    else:  # a sequence's gradient sums its tokens'
        U = sum(linear_per_sample(a[:, t], 2.0 * g[:, t], bias) for t in range(tokens))
    to_flat = join
    return (lambda p: p.add_linear(n_in, n_out, bias=bias)), a, g, 2.0, U, to_flat


def conv_case(rng):
    spec = dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, bias=True)
    m, cin, cout, h = 4, 2, 3, 5
    ho = conv_output_size(h, 3, 1, 1, 1)
    x = rng.standard_normal((m, cin, h, h)).astype(np.float32)
    g = rng.standard_normal((m, cout, ho, ho)).astype(np.float32)
    U = conv_per_sample(x.astype(np.float64), g.astype(np.float64), spec, 1.0)
    return (lambda p: p.add_conv2d(cin, cout, 3, (h, h), padding=1)), x, g, 1.0, U, join_conv


def affine_case(rng):
    m, T, D = 5, 3, 4
    xh = rng.standard_normal((m, T, D)).astype(np.float32)
    g = rng.standard_normal((m, T, D)).astype(np.float32)
    gamma = (g.astype(np.float64) * xh).sum(1)      # per sample: Σ_t g ⊙ x̂
    beta = g.astype(np.float64).sum(1)
    U = np.hstack([gamma, beta]).T                  # d × m, [γ | β]
    return (lambda p: p.add_affine(D)), xh, g, 1.0, U, lambda w, b: np.concatenate([w, b]).astype(np.float64)


def embedding_case(rng):
    V, D, m, T = 7, 3, 5, 4
    ids = rng.integers(0, V, (m, T))
    ids[:, 0] = 2
    g = rng.standard_normal((m, T, D)).astype(np.float32)
    U = np.zeros((m, V, D))
    for i in range(m):
        for t in range(T):
            U[i, ids[i, t]] += g[i, t]
    return (lambda p: p.add_embedding(V, D)), ids, g, 1.0, U.reshape(m, -1).T, lambda w, b: w.astype(np.float64).ravel()


CASES = {
    "linear": lambda rng: linear_case(rng),
    "linear-no-bias": lambda rng: linear_case(rng, bias=False),
    "linear-tokens": lambda rng: linear_case(rng, tokens=3),
    "conv": conv_case,
    "affine": affine_case,
    "embedding": embedding_case,
}


def bases(p, layer, rng):
    shapes = p.array_shapes(layer)
    return base_like(rng, shapes.weight), (base_like(rng, shapes.bias) if shapes.bias is not None else None)


@pytest.mark.parametrize("representation", ["raw", "per-sample"])
@pytest.mark.parametrize("strategy", ["auto", "factored"])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_precondition_and_natural_gradient_match_the_oracle(kind, representation, strategy):
    rng = np.random.default_rng(1)
    add, a, g, s, U, flat = CASES[kind](rng)
    damping = 0.05
    with tengrad.Preconditioner(damping=damping) as p:
        layer = add(p)
        p.set_snapshot_representation(layer, representation)
        p.set_conv_strategy(layer, strategy)   # a base takes the explicit Gram whatever this says
        ew, eb = bases(p, layer, rng)
        p.set_base(layer, ew, eb)
        assert p.has_base(layer)
        e = flat(ew, eb)
        p.update_curvature(layer, a, g, s)
        shapes = p.array_shapes(layer)
        vw = rng.standard_normal(shapes.weight).astype(np.float32)
        vb = rng.standard_normal(shapes.bias).astype(np.float32) if shapes.bias is not None else None
        want = solve(U, e, damping, flat(vw, vb))
        w, b = p.precondition(layer, vw, vb)
        assert relative_error(flat(w, b), want) < TOL
        assert relative_error(flat(w, b), solve(U, np.ones_like(e), damping, flat(vw, vb))) > 0.1  # the base matters
        # In place: the same bits as out of place.
        iw, ib = vw.copy(), (vb.copy() if vb is not None else None)
        p.precondition(layer, iw, ib, out=(iw, ib))
        np.testing.assert_array_equal(iw, w)
        # KL clipping's ⟨update, v⟩ is the oracle's.
        nu = p.kl_clip_factor(1.0, 1e30)
        assert nu == 1.0
        dot = float(flat(vw, vb) @ want)
        stats = p.layer_stats(layer)
        assert abs(stats["update_dot_grad"] - dot) <= 1e-3 * abs(dot)
        # A new damping re-factorizes the kept Gram: λ is still a shift.
        p.damping = 0.3
        w, b = p.precondition(layer, vw, vb)
        assert relative_error(flat(w, b), solve(U, e, 0.3, flat(vw, vb))) < TOL
        # The one-call natural gradient: (F + λE)⁻¹ of the batch's mean gradient.
        w, b = p.natural_gradient(layer, a, g, s)
        assert relative_error(flat(w, b), solve(U, e, 0.3, U.mean(1))) < TOL


def test_the_base_takes_effect_at_the_next_snapshot_and_clears():
    rng = np.random.default_rng(2)
    add, a, g, s, U, flat = linear_case(rng)
    with tengrad.Preconditioner(damping=0.1) as p:
        layer = add(p)
        p.update_curvature(layer, a, g, s)
        v = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
        plain = p.precondition(layer, *v)
        ew, eb = bases(p, layer, rng)
        p.set_base(layer, ew, eb)
        # The snapshot keeps the base it was taken with (none).
        np.testing.assert_array_equal(p.precondition(layer, *v)[0], plain[0])
        p.update_curvature(layer, a, g, s)
        w, b = p.precondition(layer, *v)
        assert relative_error(flat(w, b), solve(U, flat(ew, eb), 0.1, flat(*v))) < TOL
        # e = 1 is the plain block; clearing returns to λI.
        p.set_base(layer, np.ones_like(ew), np.ones_like(eb))
        p.update_curvature(layer, a, g, s)
        assert relative_error(flat(*p.precondition(layer, *v)), flat(*plain)) < 1e-5
        p.set_base(layer, None)
        assert not p.has_base(layer)
        p.update_curvature(layer, a, g, s)
        np.testing.assert_array_equal(p.precondition(layer, *v)[0], plain[0])


def test_rows_from_other_processes_and_saved_state_keep_the_base():
    rng = np.random.default_rng(3)
    add, a, g, s, U, flat = conv_case(rng)
    with tengrad.Preconditioner(damping=0.02) as p, tengrad.Preconditioner(damping=0.02) as q:
        layer = add(p)
        add(q)
        ew, eb = bases(p, layer, rng)
        p.set_base(layer, ew, eb)
        q.set_base(layer, ew, eb)
        rows = p.per_sample_gradients(layer, a, g, s)
        q.update_curvature_from_gradients(layer, rows)
        p.update_curvature(layer, a, g, s)
        vw = rng.standard_normal(ew.shape).astype(np.float32)
        vb = rng.standard_normal(eb.shape).astype(np.float32)
        want = solve(U, flat(ew, eb), 0.02, flat(vw, vb))
        assert relative_error(flat(*q.precondition(layer, vw, vb)), want) < TOL
        before = p.precondition(layer, vw, vb)
        blob = p.save_state()
        p.set_base(layer, None)
        p.update_curvature(layer, a, g, s)
        p.load_state(blob)
        assert p.has_base(layer)
        after = p.precondition(layer, vw, vb)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
        with tengrad.Preconditioner() as fresh:
            fresh.load_state(blob)
            np.testing.assert_array_equal(fresh.precondition(layer, vw, vb)[0], before[0])
            assert fresh.has_base(layer)


@pytest.mark.parametrize("bad", ["zero", "negative", "nan", "inf", "subnormal"])
def test_bad_bases_are_refused_and_change_nothing(bad):
    rng = np.random.default_rng(4)
    add, a, g, s, U, flat = linear_case(rng)
    with tengrad.Preconditioner(damping=0.1) as p:
        layer = add(p)
        ew, eb = bases(p, layer, rng)
        p.set_base(layer, ew, eb)
        p.update_curvature(layer, a, g, s)
        v = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
        before = p.precondition(layer, *v)
        blob = p.save_state()
        value = {"zero": 0.0, "negative": -1.0, "nan": np.nan, "inf": np.inf, "subnormal": 1e-40}[bad]
        wrong = ew.copy()
        wrong[1, 2] = value
        with pytest.raises(tengrad.TengradError) as info:
            p.set_base(layer, wrong, eb)
        want = tengrad._lib.ERROR_NOT_FINITE if bad in ("nan", "inf") else tengrad._lib.ERROR_INVALID_ARGUMENT
        assert info.value.status == want
        wrong_bias = eb.copy()
        wrong_bias[0] = value
        with pytest.raises(tengrad.TengradError):
            p.set_base(layer, ew, wrong_bias)
        assert p.save_state() == blob
        p.update_curvature(layer, a, g, s)
        np.testing.assert_array_equal(p.precondition(layer, *v)[0], before[0])


def test_bias_presence_and_shapes_are_checked():
    rng = np.random.default_rng(5)
    with tengrad.Preconditioner() as p:
        with_bias, without = p.add_linear(4, 2), p.add_linear(4, 2, bias=False)
        e = np.ones((2, 4), np.float32)
        with pytest.raises(ValueError):
            p.set_base(with_bias, e)                      # the bias base is required
        with pytest.raises(ValueError):
            p.set_base(without, e, np.ones(2, np.float32))
        with pytest.raises(ValueError):
            p.set_base(with_bias, np.ones((4, 2), np.float32), np.ones(2, np.float32))
        with pytest.raises(ValueError):
            p.set_base(with_bias, None, np.ones(2, np.float32))
        assert not p.has_base(with_bias) and not p.has_base(without)
        p.set_base(without, base_like(rng, (2, 4)))
        assert p.has_base(without)


def test_format_3_states_load_and_format_4_keeps_bases():
    """State written by format 3 (no bases: the fuzz corpus's v3 seeds) loads, has no base, and is
    saved as format 4 giving the same updates; the v4 seeds load with their bases."""
    import os
    import struct
    corpus = os.path.join(os.path.dirname(__file__), "..", "..", "..", "Tests", "fuzz", "corpus", "state")
    for name in ("v3-affine", "v3-embedding", "v3-tokens-per-sample-masked"):
        with open(os.path.join(corpus, name), "rb") as f:
            blob = f.read()
        assert struct.unpack_from("<I", blob, 8)[0] == 3
        with tengrad.Preconditioner() as p, tengrad.Preconditioner() as q:
            p.load_state(blob)
            assert not any(p.has_base(i) for i in range(p.num_layers))
            again = p.save_state()
            assert struct.unpack_from("<I", again, 8)[0] == 4
            q.load_state(again)
            rng = np.random.default_rng(0)
            for i in range(p.num_layers):
                shapes = p.array_shapes(i)
                vw = rng.standard_normal(shapes.weight).astype(np.float32)
                vb = rng.standard_normal(shapes.bias).astype(np.float32) if shapes.bias is not None else None
                np.testing.assert_array_equal(p.precondition(i, vw, vb)[0], q.precondition(i, vw, vb)[0])
    with open(os.path.join(corpus, "v4-base-conv-embedding"), "rb") as f:
        blob = f.read()
    with tengrad.Preconditioner() as p:
        p.load_state(blob)
        assert [p.has_base(i) for i in range(p.num_layers)] == [False, True, True]
        assert p.save_state() == blob


@pytest.mark.parametrize("kind", sorted(CASES))
def test_relative_damping_matches_the_oracle(kind):
    """damping_mode "relative": λ · tr(F)/min(m, d) of each snapshot, with and without a base."""
    rng = np.random.default_rng(6)
    add, a, g, s, U, flat = CASES[kind](rng)
    d, m = U.shape
    for with_base in (False, True):
        with tengrad.Preconditioner(damping=0.3) as p:
            layer = add(p)
            p.set_damping_mode(layer, "relative")
            assert p.damping_mode(layer) == "relative"
            e = np.ones(d)
            if with_base:
                ew, eb = bases(p, layer, rng)
                p.set_base(layer, ew, eb)
                e = flat(ew, eb)
            p.update_curvature(layer, a, g, s)
            lam = 0.3 * float((U * U / e[:, None]).sum()) / m / min(m, d)
            assert p.layer_stats(layer)["damping"] == pytest.approx(lam, rel=1e-6)
            shapes = p.array_shapes(layer)
            vw = rng.standard_normal(shapes.weight).astype(np.float32)
            vb = rng.standard_normal(shapes.bias).astype(np.float32) if shapes.bias is not None else None
            w, b = p.precondition(layer, vw, vb)
            assert relative_error(flat(w, b), solve(U, e, lam, flat(vw, vb))) < TOL
            with pytest.raises(ValueError):
                p.set_damping_mode(layer, "trace")
