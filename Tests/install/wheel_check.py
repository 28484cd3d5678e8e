"""Run by `make test-wheel` in a fresh virtual environment, from a directory outside the checkout:
the pip-installed package imports, loads its bundled library, agrees with the header's version,
and computes a natural gradient equal to a dense numpy oracle; without torch installed,
`tengrad.torch` fails to import with an ImportError naming torch; its BLAS is the scipy-openblas32
package installed beside it, running non-generic kernels."""
import importlib.metadata
import os

import numpy as np

import tengrad

path = tengrad.library_path()
assert importlib.metadata.version("tengrad") == tengrad.__version__ == tengrad.version(), (
    importlib.metadata.version("tengrad"), tengrad.version())
assert "site-packages" in path and path.endswith(os.path.join("tengrad", "libtengrad.so")), path
blas = tengrad.blas_info()
assert blas["build"] == "scipy-openblas32" and not blas["generic_fallback"], blas
maps = open("/proc/self/maps").read()
import scipy_openblas32  # noqa: E402
assert os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so") in maps, "BLAS not from the venv"
rng = np.random.default_rng(0)
m, n_in, n_out, damping = 6, 4, 3, 0.2
a = rng.standard_normal((m, n_in)).astype(np.float32)
g = rng.standard_normal((m, n_out)).astype(np.float32)
with tengrad.Preconditioner(damping=damping) as p:
    layer = p.add_linear(n_in, n_out, bias=True)
    w, b = p.natural_gradient(layer, a, g, 1.0)
u = np.stack([np.concatenate([np.outer(g[i], a[i]).ravel(), g[i]]) for i in range(m)]).astype(np.float64)
want = np.linalg.solve(u.T @ u / m + damping * np.eye(u.shape[1]), u.mean(0))
got = np.concatenate([w.ravel(), b])
err = np.linalg.norm(got - want) / np.linalg.norm(want)
assert err < 1e-4, err
try:
    import torch  # noqa: F401
except ImportError:
    try:
        import tengrad.torch  # noqa: F401
    except ImportError as e:
        assert "torch" in str(e), e
    else:
        raise AssertionError("tengrad.torch imported without torch")
print(f"tengrad {tengrad.__version__} from {path}: natural gradient within {err:.1e} of the numpy oracle; "
      f"{tengrad.blas_summary()}")
