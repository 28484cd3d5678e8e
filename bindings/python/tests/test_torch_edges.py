"""Muon's split: ``edges(model)`` names the input layer, the classifier, embeddings and norms;
``TENGraD(model, skip=edges(model))`` preconditions the hidden layers only, exactly (dense float64
oracle), leaves the edges' gradients untouched, and ``parameters()`` / ``other_parameters()``
partition the model's trainable parameters."""
import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tengrad.torch as tt  # noqa: E402
from test_torch import batch, cnn  # noqa: E402
from test_torch_base import per_sample_rows  # noqa: E402


class TinyViT(nn.Module):
    def __init__(self, width=8, classes=3):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.pos = nn.Embedding(5, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(self.ln(self.encoder(h)).mean(1))


def test_edges_name_the_input_layer_classifier_embeddings_and_norms():
    assert tt.edges(cnn()) == ["0", "6"]
    assert tt.edges(nn.Sequential(nn.Linear(3, 3))) == ["0"]  # one layer: both edges
    assert tt.edges(nn.Sequential(nn.LayerNorm(3), nn.ReLU())) == ["0"]
    assert tt.edges(nn.Sequential(nn.ReLU())) == []
    model = TinyViT()
    names = tt.edges(model)
    assert names[:2] == ["embed", "head"]
    assert set(names[2:]) == {"pos", "ln"} | {f"encoder.layers.{i}.norm{j}" for i in (0, 1) for j in (1, 2)}
    assert not any("out_proj" in n for n in names)  # an attention's projections are hidden layers
    pre = tt.TENGraD(model, skip=names)
    try:
        assert set(pre.layer_names) == {f"encoder.layers.{i}.{k}" for i in (0, 1)
                                        for k in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")}
        mine, rest = pre.parameters(), pre.other_parameters()
        assert {id(p) for p in mine}.isdisjoint(id(p) for p in rest)
        assert sorted(map(id, mine + rest)) == sorted(id(p) for p in model.parameters())
        assert {id(p) for p in rest} >= {id(model.embed.weight), id(model.pos.weight), id(model.ln.weight),
                                         id(model.head.bias)}
    finally:
        pre.remove()


def test_other_parameters_leave_out_frozen_ones():
    model = cnn()
    model[0].bias.requires_grad_(False)
    pre = tt.TENGraD(model, skip=tt.edges(model))
    assert [id(p) for p in pre.parameters()] == [id(model[2].weight)]
    assert [id(p) for p in pre.other_parameters()] == [id(model[0].weight), id(model[6].weight), id(model[6].bias)]
    pre.remove()


@pytest.mark.parametrize("damping", [0.1, 3.0])
def test_hidden_layer_matches_the_oracle_and_edges_keep_their_gradients(damping):
    torch.manual_seed(0)
    model = cnn()
    clean = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=damping, skip=tt.edges(model))
    x, y = batch(model, 7, seed=1)
    for step in range(2):  # the second step reuses nothing stale: update_freq=1 refreshes every step
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        pre.step()
        clean.load_state_dict(model.state_dict())
        u = per_sample_rows(model, clean, x, y, [model[2].weight])
        m, d = u.shape
        g = u.mean(0)
        want = torch.linalg.solve(u.T @ u / m + damping * torch.eye(d, dtype=torch.float64), g)
        got = model[2].weight.grad.double().reshape(-1)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item()), step
        for n, p in model.named_parameters():
            if not n.startswith("2."):
                assert torch.equal(p.grad, plain[n]), n
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    pre.remove()
