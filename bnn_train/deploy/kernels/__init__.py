"""The C++ XNOR/popcount kernels (binary_ops.cpp), compiled on first use with torch's extension
builder (a C++ compiler and ninja, both installed with the package's requirements on Linux).

`load()` returns the compiled module, or None with one logged line saying why and that the
packed engine falls back to the exact int8 torch path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("binary_ops.cpp")
IMPLS = {"scalar": 0, "avx2": 1, "avx512": 2}
_module = None
_failed: str | None = None


def load():
    """The compiled kernels (cached per process and on disk under torch's extension dir)."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    try:
        from torch.utils.cpp_extension import load as build

        _module = build(name="bnn_binary_ops", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                        extra_ldflags=["-fopenmp"], verbose=os.environ.get("BNN_VERBOSE_BUILD") == "1")
    except Exception as e:  # a missing compiler or ninja: say so once, keep working on the torch path
        _failed = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("packed kernels unavailable (%s); using the exact int8 torch path instead", _failed)
    return _module


def best_impl() -> str:
    module = load()
    if module is None:
        return "torch"
    return {v: k for k, v in IMPLS.items()}[module.best_impl()]
