"""Conv2d layers against the dense float64 oracle (explicit im2col per-sample gradients, F + λI
formed densely). Tolerance 1e-3 relative (the contract's bound for float32 inputs, λ ≥ 0.01,
unit-scale data); observed errors are ~1e-7. The two Gram strategies must agree to float32
rounding (1e-5 relative), and chunked workspaces must not change results beyond rounding."""
import numpy as np
import pytest

import tengrad
from conv_oracle import conv_output_size, conv_per_sample, join_conv
from oracle import damped_solve, relative_error

TOL = 1e-3

# name: (m, C_in, C_out, (H, W), kernel, stride, padding, dilation, groups)
GEOMETRIES = {
    "3x3-pad1": (3, 2, 4, (6, 5), 3, 1, 1, 1, 1),
    "stride2": (4, 3, 4, (7, 7), 3, 2, 1, 1, 1),
    "dilation2": (3, 2, 3, (7, 6), 3, 1, 2, 2, 1),
    "groups2": (4, 4, 6, (5, 5), 3, 1, 1, 1, 2),
    "depthwise": (3, 3, 3, (5, 6), 3, 1, 1, 1, 3),
    "depthwise-multiplier": (2, 2, 4, (4, 4), 3, 2, 0, 1, 2),
    "1x1": (5, 4, 3, (4, 4), 1, 1, 0, 1, 1),
    "L=1": (6, 3, 4, (3, 3), 3, 1, 0, 1, 1),
    "batch1": (1, 2, 3, (5, 5), 3, 1, 1, 1, 1),
    "rect-kernel": (3, 2, 2, (6, 7), (2, 3), (1, 2), (1, 0), (2, 1), 1),
    "m>d": (40, 1, 2, (4, 4), 2, 2, 0, 1, 1),
}


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make(name, bias, seed=0):
    m, cin, cout, (h, w), k, s, p, d, gr = GEOMETRIES[name]
    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    ho = conv_output_size(h, k[0], s[0], p[0], d[0])
    wo = conv_output_size(w, k[1], s[1], p[1], d[1])
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    x = rng.standard_normal((m, cin, h, w)).astype(np.float32)
    g = rng.standard_normal((m, cout, ho, wo)).astype(np.float32)
    spec = dict(kernel=k, stride=s, padding=p, dilation=d, groups=gr, bias=bias)
    layer_args = (cin, cout, k, (h, w), s, p, d, gr, bias)
    return m, x, g, spec, layer_args, rng


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", ["factored", "explicit"])
@pytest.mark.parametrize("representation", ["raw", "per-sample"])
def test_both_entry_points_match_oracle(name, bias, strategy, representation):
    m, x, g, spec, layer_args, rng = make(name, bias)
    for damping, reduction in ((0.01, "sum"), (0.5, "mean")):
        given, scale = (g, 1.0) if reduction == "sum" else ((g / m).astype(np.float32), float(m))
        U = conv_per_sample(x.astype(np.float64), given.astype(np.float64), spec, scale)
        with tengrad.Preconditioner(damping=damping) as p:
            layer = p.add_conv2d(*layer_args)
            p.set_conv_strategy(layer, strategy)
            p.set_snapshot_representation(layer, representation)
            w, b = p.natural_gradient(layer, x, given, scale)
            assert relative_error(join_conv(w, b), damped_solve(U, damping, U.mean(axis=1))) <= TOL
            assert p.layer_stats(layer)["conv_strategy"] == strategy
            info = p.snapshot_info(layer)
            assert info["representation"] == representation and info["representation_setting"] == representation
            assert info["representation_bytes"] == 4 * m * (x[0].size + g[0].size if representation == "raw" else U.shape[0])
            vw = rng.standard_normal(w.shape).astype(np.float32)
            vb = rng.standard_normal(b.shape).astype(np.float32) if bias else None
            w2, b2 = p.precondition(layer, vw, vb)
            assert relative_error(join_conv(w2, b2), damped_solve(U, damping, join_conv(vw, vb))) <= TOL
            # In place.
            w3, b3 = vw.copy(), (vb.copy() if bias else None)
            p.precondition(layer, w3, b3, out=(w3, b3))
            np.testing.assert_array_equal(w3, w2)


def random_layer(rng):
    groups = int(rng.choice([1, 2]))
    cin, cout = groups * int(rng.integers(1, 4)), groups * int(rng.integers(1, 4))
    h, w = int(rng.integers(4, 9)), int(rng.integers(4, 9))
    k = int(rng.choice([1, 2, 3]))
    s, p, d = int(rng.integers(1, 3)), int(rng.integers(0, 2)), int(rng.integers(1, 3))
    if d * (k - 1) + 1 > min(h, w) + 2 * p:
        d = 1
    return (cin, cout, k, (h, w), s, p, d, groups, bool(rng.integers(0, 2)))


