"""Every layer's backward and the loss against central finite differences, in float64."""

import numpy as np
import pytest

from fastcnn import (
    AvgPool2D,
    BatchNorm1D,
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
    SoftmaxCrossEntropy,
)
from fastcnn.models import simple_cnn

from reference import numeric_grad

F64 = np.float64
RTOL, ATOL = 1e-6, 1e-8


def check_layer(layer, x, rng):
    """Compare backward() with finite differences of sum(forward(x) * g) for x and every param."""
    y = layer.forward(x)
    g = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(layer.forward(x) * g))

    layer.forward(x)
    dx = layer.backward(g)
    assert dx.shape == x.shape and dx.dtype == F64
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=RTOL, atol=ATOL)
    for key, p in layer.params.items():
        assert layer.grads[key].shape == p.shape
        np.testing.assert_allclose(layer.grads[key], numeric_grad(loss, p), rtol=RTOL, atol=ATOL,
                                   err_msg=f"gradient of {key}")


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((1, 1, 5, 5), 3, 1, "same"),
    ((2, 2, 7, 6), 3, 2, "valid"),
    ((1, 3, 6, 7), 5, 2, 2),
    ((2, 2, 5, 4), 1, 1, "valid"),
    ((1, 2, 6, 5), (2, 3), 1, 1),
    ((1, 1, 9, 7), 3, 3, "same"),
])
def test_conv2d_gradients(backend_name, rng, shape, kernel, stride, padding):
    layer = Conv2D(shape[1], 3, kernel, stride, padding, dtype=F64, rng=rng)
    layer.params["bias"][:] = rng.standard_normal(3)
    check_layer(layer, rng.standard_normal(shape), rng)


@pytest.mark.parametrize("shape,size,stride", [
    ((1, 1, 4, 4), 2, None),
    ((2, 2, 7, 5), 2, None),
    ((1, 2, 7, 7), 3, 2),
    ((2, 1, 5, 6), 3, 1),
])
def test_maxpool_gradients(backend_name, rng, shape, size, stride):
    # A permutation of well-separated values: no ties, so the max is differentiable.
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(F64) * 0.01
    check_layer(MaxPool2D(size, stride), x, rng)


@pytest.mark.parametrize("shape,size,stride", [
    ((1, 1, 4, 4), 2, None),
    ((2, 2, 7, 5), 2, None),
    ((1, 2, 7, 7), 3, 2),
    ((2, 1, 5, 6), 3, 1),
])
def test_avgpool_gradients(backend_name, rng, shape, size, stride):
    check_layer(AvgPool2D(size, stride), rng.standard_normal(shape), rng)


def test_global_avgpool_gradient(backend_name, rng):
    check_layer(GlobalAvgPool2D(), rng.standard_normal((3, 2, 5, 4)), rng)


def test_relu_gradients(backend_name, rng):
    x = rng.uniform(0.05, 1.0, (2, 3, 4, 5)) * rng.choice([-1.0, 1.0], (2, 3, 4, 5))
    check_layer(ReLU(), x, rng)


def test_flatten_and_dense_gradients(backend_name, rng):
    check_layer(Flatten(), rng.standard_normal((2, 3, 2, 3)), rng)
    dense = Dense(7, 4, dtype=F64, rng=rng)
    dense.params["bias"][:] = rng.standard_normal(4)
    check_layer(dense, rng.standard_normal((1, 7)), rng)
    check_layer(dense, rng.standard_normal((5, 7)), rng)


@pytest.mark.parametrize("n", [1, 6])
def test_softmax_cross_entropy_gradient(backend_name, rng, n):
    loss = SoftmaxCrossEntropy()
    logits = rng.standard_normal((n, 10)) * 3
    labels = rng.integers(0, 10, n)
    loss.forward(logits, labels)
    d = loss.backward()
    assert d.shape == logits.shape and d.dtype == F64
    np.testing.assert_allclose(d, numeric_grad(lambda: loss.forward(logits, labels), logits),
                               rtol=RTOL, atol=ATOL)


def test_whole_network_gradient(fast_backend_name, rng):
    """Chain rule through every layer of the simple CNN, on a few weights of each layer."""
    net = simple_cnn(dtype=F64, seed=1)
    x = rng.random((2, 1, 28, 28))
    y = np.array([3, 7])

    def loss():
        return net.loss.forward(net.forward(x), y)

    loss()
    net.backward(net.loss.backward())
    for layer in (net.layers[0], net.layers[-1]):
        for key, p in layer.params.items():
            flat, grad = p.reshape(-1), layer.grads[key].reshape(-1)
            for i in rng.choice(flat.size, min(flat.size, 8), replace=False):
                old = flat[i]
                flat[i] = old + 1e-6
                up = loss()
                flat[i] = old - 1e-6
                down = loss()
                flat[i] = old
                assert grad[i] == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("layer, shape", [
    (lambda: BatchNorm2D(3, dtype=F64), (4, 3, 3, 2)),
    (lambda: BatchNorm2D(2, eps=1e-3, dtype=F64), (1, 2, 5, 5)),
    (lambda: BatchNorm1D(5, dtype=F64), (6, 5)),
])
def test_batchnorm_gradients_in_training_mode(backend_name, rng, layer, shape):
    """Through the batch statistics (each x moves every output of its channel)."""
    bn = layer()
    bn.params["weight"][:] = rng.standard_normal(bn.channels)
    bn.params["bias"][:] = rng.standard_normal(bn.channels)
    check_layer(bn, rng.standard_normal(shape) * 2 + 1, rng)


def test_dropout_gradient_with_its_mask_held(backend_name, rng):
    drop = Dropout(0.4, rng=7)
    x = rng.standard_normal((3, 4, 5))
    y = drop.forward(x)
    keep = drop._keep
    assert 0 < keep.mean() < 1
    np.testing.assert_allclose(y, np.where(keep, x / 0.6, 0))
    g = rng.standard_normal(y.shape)
    np.testing.assert_allclose(drop.backward(g), np.where(keep, g / 0.6, 0))
