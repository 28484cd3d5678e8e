"""Saved state: round trips give bit-identical updates; every corruption tried is rejected with
ERROR_CORRUPT and leaves the preconditioner working as before."""
import struct

import numpy as np
import pytest

import tengrad

try:
    import xxhash
except ImportError:  # the checksum test then recomputes nothing
    xxhash = None


def build(rng, damping=0.05):
    p = tengrad.Preconditioner(damping=damping)
    fc = p.add_linear(12, 5, bias=True)
    conv = p.add_conv2d(4, 6, 3, (7, 7), stride=2, padding=1, dilation=1, groups=2, bias=True)
    p.set_conv_strategy(conv, "factored")
    data = {
        fc: (rng.standard_normal((9, 12)).astype(np.float32), rng.standard_normal((9, 5)).astype(np.float32)),
        conv: (rng.standard_normal((9, 4, 7, 7)).astype(np.float32), rng.standard_normal((9, 6, 4, 4)).astype(np.float32)),
    }
    for layer, (a, g) in data.items():
        p.natural_gradient(layer, a, g, 9.0)
    return p, (fc, conv), data


def updates(p, layers, rng):
    out = []
    for layer in layers:
        spec = p.layer_spec(layer)
        v = rng.standard_normal(spec.weight_shape).astype(np.float32)
        b = rng.standard_normal(spec.bias_shape).astype(np.float32) if spec.bias else None
        out.append(p.precondition(layer, v, b))
    return out


def assert_bit_identical(a, b):
    for (w1, b1), (w2, b2) in zip(a, b):
        assert w1.tobytes() == w2.tobytes()
        assert (b1 is None and b2 is None) or b1.tobytes() == b2.tobytes()


def test_round_trip_into_a_fresh_handle_is_bit_exact():
    rng = np.random.default_rng(1)
    p, layers, data = build(rng)
    blob = p.save_state()
    with tengrad.Preconditioner() as q:
        q.load_state(blob)
        assert q.num_layers == 2 and q.damping == 0.05
        assert q.layer_spec(layers[1]) == p.layer_spec(layers[1])
        assert q.layer_stats(layers[1])["batch"] == 9
        assert_bit_identical(updates(p, layers, np.random.default_rng(7)), updates(q, layers, np.random.default_rng(7)))
        assert q.kl_clip_factor(0.1, 1e-3) == p.kl_clip_factor(0.1, 1e-3)
        # The restored snapshot keeps working: the next one-call step is identical too.
        a, g = data[layers[1]]
        w1, b1 = p.natural_gradient(layers[1], a * 2, g, 9.0)
        w2, b2 = q.natural_gradient(layers[1], a * 2, g, 9.0)
        assert w1.tobytes() == w2.tobytes() and b1.tobytes() == b2.tobytes()
        assert q.layer_stats(layers[1])["conv_strategy"] == "factored"  # the setting was restored
        assert q.save_state() != blob  # new snapshot, new state
    p.close()


def test_round_trip_into_a_matching_handle_and_without_snapshots():
    rng = np.random.default_rng(2)
    p, layers, _ = build(rng)
    blob = p.save_state()
    with tengrad.Preconditioner(damping=3.0) as q:
        q.add_linear(12, 5, bias=True)
        q.add_conv2d(4, 6, 3, (7, 7), stride=2, padding=1, groups=2)
        q.load_state(blob)
        assert q.damping == 0.05
        assert_bit_identical(updates(p, layers, np.random.default_rng(3)), updates(q, layers, np.random.default_rng(3)))
    with tengrad.Preconditioner(damping=0.7) as empty, tengrad.Preconditioner() as r:
        empty.add_linear(3, 2)
        r.load_state(empty.save_state())
        assert r.num_layers == 1 and r.damping == 0.7 and r.layer_stats(0)["batch"] == 0
    p.close()


