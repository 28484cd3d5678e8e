"""``TENGraD(window=k)``: each refresh's block is the exact Fisher of the last k refreshes'
batches together, against the dense float64 oracle — per-sample gradients from torch.func, each
batch's taken at the weights of its own step — for linear and conv layers, reuse steps between
refreshes, sequences of different lengths (padded and masked); a failed step's batch never joins; state_dict resumes bit-identically."""
import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tengrad.torch as tt  # noqa: E402
from tengrad import TengradError  # noqa: E402
from test_torch import batch, cnn, mlp  # noqa: E402
from test_torch_base import assert_resumes, hooked, per_sample_rows  # noqa: E402


def close(got, want, what):
    assert float((got - want).norm() / want.norm()) < 1e-3, what


def train(model, clean, pre, steps, window, damping, update_freq=1, data=None, lr=0.1):
    """Runs ``steps`` steps and checks each layer's update against the oracle."""
    kept = {}  # layer name: [rows of the refresh batches, newest last]
    matrix = {}
    for s in range(steps):
        x, y = data(s) if data else batch(model, 8, s)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        layers = hooked(model)
        grads = {n: torch.cat([p.grad.detach().double().ravel() for p in ps]) for n, ps in layers}
        refresh = s % update_freq == 0
        if refresh:
            for n, ps in layers:
                kept[n] = (kept.get(n, []) + [per_sample_rows(model, clean, x, y, ps)])[-window:]
                U = torch.cat(kept[n])
                matrix[n] = U.T @ U / U.shape[0] + damping * torch.eye(U.shape[1], dtype=torch.float64)
        pre.step()
        for n, ps in layers:
            got = torch.cat([p.grad.double().ravel() for p in ps])
            close(got, torch.linalg.solve(matrix[n], grads[n]), (n, s))
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return kept


@pytest.mark.parametrize("make,window,update_freq", [(mlp, 2, 1), (cnn, 2, 1), (mlp, 3, 2), (cnn, 3, 2)])
def test_window_matches_the_oracle_over_steps(make, window, update_freq):
    torch.manual_seed(0)
    model = make()
    clean = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.05, window=window, update_freq=update_freq, fast_path=True)
    kept = train(model, clean, pre, 6, window, 0.05, update_freq)
    assert all(len(rows) == window for rows in kept.values())


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x):  # x: [batch, T, 4]
        return self.proj(x).mean(1)


def test_sequences_of_different_lengths_join_the_window_padded():
    torch.manual_seed(2)
    model = Tokens()
    clean = copy.deepcopy(model)
    pre = tt.TENGraD(model, damping=0.05, window=2)
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(8, t, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for t in (5, 7, 3)]
    train(model, clean, pre, 3, 2, 0.05, data=lambda s: data[s])


def test_a_failed_step_never_joins_the_window():
    torch.manual_seed(3)
    model, twin = mlp(), mlp()
    twin.load_state_dict(model.state_dict())
    pre, other = tt.TENGraD(model, damping=0.05, window=2), tt.TENGraD(twin, damping=0.05, window=2)
    for s in (0, 1, 2):
        x, y = batch(model, 8, s)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if s == 1:  # this step fails: its batch must not enter the window
            model[2].weight.grad[0, 0] = float("nan")
            with pytest.raises(TengradError):
                pre.step()
            continue
        twin.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        pre.step()
        other.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a.grad, b.grad)


def test_window_resumes_from_state_dict_and_bad_windows_are_refused():
    torch.manual_seed(4)
    model = cnn()
    pre = tt.TENGraD(model, damping=0.1, window=3, update_freq=2)
    for s in range(5):
        x, y = batch(model, 8, s)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    assert_resumes(model, pre, cnn, dict(damping=0.1, window=3, update_freq=2), range(5, 10))
    for bad in (0, 65, 1.5, True, "2"):
        with pytest.raises(ValueError):
            tt.TENGraD(mlp(), window=bad)
    with pytest.raises(ValueError):
        tt.TENGraD(mlp(), window=2, token_mode="per-token", process_group=object())


def test_an_owners_gradient_rows_restart_the_window_in_one_process():
    """A data-parallel owner keeps per-sample gradient rows (no inputs) in its window; loaded into
    one process such a layer's window restarts, the others' are kept, and steps run."""
    torch.manual_seed(5)
    model = cnn()
    pre = tt.TENGraD(model, damping=0.1, window=2)
    for s in range(2):
        x, y = batch(model, 8, s)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    state = pre.state_dict()
    first, *others = sorted(state["window"])
    state["window"][first] = [[None, g, k, sc] for _, g, k, sc in state["window"][first]]
    pre.remove()
    fresh = tt.TENGraD(model, damping=0.1, window=2)
    fresh.load_state_dict(state)
    assert sorted(fresh._window_batches) == others
    x, y = batch(model, 8, 9)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    fresh.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
