import pytest

import fastcnn
from fastcnn import backend


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("FASTCNN_BACKEND", raising=False)
    fastcnn.set_backend(None)
    yield
    fastcnn.set_backend(None)


def test_default_backend_is_available():
    assert fastcnn.get_backend() == backend.DEFAULT_BACKEND
    assert backend.DEFAULT_BACKEND in fastcnn.available_backends()


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Expected one of .*numpy"):
        fastcnn.set_backend("cuda")
    with pytest.raises(ValueError, match="'torch'"):
        with fastcnn.use_backend("torch"):
            pass


def test_env_var_is_read_at_call_time(monkeypatch):
    name = fastcnn.available_backends()[-1]
    monkeypatch.setenv("FASTCNN_BACKEND", name)
    assert fastcnn.get_backend() == name
    monkeypatch.setenv("FASTCNN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTCNN_BACKEND"):
        fastcnn.get_backend()


def test_precedence_context_then_set_then_env(monkeypatch):
    names = backend.BACKENDS
    first, last = list(names)[0], list(names)[-1]
    monkeypatch.setenv("FASTCNN_BACKEND", "bogus")  # never consulted below
    fastcnn.set_backend(last)
    assert fastcnn.get_backend() == last
    with fastcnn.use_backend(first):
        assert fastcnn.get_backend() == first
        fastcnn.set_backend(last)  # a with-block still wins
        assert fastcnn.get_backend() == first
    assert fastcnn.get_backend() == last


def test_use_backend_restores_after_an_exception():
    before = fastcnn.get_backend()
    with pytest.raises(RuntimeError):
        with fastcnn.use_backend(fastcnn.available_backends()[0]):
            raise RuntimeError("boom")
    assert fastcnn.get_backend() == before


@pytest.mark.parametrize("name, expected", [
    ("numpy", ["conv2d_forward", "conv2d_grad_weight", "conv2d_grad_input"]),
    # numba has the contract's optional fused pair: x laid out once per layer and step
    ("numba", ["conv2d_forward_saving", "conv2d_backward"]),
])
def test_layers_dispatch_through_the_switch(monkeypatch, name, expected):
    """A layer calls whatever the active backend is, never a module of its own."""
    import numpy as np

    calls = []
    real = backend.load(name)

    class Spy:
        OPTIONAL = real.OPTIONAL  # what it declares (the layers ask the contract, not the module)

        def __getattr__(self, name):
            value = getattr(real, name)
            calls.append(name)
            return value

    monkeypatch.setattr(backend, "kernels", lambda: Spy())
    monkeypatch.setattr(fastcnn.layers, "kernels", lambda: Spy())
    layer = fastcnn.Conv2D(1, 2, 3)
    y = layer.forward(np.zeros((1, 1, 5, 5), np.float32))
    layer.backward(np.ones_like(y))
    assert calls == expected


def test_import_fastcnn_reaches_the_documented_names_lazily():
    """`import fastcnn` loads nothing heavy (the CLI's Ctrl-C handling relies on it), yet every
    documented name and submodule is reachable from it."""
    import subprocess
    import sys

    code = ("import sys, fastcnn; assert 'numpy' not in sys.modules, 'numpy loaded at import'\n"
            "net = fastcnn.models.simple_cnn(); assert net.num_params() == 15770\n"
            "assert fastcnn.datasets.load('mnist-sample')[1][0].shape == (2000, 1, 28, 28)\n"
            "from fastcnn import ConvNet, TrainingDiverged, use_backend, kernels\n"
            "assert isinstance(net, fastcnn.ConvNet) and issubclass(TrainingDiverged, "
            "FloatingPointError)\n"
            "assert set(fastcnn.__all__) <= set(dir(fastcnn))\n"
            "assert fastcnn.plots.save_all and fastcnn.predict.top_classes and "
            "fastcnn.history.save\n"
            "try:\n    fastcnn.nothing\nexcept AttributeError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "has no attribute 'nothing'" in run.stdout