def corruptions(blob):
    """(name, damaged blob) pairs."""
    yield "empty", b""
    yield "header only", blob[:20]
    for cut in (len(blob) // 3, len(blob) - 9, len(blob) - 1):
        yield f"truncated to {cut}", blob[:cut]
    yield "trailing byte", blob + b"\0"
    for at in (0, 9, 30, len(blob) // 2, len(blob) - 3):
        damaged = bytearray(blob)
        damaged[at] ^= 0x40
        yield f"flipped byte {at}", bytes(damaged)
    wrong_version = bytearray(blob)
    struct.pack_into("<I", wrong_version, 8, 5)
    yield "version 5", bytes(wrong_version)


def test_every_corruption_is_rejected_and_changes_nothing():
    rng = np.random.default_rng(4)
    p, layers, _ = build(rng)
    blob = p.save_state()
    with tengrad.Preconditioner(damping=0.3) as q:
        q.add_linear(12, 5, bias=True)
        q.add_conv2d(4, 6, 3, (7, 7), stride=2, padding=1, groups=2)
        q.load_state(blob)
        before = updates(q, layers, np.random.default_rng(5))
        for name, damaged in corruptions(blob):
            with pytest.raises(tengrad.TengradError) as e:
                q.load_state(damaged)
            assert e.value.status == tengrad.ERROR_CORRUPT, name
        assert "version 5" in _message(q, dict(corruptions(blob))["version 5"])
        assert "checksum" in _message(q, dict(corruptions(blob))[f"flipped byte {len(blob) // 2}"])
        assert_bit_identical(before, updates(q, layers, np.random.default_rng(5)))
    p.close()


def _message(p, blob):
    try:
        p.load_state(blob)
    except tengrad.TengradError as e:
        return e.message
    return ""


def test_wrong_shapes_are_rejected():
    rng = np.random.default_rng(6)
    p, layers, _ = build(rng)
    blob = p.save_state()
    for setup in (lambda q: q.add_linear(12, 5, bias=False),
                  lambda q: (q.add_linear(12, 5), q.add_conv2d(4, 6, 3, (7, 7), padding=1, groups=2)),
                  lambda q: (q.add_linear(12, 5), q.add_conv2d(4, 6, 3, (7, 7), stride=2, padding=1, groups=2),
                             q.add_linear(1, 1))):
        with tengrad.Preconditioner() as q:
            setup(q)
            n = q.num_layers
            with pytest.raises(tengrad.TengradError) as e:
                q.load_state(blob)
            assert e.value.status == tengrad.ERROR_CORRUPT
            assert q.num_layers == n
    p.close()


@pytest.mark.skipif(xxhash is None, reason="xxhash not installed")
def test_checksum_is_xxh64_of_the_preceding_bytes():
    rng = np.random.default_rng(8)
    p, _, _ = build(rng)
    blob = p.save_state()
    assert blob[:8] == b"TENGRAD\x1a"
    assert struct.unpack_from("<Q", blob, len(blob) - 8)[0] == xxhash.xxh64(blob[:-8]).intdigest()
    p.close()


@pytest.mark.skipif(xxhash is None, reason="xxhash not installed")
def test_hostile_sizes_behind_a_valid_checksum_are_corrupt_not_a_crash():
    def blob(layer_bytes):
        payload = struct.pack("<dqI", 0.1, 0, 1) + layer_bytes
        body = b"TENGRAD\x1a" + struct.pack("<IIQ", 1, 0, len(payload)) + payload
        return body + struct.pack("<Q", xxhash.xxh64(body).intdigest())
    big = 2**31 - 1
    for m in (big, 2**20, -5, 0):
        layer = (struct.pack("<IqqI", 1, big, big, 1) + struct.pack("<II", 0, 1)
                 + struct.pack("<qfddd", m, 1.0, 0.1, 0.0, 1.0) + b"\0" * 64)
        with tengrad.Preconditioner() as p:
            with pytest.raises(tengrad.TengradError) as e:
                p.load_state(blob(layer))
            assert e.value.status == tengrad.ERROR_CORRUPT
            assert p.num_layers == 0


@pytest.mark.parametrize("representation", ["raw", "per-sample"])
def test_round_trip_of_either_representation(representation):
    rng = np.random.default_rng(8)
    with tengrad.Preconditioner(damping=0.2) as p:
        conv = p.add_conv2d(2, 3, 3, (6, 6), padding=1)
        fc = p.add_linear(5, 4)
        for layer in (conv, fc):
            p.set_snapshot_representation(layer, representation)
        p.update_curvature(conv, rng.standard_normal((4, 2, 6, 6), dtype=np.float32),
                           rng.standard_normal((4, 3, 6, 6), dtype=np.float32), 4.0)
        p.natural_gradient(fc, rng.standard_normal((4, 5), dtype=np.float32),
                           rng.standard_normal((4, 4), dtype=np.float32), 4.0)
        blob = p.save_state()
        with tengrad.Preconditioner() as q:
            q.load_state(blob)
            for layer in (conv, fc):
                assert q.snapshot_info(layer)["representation"] == representation
                assert q.snapshot_info(layer)["representation_setting"] == representation
            assert q.save_state() == blob
            assert_bit_identical(updates(p, (conv, fc), np.random.default_rng(9)),
                                 updates(q, (conv, fc), np.random.default_rng(9)))


def test_format_version_1_still_loads():
    """The fuzz corpus's seeds were written by the version-1 format (before per-sample snapshots);
    they must load, and the restored snapshots must precondition correctly. The seeds' inputs are
    regenerated here exactly as Tests/fuzz/make_state_seeds.py drew them."""
    import os
    from conv_oracle import conv_per_sample, join_conv
    from oracle import damped_solve, relative_error
    seed = os.path.join(os.path.dirname(__file__), "..", "..", "..", "Tests", "fuzz", "corpus", "state", "linear-conv-0")
    with open(seed, "rb") as f:
        blob = f.read()[1:]
    assert struct.unpack_from("<I", blob, 8)[0] == 1
    rng = np.random.default_rng(0)
    rng.standard_normal((2, 3)), rng.standard_normal((2, 2))  # the linear layer's batch
    x = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    g = rng.standard_normal((2, 2, 2, 2)).astype(np.float32)
    with tengrad.Preconditioner() as p:
        p.load_state(blob)
        assert p.num_layers == 2 and p.snapshot_info(1)["representation"] == "raw"
        assert p.layer_stats(1)["batch"] == 2 and p.snapshot_info(1)["representation_setting"] == "auto"
        v = np.random.default_rng(1).standard_normal((2, 1, 2, 2)).astype(np.float32)
        w, _ = p.precondition(1, v, None)
        spec = dict(kernel=(2, 2), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=2, bias=False)
        U = conv_per_sample(x.astype(np.float64), g.astype(np.float64), spec, 1.0)
        assert relative_error(join_conv(w, None), damped_solve(U, p.damping, join_conv(v, None))) <= 1e-3
        assert struct.unpack_from("<I", p.save_state(), 8)[0] == 4  # saved again as version 4
