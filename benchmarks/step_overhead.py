"""What ``tengrad.torch``'s ``step()`` costs beyond the library's own calls, on reuse steps.

    python3 benchmarks/step_overhead.py [--sizes 1024,2048,4096] [--layers 2] [--batch 32] [--steps 40]

For MLPs of square ``nn.Linear`` layers (width n, ``--layers`` of them, bias on), trained with
random data: a TENGraD with curvature refreshed once (``update_freq`` larger than the run) and KL
clipping, so every timed step is a reuse step. Reported, as medians over ``--steps`` steps:

* ``step()``       — ``TENGraD.step()`` as a training loop calls it (after ``loss.backward()``);
* ``calls alone``  — the same layers' ``Preconditioner.precondition`` on the same gradients, back
  to back, into arrays allocated once (the library's work, nothing else);
* ``new arrays``   — the same calls into new arrays each time (numpy's ``empty``: fresh pages
  above glibc's 32 MiB mmap threshold);
* ``overhead``     — step() ÷ calls alone: the integration's own share (reading ``.grad``,
  writing the updates back, KL clipping, Python).

Each size runs in a fresh process; torch and the library share the machine's cores as in
training (GOMP_SPINCOUNT=10000 unless set, as in the examples).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))


def measure(n: int, layers: int, batch: int, steps: int) -> None:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import tengrad.torch as tt

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(n, n) for _ in range(layers)])
    pre = tt.TENGraD(model, damping=0.1, update_freq=10 ** 9, kl_clip=1e-3, lr=0.1)
    x, y = torch.randn(batch, n), torch.randn(batch, n)
    kept = [(np.empty((n, n), np.float32), np.empty(n, np.float32)) for _ in range(layers)]
    step_s, alone_s, fresh_s = [], [], []
    for i in range(steps + 2):
        for p in model.parameters():
            p.grad = None
        F.mse_loss(model(x), y).backward()
        grads = [(layer.weight.grad.numpy().copy(), layer.bias.grad.numpy().copy()) for layer in model]
        t0 = time.perf_counter()
        pre.step()
        t1 = time.perf_counter()
        for layer, (w, b), out in zip(pre._registered, grads, kept):
            pre._pre.precondition(layer.id, w, b, out=out)
        t2 = time.perf_counter()
        for layer, (w, b) in zip(pre._registered, grads):
            pre._pre.precondition(layer.id, w, b)
        t3 = time.perf_counter()
        if i >= 2:  # the first step refreshes; the second is the first reuse step
            step_s.append(t1 - t0)
            alone_s.append(t2 - t1)
            fresh_s.append(t3 - t2)
    step, alone, fresh = (float(np.median(s)) * 1e3 for s in (step_s, alone_s, fresh_s))
    print(f"{n:>6} {layers:>6} {batch:>6} {step:>12.2f} {alone:>12.2f} {fresh:>12.2f} {step / alone:>9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.child, args.layers, args.batch, args.steps)
    import tengrad
    print(f"CPU and our BLAS: {tengrad.blas_summary()}")
    print("reuse steps, median ms: step() = TENGraD.step(); calls alone = the library's precondition calls into "
          "kept arrays; new arrays = the same into new arrays each call; overhead = step() / calls alone")
    print(f"{'n':>6} {'layers':>6} {'batch':>6} {'step()':>12} {'calls alone':>12} {'new arrays':>12} {'overhead':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n), "--layers", str(args.layers),
                        "--batch", str(args.batch), "--steps", str(args.steps)], check=True)


if __name__ == "__main__":
    main()
