"""The main-job demo: the paper's Fashion-MNIST ConvNet trained with TENGraD, SGD with momentum
and Adam, on the real data set, compared at equal wall-clock time.

    python3 examples/torch/fashion_mnist.py [--budget 150] [--width 32] [--batch 128]
        [--optimizers tengrad,sgd,adam] [--epochs N] [--target 0.88] [--plot fashion_mnist.png]

The network (Soori et al., 2021, Fashion-MNIST): three 3×3 convolutions (padding 1) with ReLU and
2×2 max-pooling after the 2nd and 3rd, then two linear layers. ``--width`` scales the channels
(the paper uses 128; the default 32 fits the time budget on 2 CPU cores).

Each optimizer trains for ``--budget`` seconds of training wall-clock time (or ``--epochs``), with
test accuracy measured on the full 10k test set every ``--eval-seconds`` of training (evaluation
time is not counted; each evaluation takes a few seconds on 2 cores). Printed: a table with test accuracy at equal wall-clock time, time to reach the
target accuracy, and TENGraD's per-step cost over SGD's; written: a PNG plot of test accuracy and
training loss against training seconds.

Optimizers: TENGraD with the paper's protocol — sampled-label Fisher (labels drawn from the
model's softmax, an extra backward pass on refresh steps only), curvature refreshed every 10 steps
and reused in between, KL clipping κ = 1e-2, heavy-ball momentum 0.9 and weight decay 5e-4 from
torch.optim.SGD; SGD with momentum 0.9; Adam; KFAC (ASDL, `pip install asdfghjkl`: Monte-Carlo
Fisher, factors every 20 steps, inverses every 100, the same KL clipping, SGD momentum 0.9). All
use weight decay 5e-4. Learning rates and dampings are the winners of the equal-budget grid of
``examples/torch/tune.py`` (results in ``examples/torch/TUNING.md``). ``--seeds N`` runs N seeds
per optimizer and reports median [min–max]; ``--profile`` prints where each step's time goes.
``--distributed`` trains data-parallel under torchrun (see examples/torch/data_parallel.py).
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

# torch's OpenMP workers spin ~5 ms after each op by default and then compete with our BLAS
# threads for the 2 cores; 10000 spins (~0.2 ms) keeps torch's own speed and lets every TENGraD
# call run at its standalone speed (README, "Threads"). libgomp reads this when torch is loaded,
# so it must be set before `import torch`; it applies to every optimizer of the race alike.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bindings", "python"))
import tengrad  # noqa: E402
import tengrad.torch as tt  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    tqdm = None


def load_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(directory, prefix):
    def find(name):
        for candidate in (name + ".gz", name):
            path = os.path.join(directory, candidate)
            if os.path.exists(path):
                return path
        raise FileNotFoundError(f"{name}(.gz) not in {directory} (apt-get install dataset-fashion-mnist)")
    x = load_idx(find(f"{prefix}-images-idx3-ubyte")).astype(np.float32) / 255.0
    y = load_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    x = (x - 0.2860) / 0.3530
    return torch.from_numpy(x[:, None]), torch.from_numpy(y)


class ConvNet(nn.Module):
    """The paper's Fashion-MNIST network, channels scaled by `width`."""

    def __init__(self, width=32, hidden=128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc1 = nn.Linear(width * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x), inplace=True)
        x = F.max_pool2d(F.relu(self.conv2(x), inplace=True), 2)
        x = F.max_pool2d(F.relu(self.conv3(x), inplace=True), 2)
        x = F.relu(self.fc1(x.flatten(1)), inplace=True)
        return self.fc2(x)


def make_kfac(model, args):
    """ASDL's KfacGradientMaker with the KL clipping that KFAC optimizers use (kfac-pytorch, the
    paper's baselines): without it, ASDL's bare KFAC diverged within ~10 steps at every learning
    rate and damping tried here. ν = min(1, sqrt(κ / (lr² Σ⟨preconditioned grad, grad⟩))), κ the
    same --kl-clip as TENGraD's. The Kronecker factors, their inverses and the preconditioning are
    ASDL's own."""
    from asdl import KfacGradientMaker, PreconditioningConfig

    class ClippedKfac(KfacGradientMaker):
        def precondition(self):
            params = [p for p in model.parameters() if p.grad is not None]
            raw = [p.grad.clone() for p in params]
            super().precondition()
            vg = sum(float((p.grad * r).sum()) for p, r in zip(params, raw))
            if args.kl_clip and vg > 0:
                nu = min(1.0, (args.kl_clip / (args.lr_kfac ** 2 * vg)) ** 0.5)
                for p in params:
                    p.grad.mul_(nu)

    config = PreconditioningConfig(data_size=args.batch, damping=args.kfac_damping,
                                   curvature_upd_interval=args.kfac_curvature_every,
                                   preconditioner_upd_interval=args.kfac_inverse_every)
    return ClippedKfac(model, config, fisher_type="fisher_mc")


