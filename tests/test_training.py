"""End to end on real digits: the seed's recipe (simple CNN, batch 10, lr 0.05) on mnist-sample."""


from fastcnn import datasets
from fastcnn.models import simple_cnn


def test_simple_cnn_reaches_90_percent_on_mnist_sample(fast_backend_name):
    (x, y), (x_test, y_test) = datasets.load("mnist-sample", raw=True)
    net = simple_cnn(seed=0)
    history = net.fit(x, y, epochs=2, batch_size=10, lr=0.05, seed=0)
    result = net.evaluate(x_test, y_test)
    assert history["loss"][1] < history["loss"][0]
    assert result["accuracy"] >= 0.90, result


def test_fit_shows_progress_by_default_only_when_someone_watches(monkeypatch, capsys):
    import sys

    from fastcnn import models

    (x, y), _ = datasets.load("mnist-sample", raw=True)
    x, y = x[:20], y[:20]

    def fit(**kwargs):  # a fresh model each time: what is printed is all that differs
        models.build("simple", seed=0).fit(x, y, epochs=1, batch_size=10, **kwargs)

    fit()  # pytest captures: not a terminal
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    fit()
    assert capsys.readouterr().out.startswith("epoch 1/1: loss")
    fit(verbose=False)
    assert capsys.readouterr().out == ""


def test_a_jupyter_kernel_counts_as_someone_watching_and_its_package_alone_does_not(
        monkeypatch):
    import sys
    import types

    from fastcnn import training

    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert not training._interactive()  # imported (nbclient's tests do), no kernel running

    class ZMQInteractiveShell:  # the shell of a notebook's kernel
        pass

    fake = types.ModuleType("IPython")
    fake.get_ipython = ZMQInteractiveShell
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert training._interactive()
    fake.get_ipython = lambda: None  # IPython installed, not in a kernel
    assert not training._interactive()
