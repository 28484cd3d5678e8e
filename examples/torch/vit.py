"""A small Vision Transformer on Fashion-MNIST: TENGraD's exact per-sequence blocks on every
nn.Linear of a transformer, against AdamW and SGD at equal wall-clock time (`make demo-vit`).

    python3 examples/torch/vit.py [--budget 120] [--width 64] [--depth 3] [--heads 4]
        [--optimizers tengrad,adamw,sgd] [--seeds N] [--plot vit.png]

The model: 4×4 patches (T = 49 tokens of 16 pixels) → nn.Linear patch embedding → learned
position embedding → `--depth` pre-norm blocks (multi-head self-attention with separate q, k, v,
output nn.Linear projections; MLP nn.Linear d → 2d → d with GELU) → LayerNorm → mean over tokens
→ nn.Linear classifier. Every nn.Linear but the classifier sees [batch, 49, features]: TENGraD
preconditions each with the exact Fisher block of per-image gradients (docs/DESIGN.md §12);
LayerNorm and the position embedding get the plain gradient (with momentum SGD's step).

Training, evaluation, the table and the plot are the main demo's (examples/torch/fashion_mnist.py,
whose options all apply); defaults here are for this model: TENGraD with the sampled Fisher
refreshed every 10 steps, AdamW (lr 1e-3, weight decay 0.05), SGD with momentum.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist as fm  # noqa: E402  (sets GOMP_SPINCOUNT before torch loads)
import tengrad  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    def __init__(self, width=64, depth=3, heads=4, patch=4, classes=10):
        super().__init__()
        self.patch = patch
        tokens = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):                                    # x: [batch, 1, 28, 28]
        p = self.patch
        tokens = x.unfold(2, p, p).unfold(3, p, p).reshape(x.shape[0], -1, p * p)  # [batch, 49, 16]
        h = self.blocks(self.embed(tokens) + self.pos)
        return self.head(self.ln(h).mean(1))


def parser():
    ap = fm.parser()
    ap.description = __doc__
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    # Defaults for this model (a short equal-budget sweep, README "Sequence layers").
    ap.set_defaults(width=64, optimizers="tengrad,adamw,sgd", budget=120.0, plot="vit.png", targets="0.85,0.87",
                    lr_tengrad=0.1, damping=1.0, lr_sgd=0.1, lr_adamw=2e-3, eval_seconds=15.0)
    return ap


def main():
    args = parser().parse_args()
    data = fm.load_data(args)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    print(f"Fashion-MNIST {len(data[0])}/{len(data[2])}; ViT width {args.width}, depth {args.depth}, "
          f"{args.heads} heads, 4×4 patches (49 tokens), batch {args.batch}; "
          f"{'%d epochs' % args.epochs if args.epochs else '%.0f s of training' % args.budget} per optimizer; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"CPU and TENGraD's BLAS: {tengrad.blas_summary()}")
    make = lambda: ViT(args.width, args.depth, args.heads)  # noqa: E731
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {n: [fm.train(n, args, data, seed, make_model=make) for seed in seeds] for n in names}
    fm.report(runs, args, data, make_model=make)


if __name__ == "__main__":
    main()
