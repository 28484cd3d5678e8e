"""tengrad.blas_info / blas_summary and the one-time generic-fallback warning (docs/DESIGN.md §14)."""
import re
import warnings

import pytest

import tengrad
from tengrad import blas


def test_blas_info_fields():
    info = tengrad.blas_info()
    assert info["library"] == "OpenBLAS"
    assert info["build"] in ("system", "scipy-openblas32")
    assert info["version"] and info["version"] in info["config"]
    assert info["core"] and info["threads"] >= 1
    isas = ("unknown", "SSE", "AVX", "AVX2", "AVX-512")
    assert info["core_isa"] in isas and info["cpu_isa"] in isas
    rank = isas.index
    assert info["generic_fallback"] == (info["core_isa"] != "unknown" and rank(info["core_isa"]) < rank("AVX2")
                                        <= rank(info["cpu_isa"]))
    line = tengrad.blas_summary(info)
    assert info["core"] in line and info["version"] in line and info["build"] in line


def _info(fallback):
    return dict(tengrad.blas_info(), core="Prescott", core_isa="SSE", cpu_isa="AVX-512", generic_fallback=fallback)


def test_warning_text_on_generic_fallback():
    text = blas.generic_warning(_info(True), None)
    assert text is not None
    assert re.search("Prescott.*scipy-openblas32.*OPENBLAS_CORETYPE holding SkylakeX", text)
    assert "OPENBLAS_CORETYPE holding Haswell" in blas.generic_warning(dict(_info(True), cpu_isa="AVX2"), None)


def test_no_warning_when_kernels_fit_or_user_chose():
    assert blas.generic_warning(_info(False), None) is None
    assert blas.generic_warning(_info(True), "Prescott") is None  # the user's choice is respected


def test_warns_once(monkeypatch):
    # The environment is not touched: the decision is replaced, the once-per-process logic tested.
    monkeypatch.setattr(blas, "generic_warning", lambda info, coretype: "generic kernels")
    monkeypatch.setattr(blas, "_warned", False)
    with pytest.warns(RuntimeWarning, match="generic kernels"):
        assert blas.warn_if_generic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not blas.warn_if_generic()  # once per process
    monkeypatch.setattr(blas, "generic_warning", lambda info, coretype: None)
    monkeypatch.setattr(blas, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not blas.warn_if_generic()


_IDLE_CPU = r"""
import os, sys, time, numpy as np
import tengrad
print(os.environ.get("OPENBLAS_THREAD_TIMEOUT", "unset"))
p = tengrad.Preconditioner(damping=0.1, blas_threads=2)
layer = p.add_linear(512, 512, bias=False)
rng = np.random.default_rng(0)
a = rng.standard_normal((256, 512), dtype=np.float32)
g = rng.standard_normal((256, 512), dtype=np.float32)
p.update_curvature(layer, a, g, 256.0)   # threaded GEMMs: OpenBLAS's workers wake up
t0 = time.process_time()
time.sleep(0.3)                           # nothing runs: only spinning workers use CPU time
print(time.process_time() - t0)
"""


def _idle_run(env_extra):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(env_extra, OPENBLAS_NUM_THREADS="2")
    package = os.path.dirname(os.path.dirname(os.path.abspath(tengrad.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _IDLE_CPU], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen, cpu = out.stdout.split()
    return seen, float(cpu)


def test_blas_workers_sleep_soon_after_a_call_and_the_environment_is_restored():
    """OpenBLAS's idle workers would spin ~0.1 s after every threaded call (its default timeout),
    taking a core from the host framework's next pass; the binding loads OpenBLAS with a short
    timeout and leaves the environment as it found it (docs/DESIGN.md §8)."""
    seen, cpu = _idle_run({})
    assert seen == "unset"
    assert cpu < 0.05, f"idle OpenBLAS workers used {cpu:.3f} s of CPU in 0.3 s"


def test_a_user_thread_timeout_is_respected():
    seen, _ = _idle_run({"OPENBLAS_THREAD_TIMEOUT": "28"})
    assert seen == "28"
