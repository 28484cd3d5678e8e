"""Ordinary training habits that used to give silently wrong updates (issue 18, single process):
each against the dense float64 oracle of test_torch, or a clear error that changes nothing."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tengrad.torch as tt
from oracle import relative_error
from test_torch import TOL, batch, mlp, oracle_updates, per_sample_grads, tengrad_updates


def current_grads(model):
    return {n: p.grad.double() for n, p in model.named_parameters()}


def check(model, want):
    got = tengrad_updates(model)
    for name in want:
        assert relative_error(got[name], want[name]) <= TOL, name


def test_two_forwards_before_one_backward_use_both_batches():
    """loss = CE(model(x1)) + CE(model(x2)): the block of all 8 samples (each forward's mean loss
    gives its samples the scale 4), not x2's alone."""
    torch.manual_seed(0)
    model = mlp()
    x1, y1 = batch(model, 4, 1)
    x2, y2 = batch(model, 4, 2)
    ps = per_sample_grads(model, torch.cat([x1, x2]), torch.cat([y1, y2]))
    pre = tt.TENGraD(model, damping=0.1)
    (F.cross_entropy(model(x1), y1) + F.cross_entropy(model(x2), y2)).backward()
    want = oracle_updates(model, ps, current_grads(model), 0.1)
    pre.step()
    check(model, want)


def test_a_nan_batch_does_not_block_the_next_clean_batch():
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    pre, fresh = tt.TENGraD(model, damping=0.1), tt.TENGraD(twin, damping=0.1)
    x, y = batch(model, 6, 3)
    bad = x.clone()
    bad[2, 1] = float("nan")
    F.cross_entropy(model(bad), y).backward()
    with pytest.raises(Exception, match="NaN or Inf"):
        pre.step()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()             # the next batch: clean
    pre.step()
    F.cross_entropy(twin(x), y).backward()
    fresh.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_a_failed_step_retried_without_a_new_backward_is_the_same_batch():
    torch.manual_seed(1)
    model = mlp()
    x, y = batch(model, 6, 4)
    ps = per_sample_grads(model, x, y)
    pre = tt.TENGraD(model, damping=0.1)
    F.cross_entropy(model(x), y).backward()
    want = oracle_updates(model, ps, current_grads(model), 0.1)
    saved = model[0].weight.grad[0, 0].item()
    model[0].weight.grad[0, 0] = float("inf")            # step() raises and writes nothing
    with pytest.raises(Exception, match="NaN or Inf"):
        pre.step()
    model[0].weight.grad[0, 0] = saved
    model(x)                                             # a validation forward in train mode: no backward
    pre.step()                                           # the retry: the same batch
    check(model, want)


@pytest.mark.parametrize("max_norm", [1e-2, 1e-4])
def test_clipped_gradients_are_preconditioned_as_they_are(max_norm):
    torch.manual_seed(0)
    model = mlp()
    x, y = batch(model, 8, 5)
    ps = per_sample_grads(model, x, y)
    pre = tt.TENGraD(model, damping=0.1)                 # empirical, refreshed every step: the defaults
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    want = oracle_updates(model, ps, current_grads(model), 0.1)
    pre.step()
    check(model, want)


def test_an_extra_loss_term_reaches_the_update():
    torch.manual_seed(0)
    model = mlp()
    x, y = batch(model, 8, 6)
    ps = per_sample_grads(model, x, y)
    pre = tt.TENGraD(model, damping=0.1)
    loss = F.cross_entropy(model(x), y) + 0.5 * sum((p ** 2).sum() for p in model.parameters())
    loss.backward()
    want = oracle_updates(model, ps, current_grads(model), 0.1)
    pre.step()
    check(model, want)


def test_a_second_tengrad_on_one_model_is_refused_until_the_first_is_released():
    model = mlp()
    first = tt.TENGraD(model)
    with pytest.raises(ValueError, match="already preconditioned by another TENGraD"):
        tt.TENGraD(model)
    first.remove()
    second = tt.TENGraD(model)                           # after remove(): fine
    assert tt.release(model) == 1                        # a notebook whose variable is gone
    assert second._removed
    tt.TENGraD(model)


@pytest.mark.parametrize("values, match", [
    (lambda m: m.float() * 0.5, "other values"),
    (lambda m: m.float() * 2, "other values"),
    (lambda m: torch.where(m, 0.0, float("nan")), "other values"),
    (lambda m: torch.where(m, 0.0, -math.inf), "other values"),   # an additive attention mask
    (lambda m: ~m.new_ones(m.shape), "no token"),                 # key_padding_mask of an unpadded batch
])
def test_token_masks_with_other_conventions_are_refused(values, match):
    model = nn.Sequential(nn.Linear(4, 3))
    pre = tt.TENGraD(model)
    tokens = torch.ones(2, 5, dtype=torch.bool)
    tokens[1, 3:] = False
    with pytest.raises(ValueError, match=match):
        with pre.token_mask(values(tokens)):
            pass
    with pre.token_mask(tokens):                         # bool, True = token
        model(torch.randn(2, 5, 4))
    with pre.token_mask(tokens.to(torch.uint8)):         # 0/1
        model(torch.randn(2, 5, 4))


def _fast_and_slow(make, loss_fn, reduction, x, y):
    out = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = make()
        pre = tt.TENGraD(model, damping=0.1, loss_reduction=reduction, fast_path=fast)
        loss_fn(model(x), y).backward()
        pre.step()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fast_path_equals_preconditioning_grad_over_samples(reduction):
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    fast, slow = _fast_and_slow(mlp, lambda o, t: F.cross_entropy(o, t, reduction=reduction), reduction, x, y)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "tokens"])
def test_fast_path_equals_preconditioning_grad_over_tokens(reduction):
    """nn.Linear over [B, T, d] with the loss averaged over all B·T tokens (loss_reduction = B·T,
    as README says), summed, or the default: the fast path was off by T or 1/m."""
    torch.manual_seed(0)
    B, T = 4, 6
    x, y = torch.randn(B, T, 5), torch.randint(0, 3, (B, T))

    def make():
        return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))

    def loss_fn(o, t):
        return F.cross_entropy(o.reshape(-1, 3), t.reshape(-1), reduction="sum" if reduction == "sum" else "mean")
    fast, slow = _fast_and_slow(make, loss_fn, float(B * T) if reduction == "tokens" else reduction, x, y)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_multihead_attention_gets_both_blocks_or_a_note():
    """MHA reads its projections' weights inside F.multi_head_attention_forward (hooking out_proj
    made every step() raise). Now both projections are blocks (``attn.in_proj``, ``attn.out_proj``);
    an attention that cannot run explicitly (kdim ≠ embed_dim) has both skipped with a note and
    its gradients left as they are."""
    torch.manual_seed(0)
    model = Attention()
    pre = tt.TENGraD(model, damping=0.1)
    assert pre.layer_names == ["attn.in_proj", "attn.out_proj", "head"] and not pre.skipped
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    before = model.attn.in_proj_weight.grad.clone()
    pre.step()
    assert not torch.allclose(model.attn.in_proj_weight.grad, before)
    pre.remove()
    assert type(model.attn) is nn.MultiheadAttention  # PyTorch's own class again

    model.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
    pre = tt.TENGraD(model, damping=0.1)
    assert "kdim" in pre.skipped["attn.out_proj"] and pre.layer_names == ["head"]
    k = torch.randn(4, 5, 6)
    F.cross_entropy(model.head(model.attn(x, k, k)[0].mean(1)), y).backward()
    before = model.attn.out_proj.weight.grad.clone()
    pre.step()
    torch.testing.assert_close(model.attn.out_proj.weight.grad, before)


def test_copies_and_saved_models_of_a_hooked_model():
    """copy.deepcopy(model) (EMA teachers, best-model snapshots) and torch.save(model) work with
    TENGraD attached; the copy is not hooked (its forwards feed nothing) and the original still is."""
    import io
    torch.manual_seed(0)
    model = mlp()
    x, y = batch(model, 6, 7)
    ps = per_sample_grads(model, x, y)
    pre = tt.TENGraD(model, damping=0.1)
    teacher = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (teacher, loaded):
        for p, q in zip(other.parameters(), model.parameters()):
            assert torch.equal(p, q)
        F.cross_entropy(other(x + 1), y).backward()     # a forward and backward of the copy: not captured
    F.cross_entropy(model(x), y).backward()
    want = oracle_updates(model, ps, current_grads(model), 0.1)
    pre.step()
    check(model, want)
    tt.TENGraD(teacher)                                  # the copy is free to get its own


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 4)

        self.both = True

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.a(h) + self.b(h) if self.both else self.a(h)


def test_an_unused_head_with_zeroed_grads_is_left_alone():
    """zero_grad(set_to_none=False) leaves an unused head's .grad at zero (not None): no update,
    no error (README: unused layers in a step are fine)."""
    torch.manual_seed(0)
    model = TwoHeads()
    pre = tt.TENGraD(model, damping=0.1)
    for s in range(3):
        model.both = s == 0                              # head b is used in the first step only
        model.zero_grad(set_to_none=False)
        x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
        F.cross_entropy(model(x), y).backward()
        pre.step()
        if s > 0:
            assert torch.equal(model.b.weight.grad, torch.zeros_like(model.b.weight))


def test_freezing_a_bias_after_the_first_forward_names_the_bias():
    torch.manual_seed(0)
    model = mlp()
    pre = tt.TENGraD(model, damping=0.1)
    x, y = batch(model, 5, 8)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="layer '0': its bias was frozen after its first forward"):
        model(x)
