"""tengrad.torch against a dense float64 oracle built from per-sample gradients that PyTorch
itself computes (torch.func.vmap over torch.func.grad). Tolerance 1e-3 relative (the contract's
bound); observed errors are ~1e-6."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import tengrad.torch as tt
from oracle import damped_solve, relative_error

TOL = 1e-3


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=1, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1, bias=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def batch(model, m, seed):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model[0], nn.Conv2d):
        return torch.randn(m, 2, 8, 8, generator=g), torch.randint(0, 3, (m,), generator=g)
    return torch.randn(m, 6, generator=g), torch.randint(0, 4, (m,), generator=g)


# Modules whose weight (and bias) form one exact block; a norm's [γ | β] rows are a permutation of
# the library's layout, which leaves (F + λI)⁻¹ v unchanged.
BLOCKS = (nn.Linear, nn.Conv2d, nn.LayerNorm)


def per_sample_grads(model, x, labels):
    """{param name: [m, *param.shape]}: gradient of each sample's own cross-entropy."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)


def block(name, module, tensors_w, tensors_b):
    """Rows [weight row | bias] flattened, for a weight-like tensor with a leading batch dim or not."""
    w = tensors_w.reshape(*tensors_w.shape[:-module.weight.dim()], module.weight.shape[0], -1)
    if tensors_b is not None:
        w = torch.cat([w, tensors_b[..., None]], dim=-1)
    return w.reshape(*tensors_w.shape[:-module.weight.dim()], -1).double()


