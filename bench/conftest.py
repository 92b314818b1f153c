import numpy as np
import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "naive: runs the naive (Python loops) backend; only on shapes small enough to "
                   "finish in seconds. Deselect with -m 'not naive'.")


def record_rate(benchmark, flop=None, images=None):
    """Add GFLOP/s and/or images/s to the benchmark's extra_info (when it really ran)."""
    if flop is not None:
        benchmark.extra_info["gflop"] = round(flop / 1e9, 4)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the body ran once, untimed
        return
    best = stats.stats.min
    if flop is not None:
        benchmark.extra_info["gflops"] = round(flop / best / 1e9, 2)
    if images is not None:
        benchmark.extra_info["images_per_s"] = round(images / best, 1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
