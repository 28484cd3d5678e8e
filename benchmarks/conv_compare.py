"""Conv layers: TENGraD next to the authors' explicit conv path, side by side in one process.

    python3 benchmarks/conv_compare.py [--quick]

The authors' implementation (PyTorch) of an exact conv block: unfold the batch
(``F.unfold``), per-sample gradients ``AX = einsum('nkl,nml->nmk', patches, grads)``, the Gram
``AX AXᵀ``, an explicit inverse of ``K + mλI``, and **AX kept**, so a reuse step is two
matrix-vector products with AX:  update = (v − AXᵀ inv (AX v)) / λ.

For each layer (batch 128, 3×3, padding 1, no bias, λ = 0.1), medians of:

* refresh:  theirs = unfold + einsum + Gram + inverse;  ours = update_curvature;
* reuse:    theirs = the two matvecs with AX;           ours = precondition;
* one-call: ours = natural_gradient, next to our update_curvature + precondition.

Theirs and ours are timed in alternating rounds (``paired_medians``), so drifting load on a shared
machine affects both alike. The header names the CPU and both BLAS libraries (ours: build,
version, kernel set); the last columns give our refresh's GFLOP/s (the library's flop count) and
our reuse step's GB/s (two passes over the kept per-sample gradients U).

Ratios are theirs ÷ ours (> 1: TENGraD is faster). Our representation and Gram strategy are the
cost model's picks (printed). Torch runs with torch.set_num_threads(N) and our OpenBLAS with
OPENBLAS_NUM_THREADS=N, N = the OPENBLAS_NUM_THREADS of the run.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
import tengrad  # noqa: E402

LAYERS = [  # name, C_in, C_out, H = W
    ("1→32, 28²", 1, 32, 28),
    ("32→32, 28²", 32, 32, 28),
    ("128→128, 28²", 128, 128, 28),
    ("64→64, 32²", 64, 64, 32),
    ("256→256, 8²", 256, 256, 8),
]


def median_time(fn, min_time=0.5, max_reps=15):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def paired_medians(fa, fb, seconds=2.0, rounds=8):
    """Median call times of fa and fb measured in alternating rounds (a, b, a, b, ...), so that
    load that drifts on a shared machine hits both alike. Each round runs one function for about
    seconds / (2·rounds), at least one call."""
    fa(), fb()
    per_round = seconds / (2 * rounds)
    times = ([], [])
    for _ in range(rounds):
        for fn, out in ((fa, times[0]), (fb, times[1])):
            start = time.perf_counter()
            while True:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
                if time.perf_counter() - start >= per_round:
                    break
    return float(np.median(times[0])), float(np.median(times[1]))


class Authors:
    """The authors' explicit conv block, AX kept between refreshes."""

    def __init__(self, damping):
        self.damping = damping

    def refresh(self, x, g, scale):
        n = x.shape[0]
        patches = F.unfold(x, 3, padding=1)                       # [n, C_in·9, L]
        grads = g.reshape(n, g.shape[1], -1)                      # [n, C_out, L]
        ax = torch.einsum("nkl,nml->nmk", patches, grads) * scale  # [n, C_out, C_in·9]
        self.ax = ax.reshape(n, -1)
        k = self.ax @ self.ax.T
        self.inv = torch.linalg.inv(k + n * self.damping * torch.eye(n))

    def precondition(self, v):
        t = self.ax @ v
        return (v - self.ax.T @ (self.inv @ t)) / self.damping


def main():
    quick = "--quick" in sys.argv
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    m, damping = 128, 0.1
    layers = LAYERS[:2] if quick else LAYERS
    print(f"CPU and our BLAS: {tengrad.blas_summary()}")
    print(f"torch {torch.__version__} ({threads} threads, BLAS: {'MKL' if torch.backends.mkl.is_available() else 'not MKL'}); "
          f"libtengrad {tengrad.version()}; batch {m}; λ = {damping}; 3×3 pad 1, no bias; OPENBLAS_NUM_THREADS={threads}")
    head = ["layer", "ours picks", "refresh theirs", "ours", "ratio", "reuse theirs", "ours", "ratio",
            "natgrad", "curv+prec", "refr. GF/s", "reuse GB/s"]
    print("".join(f"{h:>15}" for h in head))
    rng = np.random.default_rng(0)
    for name, cin, cout, hw in layers:
        x = rng.standard_normal((m, cin, hw, hw)).astype(np.float32)
        g = (rng.standard_normal((m, cout, hw, hw)) / m).astype(np.float32)
        v = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        xt, gt, vt = torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(v).reshape(-1)
        theirs = Authors(damping)
        theirs.refresh(xt, gt, float(m))
        with tengrad.Preconditioner(damping=damping) as p:
            layer = p.add_conv2d(cin, cout, 3, (hw, hw), padding=1, bias=False)
            out = np.empty_like(v)
            t_refresh, o_refresh = paired_medians(lambda: theirs.refresh(xt, gt, float(m)),
                                                  lambda: p.update_curvature(layer, x, g, float(m)), seconds=4.0)
            refresh_flops = p.layer_stats(layer)["curvature_flops"]
            t_reuse, o_reuse = paired_medians(lambda: theirs.precondition(vt),
                                              lambda: p.precondition(layer, v, None, out=(out, None)))
            o_natgrad = median_time(lambda: p.natural_gradient(layer, x, g, float(m), out=(out, None)))
            info, stats = p.snapshot_info(layer), p.layer_stats(layer)
            check = theirs.precondition(vt).numpy()
            p.update_curvature(layer, x, g, float(m))
            ours = p.precondition(layer, v, None)[0].ravel()
            err = np.linalg.norm(ours - check) / np.linalg.norm(check)
        picks = f"{info['representation']}/{stats['conv_strategy']}"
        u_bytes = info["representation_bytes"] if info["representation"] == "per-sample" else float("nan")
        row = [name, picks, f"{t_refresh * 1e3:.1f} ms", f"{o_refresh * 1e3:.1f} ms", f"{t_refresh / o_refresh:.2f}×",
               f"{t_reuse * 1e3:.3f} ms", f"{o_reuse * 1e3:.3f} ms", f"{t_reuse / o_reuse:.2f}×",
               f"{o_natgrad * 1e3:.1f} ms", f"{(o_refresh + o_reuse) * 1e3:.1f} ms",
               f"{refresh_flops / o_refresh / 1e9:.0f}", f"{2 * u_bytes / o_reuse / 1e9:.0f}"]
        print("".join(f"{c:>15}" for c in row) + f"   (rel. diff {err:.1e})")


if __name__ == "__main__":
    main()