@pytest.mark.parametrize("seed", range(16))
def test_strategies_agree_on_random_layers(seed):
    # Float32 rounding, amplified by the condition of the m×m system K + mλI (LAPACK's estimate
    # from the layer's stats): |a − b| ≤ 8 ε₃₂ (1 + 1/rcond) |b|. Well-conditioned systems agree
    # to ~1e-7; nearly singular K (m close to or above the parameter count) loosens it.
    rng = np.random.default_rng(100 + seed)
    args = random_layer(rng)
    cin, cout, k, (h, w), s, p, d, groups, bias = args
    ho, wo = conv_output_size(h, k, s, p, d), conv_output_size(w, k, s, p, d)
    m = int(rng.integers(1, 16))
    x = rng.standard_normal((m, cin, h, w)).astype(np.float32)
    g = rng.standard_normal((m, cout, ho, wo)).astype(np.float32)
    results, rconds = [], []
    for strategy in ("factored", "explicit"):
        with tengrad.Preconditioner(damping=0.1) as pre:
            layer = pre.add_conv2d(*args)
            pre.set_conv_strategy(layer, strategy)
            results.append(join_conv(*pre.natural_gradient(layer, x, g, 1.0)))
            rconds.append(pre.layer_stats(layer)["rcond"])
    eps32 = np.finfo(np.float32).eps
    assert relative_error(results[0], results[1]) <= 8 * eps32 * (1 + 1 / min(rconds))


