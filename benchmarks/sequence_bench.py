"""Linear layers over token sequences on transformer shapes (docs/DESIGN.md §12): TENGraD's exact
per-sequence block against an expand-style KFAC update of the same layer, in one run.

    OPENBLAS_NUM_THREADS=2 python3 benchmarks/sequence_bench.py [--quick]

For m ∈ {32, 128} sequences of T ∈ {16, 64, 256} tokens and layers d → d and d → 4d (the MLP's),
d ∈ {256, 1024}, with bias:

* TENGraD, the cost models' choice: curvature (`update_curvature`, seconds), a reuse step
  (`precondition`, seconds), the Gram strategy and snapshot representation picked;
* each Gram strategy forced, curvature seconds — run only when its flop estimate is under 50
  GFLOP (the factored Gram grows as m²T²: at m = 128, T = 256, d = 1024 it is ~2 PFLOP);
* KFAC "expand" (kfac-pytorch, ASDL, kfac-jax on sequences: every token a sample): factors
  A = ÃᵀÃ/(mT) ((in+1)²) and G = GᵀG/(mT) (out²) from all m·T tokens, their eigendecompositions
  (numpy eigh, float64 as kfac-pytorch's default), and the preconditioning
  Q_G ((Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + λ)) Q_Aᵀ — an approximation of the per-token Fisher, not the
  per-sequence block TENGraD computes.

Times are medians of a few repetitions on this machine (2 cores, shared: ratios within one row
are what to read). Not a test.
"""
import argparse
import time

import numpy as np

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
import tengrad  # noqa: E402


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def estimates(m, T, n_in, n_out):
    d = n_out * (n_in + 1)
    factored = m * m * T * T * (n_in + n_out + 1)
    explicit = 2 * m * T * n_out * n_in + m * m * d
    return factored, explicit


def kfac_expand(a, g, v, damping):
    """Expand-style KFAC for one linear layer: factors over all tokens, eigendecompositions, and
    the update of v = [weight gradient | bias gradient] (out × (in + 1))."""
    tokens = a.shape[0] * a.shape[1]
    at = np.concatenate([a.reshape(tokens, -1), np.ones((tokens, 1), np.float32)], 1)
    gt = g.reshape(tokens, -1)
    t0 = time.perf_counter()
    A = (at.T @ at).astype(np.float64) / tokens
    G = (gt.T @ gt).astype(np.float64) / tokens
    la, qa = np.linalg.eigh(A)
    lg, qg = np.linalg.eigh(G)
    curvature = time.perf_counter() - t0
    qa32, qg32 = qa.astype(np.float32), qg.astype(np.float32)
    scale = (1.0 / (np.outer(lg, la) + damping)).astype(np.float32)
    t0 = time.perf_counter()
    _ = qg32 @ ((qg32.T @ v @ qa32) * scale) @ qa32.T
    return curvature, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d = 256 only, T ≤ 64")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    widths = (256,) if args.quick else (256, 1024)
    lengths = (16, 64) if args.quick else (16, 64, 256)
    print(f"CPU and our BLAS: {tengrad.blas_summary()}")
    print(f"{'m':>4}{'T':>5}{'in→out':>12}{'picks':>20}{'curv s':>9}{'reuse s':>9}{'factored s':>12}"
          f"{'explicit s':>12}{'KFAC curv s':>13}{'KFAC step s':>13}{'ours÷KFAC curv':>16}")
    for d in widths:
        for n_in, n_out in ((d, d), (d, 4 * d)):
            for m in (32, 128):
                for T in lengths:
                    a = rng.standard_normal((m, T, n_in), dtype=np.float32)
                    g = (rng.standard_normal((m, T, n_out), dtype=np.float32) / np.sqrt(m * T)).astype(np.float32)
                    v = rng.standard_normal((n_out, n_in), dtype=np.float32)
                    vb = rng.standard_normal(n_out, dtype=np.float32)
                    big = m * T * n_out * n_in > 2e10
                    reps = 1 if big else 3
                    with tengrad.Preconditioner(damping=0.1) as p:
                        layer = p.add_linear(n_in, n_out)
                        curv = timed(lambda: p.update_curvature(layer, a, g, float(m)), reps)
                        reuse = timed(lambda: p.precondition(layer, v, vb), 5)
                        strategy = p.layer_stats(layer)["conv_strategy"]
                        rep = p.snapshot_info(layer)["representation"]
                        forced = {}
                        for name, est in zip(("factored", "explicit"), estimates(m, T, n_in, n_out)):
                            if est > 5e10:
                                forced[name] = f"({est / 1e9:.0f} GF)"
                                continue
                            p.set_conv_strategy(layer, name)
                            forced[name] = f"{timed(lambda: p.update_curvature(layer, a, g, float(m)), reps):.4f}"
                    kfac_curv, kfac_step = kfac_expand(a, g, np.concatenate([v, vb[:, None]], 1), 0.1)
                    print(f"{m:>4}{T:>5}{f'{n_in}→{n_out}':>12}{f'{strategy}/{rep}':>20}{curv:>9.4f}{reuse:>9.4f}"
                          f"{forced['factored']:>12}{forced['explicit']:>12}{kfac_curv:>13.4f}{kfac_step:>13.4f}"
                          f"{curv / kfac_curv:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
