"""The Makefile works from a checkout whose path contains a space (issue 18, item 19): every
command it would run for the C tests, the install, the wheel, the system-BLAS suites, the sanitizer and fuzz builds keeps
each path inside the checkout as one shell word. `make -n` prints the commands without running
them; a path split at the space shows up as a word that starts inside it."""
import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TARGETS = ["test-c", "install", "test-wheel", "test-blas-system", "test-asan", "fuzz-build"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_checkout_path_with_a_space(tmp_path):
    checkout = tmp_path / "with space" / "tengrad"
    checkout.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "Makefile"), checkout)
    for name in ("include", "install", "Sources", "Tests", "bindings", "examples"):
        os.symlink(os.path.join(REPO, name), checkout / name)
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(checkout)] + TARGETS,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, MAKEFLAGS=""))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert any(str(checkout) in line for line in lines), "no command used the checkout's absolute path"
    for line in lines:
        try:
            words = shlex.split(line)
        except ValueError:
            continue  # a fragment of a multi-line shell construct
        for word in words:
            assert not word.startswith("space/"), f"a path split at the space: {line}"
            assert not word.endswith("/with"), f"a path split at the space: {line}"
