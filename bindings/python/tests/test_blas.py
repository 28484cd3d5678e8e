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
    assert re.search("Prescott.*scipy-openblas32.*OPENBLAS_CORETYPE=SkylakeX", text)
    assert "OPENBLAS_CORETYPE=Haswell" in blas.generic_warning(dict(_info(True), cpu_isa="AVX2"), None)


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
