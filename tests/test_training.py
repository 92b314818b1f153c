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
