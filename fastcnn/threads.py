"""Thread count for the compute: Numba's worker threads and the BLAS pool behind NumPy's matmul.

``set_num_threads(n)`` sets both, so that whichever backend runs, it uses n cores, and the two
runtimes don't fight over the same cores.
"""

from __future__ import annotations

import ctypes

# OpenBLAS builds name their setter differently (NumPy's wheels use a prefixed 64-bit build).
_BLAS_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                 "openblas_set_num_threads64_", "scipy_openblas_set_num_threads")


def _blas_libraries():
    """ctypes handles of the OpenBLAS libraries loaded in this process (Linux; else none)."""
    import numpy  # noqa: F401  (loads NumPy's BLAS)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def _blas_functions(names):
    """For each loaded OpenBLAS, its first function called one of ``names``."""
    for lib in _blas_libraries():
        fn = next((getattr(lib, n) for n in names if hasattr(lib, n)), None)
        if fn is not None:
            yield fn


def max_threads() -> int:
    """The most threads Numba may use here (NUMBA_NUM_THREADS, by default the core count)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


def set_num_threads(n: int) -> None:
    """Use n threads for the kernels: Numba's pool and, for the numpy backend, OpenBLAS's."""
    import numba

    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"the thread count must be an int, got {n!r}")
    if not 1 <= n <= max_threads():
        raise ValueError(f"the thread count must be between 1 and {max_threads()} "
                         f"(NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(n)
    for setter in _blas_functions(_BLAS_SETTERS):
        setter(ctypes.c_int(n))


def get_num_threads() -> int:
    """Numba's thread count in this thread."""
    import numba

    return numba.get_num_threads()


def blas_num_threads():
    """OpenBLAS's thread count, or None when no OpenBLAS is loaded."""
    getters = tuple(s.replace("set_", "get_") for s in _BLAS_SETTERS)
    return next((int(get()) for get in _blas_functions(getters)), None)


def threading_layer() -> str:
    """The threading layer Numba runs its parallel kernels on (tbb, omp or workqueue)."""
    import numba
    import numpy as np

    from .kernels import numba_jit

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: run a tiny one
        numba_jit.relu_forward(np.zeros(1, np.float32))
        return numba.threading_layer()
