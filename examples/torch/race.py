"""The race both demos run (examples/torch/fashion_mnist.py, vit.py): each optimizer of peers.py
trains the same model from the same seed for the same training wall-clock budget (or epochs),
under one learning-rate schedule for every method that takes one — linear warm-up over the first
``--warmup`` of the budget, then cosine (or linear) decay to zero at its end, by training time —
with test accuracy measured every ``--eval-seconds`` of training (evaluation time not counted).
Reported: accuracy at the budget (each run's own final evaluation, at the end of its budget),
time to the targets, steps/s; TENGraD's per-step cost against SGD's timed in alternating blocks;
a per-phase profile; a plot.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import peers

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    tqdm = None


def add_arguments(ap) -> None:
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"],
                    help="decay of every scheduled learning rate to the end of the budget")
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the budget with linear warm-up")
    peers.add_arguments(ap)


def schedule(progress: float, args, warmup=None) -> float:
    """The learning-rate factor at `progress` ∈ [0, 1] of the budget."""
    warmup = args.warmup if warmup is None else warmup
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    if args.schedule == "constant":
        return 1.0
    rest = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return 0.5 * (1 + math.cos(math.pi * rest)) if args.schedule == "cosine" else 1 - rest


@torch.no_grad()
def evaluate(model, x, y, setup=None, batch=1000):
    model.eval()
    if setup is not None:
        setup.eval()
    correct = 0
    for s in range(0, len(x), batch):
        correct += (model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum().item()
    model.train()
    if setup is not None:
        setup.train()
    return correct / len(x)


def one_step(model, setup, xb, yb, g, args):
    """One training step; returns the loss and the times (forward, sampled, backward, tengrad,
    optimizer) in seconds."""
    t0 = time.perf_counter()
    setup.zero_grad()
    kfac, precond = setup.kfac, setup.precond
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
    setup.step()
    t5 = time.perf_counter()
    return loss, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)


def train(name, args, data, seed, make_model):
    """Trains one optimizer for the budget on the model `make_model()` builds."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model()
    setup = peers.make(name, model, args)
    g = torch.Generator().manual_seed(seed)
    history = {"seconds": [0.0], "accuracy": [evaluate(model, x_test, y_test, setup)], "loss_seconds": [], "loss": []}
    clock, steps, step_times, running, phases = 0.0, 0, [], [], {}
    total_steps = None if args.epochs is None else args.epochs * (len(x_train) // args.batch)
    # Progress in whole steps or seconds; tqdm turns itself off when output is not a terminal.
    bar = tqdm(total=total_steps or int(round(args.budget)), desc=f"{name:>12}", unit="step" if total_steps else "s",
               leave=True, dynamic_ncols=True, mininterval=0.5, disable=None) if tqdm else None
    shown, next_eval, since_eval = 0, args.eval_seconds, []
    live = bar is not None and not bar.disable
    done = False
    while not done:
        order = torch.randperm(len(x_train), generator=g)
        for s in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[s:s + args.batch]
            progress = steps / total_steps if total_steps else clock / args.budget
            if setup.scheduled:
                factor = schedule(progress, args)
            else:  # Schedule-Free: its warm-up only
                warmup = args.warmup if args.schedulefree_warmup is None else args.schedulefree_warmup
                factor = schedule(progress, args, warmup) if progress < warmup else 1.0
            setup.scale_lr(factor)
            refresh = setup.precond is not None and setup.precond.steps % setup.precond.update_freq == 0
            loss, times = one_step(model, setup, x_train[idx], y_train[idx], g, args)
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
                history["accuracy"].append(evaluate(model, x_test, y_test, setup))
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
    if setup.precond is not None:
        setup.precond.remove()
    return history


def paired_step_cost(args, data, make_model, names=("tengrad", "sgd"), rounds=6, block=20):
    """Mean seconds per training step of each optimizer, timed in alternating blocks of `block`
    steps on the same batches (refresh steps included), so that a machine whose speed drifts
    during the sequential runs affects all alike. The first round warms up and is not counted."""
    x_train, y_train = data[0], data[1]
    setups = {}
    for name in names:
        torch.manual_seed(args.seed)
        model = make_model()
        setups[name] = (model, peers.make(name, model, args), torch.Generator().manual_seed(args.seed))
    seconds = {name: [] for name in names}
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))
    for r in range(rounds + 1):
        for name in names:
            model, setup, g = setups[name]
            for k in range(block):
                s = ((r * block + k) * args.batch) % (len(order) - args.batch + 1)
                idx = order[s:s + args.batch]
                _, times = one_step(model, setup, x_train[idx], y_train[idx], g, args)
                if r > 0:
                    seconds[name].append(sum(times))
    for name in names:
        if setups[name][1].precond is not None:
            setups[name][1].precond.remove()
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


