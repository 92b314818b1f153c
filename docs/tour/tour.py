"""What every chapter of the tour shares: the sizes, a timer, and the name of the machine.

Kept small on purpose: everything a chapter teaches is in the chapter itself.

FASTCNN_TOUR_QUICK=1 in the environment picks tiny sizes and few repeats, so that CI can run
every notebook in seconds (tests/test_tour.py); without it, the sizes are the full ones the
committed outputs come from (python docs/tour/run.py).
"""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np

QUICK = os.environ.get("FASTCNN_TOUR_QUICK") == "1"

# The convolution every chapter measures: conv2 of the seed's complex model (32 -> 32 channels,
# 3x3, 'same' padding, on 28x28 planes), a batch of 10. Quick: a toy of the same kind.
if QUICK:
    N, C, F, H, W = 2, 4, 16, 10, 10
    REPEATS = 2
else:
    N, C, F, H, W = 10, 32, 32, 28, 28
    REPEATS = 5
KH = KW = 3
PAD = 1
# The Python loops are timed on this many images of the batch (at full size one image takes
# seconds; their cost per image does not depend on the batch).
N_LOOPS = 1


def conv_case(n=N, dtype=np.float32, seed=0):
    """x (n, C, H, W), w (F, C, 3, 3), b (F,): random, seeded, of the tour's convolution."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, C, H, W)).astype(dtype)
    w = (rng.standard_normal((F, C, KH, KW)) / np.sqrt(C * KH * KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


def conv_flops(n, c=C, f=F, oh=H, ow=W, kh=KH, kw=KW):
    """Floating-point operations of a convolution: 2 (a multiply and an add) per multiply-add,
    and f * oh * ow outputs per image of c * kh * kw multiply-adds each."""
    return 2 * n * f * oh * ow * c * kh * kw


def best_time(fn, repeats=REPEATS, warmup=True):
    """Seconds of the fastest of ``repeats`` calls of fn(). The warm-up call (not timed) pays
    for compiling (numba) and first-touch allocations; the fastest call is the one least
    disturbed by whatever else the machine was doing."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_name():
    """The CPU's model name, as the operating system reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            pairs = (line.split(":", 1) for line in f if ":" in line)
            info = {key.strip(): value for key, value in pairs}
        name = info.get("model name", "").strip()
        family, model = info.get("cpu family", "").strip(), info.get("model", "").strip()
        if name and family:
            return f"{name} (CPU family {family}, model {model})"
        if name:
            return name
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return platform.processor() or platform.machine()


def machine():
    """One line naming what the numbers below were measured on, and at which sizes."""
    import numba

    from fastcnn import threads
    from fastcnn.kernels import numba_jit

    bits = numba_jit.VECTOR_BITS
    simd = {512: "AVX-512", 256: "AVX2"}.get(bits, f"{bits}-bit vectors")
    run = "QUICK run (tiny sizes: the numbers say little)" if QUICK else "full run"
    return (f"CPU: {cpu_name()}, {threads.available_cores()} cores this process may use, "
            f"{simd} ({bits}-bit vectors); Python {platform.python_version()}, "
            f"NumPy {np.__version__}, Numba {numba.__version__}. {run}")


def rate(value):
    """A speed for a table: 12,345.6 for large values, three significant digits for small
    ones (the loops' 0.0471 img/s would read 0.0)."""
    return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"
