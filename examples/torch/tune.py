"""The race's tuning search: the same budget for every optimizer, on either demo's task.

    python3 examples/torch/tune.py [--task convnet|vit] [--budget 40] [--optimizers ...]
        [--out examples/torch/TUNING.md]

Every optimizer of peers.py (and ``tengrad-hidden``, TENGraD on the hidden layers with AdamW for the
rest, searched as an optimizer of its own) gets a grid of at least 8 configurations — its learning
rate and its main knob, each method under the race's schedule (linear warm-up over 5 % of the
budget, cosine decay to zero at its end; Schedule-Free: the warm-up only) — each trained for
--budget seconds of training time on the full Fashion-MNIST training set from seed 0 and scored by
test accuracy (10k images) at the end. When the best configuration sits at an edge of a numeric
axis, the axis is extended one step beyond it (holding the other knobs at the best's values) until
it does not, up to 3 times. The two best configurations are then run on seeds 1 and 2; an
optimizer's winner is the one with the best median of the 3 seeds. When that winner sits at an edge,
the axis is extended there too (seed 0); a new configuration that beats the winner on seed 0 is run
on seeds 1 and 2 and competes by its median (up to 3 times). Every run and score goes to the output
file (a section per task, replacing that task's section; a search of some optimizers, their own
subsection in it); the demos' defaults are the winners.
"""
import argparse
import itertools
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist as demo  # noqa: E402  (sets GOMP_SPINCOUNT before torch loads)
import race  # noqa: E402

# Per optimizer: {knob: values}; the product is the grid (≥ 8 each).
GRIDS = {
    "convnet": {
        "tengrad": {"lr_tengrad": [0.03, 0.1, 0.3], "damping": [0.3, 1.0, 3.0]},
        "sgd": {"lr_sgd": [0.025, 0.05, 0.1, 0.2], "sgd_decay": [5e-4, 5e-3]},
        "adamw": {"lr_adamw": [5e-4, 1e-3, 2e-3, 4e-3], "adamw_decay": [0.01, 0.1]},
        "muon": {"lr_muon": [0.005, 0.01, 0.02, 0.04], "lr_muon_adamw": [1e-3, 4e-3]},
        "soap": {"lr_soap": [1e-3, 2e-3, 4e-3, 8e-3], "soap_decay": [0.01, 0.1]},
        "schedulefree": {"lr_schedulefree": [1e-3, 2.5e-3, 5e-3, 1e-2], "schedulefree_warmup": [0.05, 0.2]},
        "kfac": {"lr_kfac": [0.001, 0.003, 0.01, 0.03], "kfac_damping": [0.03, 0.1]},
    },
}
GRIDS["vit"] = {**GRIDS["convnet"],
                "sgd": {"lr_sgd": [0.025, 0.05, 0.1, 0.2], "sgd_decay": [5e-4, 5e-3]},
                "adamw": {"lr_adamw": [5e-4, 1e-3, 2e-3, 4e-3], "adamw_decay": [0.05, 0.2]}}
# A TENGraD variant searched like an optimizer of its own: (the race's optimizer, fixed options).
# "tengrad-hidden" is Muon's split (exact blocks on the hidden layers, AdamW for the rest; peers.py
# --tengrad-hidden); its grid adds that AdamW's lr, as Muon's does.
VARIANTS = {"tengrad-hidden": ("tengrad", {"tengrad_hidden": True})}
GRIDS["convnet"]["tengrad-hidden"] = {"lr_tengrad": [0.1, 0.3, 1.0], "damping": [0.3, 1.0, 3.0],
                                      "lr_tengrad_adamw": [0.004, 0.016]}
GRIDS["vit"]["tengrad-hidden"] = {"lr_tengrad": [0.01, 0.03, 0.1], "damping": [0.1, 0.3, 1.0],
                                  "lr_tengrad_adamw": [0.004, 0.016]}


def configs(grid):
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def label(config):
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="convnet", choices=sorted(GRIDS))
    ap.add_argument("--budget", type=float, default=40.0)
    ap.add_argument("--optimizers", default=",".join(GRIDS["convnet"]))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "TUNING.md"))
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--train-limit", type=int, default=None, help="(smoke tests) fewer training images")
    ap.add_argument("--test-limit", type=int, default=None, help="(smoke tests) fewer test images")
    cli = ap.parse_args()
    if cli.task == "vit":
        import vit
        base_parser = vit.parser()
    else:
        base_parser = demo.parser()
    argv = ["--data", cli.data, "--budget", str(cli.budget), "--eval-seconds", str(10 * cli.budget)]
    for flag, value in (("--train-limit", cli.train_limit), ("--test-limit", cli.test_limit)):
        if value:
            argv += [flag, str(value)]
    base = base_parser.parse_args(argv)
    if cli.task == "vit":
        make = lambda: vit.ViT(base.width, base.depth, base.heads)  # noqa: E731
    else:
        make = lambda: demo.ConvNet(base.width)  # noqa: E731
    data = demo.load_data(base)
    start, lines, winners = time.time(), [], {}

    def run(name, config, seed):
        peer, fixed = VARIANTS.get(name, (name, {}))
        args = argparse.Namespace(**{**vars(base), **fixed, **config})
        h = race.train_seeds(peer, args, data, [seed], make, label=f"{name} {label(config)}")[0]
        if "failed" in h:  # a diverged run (NaN inside a peer, an overflow refused) scores 0
            h = {"accuracy": [0.0], "steps_per_second": float("nan")}
        score = h["accuracy"][-1]
        lines.append(f"| {name} | {label(config)} | {seed} | {100 * score:.2f}% | {h['steps_per_second']:.1f} |")
        print(f"{name:<12} {label(config)} seed {seed} -> {100 * score:.2f}%", flush=True)
        return score

    for name in [n.strip() for n in cli.optimizers.split(",") if n.strip()]:
        grid = {k: list(v) for k, v in GRIDS[cli.task][name].items()}
        scores = {}
        for config in configs(grid):
            scores[tuple(config.items())] = run(name, config, 0)

        def extend(best):
            """Runs (seed 0) one step beyond each numeric axis's edge that holds ``best``; the new keys."""
            new_keys = []
            for k, values in grid.items():
                at = values.index(best[k])
                if at in (0, len(values) - 1) and len(values) > 1 and isinstance(best[k], float):
                    step = values[1] / values[0] if at == 0 else values[-1] / values[-2]
                    new = values[0] / step if at == 0 else values[-1] * step
                    if k.endswith("warmup") and not 0 < new < 0.5:
                        continue
                    values.insert(0, new) if at == 0 else values.append(new)
                    key = tuple({**best, k: new}.items())
                    scores[key] = run(name, dict(key), 0)
                    new_keys.append(key)
            return new_keys

        for _ in range(3):  # extend an axis whose edge holds the best of seed 0
            if not extend(dict(max(scores, key=scores.get))):
                break
        medians = {}

        def seeded(key):
            medians[key] = sorted([scores[key]] + [run(name, dict(key), seed) for seed in (1, 2)])[1]

        for key in sorted(scores, key=scores.get, reverse=True)[:2]:
            seeded(key)
        for _ in range(3):  # the winner of the medians at an edge: extend there too
            win = max(medians, key=medians.get)
            better = [key for key in extend(dict(win)) if scores[key] > scores[win]]
            for key in better:
                seeded(key)
            if not better:
                break
        win = max(medians, key=medians.get)
        winners[name] = (dict(win), medians[win])
    write(cli, start, lines, winners)


def write(cli, start, lines, winners):
    """The task's section (``## task``) for a search of every optimizer; for a search of some, their
    own subsection (``### task: names``) at the end of the task's section, the rest kept."""
    whole = set(winners) == set(GRIDS[cli.task])
    title = f"## {cli.task}" if whole else f"### {cli.task}: {', '.join(winners)}"
    command = f"python3 examples/torch/tune.py --task {cli.task} --budget {cli.budget:g}"
    command += "" if whole else f" --optimizers {','.join(winners)}"
    section = [title, "",
               f"`{command}` on the 2-core development "
               f"machine ({time.strftime('%Y-%m-%d')}, {(time.time() - start) / 60:.0f} min in all). Score: test "
               f"accuracy after {cli.budget:g} s of training under the race's schedule (seed 0; the two best of each "
               "optimizer also on seeds 1 and 2). Winners (median of 3 seeds):", ""]
    section += [f"* **{name}**: {label(config)} — {100 * score:.2f}%" for name, (config, score) in winners.items()]
    section += ["", "| optimizer | configuration | seed | test accuracy | steps/s |", "|---|---|---|---|---|"] + lines + [""]
    body = "\n".join(section) + "\n"
    old = open(cli.out).read() if os.path.exists(cli.out) else "# Tuning results\n\n"
    mine = re.compile(rf"^{re.escape(title)}\n.*?(?=^{'##' if not whole else '## '}|\Z)", re.S | re.M)
    task = re.compile(rf"^## {re.escape(cli.task)}\n.*?(?=^## |\Z)", re.S | re.M)
    if mine.search(old):
        text = mine.sub(lambda _: body, old)
    elif not whole and task.search(old):
        text = task.sub(lambda m: m.group(0).rstrip() + "\n\n" + body, old)
    else:
        text = old.rstrip() + "\n\n" + body
    with open(cli.out, "w") as f:
        f.write(text)
    print(f"written: {cli.out}")


if __name__ == "__main__":
    main()
