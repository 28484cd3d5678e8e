"""The embedding kind: ``Preconditioner.add_embedding`` (token ids in, one-hots never formed) and
``nn.Embedding`` through tengrad.torch — padding_idx and token masks, 1-D ids, gradient
accumulation over different lengths, per-token mode — against the dense float64 oracle built
from one-hot per-sample gradients (numpy) or torch.func per-sequence gradients; ids shared by the
batch (position embeddings called with [T] or [1, T]) keep the plain gradient with one warning;
embeddings without a per-sample block are skipped with a note; bad ids change nothing."""
import warnings

import numpy as np
import pytest

import tengrad

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import tengrad.torch as tt  # noqa: E402

TOL = 1e-3


def oracle_rows(ids, g, V, mask=None, scale=1.0):
    """U (m × V·D, float64) of an embedding: row v of sample i sums g over its tokens with id v."""
    m, T, D = g.shape
    U = np.zeros((m, V, D))
    for i in range(m):
        for t in range(T):
            if mask is None or mask[i, t]:
                U[i, ids[i, t]] += scale * g[i, t]
    return U.reshape(m, -1)


def solve(U, v, damping):
    return np.linalg.solve(U.T @ U / U.shape[0] + damping * np.eye(U.shape[1]), v)


def test_numpy_api_matches_the_oracle_and_refuses_bad_ids():
    rng = np.random.default_rng(0)
    V, D, m, T = 9, 4, 6, 5
    ids = rng.integers(0, V, (m, T))
    ids[:, 0] = 3  # every sample shares an id
    g = rng.standard_normal((m, T, D)).astype(np.float32)
    mask = np.arange(T)[None] < np.array([5, 3, 5, 4, 1, 5])[:, None]
    with tengrad.Preconditioner(damping=0.05) as p:
        layer = p.add_embedding(V, D)
        assert p.array_shapes(layer).weight == (V, D) and p.array_shapes(layer).activations == ()
        U = oracle_rows(ids, g, V, mask, scale=2.0)
        w, b = p.natural_gradient(layer, ids, g, 2.0, mask=mask)
        assert b is None and w.shape == (V, D)
        want = solve(U, U.mean(0), 0.05)
        assert np.linalg.norm(w.ravel() - want) <= TOL * np.linalg.norm(want)
        # Float ids are the same call; the rows are the oracle's.
        rows = p.per_sample_gradients(layer, ids.astype(np.float32), g, 2.0, mask=mask)
        np.testing.assert_allclose(rows, U, rtol=1e-5, atol=1e-5)
        p.update_curvature(layer, ids, g, 2.0, mask=mask)
        v = rng.standard_normal((V, D)).astype(np.float32)
        w2, _ = p.precondition(layer, v)
        want = solve(U, v.ravel().astype(np.float64), 0.05)
        assert np.linalg.norm(w2.ravel() - want) <= TOL * np.linalg.norm(want)
        before = p.save_state()
        for bad in (V, -1, 2**40):
            wrong = ids.copy()
            wrong[2, 1] = bad
            with pytest.raises(tengrad.TengradError, match="token id"):
                p.update_curvature(layer, wrong, g, 1.0)
        fractional = ids.astype(np.float32)
        fractional[0, 0] = 0.5
        with pytest.raises(tengrad.TengradError, match="not an integer"):
            p.natural_gradient(layer, fractional, g, 1.0)
        with pytest.raises(ValueError, match="output_grads"):
            p.update_curvature(layer, ids, g[:, :, :3].copy(), 1.0)
        assert p.save_state() == before


class Tagger(nn.Module):
    """Token ids → embedding (with a padding id) → linear, a label per sequence."""

    def __init__(self, V=11, d=6, padding_idx=0):
        super().__init__()
        self.embed = nn.Embedding(V, d, padding_idx=padding_idx)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


def per_sequence_rows(model, loss, *data):
    params = {k: v.detach() for k, v in model.named_parameters()}
    return vmap(grad(lambda p, *d: loss(functional_call(model, p, tuple(x[None] for x in d[:-1])), d[-1][None])),
                in_dims=(None,) + (0,) * len(data))(params, *data)


def check(model, rows, names, damping, vector=None):
    params = dict(model.named_parameters())
    U = torch.cat([rows[n].reshape(rows[n].shape[0], -1) for n in names], 1).double().numpy()
    v = U.mean(0) if vector is None else vector
    want = solve(U, v, damping)
    got = torch.cat([params[n].grad.reshape(-1) for n in names]).double().numpy()
    assert np.linalg.norm(got - want) <= TOL * np.linalg.norm(want), names


@pytest.mark.parametrize("masked", [False, True])
def test_embedding_with_padding_idx_and_token_mask(masked):
    torch.manual_seed(0)
    model = Tagger()
    m, T = 8, 6
    ids = torch.randint(1, 11, (m, T))
    ids[:, -1] = 0  # padding_idx: no gradient, nothing in the curvature
    ids[:4, 0] = 5
    y = torch.randint(0, 3, (m,))
    rows = per_sequence_rows(model, F.cross_entropy, ids, y)
    assert not rows["embed.weight"][:, 0].any()
    pre = tt.TENGraD(model, damping=0.05)
    assert pre.layer_names == ["embed", "head"]
    if masked:  # a mask of all tokens: the same block (padding_idx still excluded)
        with pre.token_mask(torch.ones(m, T, dtype=torch.bool)):
            out = model(ids)
    else:
        out = model(ids)
    F.cross_entropy(out, y).backward()
    pre.step()
    check(model, rows, ["embed.weight"], 0.05)
    check(model, rows, ["head.weight", "head.bias"], 0.05)
    assert not model.embed.weight.grad[0].any()
    assert pre.layer_stats("embed")["kind"] == tengrad._lib.LAYER_EMBEDDING