@torch.no_grad()
def evaluate(model, x, y, batch=1000):
    model.eval()
    correct = 0
    for s in range(0, len(x), batch):
        correct += (model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum().item()
    model.train()
    return correct / len(x)


def setup(name, args, model):
    """The optimizer of `name` for `model`: (torch optimizer, TENGraD or None, KFAC maker or None)."""
    precond = kfac = None
    if name == "tengrad":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_tengrad, momentum=0.9, weight_decay=5e-4)
        precond = tt.TENGraD(model, damping=args.damping, fisher=args.fisher, update_freq=args.update_freq,
                             kl_clip=args.kl_clip, lr=args.lr_tengrad)
    elif name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_sgd, momentum=0.9, weight_decay=5e-4)
    elif name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr_adam, weight_decay=5e-4)
    elif name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr_adamw, weight_decay=args.adamw_decay)
    elif name == "kfac":
        # ASDL's KFAC (pip asdfghjkl): Monte-Carlo Fisher (sampled labels), Kronecker factors every
        # --kfac-curvature-every steps, their inverses every --kfac-inverse-every, SGD momentum on top.
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_kfac, momentum=0.9, weight_decay=5e-4)
        kfac = make_kfac(model, args)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    return opt, precond, kfac


def one_step(model, opt, precond, kfac, xb, yb, g, args):
    """One training step; returns the loss and the times (forward, sampled, backward, tengrad,
    optimizer) in seconds."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    if kfac is not None:  # its gradient maker runs forward, backward, curvature and precondition
        dummy = kfac.setup_model_call(model, xb)
        kfac.setup_loss_call(F.cross_entropy, dummy, yb)
        logits, loss = kfac.forward_and_backward()
        t1 = time.perf_counter()  # the profile's "forward" column holds all of it for KFAC
    else:
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        t1 = time.perf_counter()
    if precond is not None and args.fisher == "sampled":
        precond.sample_fisher(logits, generator=g)
    t2 = time.perf_counter()
    if kfac is None:
        loss.backward()
    t3 = time.perf_counter()
    if precond is not None:
        precond.step()
    t4 = time.perf_counter()
    opt.step()
    t5 = time.perf_counter()
    return loss, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)


def train(name, args, data, seed, make_model=None):
    """Trains one optimizer for the budget; `make_model` (default: the ConvNet) builds the network."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model() if make_model else ConvNet(args.width)
    opt, precond, kfac = setup(name, args, model)
    g = torch.Generator().manual_seed(seed)
    history = {"seconds": [0.0], "accuracy": [evaluate(model, x_test, y_test)], "loss_seconds": [], "loss": []}
    clock, steps, step_times, running, phases = 0.0, 0, [], [], {}
    total_steps = None if args.epochs is None else args.epochs * (len(x_train) // args.batch)
    # Progress in whole steps or seconds; tqdm turns itself off when output is not a terminal.
    bar = tqdm(total=total_steps or int(round(args.budget)), desc=f"{name:>7}", unit="step" if total_steps else "s",
               leave=True, dynamic_ncols=True, mininterval=0.5, disable=None) if tqdm else None
    shown, next_eval, since_eval = 0, args.eval_seconds, []
    live = bar is not None and not bar.disable
    done = False
    while not done:
        order = torch.randperm(len(x_train), generator=g)
        for s in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[s:s + args.batch]
            xb, yb = x_train[idx], y_train[idx]
            refresh = precond is not None and precond.steps % precond.update_freq == 0
            loss, times = one_step(model, opt, precond, kfac, xb, yb, g, args)
            dt = sum(times)
            phases.setdefault("refresh" if refresh else "step", []).append(times)
            clock += dt
            steps += 1
            step_times.append(dt)
            running.append(loss.item())
            since_eval.append(running[-1])
            if live:
                if total_steps:
                    bar.update(1)
                elif int(clock) > shown:
                    bar.update(int(clock) - shown)
                    shown = int(clock)
                if steps % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(running[-50:]):.3f}", acc=f"{history['accuracy'][-1]:.3f}")
            done = bool(total_steps and steps >= total_steps) or (not total_steps and clock >= args.budget)
            if clock >= next_eval or done:
                history["loss_seconds"].append(clock)
                history["loss"].append(float(np.mean(since_eval)))
                history["seconds"].append(clock)
                history["accuracy"].append(evaluate(model, x_test, y_test))
                next_eval, since_eval = clock + args.eval_seconds, []
            if done:
                break
    if bar is not None:
        bar.close()
    if not live:
        print(f"{name}: {steps} steps in {clock:.0f} s, test accuracy {100 * history['accuracy'][-1]:.2f}%", flush=True)
    history["steps"] = steps
    history["step_time"] = float(np.median(step_times[5:] if len(step_times) > 10 else step_times))
    history["steps_per_second"] = steps / clock
    history["phases"] = {kind: np.median(np.array(v[2:] if len(v) > 4 else v), axis=0) for kind, v in phases.items()}
    history["phase_counts"] = {kind: len(v) for kind, v in phases.items()}
    if precond is not None:
        precond.remove()
    return history


