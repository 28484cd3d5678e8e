"""``TENGraD(base="adam")``: each layer's update is (F + λE)⁻¹ g against the dense float64 oracle,
F from torch.func per-sample gradients, E = diag(e) with e = √v̂ / mean(√v̂) clamped to
[0.1, 10] and v Adam's running average of the squared mean gradient, tracked here over steps;
the moments advance only on success and resume from state_dict."""
import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import tengrad.torch as tt  # noqa: E402
from test_torch import batch, cnn, mlp  # noqa: E402

BETA2 = 0.999


def hooked(model):
    """[(name, [weight, bias?])] of the layers TENGraD preconditions, in order."""
    return [(n, [p for p in (m.weight, m.bias) if p is not None]) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def per_sample_rows(model, clean, x, y, params):
    """U (m × d) of the listed parameters of ``model``: each sample's own loss gradient, flattened
    in order, computed on ``clean`` (the same network without TENGraD's hooks)."""
    names = {id(p): n for n, p in model.named_parameters()}
    detached = {n: p.detach() for n, p in model.named_parameters()}

    def loss(ps, xi, yi):
        return F.cross_entropy(functional_call(clean, ps, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(detached, x, y)
    return torch.cat([grads[names[id(p)]].reshape(x.shape[0], -1) for p in params], 1).double()


def assert_resumes(model, pre, make, options, steps):
    """A twin of ``model`` with a fresh TENGraD(**options) loading ``pre.state_dict()`` gives
    bit-identical updates to ``pre`` over ``steps``."""
    saved = pre.state_dict()
    twin = make()
    twin.load_state_dict(model.state_dict())
    other = tt.TENGraD(twin, **options)
    twin(batch(model, 8, 99)[0])  # registers the layers
    other.load_state_dict(saved)
    for s in steps:
        x, y = batch(model, 8, s)
        outs = []
        for m, p in ((model, pre), (twin, other)):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            p.step()
            outs.append([q.grad.clone() for q in m.parameters()])
        for a, b in zip(*outs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_updates_match_the_oracle_over_steps(make):
    torch.manual_seed(0)
    model = make()
    clean = copy.deepcopy(model)
    damping = 0.05
    pre = tt.TENGraD(model, damping=damping, base="adam")
    v = {}
    for s in range(3):
        x, y = batch(model, 8, s)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        layers = hooked(model)
        mean = {n: torch.cat([p.grad.detach().double().ravel() for p in ps]) for n, ps in layers}
        rows = {n: per_sample_rows(model, clean, x, y, ps) for n, ps in layers}
        pre.step()
        for n, ps in layers:
            g = mean[n]
            v[n] = BETA2 * v.get(n, torch.zeros_like(g)) + (1 - BETA2) * g * g
            root = (v[n] / (1 - BETA2 ** (s + 1))).sqrt()
            e = (root / root.mean()).clamp(0.1, 10.0)
            U = rows[n]
            want = torch.linalg.solve(U.T @ U / U.shape[0] + damping * torch.diag(e), g)
            got = torch.cat([p.grad.double().ravel() for p in ps])
            assert float((got - want).norm() / want.norm()) < 1e-3, (n, s)
            plain = torch.linalg.solve(U.T @ U / U.shape[0] + damping * torch.eye(len(g), dtype=torch.float64), g)
            if s > 0:
                assert float((got - plain).norm() / plain.norm()) > 1e-2  # the base matters
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad


def test_moments_resume_from_state_dict_and_bad_settings_are_refused():
    torch.manual_seed(1)
    model = mlp()
    pre = tt.TENGraD(model, damping=0.1, base="adam", update_freq=2)
    for s in range(3):
        x, y = batch(model, 8, s)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    assert_resumes(model, pre, mlp, dict(damping=0.1, base="adam", update_freq=2), range(3, 6))
    with pytest.raises(ValueError):
        tt.TENGraD(mlp(), base="rms")


def test_relative_damping_uses_each_blocks_average_eigenvalue():
    torch.manual_seed(3)
    model = cnn()
    clean = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.2, damping_mode="relative")
    x, y = batch(model, 8, 0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    layers = hooked(model)
    rows = {n: per_sample_rows(model, clean, x, y, ps) for n, ps in layers}
    pre.step()
    for n, _ in layers:
        U = rows[n]
        m, d = U.shape
        want = 0.2 * float(U.square().sum()) / m / min(m, d)
        assert pre.layer_stats(n)["damping"] == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError):
        tt.TENGraD(cnn(), damping_mode="trace")
