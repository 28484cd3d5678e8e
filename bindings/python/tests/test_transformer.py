"""A 2-block transformer whose attention is written by hand of nn.Linear (separate q, k, v, output
projections and MLP, as many codebases do; patch embedding on [batch, T, p] tokens, classifier on
the pooled [batch, d]) through tengrad.torch:
every Linear's and LayerNorm's update equals the dense float64 oracle's (F + λI)⁻¹ grad with F
from per-sequence gradients that PyTorch computes (torch.func.vmap of grad over the whole model).
The position embedding (a bare parameter) stays unpreconditioned (its .grad is the plain
gradient). Tolerance 1e-3."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tengrad.torch as tt  # noqa: E402
from oracle import relative_error  # noqa: E402
from test_torch import oracle_updates, per_sample_grads, tengrad_updates  # noqa: E402

TOL = 1e-3


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, patch=6, tokens=5, d=8, heads=2, blocks=2, classes=3):
        super().__init__()
        self.embed = nn.Linear(patch, d)
        self.pos = nn.Parameter(0.1 * torch.randn(tokens, d))
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(blocks)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):                                   # x: [batch, tokens, patch]
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.ln(x).mean(1))


def data(m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 5, 6, generator=g), torch.randint(0, 3, (m,), generator=g)


def test_transformer_empirical_fisher_matches_oracle():
    torch.manual_seed(0)
    model = TinyTransformer()
    x, y = data(7, 1)
    ps = per_sample_grads(model, x, y)                       # per-sequence gradients
    mean = {k: v.mean(0) for k, v in ps.items()}
    want = oracle_updates(model, ps, mean, 0.05)
    pre = tt.TENGraD(model, damping=0.05, fisher="empirical")
    assert len(pre.layer_names) == 1 + 2 * (6 + 2) + 1 + 1  # embed, blocks (6 linear, 2 norms), ln, head
    F.cross_entropy(model(x), y).backward()
    pre.step()
    got = tengrad_updates(model)
    for name in want:
        assert relative_error(got[name], want[name]) <= TOL, name
    np.testing.assert_allclose(model.pos.grad.numpy(), mean["pos"].numpy(), rtol=1e-4, atol=1e-6)  # not preconditioned


def test_transformer_sampled_fisher_and_reuse_match_oracle():
    torch.manual_seed(1)
    model = TinyTransformer()
    pre = tt.TENGraD(model, damping=0.1, fisher="sampled", update_freq=2)
    for step in range(2):                                   # a refresh, then a reuse step on a new batch
        x, y = data(6, 10 + step)
        if step == 0:
            # the oracle first (its functional forwards would count as new forwards), with the
            # labels sample_fisher will draw from the same logits and generator seed
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(model(x), -1), 1,
                                           generator=torch.Generator().manual_seed(3)).squeeze(-1)
            ps = per_sample_grads(model, x, labels)
            logits = model(x)
            pre.sample_fisher(logits, generator=torch.Generator().manual_seed(3))
        else:
            logits = model(x)
        model.zero_grad()
        F.cross_entropy(logits, y).backward()
        real = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        want = oracle_updates(model, ps, real, 0.1)         # the step-0 snapshot, this step's gradient
        pre.step()
        got = tengrad_updates(model)
        for name in want:
            assert relative_error(got[name], want[name]) <= TOL, (step, name)


def test_token_mask_reaches_the_library():
    """pre.token_mask(mask) around the forward: each sequence layer's curvature excludes the
    padded tokens — the updates equal the core library's on the same inputs, output gradients and
    mask (and differ from unmasked ones, since the loss here also reaches padded positions); two
    accumulated micro-batches, one masked and one not, use the union of their masks."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    x = torch.randn(5, 7, 4)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[1, 4:], mask[3, 2:] = False, False
    pre = tt.TENGraD(model, damping=0.1, fisher="empirical")
    kept = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: kept.__setitem__(n, (i[0].detach(), o)))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with pre.token_mask(mask):
        out = model(x)
    outs = {n: o for n, (_, o) in kept.items()}
    for o in outs.values():
        o.retain_grad()
    loss = (out ** 2).mean()                                # reaches padded positions too
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre.step()
    for h in hooks:
        h.remove()
    from tengrad import Preconditioner
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        a, g = kept[name][0].numpy(), outs[name].grad.numpy()
        v = (grads[f"{name}.weight"].numpy(), grads[f"{name}.bias"].numpy())
        with Preconditioner(damping=0.1) as p:
            layer = p.add_linear(module.in_features, module.out_features)
            p.update_curvature(layer, a, g, 5.0, mask=mask.numpy())
            want = p.precondition(layer, *v)
            p.update_curvature(layer, a, g, 5.0)
            unmasked = p.precondition(layer, *v)
        np.testing.assert_allclose(module.weight.grad.numpy(), want[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(module.bias.grad.numpy(), want[1], rtol=1e-5, atol=1e-7)
        assert not np.allclose(want[0], unmasked[0], rtol=1e-3)
    with pytest.raises(ValueError, match="token_mask has shape"):
        with pre.token_mask(torch.ones(5, 6)):
            model(x)
    del grads

    # Accumulation: a masked micro-batch, then an unmasked one; the refresh uses their union.
    model.zero_grad()
    pre.remove()
    pre2 = tt.TENGraD(model, damping=0.1, fisher="empirical")
    kept.clear()
    caught = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: caught.setdefault(n, []).append((i[0].detach(), o)))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    x2 = torch.randn(5, 7, 4)
    with pre2.token_mask(mask):
        out1 = model(x)
    for n in caught:
        caught[n][-1][1].retain_grad()
    ((out1 ** 2).mean() / 2).backward()
    out2 = model(x2)
    for n in caught:
        caught[n][-1][1].retain_grad()
    ((out2 ** 2).mean() / 2).backward()
    for h in hooks:
        h.remove()
    raw = {n: (m.weight.grad.clone().numpy(), m.bias.grad.clone().numpy())
           for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pre2.step()
    union = np.concatenate([mask.numpy(), np.ones((5, 7), bool)])
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        a = np.concatenate([c[0].numpy() for c in caught[name]])
        g = np.concatenate([c[1].grad.numpy() for c in caught[name]])
        with Preconditioner(damping=0.1) as p:
            layer = p.add_linear(module.in_features, module.out_features)
            p.update_curvature(layer, a, g, 10.0, mask=union)
            want = p.precondition(layer, *raw[name])
        np.testing.assert_allclose(module.weight.grad.numpy(), want[0], rtol=1e-5, atol=1e-7)


def test_parameters_are_the_preconditioned_ones():
    model = TinyTransformer()
    pre = tt.TENGraD(model, skip=["head"])
    mine = {id(p) for p in pre.parameters()}
    for name, p in model.named_parameters():
        assert (id(p) in mine) == (name not in ("pos",) and not name.startswith("head")), name


def test_micro_batches_of_different_lengths_join_with_padding():
    """Gradient accumulation over sequences of lengths 4 and 6: the refresh equals the library's
    on the union padded to 6 tokens with the padding masked."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    pre = tt.TENGraD(model, damping=0.2, fisher="empirical", fast_path=False)
    caught = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: caught.setdefault(n, []).append((i[0].detach(), o)))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for T in (4, 6):
        out = model(torch.randn(3, T, 3))
        for n in caught:
            caught[n][-1][1].retain_grad()
        (out.sum(1) ** 2).mean().backward()
    for h in hooks:
        h.remove()
    raw = {n: (m.weight.grad.clone().numpy(), m.bias.grad.clone().numpy())
           for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pre.step()
    from tengrad import Preconditioner
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        (a4, o4), (a6, o6) = caught[name]
        a = np.zeros((6, 6, a4.shape[-1]), np.float32)
        g = np.zeros((6, 6, o4.shape[-1]), np.float32)
        mask = np.zeros((6, 6), bool)
        a[:3, :4], g[:3, :4], mask[:3, :4] = a4.numpy(), o4.grad.numpy(), True
        a[3:], g[3:], mask[3:] = a6.numpy(), o6.grad.numpy(), True
        with Preconditioner(damping=0.2) as p:
            layer = p.add_linear(module.in_features, module.out_features)
            p.update_curvature(layer, a, g, 6.0, mask=mask)
            want = p.precondition(layer, *raw[name])
        np.testing.assert_allclose(module.weight.grad.numpy(), want[0], rtol=1e-5, atol=1e-7)
