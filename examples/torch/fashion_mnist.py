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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tengrad  # noqa: E402
import race  # noqa: E402


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


# This task's winners of examples/torch/tune.py (TUNING.md, section "convnet"); knobs not listed
# keep peers.py's defaults (the authors' settings).
TUNED = {"lr_tengrad": 0.3, "damping": 1.0, "lr_sgd": 0.05, "sgd_decay": 5e-06, "lr_adamw": 0.008,
         "adamw_decay": 0.01, "lr_muon": 0.02, "lr_muon_adamw": 0.004, "lr_soap": 0.008, "soap_decay": 0.1,
         "lr_schedulefree": 0.01, "schedulefree_warmup": 0.05, "lr_kfac": 0.003, "kfac_damping": 0.03}


def parser():
    """The command line with this task's tuned defaults."""
    ap = base_parser()
    ap.set_defaults(**TUNED)
    return ap


def base_parser():
    """The command line both demos share (vit.py sets its own defaults on it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--optimizers", default="tengrad,sgd,adamw,muon,soap,schedulefree,kfac")
    ap.add_argument("--budget", type=float, default=90.0, help="training seconds per optimizer")
    ap.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of a time budget")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eval-seconds", type=float, default=12.0, help="training seconds between evaluations")
    race.add_arguments(ap)  # the schedule and every optimizer's knobs (peers.py)
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
        import tengrad.torch as tt
        return data_parallel.main(args, (x_train, y_train, x_test, y_test), ConvNet, tt)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    print(f"Fashion-MNIST {len(x_train)}/{len(x_test)}; ConvNet width {args.width}, batch {args.batch}; "
          f"{'%d epochs' % args.epochs if args.epochs else '%.0f s of training' % args.budget} per optimizer; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"CPU and TENGraD's BLAS: {tengrad.blas_summary()}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    data = (x_train, y_train, x_test, y_test)
    make = lambda: ConvNet(args.width)  # noqa: E731
    runs = {n: race.train_seeds(n, args, data, seeds, make) for n in names}
    race.report(runs, args, data, make)


if __name__ == "__main__":
    main()
