"""Data-parallel TENGraD (torch.distributed, gloo on 127.0.0.1) equals a single process on the
concatenated batch: P ∈ {1, 2, 3, 4} ranks (m = 10: uneven for 3 and 4; 4 ranks > the MLP's 2
layers), linear and conv layers (the convolutions send per-sample gradient rows, the linear
layers raw rows), empirical and sampled Fisher, refresh and reuse steps. Every
rank's preconditioned gradients match the single process's within 1e-4 relative (float32 rounding
of a differently ordered sum of per-rank means; observed 2e-7 to 1.2e-5), ranks agree bitwise (the owner
broadcasts), and every rank computed the same owner map. With KL clipping, ν comes from the
global sum of ⟨update, grad⟩ and equals the single process's. With the model wrapped in
DistributedDataParallel, DDP averages only the layer TENGraD skips (its gradient equals the single
process's raw mean) and the rest equals the single process too. A rank that fails (NaN gradient or
activation seen by another rank's owner, a missing gradient) makes every rank raise with .grad
unchanged, and the retry equals a clean run. Each multi-process run has a timeout."""
import os
import multiprocessing
import socket
import time

import numpy as np
import pytest

import dist_worker
from dist_worker import OPTIONS


def free_ports(n):
    """n distinct free ports (all bound at once, so groups started together never share one)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# Workers are forked from one fork server per test session that has imported torch, tengrad and
# the worker (a fresh interpreter per rank spent most of this file's time importing torch).
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "SWIFT_BACKTRACE": "enable=no"}
_context = None


def context():
    """The fork server's context, started on first use with the workers' thread settings (read
    when OpenBLAS and OpenMP load); this process's environment is restored afterwards."""
    global _context
    if _context is None:
        from multiprocessing import forkserver
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["dist_worker"])
        saved = {k: os.environ.get(k) for k in _WORKER_ENV}
        os.environ.update(_WORKER_ENV)
        try:
            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _context = ctx
    return _context


def start(make, fisher, size, out, distributed, variant, m, port=None):
    """Starts the worker on `size` ranks (gloo on 127.0.0.1, a port of its own); rank r's output
    goes to `out`.r.log."""
    port = port or free_ports(1)[0]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size))
    argv = [make, fisher, str(m), out, "1" if distributed else "0", variant]
    procs = []
    for r in range(size):
        p = context().Process(target=dist_worker.forked, args=(dict(env, RANK=str(r)), argv, f"{out}.{r}.log"))
        p.start()
        procs.append((p, f"{out}.{r}.log"))
    return procs


def wait(procs, timeout=120):
    """Every process must exit 0 within `timeout` seconds of this call; all are killed otherwise."""
    deadline = time.monotonic() + timeout
    try:
        for p, log in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                raise TimeoutError(f"a worker did not finish within {timeout} s")
            assert p.exitcode == 0, open(log).read()[-2000:]
    finally:
        for p, _ in procs:
            if p.exitcode is None:
                p.kill()
                p.join()


def launch(make, fisher, size, out, distributed, variant, m, timeout=120):
    """Runs the worker on `size` ranks; every rank must exit 0 in time."""
    wait(start(make, fisher, size, out, distributed, variant, m), timeout)


def name(tmp, make, fisher, size, distributed, variant):
    return os.path.join(tmp, f"{make}-{fisher}-{size}-{int(distributed)}-{variant}")


def results(out, size):
    return [dict(np.load(f"{out}.{r}.npz")) for r in range(size)]


def run(make, fisher, size, tmp, distributed, variant="plain", m=10):
    out = name(tmp, make, fisher, size, distributed, variant)
    launch(make, fisher, size, out, distributed, variant, m)
    return results(out, size)


@pytest.mark.parametrize("make,fisher", [("mlp", "empirical"), ("cnn", "empirical"), ("mlp", "sampled"), ("cnn", "sampled"),
                                         ("cnn", "empirical+kl")])
def test_distributed_equals_single_process(make, fisher, tmp_path):
    check(make, fisher, tmp_path, "plain", 10, (1, 2, 3, 4))


@pytest.mark.parametrize("make,fisher", [("mlp", "empirical"), ("cnn", "sampled")])
def test_ddp_wrapped_model(make, fisher, tmp_path):
    check(make, fisher, tmp_path, "ddp", 12, (2, 3))       # 12 samples: equal shards (DDP's plain average)


@pytest.mark.parametrize("make,fisher", [("mlp", "empirical"), ("cnn", "sampled")])
def test_failing_rank_raises_everywhere(make, fisher, tmp_path):
    check(make, fisher, tmp_path, "inject", 10, (2, 3))


