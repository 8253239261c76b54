"""Keep freed CPU memory in the process for reuse (glibc malloc).

A training step on the CPU allocates and frees the same large tensors every time (weight-sized
gradients and sign tensors of tens of MB). glibc serves allocations above its mmap threshold with
fresh mmap'ed pages and unmaps them on free, so every step pays page faults on every such
tensor: measured on BinaryNet's 3 x 4096 MLP, about half of the binarized step. Serving them from
the heap and never trimming it lets the next step reuse the pages (the process keeps its peak
footprint instead of returning memory to the OS between steps).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_done = False


def keep_freed_memory() -> bool:
    """mallopt(M_MMAP_MAX, 0) and a trim threshold of 2^31 - 1 bytes; False where glibc is absent.

    mallopt takes its value as a C int, so 2^31 - 1 is the largest threshold it accepts: the heap's
    free top goes back to the OS only once more than 2 GiB of it is unused, far above a step's
    working set."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
    if not _done:
        log.debug("mallopt refused; CPU memory is returned to the OS after every free")
    return _done
