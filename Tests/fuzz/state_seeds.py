"""Writes seeds of the state fuzzer (Tests/fuzz/corpus/state/v4-*) in the current format version:
diagonal bases — a setting alone, a snapshot's alone, a per-sample conv snapshot's and an
embedding's (its sparse Gram). The v3-* seeds (linear layers over tokens, raw, per-sample and
per-token snapshots, a gathered conv, affine layers, an embedding) were written by format 3 with
this script's earlier version (git history) and are kept as they are: format 3 must still load.
Run from the repository root after `swift build -c release`:  python3 Tests/fuzz/state_seeds.py"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bindings", "python"))
import tengrad  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "state")


def base_seeds():
    rng = np.random.default_rng(1)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    e = lambda *shape: (0.5 + rng.random(shape)).astype(np.float32)  # noqa: E731
    with tengrad.Preconditioner(damping=0.2) as p:
        layer = p.add_linear(3, 2)
        p.set_base(layer, e(2, 3), e(2))
        yield "v4-base-setting-only", p.save_state()
        p.update_curvature(layer, f(3, 3), f(3, 2), 3.0)
        p.set_base(layer, None)
        yield "v4-base-snapshot-only", p.save_state()
        conv = p.add_conv2d(1, 2, 3, (4, 4), padding=1)
        p.set_base(conv, e(2, 1, 3, 3), e(2))
        p.set_snapshot_representation(conv, "per-sample")
        p.update_curvature(conv, f(2, 1, 4, 4), f(2, 2, 4, 4), 1.0)
        emb = p.add_embedding(5, 3)
        p.set_base(emb, e(5, 3))
        p.update_curvature(emb, np.array([[0, 4, 4], [2, 0, 1]]), f(2, 3, 3), 2.0)
        yield "v4-base-conv-embedding", p.save_state()


if __name__ == "__main__":
    for name, blob in base_seeds():
        with open(os.path.join(OUT, name), "wb") as out:
            out.write(blob)
        print(f"{name}: {len(blob)} bytes")
