"""Bad input and training that goes wrong: a clear error before any work, never a silent number."""

import re

import numpy as np
import pytest

from fastcnn import ConvNet, Dense, Flatten, ReLU, TrainingDiverged
from fastcnn.models import simple_cnn


def digits(rng, n=40):
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def weights(net):
    return [p.copy() for layer in net.layers for p in layer.params.values()]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_images_are_refused_by_index_before_any_work(rng, bad):
    x, y = digits(rng)
    x = x.astype(np.float32) / 255
    x[3, 0, 5, 5] = bad
    x[17, 0, 0, 0] = bad
    net = simple_cnn(seed=0)
    before = weights(net)
    with pytest.raises(ValueError, match=r"x, y: 2 of 40 images hold NaN or infinite values "
                                         r"\(at index 3, 17\)"):
        net.fit(x, y, epochs=1)
    for got, want in zip(weights(net), before, strict=True):
        np.testing.assert_array_equal(got, want)  # nothing trained
    good = x.copy()
    good[[3, 17]] = 0
    with pytest.raises(ValueError, match=r"validation_data: 2 of 40 images.*index 3, 17"):
        net.fit(good, y, validation_data=(x, y))
    with pytest.raises(ValueError, match="index 3, 17"):
        net.evaluate(x, y)
    with pytest.raises(ValueError, match="index 3, 17"):
        net.predict(x)
    x[:] = np.nan
    with pytest.raises(ValueError, match=r"40 of 40 images.*index 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, "
                                         r"\.\.\.\)"):
        net.predict(x)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.int8, bool])
def test_integer_images_other_than_uint8_are_refused_everywhere(rng, dtype):
    """One rule: uint8 is scaled by 1/255, floats are used as given, other dtypes are refused
    (an int32 0..255 image used as given would be 255 times too bright)."""
    x, y = digits(rng, 10)
    x = x.astype(dtype)
    net = simple_cnn(seed=0)
    for call in (lambda: net.fit(x, y), lambda: net.evaluate(x, y), lambda: net.predict(x),
                 lambda: net.predict_proba(x)):
        with pytest.raises(TypeError, match=rf"images must be uint8 .* or float .*got "
                                            rf"{np.dtype(dtype)}"):
            call()


