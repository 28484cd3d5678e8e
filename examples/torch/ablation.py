"""TENGraD's variants side by side on either demo's task (the race's ablation), each from the
demo's tuned settings without tuning of its own: a grafted variant takes the learning rate tuned
for the optimizer whose step norm it inherits.

    python3 examples/torch/ablation.py [--task convnet|vit] [--variants a,b] [--seeds 3] [--budget ...]

Variants: ``tengrad`` (the tuned TENGraD); ``graft-sgd`` (per-layer norm of the gradient, SGD's
tuned lr); ``graft-adam`` (per-layer norm of an Adam step, AdamW's tuned lr, momentum averaged
like Adam's); ``hidden+adamw`` (exact blocks on the hidden layers only, AdamW at its tuned lr for
the first and last layers, norms and embeddings); ``all-layers`` (every parameter on its exact
block, the rest of the tuned settings: the ViT's tuned TENGraD runs on the hidden layers only);
``base-adam`` (the block F + λE, E from Adam's
second moment, TENGraD's tuned lr and λ); ``base+graft-adam`` (that base and Adam's per-layer step
norm, AdamW's tuned lr: an Adam-shaped direction corrected by the batch's exact block);
``empirical`` (the empirical Fisher instead of the sampled one: no sampled backward);
``adamw-on-top-<λ>`` (AdamW at its tuned lr and decay stepping TENGraD's natural gradient, no KL
clipping, λ 10, 1, 0.1 or 0.01: the smaller λ, the more the batch's exact block reshapes what
Adam sees); ``relative-1`` (each block's λ equal to its average
nonzero eigenvalue — relative damping at its natural, untuned point — TENGraD's tuned lr);
``kl-peak`` (KL clipping at the peak lr, so that the schedule scales the clipped step: with the
scheduled lr, lr · ν is constant while the clip binds and the cosine decay does nothing);
``window-2``, ``window-4`` (each block the exact Fisher of the last 2 or 4 refreshes' batches);
``kl-0.001``, ``kl-0.1``, ``no-kl`` (KL clipping's κ ten times smaller or larger than the race's
1e-2, or none: while the clip binds, κ and not the lr sets the step).
Printed: the race's table (accuracy at the budget, time to the targets, steps/s; median
[min–max] over seeds) and the runs that failed (a diverged variant's update refused as
overflowing float32), which the table leaves out.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist as demo  # noqa: E402  (sets GOMP_SPINCOUNT before torch loads)
import race  # noqa: E402


def variants(args):
    return {
        "tengrad": {},
        "graft-sgd": {"graft": "sgd", "lr_tengrad": args.lr_sgd},
        "graft-adam": {"graft": "adam", "lr_tengrad": args.lr_adamw},
        "hidden+adamw": {"tengrad_hidden": True, "lr_tengrad_adamw": args.lr_adamw},
        "all-layers": {"tengrad_hidden": False},
        "base-adam": {"tengrad_base": "adam"},
        "base+graft-adam": {"tengrad_base": "adam", "graft": "adam", "lr_tengrad": args.lr_adamw},
        "empirical": {"fisher": "empirical"},
        **{f"adamw-on-top-{lam:g}": {"tengrad_adamw": True, "kl_clip": 0.0, "damping": lam}
           for lam in (10.0, 1.0, 0.1, 0.01)},
        "relative-1": {"damping_mode": "relative", "damping": 1.0},
        "kl-peak": {"kl_lr": "peak"},
        "window-2": {"window": 2},
        "window-4": {"window": 4},
        "kl-0.001": {"kl_clip": 1e-3},
        "kl-0.1": {"kl_clip": 1e-1},
        "no-kl": {"kl_clip": 0.0},
    }


def main():
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", default="convnet", choices=["convnet", "vit"])
    first.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    known, argv = first.parse_known_args()
    task = known.task
    if task == "vit":
        import vit
        args = vit.parser().parse_args(argv)
        make = lambda: vit.ViT(args.width, args.depth, args.heads)  # noqa: E731
    else:
        args = demo.parser().parse_args(argv)
        make = lambda: demo.ConvNet(args.width)  # noqa: E731
    args.no_paired_cost = True
    data = demo.load_data(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"TENGraD variants on the {task} task, {args.budget:.0f} s of training each, seeds {seeds}")
    chosen = {k: v for k, v in variants(args).items() if known.variants is None or k in known.variants.split(",")}
    runs = {label: race.train_seeds("tengrad", argparse.Namespace(**{**vars(args), **change}), data, seeds, make,
                                    label=label)
            for label, change in chosen.items()}
    race.report(runs, args, data, make)


if __name__ == "__main__":
    main()