def spread(values, fmt):
    """median [min–max] of the values; a None (a target never reached) counts as slower than every
    run that reached it, so the median is "not reached" when most runs did not."""
    if all(v is None for v in values):
        return "not reached"
    order = np.array([np.inf if v is None else v for v in values], dtype=float)
    middle = float(np.median(order))
    text = fmt(middle) if np.isfinite(middle) else "not reached"
    if len(values) > 1:
        text += f" [{fmt(order.min())}–{fmt(order.max()) if np.isfinite(order.max()) else 'not'}]"
    missing = sum(v is None for v in values)
    if missing:
        text += f" ({missing} not)"
    return text


def train_seeds(name, args, data, seeds, make_model, label=None):
    """``train`` on each seed. A run that raises — a method that diverged: NaN inside a peer, an
    overflowing update the library refuses — is kept as ``{"failed": message}`` and reported as
    such, so one diverged method does not end the race."""
    out = []
    for seed in seeds:
        try:
            out.append(train(name, args, data, seed, make_model))
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [""])[0]
            out.append({"failed": f"{label or name} seed {seed} diverged: {type(e).__name__}: {first[:160]}"})
            print(out[-1]["failed"], flush=True)
    return out


def finished(histories):
    return [h for h in histories if "failed" not in h]


def report(runs, args, data=None, make_model=None):
    """The table. "acc @ budget" is each run's evaluation at the end of its own budget (every run
    ends within one step after it); an earlier version read every run at the earliest run's end,
    which showed a run's previous evaluation when its last step ended later. Runs that diverged
    are left out of their method's row and listed below the table."""
    failures = [h["failed"] for hs in runs.values() for h in hs if "failed" in h]
    runs = {name: finished(hs) for name, hs in runs.items()}
    diverged = [name for name, hs in runs.items() if not hs]
    runs = {name: hs for name, hs in runs.items() if hs}
    n = max((len(hs) for hs in runs.values()), default=0)
    print(f"\n{n} seed(s); median [min–max] over seeds; test accuracy on the full test set, evaluation time not counted")
    targets = [float(t) for t in args.targets.split(",")]
    budget = f"{args.epochs} epochs" if args.epochs else f"{args.budget:.0f} s"
    cols = ["optimizer", "steps/s", f"acc @ {budget}"] + [f"t to {100 * t:g}%" for t in targets]
    widths = [13, 20, 25] + [32] * len(targets)
    print("".join(f"{c:<{w - 1}} " for c, w in zip(cols, widths)).rstrip())
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    sec = lambda v: f"{v:.0f} s"  # noqa: E731
    for name, hs in runs.items():
        row = [name, spread([h["steps_per_second"] for h in hs], lambda v: f"{v:.1f}"),
               spread([h["accuracy"][-1] for h in hs], pct)] + [spread([time_to(h, t) for h in hs], sec) for t in targets]
        print("".join(f"{c:<{w - 1}} " for c, w in zip(row, widths)).rstrip())
    for name in diverged:
        print(f"{name:<13}diverged on every seed")
    for line in failures:
        print(f"  {line}")
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
        print(f"{'optimizer':<13}{'kind':<9}{'steps':>7}{'forward':>9}{'sampled':>9}{'backward':>10}{'tengrad':>9}"
              f"{'optimizer':>11}{'total':>8}")
        for name, hs in runs.items():
            h = hs[0]
            for kind, med in h["phases"].items():
                print(f"{name:<13}{kind:<9}{h['phase_counts'][kind]:>7}" + "".join(f"{1e3 * v:>{w}.1f}" for v, w in
                      zip(med, (9, 9, 10, 9, 11))) + f"{1e3 * med.sum():>8.1f}")
    if args.plot and runs:
        plot(runs, args.plot)


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    horizon = max(h["seconds"][-1] for hs in runs.values() for h in hs)
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