def test_uint8_and_float_images_give_the_same_predictions(rng):
    x, _ = digits(rng, 10)
    net = simple_cnn(seed=0)
    np.testing.assert_allclose(net.predict_proba(x), net.predict_proba(x / np.float32(255)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lr", [1e6, 50.0])
def test_divergence_stops_training_and_suggests_a_smaller_learning_rate(rng, lr):
    x, y = digits(rng, 200)
    net = simple_cnn(seed=0)
    with pytest.raises(TrainingDiverged, match=r"training diverged.*smaller learning rate than "
                                               + re.escape(f"lr={lr:g}")) as e:
        net.fit(x, y, epochs=3, lr=lr, seed=0)
    assert isinstance(e.value, FloatingPointError)
    assert e.value.epoch == 1 and e.value.batch < 20


def test_a_good_learning_rate_is_not_called_divergence(rng):
    x, y = digits(rng, 200)
    history = simple_cnn(seed=0).fit(x, y, epochs=2, lr=0.05, seed=0)
    assert all(np.isfinite(history["loss"]))


@pytest.mark.parametrize("scale, hint", [(1e30, "reach 1e\\+30"), (255.0, "reach 255")])
def test_huge_inputs_are_blamed_not_the_learning_rate(rng, scale, hint):
    x, y = digits(rng, 40)
    x = x.astype(np.float32) / 255 * np.float32(scale)
    with pytest.raises(TrainingDiverged, match=rf"before any update.*learning rate is not the "
                                               rf"cause.*{hint}.*scale them") as e:
        simple_cnn(seed=0).fit(x, y, epochs=1, lr=0.05)
    assert "smaller learning rate" not in str(e.value)
    assert e.value.batch == 1


def test_parameters_blown_up_by_the_last_step_are_caught(rng):
    x, y = digits(rng, 10)
    net = simple_cnn(seed=0)

    def blow_up(net):  # a gradient hook that ruins the step after the loss was taken
        if calls.append(1) or len(calls) == 1:
            net.layers[-1].grads["weight"][0, 0] = np.inf
    calls = []
    net.gradient_hook = blow_up
    with pytest.raises(TrainingDiverged, match=r"end of epoch 1.*layer 4 \(Dense\) weight"):
        net.fit(x, y, epochs=1, batch_size=10)


def test_nonfinite_weights_are_not_evaluated(rng):
    x, y = digits(rng, 10)
    net = simple_cnn(seed=0)
    net.layers[0].params["weight"][0, 0, 0, 0] = np.nan
    for call in (lambda: net.evaluate(x, y), lambda: net.predict(x), lambda: net.fit(x, y)):
        with pytest.raises(ValueError, match=r"layer 0 \(Conv2D\) weight holds NaN"):
            call()


def test_outputs_that_overflow_are_an_error_not_a_prediction(rng):
    net = ConvNet([Flatten(), Dense(4, 3, dtype=np.float32, rng=0), ReLU()],
                  input_shape=(1, 2, 2))
    net.layers[1].params["weight"][:] = 3e38
    x = np.ones((5, 1, 2, 2), np.float32)
    with pytest.raises(FloatingPointError, match=r"not finite for 5 images.*index 0"):
        net.predict(x)


@pytest.mark.parametrize("size", [0, -1])
def test_batch_size_must_be_positive(rng, size):
    x, y = digits(rng, 4)
    net = simple_cnn(seed=0)
    for call in (lambda: net.evaluate(x, y, batch_size=size),
                 lambda: net.predict(x, batch_size=size), lambda: net.fit(x, y, batch_size=size)):
        with pytest.raises(ValueError, match=rf"batch_size must be >= 1, got {size}"):
            call()
    with pytest.raises(TypeError, match="epochs must be an int"):
        net.fit(x, y, epochs=2.5)


def test_predict_on_no_images_gives_empty_results():
    net = simple_cnn(seed=0)
    empty = np.zeros((0, 1, 28, 28), np.uint8)
    assert net.predict_proba(empty).shape == (0, 10)
    assert net.predict(empty).shape == (0,)


@pytest.mark.parametrize("val", [lambda x, y: (x,), lambda x, y: (x, y, y), lambda x, y: x])
def test_validation_data_must_be_a_pair(rng, val):
    x, y = digits(rng, 4)
    with pytest.raises(ValueError, match=r"validation_data must be a pair \(x_val, y_val\)"):
        simple_cnn(seed=0).fit(x, y, validation_data=val(x, y))


def test_learning_rate_takes_numpy_numbers_and_refuses_others(rng):
    x, y = digits(rng, 10)
    simple_cnn(seed=0).fit(x, y, lr=np.float32(0.05))
    simple_cnn(seed=0).fit(x, y, lr=np.float64(0.05))
    for bad in (True, 0, -0.1, float("nan"), "0.1", np.float32(np.inf)):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            simple_cnn(seed=0).fit(x, y, lr=bad)


def test_every_epoch_sees_a_new_order_from_the_seed(rng):
    """A shuffle drawn once and reused would pass every other test: record the order."""
    n = 30
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1).repeat(4, axis=2).reshape(n, 1, 2, 2)
    x /= n
    y = np.zeros(n, np.int64)

    def orders(seed, shuffle=True):
        net = ConvNet([Flatten(), Dense(4, 2, dtype=np.float32, rng=0)], input_shape=(1, 2, 2))
        seen = []
        step = net.train_step
        net.train_step = lambda xb, yb, opt: (seen.extend(np.rint(xb[:, 0, 0, 0] * n)), step(
            xb, yb, opt))[1]
        net.fit(x, y, epochs=3, batch_size=7, lr=0.01, seed=seed, shuffle=shuffle)
        return np.array(seen, int).reshape(3, n)

    a = orders(seed=1)
    for epoch in a:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))  # every image once
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    np.testing.assert_array_equal(a, orders(seed=1))  # the seed fixes the orders
    assert not np.array_equal(a, orders(seed=2))
    np.testing.assert_array_equal(orders(seed=1, shuffle=False), np.tile(np.arange(n), (3, 1)))


def test_nonfinite_images_are_found_past_the_first_chunk():
    """The check reads images in chunks of 4096: a NaN only a large input reaches is found."""
    x = np.zeros((9000, 1, 2, 2), np.float32)
    x[5000, 0, 1, 1] = np.nan
    x[8999, 0, 0, 0] = -np.inf
    net = ConvNet([Flatten(), Dense(4, 3, dtype=np.float32, rng=0)], input_shape=(1, 2, 2))
    with pytest.raises(ValueError, match=r"2 of 9000 images .*at index 5000, 8999\)"):
        net.predict(x)


@pytest.mark.parametrize("layers, match", [
    ([], "has no layers"),
    ([ReLU()], r"gives \(1, 28, 28\) per image, not a vector of class scores")])
@pytest.mark.parametrize("call", ["fit", "evaluate", "predict"])
def test_a_network_without_class_scores_says_so(rng, layers, match, call):
    x, y = digits(rng, 4)
    net = ConvNet(layers, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=match):
        getattr(net, call)(*((x,) if call == "predict" else (x, y)))
