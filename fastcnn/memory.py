"""Keeping freed memory for reuse, so a training loop does not page-fault on every batch.

glibc's malloc hands out large blocks (above ~128 KB, e.g. a batch's activations) with mmap and
gives them back to the operating system when freed; the next batch then pays a page fault for
every 4 KB it touches again. At batch 10 that was a third to a half of the simple model's training
step (see bench/step_time.py and its --retain-freed-memory flag). Worse, whether it happens
depends on what else the process allocated: in one Python process training the simple model at
batch 10 on one thread, some epochs ran at 67-71k img/s and others at 24-37k, with half a million
page faults in 30 s; with the thresholds below, 67-72k on every epoch and 18 thousand faults.

So the first kernel module to load (``fastcnn.backend.load``) calls ``apply_once()``: library
users get it as the command line does. ``FASTCNN_RETAIN_FREED_MEMORY=0`` in the environment leaves
malloc alone; the cost otherwise is up to 256 MB of freed memory kept by the process for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit systems
ENV_VAR = "FASTCNN_RETAIN_FREED_MEMORY"

_status: list = []  # what apply_once() did, once it has run


def retain_freed_memory(trim_threshold=256 << 20) -> bool:
    """Tell glibc to serve blocks up to 32 MB from its heap and to keep up to ``trim_threshold``
    bytes of freed heap instead of returning it at once. Process-wide. Both or neither: fixing
    only the trim threshold also stops glibc from raising the mmap threshold, and every array
    over 128 KB then comes from mmap (measured 3x slower than either). Returns False (and
    changes nothing) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def apply_once() -> str:
    """``retain_freed_memory()`` once per process unless the environment says no; what was done,
    in words (``fastcnn info`` shows it)."""
    if not _status:
        if os.environ.get(ENV_VAR, "1") == "0":
            _status.append(f"malloc left alone ({ENV_VAR}=0)")
        elif retain_freed_memory():
            _status.append("freed memory kept for reuse (glibc: mmap threshold 32 MB, "
                           "trim threshold 256 MB)")
        else:
            _status.append("malloc left alone (not glibc)")
    return _status[0]
