import numpy as np
import pytest

from fastcnn import Conv2D, ConvNet, Dense, Flatten, MaxPool2D, ReLU
from fastcnn.models import build, complex_cnn, simple_cnn


def tiny_data(rng, n=40):
    x = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    return x, rng.integers(0, 10, n)


def test_dense_mismatch_is_a_build_time_error_naming_both_numbers():
    net = ConvNet(input_shape=(1, 28, 28))
    net.add(Conv2D(1, 8, 3)).add(ReLU()).add(MaxPool2D(2)).add(Flatten())
    with pytest.raises(ValueError, match=r"1568 features.*in_features is 1000"):
        net.add(Dense(1000, 10))
    assert len(net.layers) == 4  # the bad layer was not kept


def test_mismatch_without_input_shape_is_found_on_the_first_batch():
    net = ConvNet([Conv2D(1, 4, 3), Flatten(), Dense(10, 2)])
    with pytest.raises(ValueError, match=r"layer 2 \(Dense\).*3136 features"):
        net.predict(np.zeros((1, 1, 28, 28), np.float32))


def test_conv_channel_mismatch_and_bad_padding():
    with pytest.raises(ValueError, match="C=3"):
        ConvNet([Conv2D(3, 4, 3)], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="odd square kernel"):
        Conv2D(1, 2, 4, padding="same")
    with pytest.raises(ValueError, match="padding"):
        Conv2D(1, 2, 3, padding="full")


def test_summary_lists_layers_shapes_and_parameter_counts():
    text = simple_cnn().summary()
    assert "(N, 8, 28, 28)" in text and "(N, 8, 14, 14)" in text and "(N, 10)" in text
    assert "15,690" in text and "total parameters: 15,770" in text
    assert complex_cnn().num_params() == 467_818


def test_fit_returns_history_and_reduces_loss(rng):
    x, y = tiny_data(rng)
    net = simple_cnn(seed=0)
    history = net.fit(x, y, epochs=4, batch_size=10, lr=0.05, validation_data=(x[:10], y[:10]),
                      seed=0)
    assert len(history["loss"]) == 4 and len(history["val_accuracy"]) == 4
    assert history["loss"][-1] < history["loss"][0]
    assert all(0 <= a <= 1 for a in history["accuracy"])


def test_training_is_reproducible_from_a_seed(rng):
    x, y = tiny_data(rng)
    a, b = simple_cnn(seed=3), simple_cnn(seed=3)
    a.fit(x, y, epochs=1, seed=7)
    b.fit(x, y, epochs=1, seed=7)
    np.testing.assert_array_equal(a.layers[0].params["weight"], b.layers[0].params["weight"])
    c = simple_cnn(seed=3)
    c.fit(x, y, epochs=1, seed=8)  # another shuffle, other weights
    assert not np.array_equal(a.layers[0].params["weight"], c.layers[0].params["weight"])


def test_uint8_and_float_inputs_train_identically(rng):
    x, y = tiny_data(rng, 20)
    a, b = simple_cnn(seed=0), simple_cnn(seed=0)
    a.fit(x, y, epochs=1, seed=0)
    b.fit(x.astype(np.float32) / np.float32(255), y, epochs=1, seed=0)
    np.testing.assert_allclose(a.layers[-1].params["weight"], b.layers[-1].params["weight"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_diverging_loss_stops_with_a_clear_message(rng):
    x, y = tiny_data(rng)
    net = simple_cnn()
    with pytest.raises(FloatingPointError, match="diverged.*lr=1e\\+30"):
        net.fit(x, y, epochs=2, lr=1e30)


def test_fit_rejects_bad_data(rng):
    x, y = tiny_data(rng)
    net = simple_cnn()
    with pytest.raises(ValueError, match="40 images but 39 labels"):
        net.fit(x, y[:-1])
    with pytest.raises(ValueError, match=r"images of shape \(1, 28, 27\)"):
        net.fit(x[..., :27], y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        net.fit(x, y + 10)
    with pytest.raises(ValueError, match="lr"):
        net.fit(x, y, lr=-1)
    with pytest.raises(ValueError, match="Unknown model"):
        build("huge")


def test_predict_and_proba(rng):
    x, _ = tiny_data(rng, 7)
    net = simple_cnn()
    p = net.predict_proba(x, batch_size=3)
    assert p.shape == (7, 10) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(net.predict(x), p.argmax(axis=1))


def test_save_load_round_trip_gives_identical_predictions(tmp_path, rng):
    x, y = tiny_data(rng)
    net = complex_cnn(seed=2)
    net.fit(x[:10], y[:10], epochs=1)
    path = tmp_path / "model.npz"
    net.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left behind
    loaded = ConvNet.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(x), net.predict_proba(x))
    assert loaded.summary() == net.summary()


def test_load_float64_model_keeps_its_dtype(tmp_path):
    net = simple_cnn(dtype=np.float64)
    net.save(tmp_path / "m.npz")
    assert ConvNet.load(tmp_path / "m.npz").dtype == np.float64


def test_truncated_or_corrupt_model_file_fails_clearly(tmp_path):
    path = tmp_path / "model.npz"
    simple_cnn().save(path)
    data = path.read_bytes()
    (tmp_path / "short.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="short.npz is not a valid fastcnn model"):
        ConvNet.load(tmp_path / "short.npz")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the Dense weights
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="flipped.npz is not a valid fastcnn model"):
        ConvNet.load(tmp_path / "flipped.npz")
    with pytest.raises(FileNotFoundError):
        ConvNet.load(tmp_path / "missing.npz")


def test_load_rejects_a_file_whose_shapes_disagree(tmp_path):
    path = tmp_path / "m.npz"
    simple_cnn().save(path)
    with np.load(path) as z:
        arrays = dict(z)
    arrays["layer4.weight"] = arrays["layer4.weight"][:, :100]
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"layer 4 \(Dense\) weight"):
        ConvNet.load(path)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_pooling_in_inference_mode_keeps_no_argmax_and_gives_the_same_output(backend, rng):
    from fastcnn import use_backend

    x = rng.random((3, 1, 28, 28)).astype(np.float32)
    with use_backend(backend):
        net = build("complex", seed=0)
        net.train()
        trained_mode = net.forward(x)
        net.eval()
        inference = net.forward(x)
        np.testing.assert_array_equal(inference, trained_mode)
        pools = [layer for layer in net.layers if isinstance(layer, MaxPool2D)]
        assert pools and all(p._argmax is None for p in pools)
        with pytest.raises(RuntimeError, match="inference mode"):
            pools[-1].backward(np.ones((3, 64, 7, 7), np.float32))
        x[1, 0, 3, 4] = np.nan  # inference pools before the ReLU: NaN must still come out
        net.train()
        trained_mode = net.forward(x)
        net.eval()
        assert np.isnan(trained_mode[1]).all() and not np.isnan(trained_mode[[0, 2]]).any()
        np.testing.assert_array_equal(net.forward(x), trained_mode)
