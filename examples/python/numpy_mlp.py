"""TENGraD from numpy: a 784-64-10 MLP on Fashion-MNIST with exact natural-gradient steps.

    python3 examples/python/numpy_mlp.py [--data /usr/share/datasets/fashion-mnist] [--epochs 2]

Forward and backward are plain numpy; per step and per layer, Preconditioner.natural_gradient turns
the layer's inputs and output gradients into the update (F + λI)^-1 ∇ of the batch's mean gradient.
"""
import argparse
import gzip
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bindings", "python"))
import tengrad  # noqa: E402


def load_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(directory, kind, limit):
    prefix = "train" if kind == "train" else "t10k"
    x = load_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))[:limit]
    y = load_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))[:limit]
    x = ((x.reshape(len(x), -1).astype(np.float32) / 255.0) - 0.2860) / 0.3530
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--train-limit", type=int, default=20000)
    args = ap.parse_args()

    x_train, y_train = load(args.data, "train", args.train_limit)
    x_test, y_test = load(args.data, "test", 10000)
    rng = np.random.default_rng(0)
    sizes = [(784, 64), (64, 10)]
    weights = [rng.uniform(-1, 1, (o, i)).astype(np.float32) / np.sqrt(i) for i, o in sizes]
    biases = [np.zeros(o, np.float32) for _, o in sizes]

    with tengrad.Preconditioner(damping=args.damping) as p:
        layers = [p.add_linear(i, o, bias=True) for i, o in sizes]
        for epoch in range(args.epochs):
            start, losses = time.time(), []
            order = rng.permutation(len(x_train))
            for s in range(0, len(order) - args.batch + 1, args.batch):
                idx = order[s:s + args.batch]
                x, y, m = x_train[idx], y_train[idx], args.batch
                z1 = x @ weights[0].T + biases[0]
                h = np.maximum(z1, 0)
                z2 = h @ weights[1].T + biases[1]
                z2 -= z2.max(axis=1, keepdims=True)
                prob = np.exp(z2)
                prob /= prob.sum(axis=1, keepdims=True)
                losses.append(-np.log(prob[np.arange(m), y]).mean())
                dz2 = prob
                dz2[np.arange(m), y] -= 1
                dz2 = (dz2 / m).astype(np.float32)            # mean-reduced loss ...
                dz1 = ((dz2 @ weights[1]) * (z1 > 0)).astype(np.float32)
                inputs = [x, np.ascontiguousarray(h, np.float32)]
                for layer, a, g in zip(layers, inputs, [dz1, dz2]):
                    dw, db = p.natural_gradient(layer, a, g, grad_scale=m)   # ... so grad_scale = m
                    weights[layer] -= args.lr * dw
                    biases[layer] -= args.lr * db
            logits = np.maximum(x_test @ weights[0].T + biases[0], 0) @ weights[1].T + biases[1]
            accuracy = (logits.argmax(axis=1) == y_test).mean()
            print(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}  test accuracy {100 * accuracy:.2f}%  "
                  f"({time.time() - start:.1f} s)")
        stats = p.layer_stats(layers[0])
        print(f"layer 0: batch {stats['batch']}, rcond {stats['rcond']:.2e}, "
              f"last update {stats['update_seconds'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
