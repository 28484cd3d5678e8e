"""The exact blocks of standard transformer modules against an AdamW step on the same parameters,
in one run: per layer, TENGraD's refresh (``update_curvature`` then ``precondition``) and reuse
(``precondition``) seconds next to ``torch.optim.AdamW.step()`` (foreach, PyTorch's default) on
tensors of the layer's parameter shapes.

    OPENBLAS_NUM_THREADS=2 python3 benchmarks/transformer_blocks.py [--quick]

Layers of a width-d block over m sequences of T tokens: ``nn.LayerNorm(d)`` (the affine kind:
γ, β), ``nn.MultiheadAttention``'s packed in-projection d → 3d and its out-projection d → d
(linear blocks over tokens), the MLP's d → 4d, and token embeddings ``nn.Embedding(V, d)`` (the
embedding kind) for GPT-2's vocabulary V = 50257 with Zipf-distributed ids (text-like: frequent
ids shared by every sequence, the sorted Gram's worst case) and a character-level V = 65. The library calls are timed on numpy arrays (the
hooks' own cost is not included: it is PyTorch's forward work). Medians of a few repetitions on a
shared 2-core machine: read the ratios within a row. Not a test.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
import tengrad  # noqa: E402
from sequence_bench import timed  # noqa: E402  (median seconds of a few calls)


def layers(d):
    # (name, kind, in, out): kind "affine" (a norm over d features), "linear", or "embedding" (in: V)
    return [("LayerNorm", "affine", d, d), ("MHA in_proj", "linear", d, 3 * d), ("MHA out_proj", "linear", d, d),
            ("MLP up", "linear", d, 4 * d), ("Embed 50257", "embedding", 50257, d), ("Embed 65", "embedding", 65, d)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    print(f"CPU and our BLAS: {tengrad.blas_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layer':<13} {'m':>4} {'T':>4} {'d':>5} {'params':>9} {'refresh s':>10} {'reuse s':>9} "
          f"{'AdamW s':>9} {'refresh/AdamW':>14} {'reuse/AdamW':>12}")
    for d in ([256] if args.quick else [256, 512]):
        for m, T in ([(32, 64)] if args.quick else [(32, 64), (64, 128)]):
            for name, kind, n_in, n_out in layers(d):
                with tengrad.Preconditioner(damping=0.1) as p:
                    if kind == "affine":
                        layer = p.add_affine(d)
                        shapes = [(d,), (d,)]
                    elif kind == "embedding":
                        layer = p.add_embedding(n_in, n_out)
                        shapes = [(n_in, n_out)]
                    else:
                        layer = p.add_linear(n_in, n_out)
                        shapes = [(n_out, n_in), (n_out,)]
                    if kind == "embedding":
                        a = np.minimum(rng.zipf(1.2, (m, T)), n_in) - 1  # text-like ids
                    else:
                        a = rng.standard_normal((m, T, n_in)).astype(np.float32)
                    g = rng.standard_normal((m, T, n_out)).astype(np.float32)
                    vw, vb = (list(rng.standard_normal(s).astype(np.float32) for s in shapes) + [None])[:2]

                    def refresh():
                        p.update_curvature(layer, a, g, float(m))
                        p.precondition(layer, vw, vb)
                    refresh()
                    t_refresh = timed(refresh, reps)
                    t_reuse = timed(lambda: p.precondition(layer, vw, vb), reps * 4)
                params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
                for q in params:
                    q.grad = torch.randn(q.shape)
                opt = torch.optim.AdamW(params, lr=1e-3)
                opt.step()
                t_adamw = timed(opt.step, reps * 4)
                count = sum(int(np.prod(s)) for s in shapes)
                print(f"{name:<13} {m:>4} {T:>4} {d:>5} {count:>9} {t_refresh:>10.5f} {t_reuse:>9.5f} {t_adamw:>9.5f} "
                      f"{t_refresh / t_adamw:>14.1f} {t_reuse / t_adamw:>12.1f}")


if __name__ == "__main__":
    main()
