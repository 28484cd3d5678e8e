"""Writes seeds of the state fuzzer (Tests/fuzz/corpus/state/v3-*) in the current format version:
handles with linear layers over tokens (raw, per-sample, per-token snapshots), a conv layer, a
snapshot from gathered per-sample gradients, affine layers (LayerNorm's γ, β; RMSNorm's γ over
tokens), an embedding (token ids over tokens, masked), and no snapshot. Run from the repository root after
`swift build -c release`:  python3 Tests/fuzz/state_seeds.py"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bindings", "python"))
import tengrad  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "state")


def seeds():
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    with tengrad.Preconditioner() as p:
        p.add_linear(3, 2)
        yield "v3-linear-no-snapshot", p.save_state()
    with tengrad.Preconditioner(damping=0.2) as p:
        layer = p.add_linear(3, 2)
        p.update_curvature(layer, f(2, 4, 3), f(2, 4, 2), 2.0)                       # raw, T = 4
        yield "v3-tokens-raw", p.save_state()
        p.set_snapshot_representation(layer, "per-sample")
        p.update_curvature(layer, f(3, 2, 3), f(3, 2, 2), 1.0, mask=np.array([[1, 1], [1, 0], [0, 1]], bool))
        yield "v3-tokens-per-sample-masked", p.save_state()
    with tengrad.Preconditioner() as p:
        layer = p.add_linear(2, 2, bias=False)
        p.set_token_mode(layer, "per-token")
        p.update_curvature(layer, f(2, 3, 2), f(2, 3, 2), 1.0)
        conv = p.add_conv2d(1, 2, 3, (4, 4), padding=1)
        rows = p.per_sample_gradients(conv, f(2, 1, 4, 4), f(2, 2, 4, 4), 1.0)
        p.update_curvature_from_gradients(conv, rows)
        yield "v3-per-token-and-gathered-conv", p.save_state()
    with tengrad.Preconditioner() as p:
        norm = p.add_affine(4)
        p.update_curvature(norm, f(3, 4), f(3, 4), 3.0)                              # per-sample U
        rms = p.add_affine(3, bias=False)
        p.set_snapshot_representation(rms, "raw")
        p.update_curvature(rms, f(2, 5, 3), f(2, 5, 3), 1.0, mask=np.array([[1, 1, 1, 0, 0], [1] * 5], bool))
        yield "v3-affine", p.save_state()
    with tengrad.Preconditioner() as p:
        emb = p.add_embedding(5, 3)
        p.update_curvature(emb, np.array([[0, 4, 4], [2, 0, 1]]), f(2, 3, 3), 2.0, mask=np.array([[1, 1, 1], [1, 1, 0]], bool))
        yield "v3-embedding", p.save_state()


if __name__ == "__main__":
    for name, blob in seeds():
        with open(os.path.join(OUT, name), "wb") as out:
            out.write(blob)
        print(f"{name}: {len(blob)} bytes")
