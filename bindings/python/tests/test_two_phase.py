"""The precondition in two phases (``precondition_prepare`` / ``precondition_finish``, docs/DESIGN.md
§6) and ``tengrad.torch``'s step on it: scale 1 gives ``precondition``'s bits, a scale matches the
float64 oracle, layers prepared in turn keep their own coefficients, refusals keep the first phase
and the outputs; ``step()`` writes ν · update straight over ``.grad`` (no update array, the same
tensor) and through the kept arrays when ``.grad`` is not contiguous."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tengrad
import tengrad.torch as tt
from oracle import damped_solve, join, linear_per_sample, relative_error
from test_torch import TOL, batch, cnn, mlp


def linear_layer(p, rng, m, n_in, n_out, bias=True, scale=2.0):
    a = rng.standard_normal((m, n_in)).astype(np.float32)
    g = rng.standard_normal((m, n_out)).astype(np.float32)
    layer = p.add_linear(n_in, n_out, bias=bias)
    p.update_curvature(layer, a, g, scale)
    return layer, a, g


@pytest.mark.parametrize("n_in,n_out,m", [(9, 5, 6), (300, 70, 17), (1024, 600, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_scale_one_gives_the_one_call_bits_and_a_scale_matches_float64(n_in, n_out, m, bias):
    rng = np.random.default_rng(n_in + m)
    with tengrad.Preconditioner(damping=0.05) as p:
        layer, a, g = linear_layer(p, rng, m, n_in, n_out, bias)
        vw = rng.standard_normal((n_out, n_in)).astype(np.float32)
        vb = rng.standard_normal(n_out).astype(np.float32) if bias else None
        w1, b1 = p.precondition(layer, vw, vb)
        dot = p.layer_stats(layer)["update_dot_grad"]
        p.precondition_prepare(layer, vw, vb)
        w2, b2 = p.precondition_finish(layer, vw, vb)
        np.testing.assert_array_equal(w2, w1)
        if bias:
            np.testing.assert_array_equal(b2, b1)
        # In place, times ν.
        nu = 0.3
        iw, ib = vw.copy(), (vb.copy() if bias else None)
        p.precondition_prepare(layer, iw, ib)
        assert p.layer_stats(layer)["update_dot_grad"] == dot
        p.precondition_finish(layer, iw, ib, nu, out=(iw, ib))
        if n_out * (n_in + 1) <= 2000:  # the dense oracle forms and solves d × d
            U = linear_per_sample(a, g.astype(np.float64) * 2.0, bias)
            want = nu * damped_solve(U, 0.05, join(vw, vb))
            assert relative_error(join(iw, ib), want) <= TOL
        assert relative_error(join(iw, ib), nu * join(w1, b1)) <= 1e-6
        assert p.layer_stats(layer)["update_dot_grad"] == dot  # the unscaled update's


def test_layers_prepared_in_turn_and_a_conv_layer():
    rng = np.random.default_rng(3)
    with tengrad.Preconditioner(damping=0.1) as p:
        small, *_ = linear_layer(p, rng, 6, 9, 5)
        big, *_ = linear_layer(p, rng, 20, 200, 90)
        conv = p.add_conv2d(2, 4, kernel_size=3, input_size=(7, 6), padding=1)
        p.update_curvature(conv, rng.standard_normal((5, 2, 7, 6)).astype(np.float32),
                           rng.standard_normal((5, 4, 7, 6)).astype(np.float32), 5.0)
        grads = {}
        for layer in (small, big, conv):
            shapes = p.array_shapes(layer)
            grads[layer] = (rng.standard_normal(shapes.weight).astype(np.float32),
                            rng.standard_normal(shapes.bias).astype(np.float32))
        once = {layer: p.precondition(layer, *v) for layer, v in grads.items()}
        for layer, v in grads.items():
            p.precondition_prepare(layer, *v)
        for layer in (conv, big, small):
            w, b = p.precondition_finish(layer, *grads[layer])
            np.testing.assert_array_equal(w, once[layer][0])
            np.testing.assert_array_equal(b, once[layer][1])


def test_refusals_keep_the_first_phase_and_the_outputs():
    rng = np.random.default_rng(4)
    with tengrad.Preconditioner(damping=0.1) as p:
        layer, a, g = linear_layer(p, rng, 6, 9, 5)
        vw, vb = rng.standard_normal((5, 9)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
        want, _ = p.precondition(layer, vw, vb)
        with pytest.raises(tengrad.TengradError, match="STATE"):
            p.precondition_finish(layer, vw, vb)
        p.precondition_prepare(layer, vw, vb)
        bad = vw.copy()
        bad[1, 2] = np.inf
        with pytest.raises(tengrad.TengradError, match="NOT_FINITE"):
            p.precondition_prepare(layer, bad, vb)
        out = (np.full_like(vw, 7), np.full_like(vb, 7))
        for scale in (np.nan, np.inf, 1e39):
            with pytest.raises(tengrad.TengradError):
                p.precondition_finish(layer, vw, vb, scale, out=out)
        assert (out[0] == 7).all() and (out[1] == 7).all()
        w, _ = p.precondition_finish(layer, vw, vb)  # the first phase survived every refusal
        np.testing.assert_array_equal(w, want)
        with pytest.raises(tengrad.TengradError, match="STATE"):
            p.precondition_finish(layer, vw, vb)  # spent
        p.precondition_prepare(layer, vw, vb)
        p.update_curvature(layer, a, g, 1.0)
        with pytest.raises(tengrad.TengradError, match="STATE"):
            p.precondition_finish(layer, vw, vb)  # a new snapshot drops it


@pytest.mark.parametrize("kl_clip", [None, 1e-6])
def test_step_writes_over_grad_itself(kl_clip):
    """The update lands in the .grad tensors the backward made (same storage), with no update
    array kept, and equals the one-call path's ν · update."""
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    x, y = batch(model, 8, 5)
    pre = tt.TENGraD(model, damping=0.1, kl_clip=kl_clip, lr=0.5 if kl_clip else None)
    F.cross_entropy(model(x), y).backward()
    storage = [p.grad.data_ptr() for p in model.parameters()]
    pre.step()
    assert [p.grad.data_ptr() for p in model.parameters()] == storage
    assert all(layer.updates is None for layer in pre._layers)
    if kl_clip:
        assert pre.last_nu < 1
    # Against an unclipped TENGraD on a copy (the one-call path's update) times ν.
    ref = tt.TENGraD(twin, damping=0.1)
    F.cross_entropy(twin(x), y).backward()
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        want = q.grad.double() * pre.last_nu
        assert ((p.grad.double() - want).norm() / want.norm()).item() <= 1e-6


def test_step_with_a_non_contiguous_grad_goes_through_the_kept_arrays():
    torch.manual_seed(1)
    model = cnn().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x, y = batch(model, 6, 9)
    pre, ref = tt.TENGraD(model, damping=0.1), tt.TENGraD(twin, damping=0.1)
    F.cross_entropy(model(x.to(memory_format=torch.channels_last)), y).backward()
    F.cross_entropy(twin(x), y).backward()
    conv = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert conv and not dict(model.named_modules())[conv[0]].weight.grad.is_contiguous()
    pre.step()
    ref.step()
    assert any(layer.updates is not None for layer in pre._layers)  # the channels_last conv's
    # torch's channels_last convolutions round differently: as test_channels_last_model_matches_the_contiguous_one.
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
