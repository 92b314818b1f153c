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