def paired_step_cost(args, data, make_model=None, names=("tengrad", "sgd"), rounds=6, block=20):
    """Mean seconds per training step of each optimizer, timed in alternating blocks of `block`
    steps on the same batches (refresh steps included: `block` is a multiple of TENGraD's
    update_freq by default), so that a machine whose speed drifts during the sequential runs
    affects all alike. The first round warms up and is not counted."""
    x_train, y_train = data[0], data[1]
    setups = {}
    for name in names:
        torch.manual_seed(args.seed)
        model = make_model() if make_model else ConvNet(args.width)
        setups[name] = (model, *setup(name, args, model), torch.Generator().manual_seed(args.seed))
    seconds = {name: [] for name in names}
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))
    for r in range(rounds + 1):
        for name in names:
            model, opt, precond, kfac, g = setups[name]
            for k in range(block):
                s = ((r * block + k) * args.batch) % (len(order) - args.batch + 1)
                idx = order[s:s + args.batch]
                _, times = one_step(model, opt, precond, kfac, x_train[idx], y_train[idx], g, args)
                if r > 0:
                    seconds[name].append(sum(times))
    for name in names:
        if setups[name][2] is not None:
            setups[name][2].remove()
    return {name: float(np.mean(v)) for name, v in seconds.items()}


def accuracy_at(history, t):
    """Test accuracy of the last evaluation at or before t training seconds."""
    best = history["accuracy"][0]
    for s, a in zip(history["seconds"], history["accuracy"]):
        if s <= t + 1e-9:
            best = a
    return best


def time_to(history, target):
    for s, a in zip(history["seconds"], history["accuracy"]):
        if a >= target:
            return s
    return None


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--optimizers", default="tengrad,sgd,adam,kfac")
    ap.add_argument("--budget", type=float, default=150.0, help="training seconds per optimizer")
    ap.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of a time budget")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eval-seconds", type=float, default=12.0, help="training seconds between evaluations")
    # Defaults: the winners of examples/torch/tune.py (examples/torch/TUNING.md).
    ap.add_argument("--fisher", default="sampled", choices=["sampled", "empirical"])
    ap.add_argument("--update-freq", type=int, default=10)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--kl-clip", type=float, default=1e-2)
    ap.add_argument("--lr-tengrad", type=float, default=0.1)
    ap.add_argument("--lr-sgd", type=float, default=0.1)
    ap.add_argument("--lr-adam", type=float, default=4e-3)
    ap.add_argument("--lr-adamw", type=float, default=1e-3)
    ap.add_argument("--adamw-decay", type=float, default=0.05)
    ap.add_argument("--lr-kfac", type=float, default=0.1)
    ap.add_argument("--kfac-damping", type=float, default=0.1)
    ap.add_argument("--kfac-curvature-every", type=int, default=20)
    ap.add_argument("--kfac-inverse-every", type=int, default=100)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds per optimizer")
    ap.add_argument("--targets", default="0.88,0.90", help="test accuracies whose time-to-reach the table reports")
    ap.add_argument("--plot", default="fashion_mnist.png")
    ap.add_argument("--profile", action="store_true", help="print a per-phase profile of each optimizer's steps")
    ap.add_argument("--no-paired-cost", action="store_true",
                    help="skip the per-step cost of TENGraD and SGD timed in alternating blocks (~30 s)")
    ap.add_argument("--distributed", action="store_true",
                    help="data-parallel under torchrun (examples/torch/data_parallel.py): "
                         "torchrun --standalone --nproc_per_node=2 examples/torch/fashion_mnist.py --distributed")
    return ap


def load_data(args):
    x_train, y_train = load(args.data, "train")
    x_test, y_test = load(args.data, "t10k")
    if args.train_limit:
        x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
    if args.test_limit:
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    return x_train, y_train, x_test, y_test


