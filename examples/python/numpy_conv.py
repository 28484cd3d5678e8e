"""TENGraD from numpy with a convolution: conv 1→8 (3×3, pad 1) → ReLU → 2×2 average pool →
linear 1568→10, on Fashion-MNIST, with exact natural-gradient steps for both layers.

    python3 examples/python/numpy_conv.py [--data /usr/share/datasets/fashion-mnist] [--epochs 1]

The conv layer is registered with add_conv2d; natural_gradient takes its input [m, 1, 28, 28] and
the gradient w.r.t. its output [m, 8, 28, 28] and returns updates shaped like weight [8, 1, 3, 3]
and bias [8] — the exact Fisher block, no Kronecker or spatial-averaging approximation.
"""
import argparse
import os
import sys
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bindings", "python"))
import tengrad  # noqa: E402
from numpy_mlp import load  # noqa: E402


def conv_forward(x, w, b):
    """x [m, 1, 28, 28], w [8, 1, 3, 3] -> [m, 8, 28, 28] (padding 1, stride 1)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(xp, (3, 3), axis=(2, 3))  # [m, 1, 28, 28, 3, 3]
    return np.einsum("mchwij,ocij->mohw", windows, w, optimize=True) + b[None, :, None, None]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--train-limit", type=int, default=10000)
    args = ap.parse_args()

    x_train, y_train = load(args.data, "train", args.train_limit)
    x_test, y_test = load(args.data, "test", 2000)
    x_train, x_test = x_train.reshape(-1, 1, 28, 28), x_test.reshape(-1, 1, 28, 28)
    rng = np.random.default_rng(0)
    wc = (rng.uniform(-1, 1, (8, 1, 3, 3)) / 3).astype(np.float32)
    bc = np.zeros(8, np.float32)
    wl = (rng.uniform(-1, 1, (10, 8 * 14 * 14)) / np.sqrt(8 * 14 * 14)).astype(np.float32)
    bl = np.zeros(10, np.float32)

    def forward(x):
        z = conv_forward(x, wc, bc)
        h = np.maximum(z, 0)
        pooled = h.reshape(len(x), 8, 14, 2, 14, 2).mean(axis=(3, 5)).reshape(len(x), -1)
        return z, pooled, pooled @ wl.T + bl

    with tengrad.Preconditioner(damping=args.damping) as p:
        conv = p.add_conv2d(1, 8, kernel_size=3, input_size=(28, 28), padding=1)
        fc = p.add_linear(8 * 14 * 14, 10)
        for epoch in range(args.epochs):
            start, losses = time.time(), []
            order = rng.permutation(len(x_train))
            for s in range(0, len(order) - args.batch + 1, args.batch):
                idx = order[s:s + args.batch]
                x, y, m = x_train[idx], y_train[idx], args.batch
                z, pooled, logits = forward(x)
                logits -= logits.max(axis=1, keepdims=True)
                prob = np.exp(logits)
                prob /= prob.sum(axis=1, keepdims=True)
                losses.append(-np.log(prob[np.arange(m), y]).mean())
                dlogits = prob
                dlogits[np.arange(m), y] -= 1
                dlogits = (dlogits / m).astype(np.float32)          # mean-reduced loss: grad_scale = m
                dpooled = (dlogits @ wl).reshape(m, 8, 14, 1, 14, 1) / 4
                dz = np.broadcast_to(dpooled, (m, 8, 14, 2, 14, 2)).reshape(m, 8, 28, 28) * (z > 0)
                dwl, dbl = p.natural_gradient(fc, np.ascontiguousarray(pooled, np.float32), dlogits, grad_scale=m)
                dwc, dbc = p.natural_gradient(conv, x, np.ascontiguousarray(dz, np.float32), grad_scale=m)
                wl -= args.lr * dwl
                bl -= args.lr * dbl
                wc -= args.lr * dwc
                bc -= args.lr * dbc
            accuracy = (forward(x_test)[2].argmax(axis=1) == y_test).mean()
            stats = p.layer_stats(conv)
            print(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}  test accuracy {100 * accuracy:.2f}%  "
                  f"({time.time() - start:.1f} s; conv Gram strategy {stats['conv_strategy']}, "
                  f"{stats['curvature_seconds'] * 1e3:.1f} ms per curvature update)")


if __name__ == "__main__":
    main()