def test_resume_from_a_checkpoint_saved_on_rank_0(tmp_path):
    """Rank 0 saves state_dict(), every rank loads it: training continues (the first step after
    the load refreshes), the ranks agree bitwise and the step counter is the saved one's."""
    ranks = run("mlp", "empirical", 2, str(tmp_path), True, "resume", 10)
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    assert int(ranks[0]["steps"]) == 4


def test_ddp_after_remove_and_a_second_tengrad(tmp_path):
    """After pre.remove() a DDP model averages every gradient again (replicas stay equal), and a new
    TENGraD on the same DDP model works (DDP allows one hook: the first one routes)."""
    ranks = run("mlp", "empirical", 2, str(tmp_path), True, "ddp-remove", 10)
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)


def test_frozen_layer_unused_head_and_keyword_input(tmp_path):
    """What works in one process works data-parallel: a frozen layer and an unused head (no
    gradient on any rank: left out alike), and model(x=...) (the batch read from the keyword)."""
    check("mlp", "empirical", tmp_path, "partial", 10, (2, 3))


def test_disagreeing_ranks_raise_everywhere(tmp_path):
    """A damping set on one rank, and a rank that skips step(): every rank raises a clear error
    within seconds (the pairing used to mix replicas silently)."""
    out = os.path.join(str(tmp_path), "disagree")
    launch("mlp", "empirical", 2, out, True, "disagree", 10, timeout=60)
    for r in range(2):
        said = open(f"{out}.{r}.txt").read().splitlines()
        assert len(said) == 2, said
        assert "different layers or settings" in said[0]
        assert "different numbers of training forwards" in said[1] and "skip step()" in said[1]


def test_one_step_more_at_the_end_raises_within_seconds(tmp_path):
    """Rank 0 calls step() once more after its peers destroyed the group and exited: it raises
    within seconds instead of waiting for the group's timeout (60 s)."""
    out = os.path.join(str(tmp_path), "one-step-more")
    launch("mlp", "empirical", 2, out, True, "one-step-more", 10, timeout=50)
    assert open(f"{out}.1.txt").read() == "returned"
    seconds, said = open(f"{out}.0.txt").read().split(" ", 1)
    assert float(seconds) < 10, said
    assert "RuntimeError: TENGraD: step 3's first exchange failed" in said and "more steps" in said, said


def test_a_subgroup_without_global_rank_0(tmp_path):
    """TENGraD on a process group of global ranks 1 and 2 (rank 0 elsewhere): owners are group
    ranks, torch's collectives take global ranks; equals the single process."""
    reference = run("mlp", "empirical", 1, str(tmp_path), False, "plain", 10)[0]
    out = os.path.join(str(tmp_path), "subgroup")
    launch("mlp", "empirical", 3, out, True, "subgroup", 10)
    ranks = [dict(np.load(f"{out}.{r}.npz")) for r in (1, 2)]
    for key, want in reference.items():
        if key in ("owners", "kinds", "nu"):
            continue
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
        assert np.linalg.norm(ranks[0][key] - want) <= 1e-4 * np.linalg.norm(want), key


@pytest.mark.parametrize("make", ["mlp", "cnn"])
def test_a_rank_without_samples(make, tmp_path):
    """A rank whose shard is empty (its mean loss is NaN): the others' samples make the step, equal
    to the single process's; it used to raise IndexError there while its peers waited."""
    check(make, "empirical", tmp_path, "empty", 10, (2, 3))


@pytest.mark.parametrize("make", ["mlp", "cnn"])
def test_accumulated_micro_batches_on_a_reuse_step(make, tmp_path):
    """Gradient accumulation on reuse steps, micro-batches of unequal sizes (1 + rank and the
    rest): each rank's gradient is weighted by all its samples since the last step, so the step
    equals the single process's; the last micro-batch's size alone was 13-16 % off."""
    check(make, "empirical", tmp_path, "accumulate", 10, (2, 3))


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_sequence_layers_with_padding(fisher, tmp_path):
    """A linear layer over tokens sends per-sequence gradients (one width whatever the padding)."""
    check("seq", fisher, tmp_path, "mask", 10, (2, 3))


def test_attention_and_norm_blocks_with_padding(tmp_path):
    """nn.MultiheadAttention's two blocks and an nn.LayerNorm over tokens, data-parallel with
    padding masks: per-sequence rows, the same updates as one process."""
    check("attn", "sampled", tmp_path, "mask", 10, (2, 3))


def test_embeddings_with_padding(tmp_path):
    """nn.Embedding with a padding id under a token mask (raw rows: ids and output gradients) and
    position embeddings from expanded ids (per-sample rows), data-parallel: one process's updates."""
    check("tokens", "empirical", tmp_path, "mask", 10, (2, 3))


