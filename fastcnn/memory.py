"""Keeping freed memory for reuse, so a training loop does not page-fault on every batch.

glibc's malloc hands out large blocks (above ~128 KB, e.g. a batch's activations) with mmap and
gives them back to the operating system when freed; the next batch then pays a page fault for
every 4 KB it touches again. At batch 10 that was a third to a half of the simple model's training
step (see bench/step_time.py and its --retain-freed-memory flag).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit systems


def retain_freed_memory(trim_threshold=256 << 20) -> bool:
    """Tell glibc to serve blocks up to 32 MB from its heap and to keep up to ``trim_threshold``
    bytes of freed heap instead of returning it at once. Process-wide; the CLI calls it, library
    users may. Returns False (and changes nothing) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