def oracle_updates(model, per_sample, grads, damping):
    """{layer name: (F + λI)⁻¹ grad} per Linear/Conv2d block, F from the per-sample gradients."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, BLOCKS):
            continue
        pb = per_sample.get(f"{name}.bias")
        U = block(name, module, per_sample[f"{name}.weight"], pb).numpy().T  # d × m
        v = block(name, module, grads[f"{name}.weight"], grads.get(f"{name}.bias")).numpy()
        out[name] = damped_solve(U, damping, v)
    return out


def tengrad_updates(model):
    return {name: block(name, module, module.weight.grad, module.bias.grad if module.bias is not None else None).numpy()
            for name, module in model.named_modules() if isinstance(module, BLOCKS)}


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("fast_path", [True, False])
def test_empirical_fisher_matches_oracle(make, fast_path):
    torch.manual_seed(0)
    model = make()
    x, y = batch(model, 10, 1)
    ps = per_sample_grads(model, x, y)
    mean = {k: v.mean(0) for k, v in ps.items()}
    want = oracle_updates(model, ps, mean, 0.05)
    pre = tt.TENGraD(model, damping=0.05, fisher="empirical", fast_path=fast_path)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    got = tengrad_updates(model)
    for name in want:
        assert relative_error(got[name], want[name]) <= TOL, name


@pytest.mark.parametrize("make", [mlp, cnn])
def test_sampled_fisher_matches_oracle(make):
    torch.manual_seed(0)
    model = make()
    x, y = batch(model, 9, 2)
    logits = model(x)
    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
    ps = per_sample_grads(model, x, labels)  # the sampled labels' per-sample gradients
    real = {k: v.detach() for k, v in zip([n for n, _ in model.named_parameters()],
                                           torch.autograd.grad(F.cross_entropy(logits, y), list(model.parameters())))}
    want = oracle_updates(model, ps, real, 0.1)
    pre = tt.TENGraD(model, damping=0.1, fisher="sampled")
    logits = model(x)
    pre.sample_fisher(logits, generator=torch.Generator().manual_seed(5))
    assert all(p.grad is None for p in model.parameters())  # .grad untouched by the curvature pass
    F.cross_entropy(logits, y).backward()
    pre.step()
    got = tengrad_updates(model)
    for name in want:
        assert relative_error(got[name], want[name]) <= TOL, name


@pytest.mark.parametrize("blas_threads", ["auto", 0, 2])
def test_refresh_interval_reuses_the_snapshot(blas_threads):
    torch.manual_seed(0)
    model = mlp()
    plain = copy.deepcopy(model)    # per-sample gradients from an unhooked twin
    pre = tt.TENGraD(model, damping=0.1, fisher="empirical", update_freq=2, blas_threads=blas_threads)
    x1, y1 = batch(model, 8, 3)
    x2, y2 = batch(model, 8, 4)
    ps1 = per_sample_grads(plain, x1, y1)
    F.cross_entropy(model(x1), y1).backward()
    pre.step()                      # refresh from batch 1
    model.zero_grad()
    ps2 = per_sample_grads(plain, x2, y2)
    F.cross_entropy(model(x2), y2).backward()
    pre.step()                      # batch 2's gradient, batch 1's curvature
    want = oracle_updates(model, ps1, {k: v.mean(0) for k, v in ps2.items()}, 0.1)
    got = tengrad_updates(model)
    for name in want:
        assert relative_error(got[name], want[name]) <= TOL
    assert pre.layer_stats("0")["batch"] == 8
    with pytest.raises(ValueError):
        tt.TENGraD(model, blas_threads="many")


def test_kl_clip_scales_every_update_by_nu():
    torch.manual_seed(0)
    model = mlp()
    reference = copy.deepcopy(model)
    x, y = batch(model, 8, 6)
    lr, kappa = 0.5, 1e-6
    clipped = tt.TENGraD(model, damping=0.1, kl_clip=kappa, lr=lr)
    unclipped = tt.TENGraD(reference, damping=0.1)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    clipped.step()
    unclipped.step()
    total = sum((p.grad.double() * g.double()).sum().item() for p, g in zip(reference.parameters(), grads))
    expected = min(1.0, (kappa / (lr * lr * total)) ** 0.5)
    nu = clipped.last_nu
    assert nu < 1 and abs(nu - expected) <= 1e-4 * expected
    # ν is folded into the library's products ((ν/λ) v − (ν/λ) U x, written over .grad) rather than
    # multiplying the finished update: the same numbers to float32 rounding, element by element
    # except where v and U x cancel, so compared in norm, per parameter.
    for p, q in zip(model.parameters(), reference.parameters()):
        want = q.grad.double() * nu
        assert ((p.grad.double() - want).norm() / want.norm()).item() <= 1e-6


def test_a_callable_lr_follows_the_optimizers_scheduler():
    """lr=callable: each step reads it, so KL clipping follows a scheduler without set_lr and
    equals a TENGraD given each step's lr by set_lr; a callable that fails or returns a bad
    value makes step() raise with every .grad unchanged, and a retry succeeds."""
    torch.manual_seed(1)
    model = mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    follows = tt.TENGraD(model, damping=0.1, kl_clip=1e-5, lr=lambda: opt.param_groups[0]["lr"], update_freq=2)
    manual = tt.TENGraD(twin, damping=0.1, kl_clip=1e-5, lr=0.5, update_freq=2)
    nus = []
    for step in range(4):
        x, y = batch(model, 8, 20 + step)
        for m in (model, twin):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
        manual.set_lr(sched.get_last_lr()[0])
        follows.step()
        manual.step()
        nus.append(follows.last_nu)
        assert follows.lr == manual.lr == opt.param_groups[0]["lr"]
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad)
        opt.step()
        with torch.no_grad():
            for q in twin.parameters():
                q.add_(q.grad, alpha=-manual.lr)
        sched.step()
    assert all(nu < 1 for nu in nus) and len(set(nus)) == 4  # the clip saw four learning rates
    x, y = batch(model, 8, 30)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    for bad in (lambda: float("nan"), lambda: -1.0, lambda: 1 / 0):
        follows.set_lr(bad)
        with pytest.raises((ValueError, ZeroDivisionError)):
            follows.step()
        assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    follows.set_lr(lambda: 0.1)
    follows.step()
    assert follows.lr == 0.1 and not all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    # state_dict keeps the lr last read; a callable never read saves none, and a numeric lr stays
    fresh = tt.TENGraD(mlp(), damping=0.1, kl_clip=1e-5, lr=lambda: 0.2)
    fresh.model(batch(model, 4, 31)[0])
    saved = fresh.state_dict()
    assert saved["lr"] is None
    fresh.remove()
    numeric = tt.TENGraD(fresh.model, damping=0.1, kl_clip=1e-5, lr=0.3)
    numeric.load_state_dict(saved)
    assert numeric.lr == 0.3


def test_short_training_run_reduces_the_loss():
    torch.manual_seed(0)
    model = cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 1, 4:].mean((1, 2))).long() + (x.mean((1, 2, 3)) > 0).long()
    pre = tt.TENGraD(model, damping=0.3, fisher="sampled", kl_clip=1e-2, lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        start = F.cross_entropy(model(x), y).item()
    for step in range(40):
        idx = torch.randperm(64, generator=g)[:32]
        opt.zero_grad()
        logits = model(x[idx])
        pre.sample_fisher(logits, generator=g)
        F.cross_entropy(logits, y[idx]).backward()
        pre.step()
        opt.step()
    with torch.no_grad():
        end = F.cross_entropy(model(x), y).item()
    assert end < 0.7 * start, (start, end)


def test_state_dict_round_trip_gives_identical_steps():
    torch.manual_seed(0)
    model = cnn()
    pre = tt.TENGraD(model, damping=0.2, fisher="empirical", update_freq=3)
    for s in range(2):
        x, y = batch(model, 6, 10 + s)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    saved_model, saved_pre = copy.deepcopy(model.state_dict()), pre.state_dict()
    twin = cnn()
    twin.load_state_dict(saved_model)
    twin_pre = tt.TENGraD(twin, damping=5.0)
    twin_pre.load_state_dict(saved_pre)
    assert twin_pre.damping == 0.2 and twin_pre.steps == 2
    x, y = batch(model, 6, 20)      # step 3 reuses the snapshot of step 1: comes from the state
    for m, p in ((model, pre), (twin, twin_pre)):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        p.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_clear_errors():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))
    pre = tt.TENGraD(Twice())
    with pytest.raises(RuntimeError, match="ran twice in one forward"):
        pre.model(torch.randn(3, 4))
    double = mlp().double()
    tt_double = tt.TENGraD(double)
    with pytest.raises(TypeError, match="float32"):
        double(torch.randn(3, 6, dtype=torch.float64))
    model = mlp()
    pre = tt.TENGraD(model)
    model.eval()
    F.cross_entropy(model(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(RuntimeError, match="eval mode"):
        pre.step()
    with pytest.raises(ValueError, match="no nn.Linear"):
        tt.TENGraD(nn.ReLU())
    with pytest.raises(RuntimeError, match="sampled"):
        tt.TENGraD(mlp()).sample_fisher(torch.randn(2, 4))
    tt_double.remove()


def test_skip_list_by_name_and_type():
    assert tt.TENGraD(cnn(), skip=[nn.Conv2d]).layer_names == ["6"]
    assert tt.TENGraD(cnn(), skip=["0"]).layer_names == ["2", "6"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        tt.TENGraD(cnn(), skip=["6", nn.Conv2d])


@pytest.mark.parametrize("make", [mlp, cnn])
def test_paper_protocol_sampled_fisher_reuse_and_damping_schedule(make):
    """The paper's protocol: sampled-label Fisher refreshed every T steps (the extra backward only
    on refresh steps) and reused in between; a damping change between steps keeps the snapshot.
    Each reuse step must equal the dense oracle of the refresh batch's sampled Fisher applied to
    the new batch's gradient, at the damping of that step."""
    torch.manual_seed(0)
    model = make()
    plain = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.1, fisher="sampled", update_freq=3)
    x1, y1 = batch(model, 9, 30)
    logits = model(x1)
    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
    ps = per_sample_grads(plain, x1, labels)       # the refresh batch's sampled per-sample gradients
    pre.sample_fisher(logits, generator=torch.Generator().manual_seed(7))
    F.cross_entropy(logits, y1).backward()
    pre.step()
    assert pre.layer_stats(pre.layer_names[0])["batch"] == 9
    for step, damping in ((1, 0.1), (2, 0.4)):      # reuse steps; a damping schedule in between
        pre.set_damping(damping)
        model.zero_grad()
        x, y = batch(model, 5, 40 + step)
        logits = model(x)
        calls = []
        original = pre._pre.update_curvature
        pre._pre.update_curvature = lambda *a, **k: calls.append(a) or original(*a, **k)
        pre.sample_fisher(logits)                    # a no-op on a reuse step: no extra backward
        assert all(p.grad is None for p in model.parameters())
        F.cross_entropy(logits, y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        pre.step()
        pre._pre.update_curvature = original
        assert not calls                             # the snapshot was reused, not refreshed
        want = oracle_updates(model, ps, grads, damping)
        got = tengrad_updates(model)
        for name in want:
            assert relative_error(got[name], want[name]) <= TOL, (step, name)
        assert pre.layer_stats(pre.layer_names[0])["damping"] == damping


def test_momentum_and_weight_decay_come_from_the_users_optimizer():
    """TENGraD rewrites .grad; momentum and weight decay are the torch optimizer's, applied to the
    preconditioned gradient exactly as to any gradient."""
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    buf = {n: torch.zeros_like(p) for n, p in twin.named_parameters()}
    for s in range(3):
        x, y = batch(model, 6, 50 + s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        updates = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        with torch.no_grad():                        # the same SGD by hand from the updates
            for n, p in twin.named_parameters():
                d = updates[n] + 1e-3 * p
                buf[n] = d if s == 0 else 0.9 * buf[n] + d
                p.sub_(0.1 * buf[n])
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_reuse_threads_follow_the_host_spin():
    """blas_threads="auto" gives reuse steps OpenBLAS's threads only when torch's OpenMP workers
    stop spinning soon after each op (read from the environment libgomp read)."""
    from tengrad.torch.options import short_host_spin as _short_host_spin
    assert _short_host_spin({"GOMP_SPINCOUNT": "10000"})
    assert _short_host_spin({"OMP_WAIT_POLICY": "PASSIVE"})
    assert not _short_host_spin({})
    assert not _short_host_spin({"GOMP_SPINCOUNT": "30000000"})
    assert not _short_host_spin({"GOMP_SPINCOUNT": "infinite"})
    assert not _short_host_spin({"OMP_WAIT_POLICY": "active"})
