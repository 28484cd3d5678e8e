"""Per-step cost of TENGraD next to the same mathematics in numpy and to a KFAC inverse update.

    python3 benchmarks/compare.py [--quick]

For a linear layer (batch m, in = out = n, bias), each row times one natural-gradient step of the
batch's mean gradient, all in this process on the same CPU:

* tengrad   — Preconditioner.natural_gradient (snapshot + U (K + mλI)^-1 1), through the binding;
* numpy     — the authors' style: Grams by matmul, K = (ÃÃᵀ)∘(GGᵀ), explicit np.linalg.inv of
              K + mλI, then the weighted gradient by einsum;
* kfac      — KFAC's inverse update at the same sizes: factors ÃᵀÃ/m and GᵀG·m, eigendecomposition
              of both (the (in+1)² and out² matrices), then the update Q_G[(Q_Gᵀ V Q_A) / (d_G d_Aᵀ + λ)]Q_Aᵀ.

Times are medians; ratios are numpy ÷ tengrad and kfac ÷ tengrad (> 1: TENGraD is faster).

numpy's wheel carries its own OpenBLAS, so this process holds two BLAS thread pools. With more
than one thread each, the pool that just ran spins while the other works and on a 2-core machine
they slow each other down; `make bench` therefore runs this script with OPENBLAS_NUM_THREADS=1 and
=2 and prints both.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
import tengrad  # noqa: E402


def median_time(fn, min_time=0.3, max_reps=25, warm_up=True):
    if warm_up:
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min(3, max_reps) or (len(times) < max_reps and time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def numpy_step(a, g, scale, damping):
    m = a.shape[0]
    gram_a = a @ a.T + 1.0
    gram_g = g @ g.T
    k = (scale * scale) * gram_a.astype(np.float64) * gram_g
    inv = np.linalg.inv(k + m * damping * np.eye(m))
    c = (inv @ np.ones(m)).astype(np.float32)
    dw = scale * np.einsum("i,io,ij->oj", c, g, a, optimize=True)
    db = scale * np.einsum("i,io->o", c, g)
    return dw, db


def kfac_step(a, g, scale, damping):
    m = a.shape[0]
    a1 = np.hstack([a, np.ones((m, 1), np.float32)])
    fa = a1.T @ a1 / m
    fg = (g.T @ g) * (scale * scale / m)
    da, qa = np.linalg.eigh(fa)
    dg, qg = np.linalg.eigh(fg)
    v = scale * (g.T @ a1) / m
    inner = qg.T @ v @ qa
    inner /= np.outer(dg, da) + damping
    return qg @ inner @ qa.T


def main():
    quick = "--quick" in sys.argv
    shapes = [(32, 256), (128, 1024)] if quick else [(32, 256), (128, 256), (32, 1024), (128, 1024), (512, 1024),
                                                        (128, 2048), (128, 4096)]
    damping = 0.1
    rng = np.random.default_rng(0)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"CPU and our BLAS: {tengrad.blas_summary()}")
    print(f"numpy {np.__version__}; libtengrad {tengrad.version()}; λ = {damping}; bias on; "
          f"OPENBLAS_NUM_THREADS={threads}")
    print(f"{'m':>5} {'n':>6} {'tengrad s':>11} {'numpy s':>11} {'kfac s':>11} {'numpy/ours':>11} {'kfac/ours':>10}")
    for m, n in shapes:
        a = rng.standard_normal((m, n)).astype(np.float32)
        g = (rng.standard_normal((m, n)) / m).astype(np.float32)
        with tengrad.Preconditioner(damping=damping) as p:
            layer = p.add_linear(n, n, bias=True)
            out = (np.empty((n, n), np.float32), np.empty(n, np.float32))
            ours = median_time(lambda: p.natural_gradient(layer, a, g, float(m), out=out))
        theirs = median_time(lambda: numpy_step(a, g, float(m), damping))
        big = n >= 2048  # eigendecompositions of 2k-4k matrices take seconds: time one
        kfac = median_time(lambda: kfac_step(a, g, float(m), damping), max_reps=1 if big else 25, warm_up=not big)
        print(f"{m:>5} {n:>6} {ours:>11.3e} {theirs:>11.3e} {kfac:>11.3e} {theirs / ours:>11.1f} {kfac / ours:>10.1f}")


if __name__ == "__main__":
    main()
