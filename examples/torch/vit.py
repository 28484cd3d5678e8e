"""A small Vision Transformer on Fashion-MNIST, built of standard PyTorch modules that all have
TENGraD's exact per-sequence blocks, against the race's peers at equal wall-clock time
(`make demo-vit`).

    python3 examples/torch/vit.py [--budget 120] [--width 64] [--depth 3] [--heads 4]
        [--optimizers tengrad,sgd,adamw,...] [--seeds N] [--plot vit.png]

The model: 4×4 patches (T = 49 tokens of 16 pixels) → nn.Linear patch embedding + nn.Embedding
position embedding (each image's position ids) → nn.TransformerEncoder of `--depth` pre-norm
nn.TransformerEncoderLayer blocks (nn.MultiheadAttention, MLP d → 2d → d with GELU, two
nn.LayerNorm) → nn.LayerNorm → mean over tokens → nn.Linear classifier. Every layer but the
classifier sees [batch, 49, features]: TENGraD can precondition each with the exact Fisher block
of per-image gradients (docs/DESIGN.md §12) — the attention's packed in-projection as one block,
the norms' γ and β, the position table — so no parameter need be left to the plain gradient.

Training, evaluation, the table and the plot are the main demo's (examples/torch/fashion_mnist.py,
whose options all apply); defaults here are this model's tuned settings (TUNED below, from
``tune.py --task vit``), TENGraD with the sampled Fisher refreshed every 10 steps, on the hidden
layers (AdamW for the rest, as Muon; ``--no-tengrad-hidden`` puts every parameter on its block).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist as fm  # noqa: E402  (sets GOMP_SPINCOUNT before torch loads)
import race  # noqa: E402
import tengrad  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


class ViT(nn.Module):
    """Standard PyTorch modules only, so every parameter gets an exact block."""

    def __init__(self, width=64, depth=3, heads=4, patch=4, classes=10):
        super().__init__()
        self.patch = patch
        tokens = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.pos = nn.Embedding(tokens, width)
        nn.init.normal_(self.pos.weight, std=0.02)
        block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):                                    # x: [batch, 1, 28, 28]
        p = self.patch
        tokens = x.unfold(2, p, p).unfold(3, p, p).reshape(x.shape[0], -1, p * p)  # [batch, 49, 16]
        # Each image's own position ids ([batch, 49]): an exact block (ids shared by the batch, [49],
        # would leave the position embedding its plain gradient).
        positions = torch.arange(tokens.shape[1], device=x.device).expand(tokens.shape[:2])
        h = self.blocks(self.embed(tokens) + self.pos(positions))
        return self.head(self.ln(h).mean(1))


# The tuning search's winners for this model (examples/torch/TUNING.md, section vit: tune.py --task vit).
# TENGraD runs in Muon's split here (the ablation's one variant that helps the transformer): exact
# blocks on the hidden layers, AdamW for patch embedding, positions, norms, biases and head, its own
# search (tengrad-hidden: 82.12 % against 79.70 % for blocks on every parameter; --no-tengrad-hidden
# with --lr-tengrad 0.03 --damping 0.3 runs that one).
TUNED = {"tengrad_hidden": True, "lr_tengrad": 0.01, "damping": 0.1, "lr_tengrad_adamw": 0.016, "lr_sgd": 0.1, "sgd_decay": 5e-4, "lr_adamw": 0.004,
         "adamw_decay": 0.0125, "lr_muon": 0.01, "lr_muon_adamw": 0.064, "lr_soap": 0.008, "soap_decay": 0.1,
         "lr_schedulefree": 0.01, "schedulefree_warmup": 0.2, "lr_kfac": 0.001, "kfac_damping": 0.03}


def parser():
    ap = fm.base_parser()
    ap.description = __doc__
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.set_defaults(width=64, optimizers="tengrad,sgd,adamw,muon,soap,schedulefree,kfac", budget=120.0, plot="vit.png",
                    targets="0.85,0.87", eval_seconds=15.0, **TUNED)
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
    runs = {n: race.train_seeds(n, args, data, seeds, make) for n in names}
    race.report(runs, args, data, make)


if __name__ == "__main__":
    main()
