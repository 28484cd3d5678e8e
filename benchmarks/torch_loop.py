"""Our calls inside a PyTorch training loop versus the same calls alone (threads cooperating).

    python3 benchmarks/torch_loop.py            # every configuration, each in a fresh process
    python3 benchmarks/torch_loop.py --child    # one configuration (the environment decides)

The loop trains the demo ConvNet (Fashion-MNIST shapes, width 32, batch 128) on random data:
torch forward + backward, then for every layer one libtengrad call on the captured inputs and
output gradients (``natural_gradient``: the refresh, the heaviest call; with TORCH_LOOP_CALLS=precondition the
reuse step instead). TORCH_LOOP_WIDTH sets the channels (default 32). Reported, as medians:

* ``ours in loop``   — our calls between torch's forward/backward passes;
* ``ours alone``     — the same calls on the same data, back to back, no torch op in between;
* ``ratio``          — in loop ÷ alone (the target is ≤ 1.2);
* ``alone, cold``    — the same, with the caches flushed before each round (64 MiB read), as
  torch's passes leave them: the part of the ratio that is cache eviction, not threads;
* ``torch fwd+bwd``  — torch's own step in the loop with our calls, and ``torch alone`` without.

Configurations: the default; OMP_WAIT_POLICY=PASSIVE (torch's OpenMP threads sleep at once
instead of spinning for ~5 ms after each op); OPENBLAS_NUM_THREADS=1; GOMP_SPINCOUNT=10000
(torch's workers spin ~0.2 ms); OPENBLAS_THREAD_TIMEOUT=4 (our pool's workers sleep at once);
and what tengrad.torch does by default (blas_threads="auto": refreshes on OpenBLAS's threads,
reuse steps on one), alone and with GOMP_SPINCOUNT=10000.
"""
import os
import subprocess
import sys
import time

CONFIGS = [
    ("default", {}),
    ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("OPENBLAS_NUM_THREADS=1", {"OPENBLAS_NUM_THREADS": "1"}),
    ("GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"}),
    ("OPENBLAS_THREAD_TIMEOUT=4", {"OPENBLAS_THREAD_TIMEOUT": "4"}),
    ("tengrad.torch (auto)", {"TORCH_LOOP_POLICY": "integration"}),
    ("tengrad.torch + SPIN 10000", {"TORCH_LOOP_POLICY": "integration", "GOMP_SPINCOUNT": "10000"}),
]


def child():
    import numpy as np
    import torch
    import torch.nn as nn
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "torch"))
    import tengrad
    from fashion_mnist import ConvNet

    torch.manual_seed(0)
    width = int(os.environ.get("TORCH_LOOP_WIDTH", "32"))
    model = ConvNet(width)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    captured = {}

    def keep_input(module, inputs):
        captured[module] = [inputs[0].detach(), None]

    def keep_output(module, inputs, output):
        def hook(grad):
            captured[module][1] = grad.detach()
        output.register_hook(hook)

    for m in layers:
        m.register_forward_pre_hook(keep_input)
        m.register_forward_hook(keep_output)
    p = tengrad.Preconditioner(damping=0.1)
    ids = {}
    for m in layers:
        if isinstance(m, nn.Linear):
            ids[m] = p.add_linear(m.in_features, m.out_features, bias=True)
        else:
            ids[m] = p.add_conv2d(m.in_channels, m.out_channels, m.kernel_size, (28, 28) if m.in_channels == 1 or m is layers[1] else (14, 14), padding=1)
    x = torch.randn(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    outs = {m: (np.empty(tuple(m.weight.shape), np.float32), np.empty(tuple(m.bias.shape), np.float32)) for m in layers}

    mode = os.environ.get("TORCH_LOOP_CALLS", "natural_gradient")
    if os.environ.get("TORCH_LOOP_POLICY") == "integration":
        # What tengrad.torch's blas_threads="auto" does: refreshes with OpenBLAS's setting,
        # reuse steps on one thread.
        p.blas_threads = 0 if mode == "natural_gradient" else 1

    def ours():
        t = time.perf_counter()
        for m in layers:
            a, g = captured[m]
            if mode == "natural_gradient":
                p.natural_gradient(ids[m], a.numpy(), g.numpy(), 128.0, out=outs[m])
            else:  # the reuse step: precondition .grad with the snapshot of the first step
                p.precondition(ids[m], m.weight.grad.numpy(), m.bias.grad.numpy(), out=outs[m])
        return time.perf_counter() - t

    def torch_step():
        t = time.perf_counter()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return time.perf_counter() - t

    torch_step()
    for m in layers:
        a, g = captured[m]
        p.update_curvature(ids[m], a.numpy(), g.numpy(), 128.0)
    for _ in range(3):
        torch_step()
        ours()
    in_loop, torch_with = [], []
    for _ in range(12 if mode == "natural_gradient" else 50):
        torch_with.append(torch_step())
        in_loop.append(ours())
    alone = [ours() for _ in range(len(in_loop))]
    flush = np.ones(16 << 20, np.float32)  # 64 MiB, twice the last-level cache

    def cold():
        flush.sum()  # evicts our snapshots from the caches, as torch's passes do
        return ours()
    alone_cold = [cold() for _ in range(len(in_loop))]
    torch_alone = [torch_step() for _ in range(len(in_loop))]
    med = lambda v: float(np.median(v)) * 1e3  # noqa: E731
    print(f"{med(in_loop):.2f} {med(alone):.2f} {med(alone_cold):.2f} {med(torch_with):.1f} {med(torch_alone):.1f}")


def main():
    print(f"{'configuration':<28}{'ours in loop':>14}{'alone':>10}{'ratio':>8}{'alone, cold':>13}{'ratio':>8}"
          f"{'torch fwd+bwd':>15}{'torch alone':>13}")
    for name, extra in CONFIGS:
        env = dict(os.environ)
        env.setdefault("OPENBLAS_NUM_THREADS", "2")
        env.update(extra)
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            print(f"{name:<28} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        loop, alone, cold, tw, ta = map(float, out.stdout.split())
        print(f"{name:<28}{loop:>11.2f} ms{alone:>7.2f} ms{loop / alone:>7.2f}×{cold:>10.2f} ms{loop / cold:>7.2f}×"
              f"{tw:>12.1f} ms{ta:>10.1f} ms")


if __name__ == "__main__":
    child() if "--child" in sys.argv else main()
