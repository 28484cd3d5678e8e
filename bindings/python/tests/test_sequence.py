"""Linear layers over token sequences (docs/DESIGN.md §12) against a dense float64 oracle whose
per-sequence gradients PyTorch computes itself (torch.func.vmap of torch.func.grad; a loop over
sequences when their lengths differ): F = (1/m) Σ u_i u_iᵀ + λI formed and solved densely.
T = 1 equals the plain layer, T > 1 and T varying between calls on one layer, masks (padding full
of NaN contributes nothing), bias on and off, both entry points, both Gram strategies and both
snapshot representations,
per-token mode against flattening, and bad input refused with the state unchanged.
Tolerance 1e-3 relative, as everywhere (observed ~1e-6)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.func import functional_call, grad, vmap  # noqa: E402

import tengrad  # noqa: E402

TOL = 1e-3


def make(seed, m, T, n_in, n_out, bias):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(n_in, n_out, bias=bias).double()
    x = torch.randn(m, T, n_in, generator=g, dtype=torch.float64)
    c = torch.randn(T, n_out, generator=g, dtype=torch.float64)  # a per-token loss weighting
    return layer, x, c


def sequence_loss(layer, params, x, c):
    """ℓ(sequence) = Σ_t Σ_o c[t, o] · sin(y[t, o]): tokens interact through the sum only."""
    y = functional_call(layer, params, (x,))
    return (c[: x.shape[0]] * torch.sin(y)).sum()


def oracle_rows(layer, x, c, lengths=None):
    """Per-sequence gradients [m, d] (weight flattened, then bias) by torch.func, and the output
    gradients dℓ_i/dy_i [m, T, out] that the library is given."""
    params = {k: v.detach() for k, v in layer.named_parameters()}
    if lengths is None:
        grads = vmap(grad(lambda p, xi: sequence_loss(layer, p, xi, c)), in_dims=(None, 0))(params, x)
        rows = [grads["weight"].reshape(len(x), -1)] + ([grads["bias"]] if "bias" in grads else [])
        u = torch.cat(rows, 1)
    else:
        u = []
        for i, n in enumerate(lengths):
            gi = grad(lambda p: sequence_loss(layer, p, x[i, :n], c))(params)
            u.append(torch.cat([gi["weight"].reshape(-1)] + ([gi["bias"]] if "bias" in gi else [])))
        u = torch.stack(u)
    y = layer(x).detach()
    dy = c[None, : x.shape[1]] * torch.cos(y)                  # dℓ/dy per token
    return u.numpy(), dy


def solve(u, damping, v):
    m, d = u.shape
    return np.linalg.solve(u.T @ u / m + damping * np.eye(d), v)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def flat(w, b):
    return np.concatenate([w.ravel(), b]) if b is not None else w.ravel()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("representation", ["raw", "per-sample"])
@pytest.mark.parametrize("strategy", ["factored", "explicit"])
def test_sequences_match_torch_func_oracle(bias, representation, strategy):
    n_in, n_out, damping = 5, 4, 0.1
    with tengrad.Preconditioner(damping=damping) as p:
        layer_id = p.add_linear(n_in, n_out, bias=bias)
        p.set_snapshot_representation(layer_id, representation)
        p.set_conv_strategy(layer_id, strategy)                     # the Gram of T > 1
        for seed, (m, T) in enumerate([(6, 1), (4, 7), (8, 3)]):       # T varies between calls
            layer, x, c = make(seed, m, T, n_in, n_out, bias)
            u, dy = oracle_rows(layer, x, c)
            a32, g32 = x.float().numpy(), dy.float().numpy()
            w, b = p.natural_gradient(layer_id, a32, g32, 1.0)
            assert rel(flat(w, b), solve(u, damping, u.mean(0))) <= TOL, (m, T)
            assert p.snapshot_info(layer_id)["representation"] == representation
            assert p.layer_stats(layer_id)["conv_strategy"] == (strategy if T > 1 else None)  # T = 1: no choice
            assert p.layer_stats(layer_id)["batch"] == m
            v = np.random.default_rng(seed).standard_normal(u.shape[1]).astype(np.float32)
            vw, vb = v[: n_in * n_out].reshape(n_out, n_in), (v[n_in * n_out:] if bias else None)
            p.update_curvature(layer_id, a32, g32, 1.0)
            w2, b2 = p.precondition(layer_id, vw, vb)
            assert rel(flat(w2, b2), solve(u, damping, v.astype(np.float64))) <= TOL, (m, T)


def test_t1_equals_the_plain_layer():
    layer, x, c = make(3, 6, 1, 4, 3, True)
    _, dy = oracle_rows(layer, x, c)
    with tengrad.Preconditioner() as p, tengrad.Preconditioner() as q:
        a, b = p.add_linear(4, 3), q.add_linear(4, 3)
        seq = p.natural_gradient(a, x.float().numpy(), dy.float().numpy(), 6.0)
        plain = q.natural_gradient(b, x[:, 0].float().contiguous().numpy(), dy[:, 0].float().contiguous().numpy(), 6.0)
        np.testing.assert_array_equal(seq[0], plain[0])
        np.testing.assert_array_equal(seq[1], plain[1])


@pytest.mark.parametrize("bias", [True, False])
def test_masks_match_the_unpadded_oracle(bias):
    """Sequences of lengths 5, 2, 4, 1 padded to T = 5 with NaN: the mask makes the padding count
    for nothing, so the result is the block of the unpadded sequences."""
    n_in, n_out, damping, lengths = 3, 2, 0.05, [5, 2, 4, 1]
    layer, x, c = make(11, len(lengths), 5, n_in, n_out, bias)
    u, dy = oracle_rows(layer, x, c, lengths)
    mask = np.zeros((len(lengths), 5), dtype=bool)
    a32, g32 = x.float().numpy().copy(), dy.float().numpy().copy()
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        a32[i, n:], g32[i, n:] = np.nan, np.nan
    with tengrad.Preconditioner(damping=damping) as p:
        layer_id = p.add_linear(n_in, n_out, bias=bias)
        w, b = p.natural_gradient(layer_id, a32, g32, 1.0, mask=mask)
        assert rel(flat(w, b), solve(u, damping, u.mean(0))) <= TOL
        ones = np.ones_like(mask)
        clean_a, clean_g = np.nan_to_num(a32), np.nan_to_num(g32)
        np.testing.assert_array_equal(p.natural_gradient(layer_id, clean_a, clean_g, 1.0, mask=ones)[0],
                                      p.natural_gradient(layer_id, clean_a, clean_g, 1.0)[0])


def test_per_token_mode_equals_flattening():
    layer, x, c = make(5, 3, 4, 3, 2, True)
    _, dy = oracle_rows(layer, x, c)
    a32, g32 = x.float().numpy(), dy.float().numpy()
    mask = np.ones((3, 4), dtype=np.uint8)
    mask[1, 2:] = 0
    with tengrad.Preconditioner() as p, tengrad.Preconditioner() as q:
        a, b = p.add_linear(3, 2), q.add_linear(3, 2)
        p.set_token_mode(a, "per-token")
        assert p.token_mode(a) == "per-token" and q.token_mode(b) == "per-sequence"
        got = p.natural_gradient(a, a32, g32, 2.0, mask=mask)
        keep = mask.reshape(-1).astype(bool)
        want = q.natural_gradient(b, np.ascontiguousarray(a32.reshape(-1, 3)[keep]),
                                  np.ascontiguousarray(g32.reshape(-1, 2)[keep]), 2.0)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert p.layer_stats(a)["batch"] == keep.sum()


def test_bad_sequence_input_is_refused_and_changes_nothing():
    layer, x, c = make(2, 2, 3, 2, 2, True)
    _, dy = oracle_rows(layer, x, c)
    a32, g32 = x.float().numpy(), dy.float().numpy()
    with tengrad.Preconditioner() as p:
        layer_id = p.add_linear(2, 2)
        conv = p.add_conv2d(1, 1, 1, (2, 2))
        p.update_curvature(layer_id, a32, g32, 1.0)
        before = p.save_state()
        with pytest.raises(ValueError):
            p.update_curvature(layer_id, a32, g32[:, :2].copy(), 1.0)           # inconsistent tokens
        with pytest.raises(ValueError):
            p.update_curvature(layer_id, a32, g32, 1.0, mask=np.ones((2, 2), bool))   # mask of the wrong size
        with pytest.raises(tengrad.TengradError, match="mask"):
            p.update_curvature(layer_id, a32, g32, 1.0, mask=np.full((2, 3), 2, np.uint8))   # not 0/1
        with pytest.raises(tengrad.TengradError, match="tokens must be positive"):     # T = 0
            p.update_curvature(layer_id, np.zeros((2, 0, 2), np.float32), np.zeros((2, 0, 2), np.float32), 1.0)
        p.set_token_mode(layer_id, "per-token")
        with pytest.raises(tengrad.TengradError, match="no token"):
            p.update_curvature(layer_id, a32, g32, 1.0, mask=np.zeros((2, 3), bool))
        p.set_token_mode(layer_id, "per-sequence")
        with pytest.raises(tengrad.TengradError):
            p.set_token_mode(conv, "per-token")
        with pytest.raises(ValueError):
            p.set_token_mode(layer_id, "expand")
        assert p.save_state() == before
