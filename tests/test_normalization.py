"""BatchNorm and Dropout layers: against PyTorch, in both modes, and in model files version 2."""

import numpy as np
import pytest

from fastcnn import SGD, BatchNorm1D, BatchNorm2D, Conv2D, ConvNet, Dense, Dropout, Flatten, ReLU
from fastcnn.models import simple_cnn


def torch_bn(torch, channels, ndim):
    cls = torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d
    return cls(channels, eps=1e-5, momentum=0.1).double()


@pytest.mark.parametrize("shape", [(6, 3, 5, 4), (8, 5)])
def test_batchnorm_matches_pytorch_in_both_modes(backend_name, rng, shape):
    torch = pytest.importorskip("torch")
    c = shape[1]
    ours = (BatchNorm2D if len(shape) == 4 else BatchNorm1D)(c, dtype=np.float64)
    theirs = torch_bn(torch, c, len(shape))
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    ours.params["weight"][:], ours.params["bias"][:] = gamma, beta
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(gamma))
        theirs.bias.copy_(torch.from_numpy(beta))
    for _ in range(4):  # several training steps: outputs, gradients, running statistics
        x = rng.standard_normal(shape) * 2 + 3
        dy = rng.standard_normal(shape)
        tx = torch.tensor(x, requires_grad=True)
        ty = theirs(tx)
        ty.backward(torch.from_numpy(dy))
        y = ours.forward(x)
        dx = ours.backward(dy)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(ours.grads["weight"], theirs.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(ours.grads["bias"], theirs.bias.grad.numpy(), rtol=1e-10)
        theirs.weight.grad = theirs.bias.grad = None
    np.testing.assert_allclose(ours.buffers["running_mean"], theirs.running_mean.numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(ours.buffers["running_var"], theirs.running_var.numpy(),
                               rtol=1e-12)
    ours.training = False
    theirs.eval()
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(ours.forward(x), theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-10, atol=1e-12)


def test_batchnorm_running_statistics_and_inference_mode(rng):
    bn = BatchNorm2D(2, dtype=np.float64)
    x = rng.standard_normal((5, 2, 3, 3)) * 4 + 10
    bn.forward(x)
    mean = x.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.1 * mean)
    var = x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.buffers["running_var"], 0.9 + 0.1 * var)
    bn.training = False
    before = bn.buffers["running_mean"].copy()
    y = bn.forward(x)
    np.testing.assert_array_equal(bn.buffers["running_mean"], before)  # inference: no update
    expected = (x - before[:, None, None]) / np.sqrt(bn.buffers["running_var"][:, None, None]
                                                     + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    with pytest.raises(RuntimeError, match="inference mode"):
        bn.backward(np.ones_like(x))
    bn.training = True
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm1D(3).forward(np.ones((1, 3), np.float32))


def test_batchnorm_layer_checks_its_input():
    with pytest.raises(ValueError, match="C=4"):
        ConvNet([Conv2D(1, 3, 3), BatchNorm2D(4)], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"expects input \(C,\)"):
        ConvNet([BatchNorm1D(1)], input_shape=(1, 8, 8))
    for bad, message in [({"channels": 0}, "channels must be >= 1"),
                         ({"channels": 2, "eps": 0}, "eps must be a positive finite number"),
                         ({"channels": 2, "eps": 1}, "eps must be < 1.0, got 1"),
                         ({"channels": 2, "momentum": 2}, r"momentum must be in \[0.0, 1.0\]"),
                         ({"channels": 2, "momentum": -0.5}, r"momentum must be in \[0.0, 1.0\]"),
                         ({"channels": 2, "momentum": True}, "momentum must be a finite number")]:
        with pytest.raises(ValueError, match=message):
            BatchNorm2D(**bad)
    assert BatchNorm2D(2, momentum=1).momentum == 1.0


def test_dropout_drops_in_training_and_is_the_identity_at_inference(rng):
    drop = Dropout(0.25, rng=0)
    x = np.ones((200, 50), np.float32)
    y = drop.forward(x)
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.02  # the expected value is kept: E[y] = x
    drop.training = False
    assert drop.forward(x) is x
    assert Dropout(0.0).forward(x) is x
    for p in (-0.1, 1.0, True, float("nan")):
        with pytest.raises(ValueError, match=r"p must be (in \[0.0, 1.0\)|a finite number)"):
            Dropout(p)


def bn_net(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return ConvNet([Conv2D(1, 4, 3, dtype=dtype, rng=rng), BatchNorm2D(4, dtype=dtype), ReLU(),
                    Flatten(), Dense(4 * 6 * 6, 8, dtype=dtype, rng=rng),
                    BatchNorm1D(8, dtype=dtype), ReLU(), Dropout(0.3, rng=rng),
                    Dense(8, 3, dtype=dtype, rng=rng)], input_shape=(1, 6, 6))


def test_the_same_run_gives_the_same_weights_on_every_backend(rng):
    """Dropout masks come from the layer's generator, so every backend trains alike."""
    import fastcnn

    x = rng.random((16, 1, 6, 6))
    y = rng.integers(0, 3, 16)
    weights = {}
    for name in fastcnn.available_backends():
        with fastcnn.use_backend(name):
            net = bn_net(seed=4)
            net.fit(x, y, epochs=2, batch_size=8, optimizer=fastcnn.Adam(0.01), seed=1)
        weights[name] = [a.copy() for _, a, _ in net.parameters()] + [
            b.copy() for _, b in net.buffers()]
    # (the convolution's bias before BatchNorm has a gradient of zero up to rounding, ~1e-10)
    for name, ws in weights.items():
        for got, want in zip(ws, weights["naive"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-8, err_msg=name)


def test_model_files_keep_buffers_and_version_1_files_still_load(tmp_path, rng):
    import json
    import zipfile

    from fastcnn import serialize

    net = bn_net(seed=1)
    net.fit(rng.random((16, 1, 6, 6)), rng.integers(0, 3, 16), epochs=1, batch_size=8)
    net.save(tmp_path / "bn.npz")
    loaded = ConvNet.load(tmp_path / "bn.npz")
    assert not loaded.training  # a loaded model infers
    for (_, a), (_, b) in zip(net.buffers(), loaded.buffers(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = rng.random((5, 1, 6, 6))
    np.testing.assert_array_equal(net.predict_proba(x), loaded.predict_proba(x))
    with zipfile.ZipFile(tmp_path / "bn.npz") as z:
        arch = json.loads(np.load(z.open("architecture.npy")).tobytes())
    assert arch["version"] == serialize.VERSION == 3
    # a file written by the previous release (version 1, no buffers) loads unchanged
    old = simple_cnn(seed=3)
    arrays = {f"layer{i}.{k}": p for i, layer in enumerate(old.layers)
              for k, p in layer.params.items()}
    record = {"format": "fastcnn-model", "version": 1, "input_shape": [1, 28, 28],
              "layers": [{"type": type(layer).__name__, "config": layer.config(),
                          "params": {k: list(p.shape) for k, p in layer.params.items()}}
                         for layer in old.layers]}
    arrays["architecture"] = np.frombuffer(json.dumps(record).encode(), np.uint8)
    np.savez(tmp_path / "v1.npz", **arrays)
    v1 = ConvNet.load(tmp_path / "v1.npz")
    np.testing.assert_array_equal(v1.layers[0].params["weight"], old.layers[0].params["weight"])


def test_missing_or_bad_buffers_are_refused(tmp_path, rng):
    net = bn_net(seed=1)
    net.save(tmp_path / "bn.npz")
    with np.load(tmp_path / "bn.npz") as z:
        arrays = dict(z)
    arrays["layer1.running_var"] = arrays["layer1.running_var"].copy()
    arrays["layer1.running_var"][0] = np.inf
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2D\) running_var holds 1 NaN"):
        ConvNet.load(tmp_path / "bad.npz")
    del arrays["layer1.running_var"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2D\) has no running_var array"):
        ConvNet.load(tmp_path / "missing.npz")


def test_a_last_batch_of_one_image_is_trained_with_the_one_before(capsys):
    """BatchNorm1D cannot normalise a batch of one image; a last batch of one failed after
    several steps ("needs more than one value per channel ... use a larger batch")."""
    rng = np.random.default_rng(0)

    def net():
        r = np.random.default_rng(1)
        return ConvNet([Flatten(), Dense(16, 8, rng=r), BatchNorm1D(8), ReLU(),
                        Dense(8, 3, rng=r)], input_shape=(1, 4, 4))

    x = rng.integers(0, 256, (21, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, 21)
    history = net().fit(x, y, epochs=2, batch_size=10, verbose=True, shuffle=False)
    assert len(history["batch_loss"]) == 4  # 10 and 11 images an epoch
    assert "note: the last 1 image of an epoch would make a batch too small" in \
        capsys.readouterr().out
    # the same as training on batches of 10 and 11 by hand
    by_hand = net()
    opt = SGD(0.05)
    by_hand.train()
    for _ in range(2):
        for part in (slice(0, 10), slice(10, 21)):
            by_hand.train_step(x[part].astype(np.float32) / 255, y[part], opt)
    fitted = net()
    fitted.fit(x, y, epochs=2, batch_size=10, verbose=False, shuffle=False)
    for (_, a, _), (_, b, _) in zip(fitted.parameters(), by_hand.parameters(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # a model that trains on one image keeps its last batch of one
    plain = ConvNet([Flatten(), Dense(16, 3, rng=0)], input_shape=(1, 4, 4))
    assert len(plain.fit(x, y, epochs=1, batch_size=10, verbose=False)["batch_loss"]) == 3
    # a batch size of one cannot be helped: the error says so at once
    with pytest.raises(ValueError, match="a batch of one: use a larger batch"):
        net().fit(x, y, epochs=1, batch_size=1, verbose=False)
