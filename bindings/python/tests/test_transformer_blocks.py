"""Standard PyTorch transformer modules through tengrad.torch, every parameter on an exact block:
``nn.TransformerEncoder`` (packed ``nn.MultiheadAttention``, ``nn.LayerNorm``, MLP), a GPT-style
pre-norm decoder (token and position ``nn.Embedding``, causal ``nn.MultiheadAttention``,
``nn.RMSNorm``), language-model logits
[B, T, V] for the sampled Fisher. Each block's update is checked against the dense float64
oracle (F + λI)⁻¹ v with F from per-sequence gradients PyTorch computes (torch.func.vmap of grad
over the unhooked model); the test lists each parameter and its block. The explicit attention
that makes the projections visible is checked against PyTorch's own forward."""
import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import tengrad.torch as tt  # noqa: E402
from tengrad.torch import attention  # noqa: E402
from tengrad.torch.modules import bias_of  # noqa: E402

TOL = 1e-3
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


class Encoder(nn.Module):
    def __init__(self, d=8, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, d)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x, pad=None):                      # x [B, T, 6]; pad [B, T], True = padding
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=pad)
        if not self.batch_first:
            h = h.transpose(0, 1)
        keep = torch.ones(h.shape[:2]) if pad is None else (~pad).float()
        return self.head((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))


class DecoderBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        T = x.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token ids [B, T] through nn.Embedding; position embeddings from ids expanded to [B, T]
    (each sequence's own ids: an exact block; shared ids [T] get the plain gradient)."""

    def __init__(self, vocab=7, d=8, heads=2, blocks=2, T=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.Sequential(*(DecoderBlock(d, heads) for _ in range(blocks)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        positions = torch.arange(x.shape[1]).expand(x.shape)
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos(positions))))


def blocks(pre, model):
    """{layer name: [parameter names]} of every block, from the hooked modules."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {layer.name: [names[id(p)] for p in (layer.module.weight, bias_of(layer.module)) if p is not None]
            for layer in pre._layers}


def check_blocks(model, table, rows, vectors, damping):
    """Each block's .grad against (F + λI)⁻¹ v, F = (1/m) U Uᵀ from the per-sequence rows."""
    params = dict(model.named_parameters())
    for layer, names in table.items():
        U = torch.cat([rows[n].reshape(rows[n].shape[0], -1) for n in names], 1).double().numpy()
        v = torch.cat([vectors[n].reshape(-1) for n in names]).double().numpy()
        want = np.linalg.solve(U.T @ U / U.shape[0] + damping * np.eye(U.shape[1]), v)
        got = torch.cat([params[n].grad.reshape(-1) for n in names]).double().numpy()
        assert np.linalg.norm(got - want) <= TOL * np.linalg.norm(want), layer


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_every_parameter_on_an_exact_block(batch_first, padded):
    torch.manual_seed(0)
    model = Encoder(batch_first=batch_first)
    m, T = 7, 5
    x, y = torch.randn(m, T, 6), torch.randint(0, 3, (m,))
    pad = (torch.arange(T)[None] >= torch.tensor([5, 4, 3, 5, 2, 5, 4])[:, None]) if padded else None
    args = (x,) if pad is None else (x, pad)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi, *pi):
        return F.cross_entropy(functional_call(model, p, (xi[None],) + tuple(q[None] for q in pi)), yi[None])
    rows = vmap(grad(loss), in_dims=(None, 0, 0) + (0,) * (pad is not None))(params, x, y, *(() if pad is None else (pad,)))
    pre = tt.TENGraD(model, damping=0.05, fisher="empirical")
    table = blocks(pre, model)
    layers = ["embed"] + [f"encoder.layers.{i}.{n}" for i in range(2) for n in
                          ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2", "norm1", "norm2")] + ["head"]
    assert sorted(table) == sorted(layers) and not pre.skipped
    assert table["encoder.layers.0.self_attn.in_proj"] == ["encoder.layers.0.self_attn.in_proj_weight",
                                                           "encoder.layers.0.self_attn.in_proj_bias"]
    covered = [n for names in table.values() for n in names]
    assert sorted(covered) == sorted(n for n, _ in model.named_parameters())  # every parameter, once
    F.cross_entropy(model(*args), y).backward()
    pre.step()
    check_blocks(model, table, rows, {k: v.mean(0) for k, v in rows.items()}, 0.05)


def test_gpt_decoder_sampled_fisher_over_tokens_and_reuse():
    """A pre-norm causal decoder, LM logits [B, T, V], sampled labels per token with a mask."""
    torch.manual_seed(1)
    model = GPT()
    m, T, V = 6, 5, 7
    x = torch.randint(0, V, (m, T))
    targets = torch.randint(0, V, (m, T))
    mask = torch.arange(T)[None] < torch.tensor([5, 3, 5, 4, 5, 2])[:, None]
    with torch.no_grad():
        flat = model(x).reshape(-1, V)
        labels = torch.multinomial(torch.softmax(flat, -1), 1, generator=torch.Generator().manual_seed(3)).reshape(m, T)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sampled(p, xi, li, ki):
        logits = functional_call(model, p, (xi[None],))[0]
        return (F.cross_entropy(logits, li, reduction="none") * ki).sum()
    rows = vmap(grad(sampled), in_dims=(None, 0, 0, 0))(params, x, labels, mask.float())
    pre = tt.TENGraD(model, damping=0.1, fisher="sampled", update_freq=2)
    table = blocks(pre, model)
    covered = [n for names in table.values() for n in names]
    assert sorted(covered) == sorted(params) and not pre.skipped  # every parameter, once
    assert table["embed"] == ["embed.weight"] and table["pos"] == ["pos.weight"]
    assert "blocks.0.attn.in_proj" in table and "blocks.1.norm1" in table and table["blocks.1.norm1"] == ["blocks.1.norm1.weight"]
    for step in range(2):                                # a refresh, then a reuse step on a new batch
        xs = x if step == 0 else torch.randint(0, V, (m, T))
        logits = model(xs)
        if step == 0:
            pre.sample_fisher(logits, generator=torch.Generator().manual_seed(3), mask=mask)
        model.zero_grad()
        F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        pre.step()
        check_blocks(model, table, rows, grads, 0.1)


def test_sample_fisher_refuses_bad_masks_and_1d_logits():
    torch.manual_seed(0)
    model = GPT()
    pre = tt.TENGraD(model, fisher="sampled")
    logits = model(torch.randint(0, 7, (2, 5)))
    for bad, match in [(torch.ones(2, 4), "shape"), (torch.full((2, 5), 0.5), "1 for a token")]:
        with pytest.raises(ValueError, match=match):
            pre.sample_fisher(logits, mask=bad)
    with pytest.raises(ValueError, match="logits"):
        pre.sample_fisher(logits[0, 0])


CASES = [  # (batch_first, kind, masks, need_weights, average)
    (True, "self", "none", False, True), (False, "self", "kpm-bool", False, True),
    (True, "self", "causal", True, True), (True, "cross", "attn-float", True, False),
    (False, "distinct", "both", True, True), (True, "self", "kpm-float-3d", False, True),
    (True, "unbatched", "attn-bool", True, True),
]


@pytest.mark.parametrize("batch_first,kind,masks,need_weights,average", CASES)
def test_explicit_attention_equals_pytorch(batch_first, kind, masks, need_weights, average):
    """Outputs, attention weights and input gradients of the explicit forward equal PyTorch's."""
    torch.manual_seed(2)
    B, T, S, E, H = 3, 4, 6, 8, 2
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    q = torch.randn(B, T, E) if batch_first else torch.randn(T, B, E)
    kv = torch.randn(B, S, E) if batch_first else torch.randn(S, B, E)
    if kind == "self":
        query = key = value = q
        S = T
    elif kind == "cross":
        query, key, value = q, kv, kv
    elif kind == "distinct":
        query, key, value = q, kv, torch.randn_like(kv)
    else:  # unbatched [T, E]
        query = key = value = torch.randn(T, E)
        S = T
    kw = {"need_weights": need_weights, "average_attn_weights": average}
    if masks in ("kpm-bool", "both"):
        kw["key_padding_mask"] = torch.arange(S)[None].expand(B, S) >= torch.tensor([S, S - 1, 2])[:, None]
    if masks == "kpm-float-3d":
        kw["key_padding_mask"] = torch.zeros(B, S).masked_fill_(torch.arange(S)[None] >= 3, float("-inf"))
        kw["attn_mask"] = torch.randn(B * H, T, S)
    if masks == "causal":
        kw["attn_mask"], kw["is_causal"] = torch.triu(torch.ones(T, T, dtype=torch.bool), 1), True
    if masks in ("attn-float", "both"):
        kw["attn_mask"] = torch.randn(T, S)
    if masks == "attn-bool":
        kw["attn_mask"] = torch.triu(torch.ones(T, S, dtype=torch.bool), 1)
    inputs = [t.clone().requires_grad_() for t in {id(t): t for t in (query, key, value)}.values()]
    lookup = {id(t): i for i, t in enumerate({id(t): t for t in (query, key, value)}.values())}
    args = [inputs[lookup[id(t)]] for t in (query, key, value)]
    twin = copy.deepcopy(mha)
    want_out, want_w = mha(*args, **kw)
    want_out.square().sum().backward()
    want_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    model = nn.Sequential(twin)
    pre = tt.TENGraD(model)
    assert type(twin) is attention.Attention
    got_out, got_w = twin(*args, **kw)
    got_out.square().sum().backward()
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    else:
        assert got_w is None and want_w is None
    for t, w in zip(inputs, want_grads):
        torch.testing.assert_close(t.grad, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(twin.in_proj_weight.grad, mha.in_proj_weight.grad, rtol=1e-4, atol=1e-5)
    pre.remove()


def test_copies_of_a_hooked_attention_are_plain():
    torch.manual_seed(0)
    model = Encoder()
    pre = tt.TENGraD(model)
    attn = model.encoder.layers[0].self_attn
    assert type(attn) is attention.Attention
    teacher = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (teacher, loaded):
        assert type(other.encoder.layers[0].self_attn) is nn.MultiheadAttention
        x = torch.randn(2, 5, 6)
        torch.testing.assert_close(other(x), model(x))
    pre.remove()
    assert type(attn) is nn.MultiheadAttention


@pytest.mark.parametrize("norm", ["layer-2d", "layer-nobias", "rms"])
def test_norm_blocks_match_oracle(norm):
    """Norms over a 2-D normalized shape, without β, and RMSNorm, on [B, features] and tokens."""
    torch.manual_seed(3)
    if norm == "layer-2d":
        model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(-1, (2, 3)), nn.LayerNorm((2, 3)), nn.Flatten(1), nn.Linear(6, 3))
        x = torch.randn(8, 4)
    else:
        n = nn.LayerNorm(6, bias=False) if norm == "layer-nobias" else nn.RMSNorm(6, eps=1e-5)
        model = nn.Sequential(nn.Linear(4, 6), n, nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(8, 3, 4)
    with torch.no_grad():
        model[2 if norm == "layer-2d" else 1].weight.uniform_(0.5, 1.5)
    y = torch.randint(0, 3, (8,))

    def out(o):
        return o if o.dim() == 2 else o.mean(1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = vmap(grad(lambda p, xi, yi: F.cross_entropy(out(functional_call(model, p, (xi[None],))), yi[None])),
                in_dims=(None, 0, 0))(params, x, y)
    pre = tt.TENGraD(model, damping=0.02)
    table = blocks(pre, model)
    assert sorted(n for names in table.values() for n in names) == sorted(params)
    F.cross_entropy(out(model(x)), y).backward()
    pre.step()
    check_blocks(model, table, rows, {k: v.mean(0) for k, v in rows.items()}, 0.02)


def test_norm_without_affine_parameters_is_skipped_with_a_note():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=False), nn.Linear(6, 3))
    pre = tt.TENGraD(model)
    assert pre.layer_names == ["0", "2"] and "elementwise_affine" in pre.skipped["1"]


def test_token_mask_skips_layers_that_are_not_over_tokens():
    """A conv stem before sequence layers, all under one token_mask: the mask applies to the
    sequence layers only (the conv input is NCHW, not [batch, tokens, features])."""
    class ConvStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.norm, self.head = nn.Conv2d(1, 4, 2, stride=2), nn.LayerNorm(4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.norm(self.stem(x).flatten(2).transpose(1, 2))).mean(1)
    torch.manual_seed(0)
    model = ConvStem()
    pre = tt.TENGraD(model)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 3] = False
    with pre.token_mask(mask):
        out = model(torch.randn(3, 1, 4, 4))
    assert [c.mask is None for layer in pre._layers for c in layer.captures] == [True, False, False]
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    pre.step()