def test_one_id_per_sample_and_accumulated_lengths():
    """Class embeddings [B] (one id per sample), then two micro-batches of token ids of different
    lengths accumulated into one refresh (padded and masked by the library's rules)."""
    torch.manual_seed(1)
    cls = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3))
    labels, y = torch.randint(0, 5, (9,)), torch.randint(0, 3, (9,))
    rows = per_sequence_rows(cls, F.cross_entropy, labels, y)
    pre = tt.TENGraD(cls, damping=0.1)
    F.cross_entropy(cls(labels), y).backward()
    pre.step()
    check(cls, rows, ["0.weight"], 0.1)
    pre.remove()

    model = Tagger(padding_idx=None)
    a, b = torch.randint(0, 11, (3, 4)), torch.randint(0, 11, (2, 6))
    ya, yb = torch.randint(0, 3, (3,)), torch.randint(0, 3, (2,))
    ra, rb = per_sequence_rows(model, F.cross_entropy, a, ya), per_sequence_rows(model, F.cross_entropy, b, yb)
    pre = tt.TENGraD(model, damping=0.1, loss_reduction="sum")
    for ids, yy in ((a, ya), (b, yb)):
        F.cross_entropy(model(ids), yy, reduction="sum").backward()
    pre.step()
    rows = {k: torch.cat([ra[k], rb[k]]) for k in ra}
    params = dict(model.named_parameters())
    U = rows["embed.weight"].reshape(5, -1).double().numpy()
    want = solve(U, U.sum(0), 0.1)  # sum-reduced losses: the summed gradient
    got = params["embed.weight"].grad.reshape(-1).double().numpy()
    assert np.linalg.norm(got - want) <= TOL * np.linalg.norm(want)


class Positional(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(8, 4), nn.Linear(4, 3)

    def forward(self, ids):
        T = ids.shape[1]
        positions = {"T": torch.arange(T), "1T": torch.arange(T)[None], "BT": torch.arange(T).expand(ids.shape)}[self.shape]
        return self.head((self.tok(ids) + self.pos(positions)).mean(1))


@pytest.mark.parametrize("shape,T", [("T", 5), ("1T", 5), ("T", 4)])  # T = 4 = B: ambiguous, counted as shared
def test_shared_position_ids_keep_the_plain_gradient_with_one_warning(shape, T):
    torch.manual_seed(2)
    model = Positional(shape)
    ids, y = torch.randint(0, 7, (4, T)), torch.randint(0, 3, (4,))
    pre = tt.TENGraD(model, damping=0.1)
    for step in range(2):
        model.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(ids)
        assert len([w for w in caught if "'pos'" in str(w.message)]) == (1 if step == 0 else 0)
        F.cross_entropy(out, y).backward()
        plain = model.pos.weight.grad.clone()
        pre.step()
        assert torch.equal(model.pos.weight.grad, plain)  # untouched
    assert id(model.pos.weight) not in {id(p) for p in pre.parameters()}
    assert id(model.tok.weight) in {id(p) for p in pre.parameters()}
    # The token embedding still has its exact block.
    expanded = Positional("BT")
    expanded.load_state_dict(model.state_dict())
    rows = per_sequence_rows(expanded, F.cross_entropy, ids, y)
    model.zero_grad()
    F.cross_entropy(model(ids), y).backward()
    pre.step()
    check(model, rows, ["tok.weight"], 0.1)


def test_embeddings_without_a_per_sample_block_are_skipped_with_a_note():
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Embedding(5, 3, scale_grad_by_freq=True),
                          nn.Embedding(5, 3, max_norm=1.0), nn.Linear(3, 2))
    pre = tt.TENGraD(model)
    assert pre.layer_names == ["3"]
    assert "sparse" in pre.skipped["0"] and "scale_grad_by_freq" in pre.skipped["1"] and "max_norm" in pre.skipped["2"]


def test_an_embedding_tied_to_the_head_is_left_to_the_head():
    torch.manual_seed(4)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.embed(ids))))
    model = Tied()
    pre = tt.TENGraD(model)
    assert pre.layer_names == ["mix", "head"] and "tied to 'head'" in pre.skipped["embed"]
    ids = torch.randint(0, 7, (3, 5))
    F.cross_entropy(model(ids).reshape(-1, 7), ids.reshape(-1)).backward()
    pre.step()
    assert torch.isfinite(model.head.weight.grad).all()


def test_float_input_to_an_embedding_is_refused():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    tt.TENGraD(model)
    with pytest.raises(ValueError, match="integer ids"):
        model(torch.zeros(2, 3))


def test_per_token_mode_equals_flattened_tokens():
    torch.manual_seed(3)
    model = Tagger(padding_idx=None)
    ids, y = torch.randint(0, 11, (4, 3)), torch.randint(0, 3, (4,))
    pre = tt.TENGraD(model, damping=0.1, token_mode="per-token", loss_reduction="sum")
    F.cross_entropy(model(ids), y, reduction="sum").backward()
    g = model.embed.weight.grad.clone()
    captured = pre._layers[0].captures[0]
    pre.step()
    a = captured.inputs.reshape(-1).numpy().astype(np.int64)
    gout = captured.grads.reshape(-1, 1, 6).numpy()
    U = oracle_rows(a[:, None], gout, 11)
    want = solve(U, g.reshape(-1).double().numpy(), 0.1)
    got = model.embed.weight.grad.reshape(-1).double().numpy()
    assert np.linalg.norm(got - want) <= TOL * np.linalg.norm(want)
