"""Dense float64 oracle: forms every per-sample gradient and F + λI explicitly (docs/DESIGN.md §2)."""
import numpy as np


def linear_per_sample(activations, per_sample_output_grads, bias):
    """U with one column per sample: u_i = g_i ⊗ ã_i, flattened as [W | b] row by row."""
    a = activations.astype(np.float64)
    g = per_sample_output_grads.astype(np.float64)
    if bias:
        a = np.hstack([a, np.ones((a.shape[0], 1))])
    return np.stack([np.outer(g[i], a[i]).ravel() for i in range(a.shape[0])], axis=1)


def damped_solve(U, damping, v):
    """(F + λI)^-1 v with F = (1/m) U Uᵀ, formed densely."""
    d, m = U.shape
    F = U @ U.T / m
    return np.linalg.solve(F + damping * np.eye(d), v)


def split(flat, out_features, in_features, bias):
    """[W | b] flattened row by row -> (W [out, in], b [out] or None)."""
    block = flat.reshape(out_features, in_features + (1 if bias else 0))
    return block[:, :in_features], (block[:, in_features] if bias else None)


def join(weight, bias):
    return (np.hstack([weight, bias[:, None]]) if bias is not None else weight).astype(np.float64).ravel()


def relative_error(got, want):
    return np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-300)
