"""Per-layer step-size grafting (``TENGraD(graft=...)``): each layer's update has TENGraD's
direction (the ungrafted update of a twin) and the reference step's norm — the gradient's
("sgd") or an Adam step's g / (√v̂ + ε) with v tracked here over steps ("adam"); KL clipping sums
the grafted ⟨update, grad⟩; the moments advance only on success and resume from state_dict."""
import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import tengrad.torch as tt  # noqa: E402
from test_torch import batch, cnn, mlp  # noqa: E402


def layer_params(model):
    """[(weight, bias)] of the hooked layers, in order."""
    return [(m.weight, m.bias) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def step(model, pre, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = [[p.grad.clone() for p in pair if p is not None] for pair in layer_params(model)]
    pre.step()
    return raw, [[p.grad.clone() for p in pair if p is not None] for pair in layer_params(model)]


def norm(tensors):
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


@pytest.mark.parametrize("graft", ["sgd", "adam"])
@pytest.mark.parametrize("make", [mlp, cnn])
def test_direction_is_tengrads_and_norm_the_references(graft, make):
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.1, graft=graft)
    plain = tt.TENGraD(twin, damping=0.1)
    v = None
    for s in range(3):
        x, y = batch(model, 8, s)
        raw, got = step(model, pre, x, y)
        _, want = step(twin, plain, x, y)
        if graft == "adam":
            v = [[torch.zeros_like(g, dtype=torch.float64) for g in gs] for gs in raw] if v is None else v
            v = [[0.999 * vv + 0.001 * g.double() ** 2 for vv, g in zip(vs, gs)] for vs, gs in zip(v, raw)]
        for i, (r, g, w) in enumerate(zip(raw, got, want)):
            if graft == "sgd":
                reference = norm(r)
            else:
                reference = norm([gg.double() / ((vv / (1 - 0.999 ** (s + 1))).sqrt() + 1e-8) for gg, vv in zip(r, v[i])])
            assert norm(g) == pytest.approx(reference, rel=1e-5)
            cos = sum(float((a.double() * b.double()).sum()) for a, b in zip(g, w)) / (norm(g) * norm(w))
            assert cos == pytest.approx(1.0, abs=1e-6)
        # the twins stay equal: give both models the same weights for the next step
        twin.load_state_dict(model.state_dict())


def test_kl_clipping_sums_the_grafted_products():
    torch.manual_seed(1)
    model = mlp()
    lr, kappa = 0.5, 1e-4
    pre = tt.TENGraD(model, damping=0.1, graft="sgd", kl_clip=kappa, lr=lr)
    x, y = batch(model, 8, 0)
    raw, got = step(model, pre, x, y)
    total = sum(float((u.double() * g.double()).sum()) for us, gs in zip(got, raw) for u, g in zip(us, gs)) / pre.last_nu
    assert pre.last_nu < 1
    assert pre.last_nu == pytest.approx(min(1.0, math.sqrt(kappa / (lr * lr * total))), rel=1e-6)


def test_moments_advance_only_on_success_and_resume():
    torch.manual_seed(2)
    model = mlp()
    pre = tt.TENGraD(model, damping=0.1, graft="adam")
    x, y = batch(model, 8, 0)
    step(model, pre, x, y)
    saved_model, saved = copy.deepcopy(model.state_dict()), pre.state_dict()
    before = {k: v.clone() for k, (v, _) in pre._moments.items()}
    x, y = batch(model, 8, 1)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(Exception):
        pre.step()
    assert all(torch.equal(before[k], v) for k, (v, _) in pre._moments.items())
    model[0].weight.grad[0, 0] = 0.0
    pre.step()
    first = [p.grad.clone() for p in model.parameters()]
    # A fresh run resumed from the state after step 1 gives the same step 2.
    other = mlp()
    other.load_state_dict(saved_model)
    resumed = tt.TENGraD(other, damping=0.1, graft="adam")
    resumed.load_state_dict(saved)
    other.zero_grad()
    F.cross_entropy(other(x), y).backward()
    other[0].weight.grad[0, 0] = 0.0
    resumed.step()
    for a, b in zip(first, other.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="graft"):
        tt.TENGraD(mlp(), graft="shampoo")
