"""Two-thread jobs (the fused linear products, per-sample gradients): the library's helper thread
(docs/DESIGN.md §8) in a forked child and under handles used from two threads at once. The
results must be the bits of the one-thread call, and nothing may hang."""
import os
import signal
import threading
import time

import numpy as np
import pytest

import tengrad

# 1024² weights over 32 positions: the fused linear path, two threads when BLAS may use two.
M, N = 32, 1024


def layer_and_gradient(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, N)).astype(np.float32)
    g = rng.standard_normal((M, N)).astype(np.float32)
    vw = rng.standard_normal((N, N)).astype(np.float32)
    vb = rng.standard_normal(N).astype(np.float32)
    return a, g, vw, vb


def preconditioned(seed, blas_threads):
    a, g, vw, vb = layer_and_gradient(seed)
    with tengrad.Preconditioner(damping=0.1, blas_threads=blas_threads) as p:
        layer = p.add_linear(N, N, bias=True)
        p.update_curvature(layer, a, g, 1.0)
        return p.precondition(layer, vw, vb)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_two_thread_jobs():
    # The parent's helper thread does not survive fork; the child must start its own, not wait
    # for a thread it does not have.
    want = preconditioned(5, 1)
    a, g, vw, vb = layer_and_gradient(5)
    with tengrad.Preconditioner(damping=0.1, blas_threads=2) as p:
        layer = p.add_linear(N, N, bias=True)
        p.update_curvature(layer, a, g, 1.0)
        w, b = p.precondition(layer, vw, vb)  # starts the helper in this process
        assert np.array_equal(w, want[0]) and np.array_equal(b, want[1])
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            try:
                results = [p.precondition(layer, vw, vb) for _ in range(3)]
                same = all(np.array_equal(cw, w) and np.array_equal(cb, b) for cw, cb in results)
                os.write(write, b"1" if same else b"0")
            finally:
                os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 60
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung in a two-thread job")
            time.sleep(0.01)
        assert os.read(read, 1) == b"1"
        os.close(read)
        # The parent's helper still works after the fork.
        w2, b2 = p.precondition(layer, vw, vb)
        assert np.array_equal(w2, w) and np.array_equal(b2, b)


def test_handles_used_from_two_threads_at_once_give_their_sequential_bits():
    # One thread holds the helper, the other starts a thread of its own for its job (or runs it
    # alone); each call's numbers do not depend on which. (Curvature is taken before the threads
    # start: OpenBLAS's split of a GEMM by thread count may differ while calls overlap.)
    handles, want = [], []
    for seed in [11, 12]:
        a, g, vw, vb = layer_and_gradient(seed)
        p = tengrad.Preconditioner(damping=0.1, blas_threads=2)
        layer = p.add_linear(N, N, bias=True)
        p.update_curvature(layer, a, g, 1.0)
        handles.append((p, layer, vw, vb))
        want.append(p.precondition(layer, vw, vb))
    failures, errors = [], []

    def worker(i):
        p, layer, vw, vb = handles[i]
        try:
            for _ in range(20):
                w, b = p.precondition(layer, vw, vb)
                if not (np.array_equal(w, want[i][0]) and np.array_equal(b, want[i][1])):
                    failures.append(i)
        except Exception as error:  # reported below, on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(handles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a two-thread job hung"
    for p, *_ in handles:
        p.close()
    assert not errors and not failures
