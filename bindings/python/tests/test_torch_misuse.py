"""tengrad.torch under ordinary PyTorch habits: skipped batches, validation forwards, gradient
accumulation, failed and retried steps, tied weights, unused heads, frozen biases, channels_last,
checkpointing, torch.compile, and clear errors. Each either works (checked against the dense
float64 oracle of test_torch) or is refused with a clear error and changes nothing."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tengrad.torch as tt
from oracle import relative_error
from test_torch import TOL, batch, cnn, mlp, oracle_updates, per_sample_grads, tengrad_updates


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def empirical_step(model, pre, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()


def test_forward_without_step_then_a_normal_step():
    torch.manual_seed(0)
    model = mlp()
    plain = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.1)
    x0, y0 = batch(model, 5, 1)
    F.cross_entropy(model(x0), y0)                       # a skipped batch: no backward, no step
    model(x0)                                            # a validation forward in train mode
    x, y = batch(model, 8, 2)
    empirical_step(model, pre, x, y)                     # used to raise "called twice"
    ps = per_sample_grads(plain, x, y)
    want = oracle_updates(model, ps, {k: v.mean(0) for k, v in ps.items()}, 0.1)
    got = tengrad_updates(model)
    for name in want:
        assert relative_error(got[name], want[name]) <= TOL


@pytest.mark.parametrize("fast_path", [True, False])
def test_gradient_accumulation_uses_the_union_of_micro_batches(fast_path):
    torch.manual_seed(0)
    model = cnn()
    plain = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.1, fast_path=fast_path)
    (x1, y1), (x2, y2) = batch(model, 4, 3), batch(model, 4, 4)
    model.zero_grad()
    for x, y in ((x1, y1), (x2, y2)):                    # the standard recipe: loss / k
        (F.cross_entropy(model(x), y) / 2).backward()
    pre.step()
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    ps = per_sample_grads(plain, x, y)
    want = oracle_updates(model, ps, {k: v.mean(0) for k, v in ps.items()}, 0.1)
    got = tengrad_updates(model)
    for name in want:
        assert relative_error(got[name], want[name]) <= TOL, name
    assert pre.layer_stats("0")["batch"] == 8


def test_failed_step_changes_no_grad_and_a_retry_is_a_clean_step():
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    pre = tt.TENGraD(model, fisher="empirical", kl_clip=1e-3, lr=0.1, update_freq=1, fast_path=False)
    clean = tt.TENGraD(twin, fisher="empirical", kl_clip=1e-3, lr=0.1, update_freq=1, fast_path=False)
    x, y = batch(model, 6, 5)
    for m in (model, twin):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    model[2].bias.grad[0] = float("nan")                 # the last layer fails
    before = grads_of(model)
    with pytest.raises(Exception, match="NaN"):
        pre.step()
    after = grads_of(model)
    for name in before:                                  # nothing was rewritten, not even layer 0
        assert torch.equal(before[name].view(torch.int32), after[name].view(torch.int32)), name  # bitwise (NaN)
    model[2].bias.grad.copy_(twin[2].bias.grad)          # fix the cause and retry
    pre.step()
    clean.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), n
    assert pre.steps == 1


def test_lr_zero_means_no_clipping_and_set_lr_is_validated():
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    pre = tt.TENGraD(model, kl_clip=1e-9, lr=0.1)
    ref = tt.TENGraD(twin)
    pre.set_lr(0.0)                                      # a cosine schedule's last value
    x, y = batch(model, 6, 6)
    empirical_step(model, pre, x, y)
    empirical_step(twin, ref, x, y)
    assert pre.last_nu == 1.0
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            pre.set_lr(bad)
    assert pre.lr == 0.0


def test_tied_weights_are_refused_with_their_names():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ValueError, match=r"'0' and '2' share one weight.*skip=\['2'\]"):
        tt.TENGraD(nn.Sequential(a, nn.ReLU(), b))
    tt.TENGraD(nn.Sequential(a, nn.ReLU(), b), skip=["2"])   # the suggested way out works


def test_kl_clipping_counts_only_the_layers_updated_in_this_step():
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x, head):
            return (self.a if head == "a" else self.b)(torch.relu(self.body(x)))
    model = TwoHeads()
    pre = tt.TENGraD(model, kl_clip=1e-6, lr=1.0)
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    for head in ("a", "b", "a"):                         # head b gets no .grad in the last step
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, head), y).backward()
        pre.step()
    assert model.b.weight.grad is None
    terms = sum(pre.layer_stats(n)["update_dot_grad"] for n in ("body", "a"))
    assert pre.last_nu == pytest.approx(min(1.0, (1e-6 / terms) ** 0.5), rel=1e-9)


def test_frozen_bias_gives_the_weight_only_block():
    torch.manual_seed(0)
    model = mlp()
    model[0].bias.requires_grad_(False)
    plain = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.1)
    x, y = batch(model, 7, 7)
    empirical_step(model, pre, x, y)
    ps = per_sample_grads(plain, x, y)
    ps.pop("0.bias")
    want = oracle_updates(model, ps, {k: v.mean(0) for k, v in ps.items()}, 0.1)
    got = tengrad_updates(model)
    assert relative_error(got["2"], want["2"]) <= TOL
    w = model[0].weight.grad.reshape(-1).double().numpy()
    assert relative_error(w, want["0"]) <= TOL
    assert model[0].bias.grad is None


def test_channels_last_model_matches_the_contiguous_one():
    torch.manual_seed(0)
    model = cnn()
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    pre, pre2 = tt.TENGraD(model), tt.TENGraD(twin)
    x, y = batch(model, 6, 8)
    empirical_step(model, pre, x, y)
    empirical_step(twin, pre2, x.to(memory_format=torch.channels_last), y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_is_not_a_second_forward():
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    pre, ref = tt.TENGraD(model), tt.TENGraD(twin)
    x, y = batch(model, 6, 9)
    model.zero_grad()
    F.cross_entropy(checkpoint(model, x, use_reentrant=False), y).backward()
    pre.step()
    empirical_step(twin, ref, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_clear_errors_name_the_layer_and_the_way_out():
    with pytest.raises(ValueError, match=r"'0'.*padding_mode='reflect'.*skip=\['0'\]"):
        tt.TENGraD(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(2, 2)))
    torch.manual_seed(0)
    model = mlp()
    pre = tt.TENGraD(model, fisher="sampled")
    x, y = batch(model, 4, 10)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    with pytest.raises(RuntimeError, match="before loss.backward"):
        pre.sample_fisher(logits)
    # load_state_dict into a model with other linear widths
    src = mlp()
    src_pre = tt.TENGraD(src)
    empirical_step(src, src_pre, *batch(src, 4, 11))
    other = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 4))
    with pytest.raises(ValueError, match=r"layer '0'.*LinearSpec\(in_features=6, out_features=5"):
        tt.TENGraD(other).load_state_dict(src_pre.state_dict())
    pre.remove()
    with pytest.raises(RuntimeError, match="removed"):
        pre.step()


def test_torch_compile_default_settings():
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    pre, ref = tt.TENGraD(model), tt.TENGraD(twin)
    compiled = torch.compile(model)
    for s in range(3):                                   # step 2 used to crash inside the hook
        x, y = batch(model, 6, 20 + s)
        model.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        pre.step()
        empirical_step(twin, ref, x, y)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_training_without_torch_compile_never_imports_dynamo():
    """Dynamo costs 2 s to import (most of a data-parallel worker's start-up); the hooks are kept
    out of torch.compile's tracing without loading it in a process that never compiles."""
    import os
    import subprocess
    import sys
    code = ("import sys, torch, torch.nn.functional as F\n"
            "import tengrad.torch as tt\n"
            "model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))\n"
            "pre = tt.TENGraD(model, fisher='sampled')\n"
            "for s in range(2):\n"
            "    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))\n"
            "    model.zero_grad(); logits = model(x); pre.sample_fisher(logits)\n"
            "    F.cross_entropy(logits, y).backward(); pre.step()\n"
            "print('torch._dynamo' in sys.modules)\n")
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(tt.__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_of_integration_calls(seed):
    """Random sequences of forward/backward (micro-batches), forwards without backward, eval
    forwards, steps, failing steps, state_dict round trips, damping and lr changes. After every
    call: either it succeeded (a step's update matches the oracle built from the micro-batches it
    consumed) or it raised and no .grad changed."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = mlp()
    plain = copy.deepcopy(model)
    damping = 0.1
    pre = tt.TENGraD(model, damping=damping, fast_path=bool(seed % 2), kl_clip=None)
    pending = []                                          # micro-batches with a backward since the last step
    k = 2                                                 # the accumulation recipe: each loss / k
    failed = False                                        # the last step raised: a backward starts a new batch
    for _ in range(40):
        op = rng.choice(["backward", "backward", "forward", "eval", "step", "step", "bad-step", "state", "damping", "lr"])
        if op == "backward" and failed:                   # moving on from a failed batch, as a trainer would
            model.zero_grad(set_to_none=True)
            pending, failed = [], False
        if op == "backward" and len(pending) < k:
            x, y = batch(model, 4, int(rng.integers(1 << 30)))
            (F.cross_entropy(model(x), y) / k).backward()
            pending.append((x, y))
        elif op == "forward":
            model(batch(model, 3, int(rng.integers(1 << 30)))[0])
        elif op == "eval":
            model.eval()
            model(batch(model, 3, 0)[0])
            model.train()
        elif op == "bad-step" and pending:
            before = grads_of(model)
            model[0].weight.grad[0, 0] = float("inf")
            with pytest.raises(Exception, match="NaN or Inf"):
                pre.step()
            failed = True
            model[0].weight.grad[0, 0] = before["0.weight"][0, 0]
            for name, g in grads_of(model).items():
                assert torch.equal(g, before[name]), name
        elif op == "step" and len(pending) == k:
            for p, q in zip(plain.parameters(), model.parameters()):
                p.data.copy_(q.data)
            x = torch.cat([b[0] for b in pending])
            y = torch.cat([b[1] for b in pending])
            ps = per_sample_grads(plain, x, y)
            want = oracle_updates(model, ps, {n: p.grad.double() for n, p in model.named_parameters()}, damping)
            pre.step()
            got = tengrad_updates(model)
            for name in want:
                assert relative_error(got[name], want[name]) <= TOL, (seed, name)
            model.zero_grad(set_to_none=True)
            pending, failed = [], False
            with torch.no_grad():                         # move the weights a little, like a trainer
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        elif op == "state":
            pre.load_state_dict(pre.state_dict())
        elif op == "damping":
            damping = float(rng.choice([0.05, 0.1, 0.5]))
            pre.set_damping(damping)
        elif op == "lr":
            pre.set_lr(float(rng.choice([0.0, 0.1])))
