"""hatchling build hook: builds the installable libtengrad.so (`make .build-install/release/libtengrad.so`
in the checkout: the Swift standard library linked statically, only the C ABI exported, BLAS from
PyPI's scipy-openblas32, a dependency of the wheel) and
bundles it in the wheel as tengrad/libtengrad.so, which the binding loads first (after
TENGRAD_LIBRARY). The wheel is platform-specific (its tag says so). Build from a TENGraD checkout:
`pip install ./bindings/python`."""
import os
import subprocess
import sys

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if self.target_name != "wheel":
            return
        repo = os.path.normpath(os.path.join(self.root, "..", ".."))
        if not os.path.isfile(os.path.join(repo, "Package.swift")):
            raise RuntimeError("tengrad's wheel is built from a TENGraD checkout (bindings/python inside it)")
        target = os.path.join(".build-install", "release", "libtengrad.so")
        # This interpreter sees the build requirements (scipy-openblas32: headers and library to
        # link against; the installed copy is found at run time through the rpath or preloaded).
        subprocess.run(["make", "-C", repo, "--no-print-directory", f"PYTHON={sys.executable}", "BLAS=scipy-openblas",
                        target], check=True)
        build_data["force_include"][os.path.join(repo, target)] = "tengrad/libtengrad.so"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
