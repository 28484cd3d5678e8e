"""TENGraD untuned: the SGD a user already has, with and without ``tt.TENGraD(model)`` in front of it.

    python3 examples/torch/untuned.py [--steps 300] [--lrs 0.01,0.1] [--tasks mlp,autoencoder,convnet,lm]
                                      [--options "update_freq=10" ...]

Each task trains a fixed number of steps (batch 128, the same batches and initial weights for
every run) with SGD (momentum 0.9) at each learning rate of ``--lrs``, alone and behind TENGraD
constructed with nothing but the model (the library's defaults) — or with ``--options``, one
comma-separated ``key=value`` set per argument, each a row of its own (``lr=sgd``: the row's SGD
learning rate, for KL clipping). The tasks cover other
models and losses than the race's: an MLP and the demo's ConvNet (Fashion-MNIST, cross-entropy),
a deep autoencoder (Fashion-MNIST pixels, mean squared error over pixels: a loss whose scale is
not the per-sample mean TENGraD assumes) and a character-level causal transformer language model
(a license text of the system, cross-entropy over every token); ``fisher=sampled`` rows call
``sample_fisher`` on the outputs (not for the autoencoder). Printed per task and lr: the
training loss over the last 20 steps, the test metric, seconds, and "diverged" when the loss
became NaN/Inf or TENGraD refused an overflowing update.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist as fm  # noqa: E402  (sets GOMP_SPINCOUNT before torch loads)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tengrad  # noqa: E402
import tengrad.torch as tt  # noqa: E402

TEXT = "/usr/share/common-licenses/GPL-3"


class CharLM(nn.Module):
    """A small causal transformer over bytes (standard modules: every parameter an exact block)."""

    def __init__(self, vocab=256, width=64, depth=2, heads=4, context=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        t = ids.shape[1]
        positions = torch.arange(t).expand(ids.shape)
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.blocks(self.embed(ids) + self.pos(positions), mask=causal, is_causal=True)
        return self.head(self.ln(h))


def fashion(args):
    x, y = fm.load(args.data, "train")
    xt, yt = fm.load(args.data, "t10k")
    return x[:20000], y[:20000], xt[:2000], yt[:2000]


def tasks(args):
    """name → (make model, training batches [(x, y)], loss(output, x, y), test metric(model) and its name)."""
    out = {}
    x, y, xt, yt = fashion(args)
    g = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(x), (args.steps, 128), generator=g)
    images = [(x[i], y[i]) for i in order]

    def accuracy(model, inputs=xt):
        with torch.no_grad():
            return float((model(inputs).argmax(1) == yt).float().mean())
    ce = lambda out, a, b: F.cross_entropy(out, b)  # noqa: E731
    out["mlp"] = (lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)),
                  images, ce, accuracy, "test acc")
    out["convnet"] = (lambda: fm.ConvNet(16), images, ce, accuracy, "test acc")

    def autoencoder():
        sizes = [784, 256, 64, 16, 64, 256, 784]
        layers = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*layers)

    def mse(out, a, _):  # named: sampled labels do not apply to it (run())
        return F.mse_loss(out, a.flatten(1))

    def reconstruction(model):
        with torch.no_grad():
            return float(mse(model(xt), xt, None))
    out["autoencoder"] = (autoencoder, images, mse, reconstruction, "test mse")

    text = torch.tensor(list(open(TEXT, "rb").read()), dtype=torch.long)
    split = int(0.9 * len(text))
    starts = torch.randint(0, split - 65, (args.steps, 32), generator=g)
    windows = [(torch.stack([text[s:s + 64] for s in st]), torch.stack([text[s + 1:s + 65] for s in st]))
               for st in starts]
    held = torch.arange(split, len(text) - 65, 64)[:64]
    test_ids = torch.stack([text[s:s + 64] for s in held])
    test_next = torch.stack([text[s + 1:s + 65] for s in held])
    lm_loss = lambda out, a, b: F.cross_entropy(out.flatten(0, 1), b.flatten())  # noqa: E731

    def held_out(model):
        with torch.no_grad():
            return float(lm_loss(model(test_ids), test_ids, test_next))
    out["lm"] = (CharLM, windows, lm_loss, held_out, "test loss")
    return out


def run(task, lr, options):
    """One training run; options None: SGD alone. Returns (final loss, metric, seconds, note)."""
    make, batches, loss_fn, metric, _ = task
    if options is not None and options.get("fisher") == "sampled" and loss_fn.__name__ == "mse":
        return float("nan"), float("nan"), 0.0, "n/a (sampled labels need a softmax output)"
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if options is not None and options.get("lr") == "sgd":  # KL clipping at the SGD's lr
        options = dict(options, lr=lr)
    pre = tt.TENGraD(model, **options) if options is not None else None
    losses, start = [], time.perf_counter()
    try:
        for a, b in batches:
            opt.zero_grad()
            out = model(a)
            if pre is not None and pre.fisher == "sampled":
                pre.sample_fisher(out)  # labels drawn from the model's softmax (classes or tokens)
            loss = loss_fn(out, a, b)
            if not math.isfinite(loss.item()):
                return float("nan"), float("nan"), time.perf_counter() - start, "diverged"
            loss.backward()
            if pre is not None:
                pre.step()
            opt.step()
            losses.append(loss.item())
    except tengrad.TengradError as e:
        return float("nan"), float("nan"), time.perf_counter() - start, f"diverged ({str(e)[:40]}...)"
    finally:
        if pre is not None:
            pre.remove()
    seconds = time.perf_counter() - start
    tail = losses[-20:]
    return sum(tail) / len(tail), metric(model), seconds, ""


def parse_options(text):
    options = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, value = item.split("=", 1)
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lrs", default="0.01,0.1")
    ap.add_argument("--tasks", default="mlp,autoencoder,convnet,lm")
    ap.add_argument("--options", action="append", default=None,
                    help="TENGraD options of one row, e.g. 'damping=1,update_freq=10' (default: one row, the defaults)")
    args = ap.parse_args()
    rows = [("SGD", None)] + [(f"TENGraD({text or 'defaults'})", parse_options(text))
                              for text in (args.options or [""])]
    every = tasks(args)
    print(f"{args.steps} steps, batch 128 (lm: 32 × 64 tokens), SGD momentum 0.9; CPU and TENGraD's BLAS: "
          f"{tengrad.blas_summary()}")
    print(f"{'task':<12} {'lr':>6}  {'run':<40} {'train loss':>10} {'metric':>12} {'s':>6}")
    for name in args.tasks.split(","):
        task = every[name]
        for lr in (float(v) for v in args.lrs.split(",")):
            for label, options in rows:
                loss, value, seconds, note = run(task, lr, options)
                print(f"{name:<12} {lr:>6g}  {label:<40} {loss:>10.4f} {task[4]:>8} {value:6.4f} {seconds:6.1f} {note}",
                      flush=True)


if __name__ == "__main__":
    main()
