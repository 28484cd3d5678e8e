"""tengrad.blas_info / blas_summary and the one-time generic-fallback warning (docs/DESIGN.md §14)."""
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


def _fake(monkeypatch, fallback):
    info = dict(tengrad.blas_info(), core="Prescott", core_isa="SSE", cpu_isa="AVX-512", generic_fallback=fallback)
    monkeypatch.setattr(blas, "blas_info", lambda: info)
    monkeypatch.setattr(blas, "_warned", False)


def test_warns_once_on_generic_fallback(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    _fake(monkeypatch, True)
    with pytest.warns(RuntimeWarning, match="Prescott.*scipy-openblas32.*OPENBLAS_CORETYPE=SkylakeX"):
        assert blas.warn_if_generic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not blas.warn_if_generic()  # once per process


def test_no_warning_when_kernels_fit_or_user_chose(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
        _fake(monkeypatch, False)
        assert not blas.warn_if_generic()
        _fake(monkeypatch, True)
        monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")  # the user's choice is respected
        assert not blas.warn_if_generic()
