import numpy as np
import pytest

import fastcnn
from fastcnn import backend

BACKENDS = fastcnn.available_backends()


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    """Every backend that imports here; the test body runs with it active."""
    with fastcnn.use_backend(request.param):
        yield request.param


FAST_BACKENDS = tuple(name for name in BACKENDS if name != "naive")


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend_name(request):
    """Every backend but the slow reference, active during the test."""
    with fastcnn.use_backend(request.param):
        yield request.param


@pytest.fixture
def k(backend_name):
    """The kernel module of the backend under test."""
    return backend.load(backend_name)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def ctrl_c_at_step(step):
    """A gradient hook that sends this process a Ctrl-C (SIGINT) during training step ``step``
    (1-based): fit then stops at the next batch boundary, as after a real Ctrl-C."""
    import os
    import signal

    steps = []

    def hook(net):
        steps.append(1)
        if len(steps) == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook
