"""Writes the committed seed corpus of the state fuzzer: small valid state blobs (tiny linear and
conv layers, with and without snapshots), each twice — prefixed by 0 (as is) and by 1 (the
harness repairs length and checksum after mutation). Run from the repository root:

    python3 Tests/fuzz/make_state_seeds.py

The seeds named without a version (empty-0, linear-conv-1, ...) were written by state format 1
and are kept as they are: they are the fixtures that format 1 still loads (bindings/python/tests/
test_state.py). This script writes the current format's seeds as v2-NAME-PREFIX, among them
snapshots of both representations.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bindings", "python"))
import tengrad  # noqa: E402

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "state")
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
blobs = {}
with tengrad.Preconditioner() as p:
    blobs["empty"] = p.save_state()
    fc = p.add_linear(3, 2, bias=True)
    blobs["linear-no-snapshot"] = p.save_state()
    p.natural_gradient(fc, rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32), 2.0)
    blobs["linear"] = p.save_state()
    conv = p.add_conv2d(2, 2, 2, (3, 3), stride=1, padding=0, groups=2, bias=False)
    p.set_conv_strategy(conv, "explicit")
    p.update_curvature(conv, rng.standard_normal((2, 2, 3, 3)).astype(np.float32), rng.standard_normal((2, 2, 2, 2)).astype(np.float32), 1.0)
    blobs["linear-conv"] = p.save_state()
    wide = p.add_conv2d(1, 2, 3, (4, 4), padding=1, bias=True)
    p.set_snapshot_representation(wide, "per-sample")
    p.update_curvature(wide, rng.standard_normal((2, 1, 4, 4)).astype(np.float32), rng.standard_normal((2, 2, 4, 4)).astype(np.float32), 2.0)
    p.set_snapshot_representation(fc, "per-sample")
    blobs["linear-conv-per-sample"] = p.save_state()
for name, blob in blobs.items():
    for prefix in (0, 1):
        with open(os.path.join(out, f"v2-{name}-{prefix}"), "wb") as f:
            f.write(bytes([prefix]) + blob)
print(f"wrote {2 * len(blobs)} seeds to {out}")
