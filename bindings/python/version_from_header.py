"""The package version, read at build time from the one place it is kept: the
TENGRAD_VERSION_MAJOR/MINOR/PATCH macros of include/tengrad.h (hatchling's "code" version source)."""
import os
import re

_HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "include", "tengrad.h")
with open(_HEADER) as _f:
    _text = _f.read()
__version__ = ".".join(re.search(rf"#define TENGRAD_VERSION_{part} (\d+)", _text).group(1)
                       for part in ("MAJOR", "MINOR", "PATCH"))