@pytest.mark.parametrize("strategy", ["factored", "explicit"])
def test_memory_limit_chunks_workspaces_without_changing_results(strategy):
    m, x, g, spec, layer_args, rng = make("groups2", True)
    x = np.concatenate([x] * 4)  # m = 16
    g = np.concatenate([g, -g, 2 * g, g / 3]).astype(np.float32)
    v = rng.standard_normal((6, 2, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    outputs, workspaces, snapshot_bytes = [], [], 0  # the unlimited run (first) measures the snapshot
    for limit in (0, 1):
        with tengrad.Preconditioner(damping=0.1) as p:
            layer = p.add_conv2d(*layer_args)
            p.set_conv_strategy(layer, strategy)
            if limit:
                # The snapshot (batch copies and the m×m system) plus a few KB, about the least
                # each strategy needs: chunks of single samples (explicit: and single output
                # channels, 4 KB; factored: one sample pair's L×L products, 9 KB).
                p.memory_limit = snapshot_bytes + (12_000 if strategy == "factored" else 5_000)
            p.update_curvature(layer, x, g, 1.0)
            snapshot_bytes = p.layer_stats(layer)["snapshot_bytes"]
            outputs.append(join_conv(*p.precondition(layer, *v)))
            workspaces.append(p.memory_in_use - snapshot_bytes)
            assert limit == 0 or p.memory_in_use <= p.memory_limit
    assert workspaces[1] < workspaces[0] / 2
    assert relative_error(outputs[1], outputs[0]) <= 1e-5


def test_out_of_memory_reports_bytes_and_keeps_state():
    m, x, g, spec, layer_args, rng = make("3x3-pad1", True)
    v = rng.standard_normal((4, 2, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    with tengrad.Preconditioner() as p:
        layer = p.add_conv2d(*layer_args)
        p.update_curvature(layer, x, g, 1.0)
        before = p.precondition(layer, *v)
        p.memory_limit = p.layer_stats(layer)["snapshot_bytes"] + 16
        big_x, big_g = np.concatenate([x] * 30), np.concatenate([g] * 30)
        with pytest.raises(tengrad.TengradError) as e:
            p.update_curvature(layer, big_x, big_g, 1.0)
        assert e.value.status == tengrad.ERROR_OUT_OF_MEMORY and "bytes" in e.value.message
        p.memory_limit = 0
        after = p.precondition(layer, *v)
        np.testing.assert_array_equal(after[0], before[0])


def test_auto_strategy_follows_the_flop_model():
    rng = np.random.default_rng(1)
    with tengrad.Preconditioner() as p:
        small = p.add_conv2d(16, 16, 3, (3, 3))             # L = 1: factored is far cheaper
        large = p.add_conv2d(2, 4, 3, (16, 16), padding=1)  # L = 256: explicit is far cheaper
        p.natural_gradient(small, rng.standard_normal((8, 16, 3, 3)).astype(np.float32),
                           rng.standard_normal((8, 16, 1, 1)).astype(np.float32), 1.0)
        p.natural_gradient(large, rng.standard_normal((8, 2, 16, 16)).astype(np.float32),
                           rng.standard_normal((8, 4, 16, 16)).astype(np.float32), 1.0)
        s, l = p.layer_stats(small), p.layer_stats(large)
        assert s["conv_strategy"] == "factored" and s["conv_factored_flops"] < s["conv_explicit_flops"]
        assert l["conv_strategy"] == "explicit" and l["conv_explicit_flops"] < l["conv_factored_flops"]


@pytest.mark.parametrize("kwargs,field", [
    (dict(in_channels=3, out_channels=4, kernel_size=3, input_size=(5, 5), groups=2), "in_channels"),
    (dict(in_channels=4, out_channels=3, kernel_size=3, input_size=(5, 5), groups=2), "out_channels"),
    (dict(in_channels=1, out_channels=1, kernel_size=6, input_size=(5, 5)), "kernel_height"),
    (dict(in_channels=1, out_channels=1, kernel_size=(1, 3), input_size=(5, 2)), "kernel_width"),
    (dict(in_channels=1, out_channels=1, kernel_size=3, input_size=(5, 5), dilation=3), "dilation_height"),
    (dict(in_channels=1, out_channels=1, kernel_size=3, input_size=(5, 5), stride=(1, 0)), "stride_width"),
    (dict(in_channels=1, out_channels=1, kernel_size=3, input_size=(5, 5), padding=(-1, 0)), "padding_height"),
    (dict(in_channels=0, out_channels=1, kernel_size=3, input_size=(5, 5)), "in_channels"),
    (dict(in_channels=1, out_channels=1, kernel_size=3, input_size=(0, 5)), "in_height"),
])
def test_invalid_geometry_names_the_field(kwargs, field):
    with tengrad.Preconditioner() as p:
        with pytest.raises(tengrad.TengradError) as e:
            p.add_conv2d(**kwargs)
        assert e.value.status == tengrad.ERROR_INVALID_ARGUMENT and field in e.value.message
        assert p.num_layers == 0


def test_overflowing_geometry_is_a_shape_error():
    with tengrad.Preconditioner() as p:
        with pytest.raises(tengrad.TengradError) as e:
            p.add_conv2d(2**31, 2**31, 1, (2**20, 2**20))
        assert e.value.status == tengrad.ERROR_SHAPE


def test_strategy_setting_on_linear_layers_and_unknown_names():
    """Linear layers take a strategy (it decides their Gram over tokens); unknown names and layer
    ids are refused."""
    with tengrad.Preconditioner() as p:
        layer = p.add_linear(3, 3)
        p.set_conv_strategy(layer, "explicit")
        with pytest.raises(ValueError):
            p.set_conv_strategy(layer, "fastest")
        with pytest.raises((tengrad.TengradError, ValueError)):
            p.set_conv_strategy(5, "explicit")


def test_auto_representation_follows_the_cost_model():
    """Many output positions: per-sample gradients (the reuse step is two GEMVs); few positions
    or a linear layer: the raw batch. The model's numbers are reported either way."""
    rng = np.random.default_rng(12)
    with tengrad.Preconditioner() as p:
        wide = p.add_conv2d(3, 8, 3, (12, 12), padding=1)        # L = 144
        narrow = p.add_conv2d(8, 8, 1, (2, 2))                   # L = 4
        fc = p.add_linear(20, 10)
        p.update_curvature(wide, rng.standard_normal((16, 3, 12, 12), dtype=np.float32),
                           rng.standard_normal((16, 8, 12, 12), dtype=np.float32), 1.0)
        p.update_curvature(narrow, rng.standard_normal((16, 8, 2, 2), dtype=np.float32),
                           rng.standard_normal((16, 8, 2, 2), dtype=np.float32), 1.0)
        p.update_curvature(fc, rng.standard_normal((16, 20), dtype=np.float32),
                           rng.standard_normal((16, 10), dtype=np.float32), 1.0)
        picks = {layer: p.snapshot_info(layer) for layer in (wide, narrow, fc)}
        assert picks[wide]["representation"] == "per-sample"
        assert picks[wide]["per_sample_reuse_cost"] < picks[wide]["raw_reuse_cost"]
        assert picks[wide]["representation_bytes"] == 4 * 16 * 8 * 28
        assert picks[narrow]["representation"] == "raw" and picks[fc]["representation"] == "raw"
        assert all(info["representation_setting"] == "auto" for info in picks.values())
        with pytest.raises(ValueError):
            p.set_snapshot_representation(wide, "dense")
    with tengrad.Preconditioner() as empty:
        empty.add_linear(2, 2)
        assert empty.snapshot_info(0)["representation"] is None and empty.snapshot_info(0)["batch"] == 0


@pytest.mark.parametrize("name", ["3x3-pad1", "groups2", "stride2", "batch1"])
@pytest.mark.parametrize("bias", [True, False])
def test_snapshot_from_gathered_per_sample_rows(name, bias):
    """Data-parallel building block (docs/DESIGN.md §11): rows from per_sample_gradients of two
    pieces of the batch (two workers), concatenated, make a snapshot on another handle (the owner)
    that preconditions like the dense oracle of the whole batch; the rows are the oracle's
    per-sample gradients; NaN rows and wrong shapes are refused with the snapshot unchanged."""
    m, x, g, spec, layer_args, rng = make(name, bias)
    U = conv_per_sample(x.astype(np.float64), g.astype(np.float64), spec, 2.0)
    with tengrad.Preconditioner() as worker, tengrad.Preconditioner(damping=0.05) as owner:
        a, b = worker.add_conv2d(*layer_args), owner.add_conv2d(*layer_args)
        pieces = [slice(0, m // 2), slice(m // 2, m)] if m > 1 else [slice(0, 1)]
        rows = np.concatenate([worker.per_sample_gradients(a, x[s], g[s], 2.0) for s in pieces])
        assert worker.layer_stats(a)["batch"] == 0                   # rows change no state
        cout = layer_args[1]
        weights = rows[:, :rows.shape[1] - (cout if bias else 0)].reshape((m, cout, -1))
        biases = rows[:, rows.shape[1] - cout:] if bias else None
        for i in range(m):
            assert relative_error(join_conv(weights[i], None if biases is None else biases[i]), U[:, i]) <= TOL
        owner.update_curvature_from_gradients(b, rows)
        assert owner.snapshot_info(b)["representation"] == "per-sample"
        shape = owner.layer_spec(b).weight_shape
        vw = rng.standard_normal(shape).astype(np.float32)
        vb = rng.standard_normal(cout).astype(np.float32) if bias else None
        w, wb = owner.precondition(b, vw, vb)
        assert relative_error(join_conv(w, wb), damped_solve(U, 0.05, join_conv(vw, vb))) <= TOL
        before = owner.save_state()
        bad = rows.copy()
        bad[0, 0] = np.nan
        with pytest.raises(tengrad.TengradError, match="NOT_FINITE"):
            owner.update_curvature_from_gradients(b, bad)
        with pytest.raises(ValueError):
            owner.update_curvature_from_gradients(b, rows[:, 1:].copy())
        assert owner.save_state() == before


def test_array_shapes_come_from_the_library():
    """Python asks the library for a layer's array shapes (tengrad_get_layer_arrays) instead of
    recomputing a convolution's output size: strides, dilation, padding and groups; the shapes
    check every call's arrays, and after load_state the same shapes come back."""
    with tengrad.Preconditioner() as p:
        conv = p.add_conv2d(4, 6, (3, 2), (9, 7), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=True)
        lin = p.add_linear(5, 3, bias=False)
        s = p.array_shapes(conv)
        want_h, want_w = conv_output_size(9, 3, 2, 1, 1), conv_output_size(7, 2, 1, 0, 2)
        assert s.activations == (4, 9, 7) and s.output_grads == (6, want_h, want_w)
        assert s.weight == (6, 2, 3, 2) and s.bias == (6,) and s.parameters == 6 * 2 * 3 * 2 + 6
        t = p.array_shapes(lin)
        assert (t.activations, t.output_grads, t.weight, t.bias) == ((5,), (3,), (3, 5), None)
        rng = np.random.default_rng(0)
        a = rng.standard_normal((3, 4, 9, 7), dtype=np.float32)
        with pytest.raises(ValueError):  # one output column short
            p.update_curvature(conv, a, np.zeros((3, 6, want_h, want_w - 1), np.float32), 3.0)
        p.update_curvature(conv, a, rng.standard_normal((3, 6, want_h, want_w), dtype=np.float32), 3.0)
        state = p.save_state()
    with tengrad.Preconditioner() as q:
        q.load_state(state)
        assert q.array_shapes(conv) == s and q.array_shapes(lin) == t
