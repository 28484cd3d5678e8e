"""Fair tuning of the demo's optimizers: the same small grid budget for each, on a short run.

    python3 examples/torch/tune.py [--budget 25] [--out examples/torch/TUNING.md]

Every optimizer gets 4 configurations, each trained for --budget seconds of training time on the
full Fashion-MNIST training set (width 32, batch 128, seed 0), scored by test accuracy at the end
(evaluation time not counted). Common to all: momentum 0.9 (SGD-based methods), weight decay 5e-4.
TENGraD runs the paper's protocol: sampled-label Fisher, curvature refreshed every 10 steps and
reused in between, KL clipping κ = 1e-2; KFAC (ASDL) the paper's: Monte-Carlo Fisher, factors
every 20 steps, inverses every 100, the same KL clipping. The results file lists every
configuration and its score; the demo's defaults are the winners.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist as demo  # noqa: E402  (sets GOMP_SPINCOUNT before torch loads)

GRID = {
    "sgd": [{"lr_sgd": lr} for lr in (0.02, 0.05, 0.1, 0.2)],
    "adam": [{"lr_adam": lr} for lr in (5e-4, 1e-3, 2e-3, 4e-3)],
    "kfac": [{"lr_kfac": lr, "kfac_damping": d} for lr in (0.05, 0.1) for d in (0.03, 0.1)],
    "tengrad": [{"lr_tengrad": lr, "damping": d, "fisher": "sampled", "update_freq": 10}
                for lr in (0.05, 0.1) for d in (0.1, 1.0)],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=25.0)
    ap.add_argument("--optimizers", default="tengrad,sgd,adam,kfac")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "TUNING.md"))
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    cli = ap.parse_args()
    base = demo.parser().parse_args(["--data", cli.data, "--budget", str(cli.budget), "--eval-seconds", str(10 * cli.budget)])
    data = demo.load_data(base)
    rows = []
    start = time.time()
    for name in [n.strip() for n in cli.optimizers.split(",")]:
        for config in GRID[name]:
            args = argparse.Namespace(**{**vars(base), **config})
            h = demo.train(name, args, data, seed=0)
            rows.append((name, config, h["accuracy"][-1], h["steps_per_second"]))
            print(f"{name:<8} {config} -> {100 * h['accuracy'][-1]:.2f}% ({h['steps_per_second']:.1f} steps/s)", flush=True)
    with open(cli.out, "w") as f:
        f.write("# Tuning results\n\n")
        f.write(f"`python3 examples/torch/tune.py --budget {cli.budget:g}` on the 2-core development machine "
                f"({time.strftime('%Y-%m-%d')}, {time.time() - start:.0f} s in all). Each configuration trains the demo "
                f"ConvNet (width 32, batch 128, seed 0) for {cli.budget:g} s of training time on the full training "
                "set; score = test accuracy (10k images) at the end. Same grid size (4) for every optimizer. "
                "**Bold**: the best of each optimizer, the demo's defaults.\n\n")
        f.write("| optimizer | configuration | test accuracy | steps/s |\n|---|---|---|---|\n")
        for name in dict.fromkeys(r[0] for r in rows):
            mine = [r for r in rows if r[0] == name]
            best = max(mine, key=lambda r: r[2])
            for r in mine:
                cfg = ", ".join(f"{k}={v}" for k, v in r[1].items())
                acc = f"{100 * r[2]:.2f}%"
                f.write(f"| {name} | {cfg} | {'**' + acc + '**' if r is best else acc} | {r[3]:.1f} |\n")
    print(f"written: {cli.out}")


if __name__ == "__main__":
    main()