def main():
    args = parser().parse_args()

    x_train, y_train, x_test, y_test = load_data(args)
    if args.distributed:
        import data_parallel
        return data_parallel.main(args, (x_train, y_train, x_test, y_test), ConvNet, tt)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    print(f"Fashion-MNIST {len(x_train)}/{len(x_test)}; ConvNet width {args.width}, batch {args.batch}; "
          f"{'%d epochs' % args.epochs if args.epochs else '%.0f s of training' % args.budget} per optimizer; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"CPU and TENGraD's BLAS: {tengrad.blas_summary()}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    data = (x_train, y_train, x_test, y_test)
    runs = {n: [train(n, args, data, seed) for seed in seeds] for n in names}
    report(runs, args, data)


def spread(values, fmt):
    """median [min–max] of the values that are not None, and how many are missing."""
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = fmt(float(np.median(got)))
    if len(values) > 1:
        text += f" [{fmt(min(got))}–{fmt(max(got))}]"
    if len(got) < len(values):
        text += f" ({len(values) - len(got)} not)"
    return text


def report(runs, args, data=None, make_model=None):
    horizon = min(h["seconds"][-1] for hs in runs.values() for h in hs)  # budgets end within a step
    n = len(next(iter(runs.values())))
    print(f"\n{n} seed(s); median [min–max] over seeds; test accuracy on the full test set, evaluation time not counted")
    targets = [float(t) for t in args.targets.split(",")]
    cols = ["optimizer", "steps/s", "acc @ %.0f s" % horizon] + [f"t to {100 * t:g}%" for t in targets] + ["final acc"]
    widths = [10, 20, 25] + [26] * len(targets) + [22]
    print("".join(f"{c:<{w}}" for c, w in zip(cols, widths)))
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    sec = lambda v: f"{v:.0f} s"  # noqa: E731
    for name, hs in runs.items():
        row = [name, spread([h["steps_per_second"] for h in hs], lambda v: f"{v:.1f}"),
               spread([accuracy_at(h, horizon) for h in hs], pct)] + \
              [spread([time_to(h, t) for h in hs], sec) for t in targets] + [spread([h["accuracy"][-1] for h in hs], pct)]
        print("".join(f"{c:<{w}}" for c, w in zip(row, widths)))
    if "tengrad" in runs and "sgd" in runs:
        ratio = np.median([h["steps_per_second"] for h in runs["tengrad"]]) / np.median(
            [h["steps_per_second"] for h in runs["sgd"]])
        print(f"\nTENGraD steps/s: {ratio:.2f}× SGD's in the runs above (refresh steps included)")
        if data is not None and not args.no_paired_cost:
            block = max(args.update_freq, 20 // args.update_freq * args.update_freq)
            cost = paired_step_cost(args, data, make_model, block=block)
            print(f"TENGraD steps/s: {cost['sgd'] / cost['tengrad']:.2f}× SGD's timed in alternating blocks of {block} "
                  f"steps ({1e3 * cost['tengrad']:.1f} vs {1e3 * cost['sgd']:.1f} ms per step, refresh steps "
                  f"included; the runs above drift with the machine's load)")
    if args.profile:
        print("\nWhere the time goes (median ms per step, first seed; 'tengrad' = the preconditioner's step():")
        print("curvature on refresh steps, precondition and KL clipping on every step; KFAC's forward column")
        print("holds its whole gradient maker: forward, backward, curvature and preconditioning):")
        print(f"{'optimizer':<10}{'kind':<9}{'steps':>7}{'forward':>9}{'sampled':>9}{'backward':>10}{'tengrad':>9}"
              f"{'optimizer':>11}{'total':>8}")
        for name, hs in runs.items():
            h = hs[0]
            for kind, med in h["phases"].items():
                print(f"{name:<10}{kind:<9}{h['phase_counts'][kind]:>7}" + "".join(f"{1e3 * v:>{w}.1f}" for v, w in
                      zip(med, (9, 9, 10, 9, 11))) + f"{1e3 * med.sum():>8.1f}")
    if args.plot:
        plot(runs, horizon, args.plot)


def plot(runs, horizon, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    grid = np.linspace(0, horizon, 200)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    low = 100.0
    for name, hs in runs.items():
        acc = np.array([[100 * accuracy_at(h, t) for t in grid] for h in hs])
        line, = ax1.plot(grid, np.median(acc, 0), label=name)
        if len(hs) > 1:
            ax1.fill_between(grid, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
        low = min(low, float(np.min(acc[:, len(grid) // 10:])))
        loss = np.array([np.interp(grid, h["loss_seconds"], h["loss"]) for h in hs])
        ax2.plot(grid, np.median(loss, 0), label=name, color=line.get_color())
        if len(hs) > 1:
            ax2.fill_between(grid, loss.min(0), loss.max(0), color=line.get_color(), alpha=0.2)
    n = len(next(iter(runs.values())))
    band = f" (median of {n} seeds, min–max)" if n > 1 else ""
    ax1.set(xlabel="training seconds", ylabel="test accuracy (%)", title="test accuracy" + band)
    ax1.set_ylim(bottom=max(0, low - 2))
    ax2.set(xlabel="training seconds", ylabel="training loss", title="training loss (mean over eval interval)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
