import subprocess
import sys

import pytest

import fastcnn
from fastcnn import threads


@pytest.fixture
def restore_threads():
    before = threads.get_num_threads()
    yield
    threads.set_num_threads(before)


def test_set_num_threads_sets_numba_and_blas(restore_threads):
    fastcnn.set_num_threads(1)
    assert fastcnn.get_num_threads() == 1
    if threads.blas_num_threads() is not None:  # an OpenBLAS is loaded (NumPy's wheels)
        assert threads.blas_num_threads() == 1
    fastcnn.set_num_threads(threads.max_threads())
    assert fastcnn.get_num_threads() == threads.max_threads()


def test_set_num_threads_rejects_bad_counts():
    with pytest.raises(ValueError, match=f"between 1 and {threads.max_threads()}"):
        fastcnn.set_num_threads(threads.max_threads() + 1)
    with pytest.raises(ValueError, match="got 0"):
        fastcnn.set_num_threads(0)
    with pytest.raises(TypeError):
        fastcnn.set_num_threads(1.5)


def test_training_gives_the_same_result_on_one_thread_and_all(restore_threads, rng):
    """Each thread writes its own slice: the thread count must not change the numbers."""
    import numpy as np

    from fastcnn.models import complex_cnn

    x = rng.random((6, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 6)
    results = []
    for n in (1, threads.max_threads()):
        fastcnn.set_num_threads(n)
        with fastcnn.use_backend("numba"):
            net = complex_cnn(seed=0)
            net.fit(x, y, epochs=1, batch_size=3, seed=0)
        results.append([p for layer in net.layers for p in layer.params.values()])
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_info_shows_threads_and_threading_layer():
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "info", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "1 threads" in run.stdout and "threading layer" in run.stdout


def test_retain_freed_memory_reports_whether_it_applied():
    import platform

    from fastcnn import memory

    applied = memory.retain_freed_memory()
    assert isinstance(applied, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied


@pytest.mark.parametrize("env", ["", "0"])
def test_the_first_kernel_load_keeps_freed_memory_unless_told_not_to(env):
    """Library users (not only the CLI) get glibc's thresholds fixed, once the kernels load."""
    import os
    import platform

    code = ("import fastcnn, numpy as np\n"
            "from fastcnn import memory, models\n"
            "assert not memory._status\n"  # importing alone changes nothing
            "models.build('simple', seed=0).forward(np.zeros((1, 1, 28, 28), np.float32))\n"
            "print(memory._status[0])\n")
    environ = dict(os.environ, FASTCNN_RETAIN_FREED_MEMORY=env)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=environ)
    assert run.returncode == 0, run.stderr
    if env == "0":
        assert run.stdout.startswith("malloc left alone (FASTCNN_RETAIN_FREED_MEMORY=0)")
    elif platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert run.stdout.startswith("freed memory kept for reuse")