@pytest.mark.parametrize("variant,make,fisher", [("graft-sgd", "mlp", "empirical"), ("graft-adam", "cnn", "empirical+kl"),
                                                 ("base", "cnn", "empirical"), ("base", "mlp", "sampled"),
                                                 ("window", "cnn", "empirical"), ("window", "mlp", "sampled"),
                                                 ("window-base", "cnn", "sampled")])
def test_graft_base_and_window(variant, make, fisher, tmp_path):
    """Grafting, the diagonal base and the curvature window data-parallel: the moments advance on
    every rank from the reduced global gradient, the owner keeps the window's gathered rows (raw
    and per-sample kinds), and every rank's update equals the single process's on the whole batch."""
    check(make, fisher, tmp_path, variant, 10, (2, 3))


def check(make, fisher, tmp_path, variant, m, sizes):
    own = ("ddp", "mask", "partial") + tuple(OPTIONS)      # variants the single process runs too
    # The reference and every group at once (each group on its own port): they do not depend on
    # each other, and single-process runs would leave a core idle.
    single = variant if variant in own else "plain"
    runs = [(1, False, single)] + [(size, True, variant) for size in sizes]
    procs = []
    try:
        for (size, distributed, v), port in zip(runs, free_ports(len(runs))):
            procs += start(make, fisher, size, name(str(tmp_path), make, fisher, size, distributed, v), distributed, v, m,
                           port)
    finally:
        wait(procs, timeout=240)
    reference = results(name(str(tmp_path), make, fisher, 1, False, single), 1)[0]
    for size in sizes:
        ranks = results(name(str(tmp_path), make, fisher, size, True, variant), size)
        worst = 0.0
        for r in ranks[1:]:
            np.testing.assert_array_equal(r["owners"], ranks[0]["owners"])
            for key in reference:
                if key not in ("owners", "kinds"):
                    np.testing.assert_array_equal(r[key], ranks[0][key])
            for key in (k for k in r if k.startswith("local/")):
                # the comm hook: DDP averaged the skipped layer "0" only; the others stay local
                same = np.array_equal(r[key], ranks[0][key])
                assert same == key.startswith("local/0."), (size, key, same)
        assert sorted(set(ranks[0]["owners"].tolist())) == list(range(min(size, len(ranks[0]["owners"]))))
        # the convolutions send per-sample gradients (shorter than their inputs + outputs), linear layers raw rows
        n = len(ranks[0]["kinds"])                          # the DDP variant skips the first layer
        want_kinds = {"cnn": [True, True, False], "seq": [True, False],
                      "attn": [True] * 4 + [False], "tokens": [False, True, False]}.get(make, [False] * 3)[-n:]
        assert ranks[0]["kinds"].tolist() == want_kinds
        for key, want in reference.items():
            if key in ("owners", "kinds"):
                continue
            if key == "nu":                                  # KL clipping: the same ν from global sums
                if fisher.endswith("+kl"):
                    assert want < 1
                assert abs(float(ranks[0][key]) - float(want)) <= 1e-5 * float(want), (size, float(ranks[0][key]), float(want))
                continue
            got = ranks[0][key]
            err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
            assert err <= 1e-4, (size, key, err)
            worst = max(worst, err)
        print(f"{variant} {make} {fisher} P={size}: largest relative difference {worst:.1e}")  # pytest -s


def test_owner_map_and_kl_factor_come_from_the_library():
    """The owner map and ν are the library's (one implementation for Python and the MPI example):
    the greedy assignment equals a plain reference on random costs; bad input is refused."""
    import tengrad
    from tengrad.parallel import assign_owners, kl_clip_from_sum

    def reference(costs, size):
        load, owners = [0] * size, [0] * len(costs)
        for cost, i in sorted((-c, i) for i, c in enumerate(costs)):
            rank = min(range(size), key=lambda r: (load[r], r))
            owners[i], load[rank] = rank, load[rank] - cost
        return owners

    rng = np.random.default_rng(3)
    for _ in range(50):
        costs = rng.integers(0, 6, size=rng.integers(1, 12)).tolist()  # many ties
        size = int(rng.integers(1, 6))
        assert assign_owners(costs, size) == reference(costs, size), (costs, size)
    assert assign_owners([], 3) == []
    for bad in (([1, -2], 2), ([1, 2], 0)):
        with pytest.raises((ValueError, tengrad.TengradError)):
            assign_owners(*bad)
    assert kl_clip_from_sum(0.1, 1e-3, 4.0) == pytest.approx((1e-3 / (0.01 * 4.0)) ** 0.5, rel=1e-15)
    assert kl_clip_from_sum(0.1, 1e-3, 0.0) == 1.0 and kl_clip_from_sum(0.0, 1e-3, 4.0) == 1.0
    with pytest.raises(tengrad.TengradError):
        kl_clip_from_sum(0.1, 1e-3, float("nan"))
