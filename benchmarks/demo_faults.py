"""The main demo's training step (examples/torch/fashion_mnist.py: ConvNet, batch 128, the tuned
settings) with and without glibc's page faults, TENGraD against SGD.

On glibc, torch's large tensors come from the heap, which glibc trims and grows again as the peak
of a step moves: every page it gives back is faulted in again (and zeroed) on the next step. How
often depends on where each step's allocations land, so two processes of the same optimizer can
differ by thousands of faults per step. Pinning glibc's thresholds (MALLOC_MMAP_THRESHOLD_ at its
32 MiB maximum, MALLOC_TRIM_THRESHOLD_ at 1 GiB; environment variables, read when a process
starts) removes them for every optimizer alike. Each measurement is its own process, the
optimizers and settings run in turn for `--rounds` rounds; a benchmark, never a test.

    python3 benchmarks/demo_faults.py [--steps 100] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def child(name: str, steps: int, warmup: int) -> None:
    """Trains `steps` steps of `name` and prints mean and median ms and minor faults per step
    after `warmup` steps (refresh steps included)."""
    import resource
    import time

    import numpy as np
    import torch
    sys.path.insert(0, os.path.join(HERE, "..", "examples", "torch"))
    import fashion_mnist as fm
    import peers
    import race

    args = fm.parser().parse_args([])
    x, y = fm.load_data(args)[:2]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = fm.ConvNet(args.width)
    setup = peers.make(name, model, args)
    g = torch.Generator().manual_seed(0)
    walls, faults = [], []
    for k in range(warmup + steps):
        s = (k * args.batch) % (len(order) - args.batch + 1)
        idx = order[s:s + args.batch]
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        race.one_step(model, setup, x[idx], y[idx], g, args)
        walls.append(time.perf_counter() - t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    w = np.array(walls[warmup:]) * 1e3
    print(f"{w.mean():.1f} {np.median(w):.1f} {np.mean(faults[warmup:]):.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per process (after 20 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.steps, 20)
    sys.path.insert(0, os.path.join(HERE, "..", "bindings", "python"))
    import tengrad
    print(f"CPU and TENGraD's BLAS: {tengrad.blas_summary()}")
    print("ms per step (mean over the steps, refresh steps included; median) and minor page faults per step")
    header = f"{'glibc':>8} {'round':>5} {'optimizer':>9} {'mean ms':>8} {'median':>7} {'faults':>7}"
    print(header + "   TENGraD's steps/s ÷ SGD's")
    for r in range(a.rounds):
        for label, extra in (("default", {}), ("pinned", PINNED)):
            env = {k: v for k, v in os.environ.items() if k not in PINNED}
            env.update(extra)
            means = {}
            for name in ("tengrad", "sgd"):
                out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(a.steps)], env=env,
                                     check=True, capture_output=True, text=True).stdout.split()
                mean, median, faults = float(out[-3]), float(out[-2]), float(out[-1])
                means[name] = mean
                ratio = f"   {mean / means['tengrad']:.2f}×" if name == "sgd" else ""
                print(f"{label:>8} {r + 1:>5} {name:>9} {mean:>8.1f} {median:>7.1f} {faults:>7.0f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
