"""Layers that hold layers (Sequential, Residual): gradients, the tree walks, model files,
checkpoints, custom layers, and a residual block against PyTorch autograd."""

import json
import zipfile

import numpy as np
import pytest
from test_gradients import check_layer

from fastcnn import (
    SGD,
    AdamW,
    BatchNorm2D,
    Conv2D,
    ConvNet,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    ReLU,
    use_backend,
)
from fastcnn.layers import Layer, Residual, Sequential, register

from reference import numeric_grad

F64 = np.float64


def block(c, f, stride, rng, dtype=F64):
    """A ResNet basic block: conv-BN-ReLU-conv-BN, the identity or a strided 1x1 projection."""
    main = Sequential([Conv2D(c, f, 3, stride=stride, padding=1, dtype=dtype, rng=rng),
                       BatchNorm2D(f, dtype=dtype), ReLU(),
                       Conv2D(f, f, 3, padding=1, dtype=dtype, rng=rng),
                       BatchNorm2D(f, dtype=dtype)])
    if c == f and stride == 1:
        return Residual(main)
    return Residual(main, Sequential([Conv2D(c, f, 1, stride=stride, padding=0, dtype=dtype,
                                             rng=rng), BatchNorm2D(f, dtype=dtype)]))


def tiny_resnet(seed=0, dtype=F64, channels=2):
    rng = np.random.default_rng(seed)
    return ConvNet([Conv2D(channels, 4, 3, dtype=dtype, rng=rng), BatchNorm2D(4, dtype=dtype),
                    ReLU(), block(4, 4, 1, rng, dtype), ReLU(), block(4, 6, 2, rng, dtype),
                    ReLU(), GlobalAvgPool2D(), Dense(6, 5, dtype=dtype, rng=rng)],
                   input_shape=(channels, 8, 8))


@pytest.mark.parametrize("stride, f", [(1, 3), (2, 4)])
def test_residual_block_gradients(backend_name, rng, stride, f):
    """A whole residual block with BatchNorm (training mode), identity and projection, against
    central finite differences of its input and every parameter, float64, each backend."""
    layer = block(3, f, stride, rng)
    for key, p in layer.params.items():  # BatchNorm's gamma 1 / beta 0: move them off
        if key.endswith(("1.weight", "4.weight", "1.bias", "4.bias")):
            p[...] = rng.uniform(0.5, 1.5, p.shape) if key.endswith("weight") else \
                rng.standard_normal(p.shape)
    check_layer(layer, rng.standard_normal((2, 3, 6, 6)), rng)


def test_sequential_passes_gradients_through(backend_name, rng):
    layer = Sequential([Conv2D(2, 3, 3, dtype=F64, rng=rng), ReLU(),
                        Conv2D(3, 2, 1, padding=0, dtype=F64, rng=rng)])
    x = rng.uniform(0.1, 1, (2, 2, 5, 5)) * rng.choice([-1, 1], (2, 2, 5, 5))
    check_layer(layer, x, rng)


def test_whole_residual_network_gradient(fast_backend_name, rng):
    """d(loss)/d(every parameter) of a small ResNet (BN, residual adds, global average) against
    finite differences of the network's own loss (the naive backend's are checked against
    PyTorch's autograd below: finite differences of every weight take it minutes)."""
    net = tiny_resnet(seed=3)
    x, y = rng.standard_normal((4, 2, 8, 8)), rng.integers(0, 5, 4)

    def loss():
        return net.loss.forward(net.forward(x), y)

    loss()
    net.backward(net.loss.backward())
    grads = {name: g.copy() for name, _, g in net.parameters()}
    for name, p, _ in net.parameters():
        np.testing.assert_allclose(grads[name], numeric_grad(loss, p), rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_the_tree_is_walked_by_parameters_buffers_modes_and_summary():
    net = tiny_resnet()
    names = [name for name, _, _ in net.parameters()]
    assert "layer3.block.0.weight" in names and "layer5.shortcut.0.weight" in names
    assert len(names) == len(set(names))
    assert "layer5.shortcut.1.running_mean" in dict(net.buffers())
    assert net.num_params() == sum(p.size for _, p, _ in net.parameters())
    net.eval()
    assert not any(layer.training for _, layer in net.walk())
    net.train()
    assert all(layer.training for _, layer in net.walk())
    with net.mode(False):
        assert not net.layer_at("5.block.1").training
    assert net.layer_at("5.block.1").training
    text = net.summary()
    assert "  Sequential(5 layers)" in text and "    Conv2D(in_channels=4, out_channels=6" in text
    conv_flops = 2 * 4 * 2 * 9 * 64
    assert net.flops() > conv_flops and f"FLOPs per image: {net.flops():,}" in text


def test_shapes_that_do_not_add_up_are_named_when_built(rng):
    with pytest.raises(ValueError, match=r"identity shortcut needs the same shape"):
        ConvNet([Residual(Conv2D(2, 3, 3, rng=rng))], input_shape=(2, 6, 6))
    with pytest.raises(ValueError, match=r"block gives \(3, 6, 6\) but its shortcut gives "
                                         r"\(3, 3, 3\)"):
        ConvNet([Residual(Conv2D(2, 3, 3, rng=rng), Conv2D(2, 3, 1, stride=2, padding=0,
                                                            rng=rng))], input_shape=(2, 6, 6))
    with pytest.raises(ValueError, match=r"in Sequential, layer 1 \(Dense\)"):
        ConvNet([Sequential([Conv2D(2, 3, 3, rng=rng), Dense(4, 2)])], input_shape=(2, 6, 6))
    with pytest.raises(ValueError, match="at least one layer"):
        Sequential([])
    with pytest.raises(TypeError, match=r"Sequential's layers\[1\] must be a fastcnn layer"):
        Sequential([ReLU(), "relu"])


def test_a_residual_model_file_round_trip(tmp_path, rng):
    net = tiny_resnet(seed=1, dtype=np.float32)
    x, y = rng.random((8, 2, 8, 8)).astype(np.float32), rng.integers(0, 5, 8)
    net.fit(x, y, epochs=1, batch_size=4, verbose=False)
    path = tmp_path / "resnet.npz"
    net.save(path)
    with zipfile.ZipFile(path) as z:
        arch = json.loads(np.load(z.open("architecture.npy")).tobytes())
    assert arch["version"] == 3 and arch["layers"][3]["type"] == "Residual"
    loaded = ConvNet.load(path)
    net.eval()
    np.testing.assert_array_equal(loaded.forward(x), net.forward(x))
    for (name, p, _), (name2, q, _) in zip(net.parameters(), loaded.parameters(), strict=True):
        assert name == name2
        np.testing.assert_array_equal(p, q)


def edit_architecture(path, out, change):
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
        arch = json.loads(np.load(z.open("architecture.npy")).tobytes())
    change(arch)
    import io
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(arch).encode(), np.uint8))
    members["architecture.npy"] = buf.getvalue()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def nest(arch, depth):
    spec = arch["layers"][0]
    for _ in range(depth):
        spec = {"type": "Sequential", "config": {"layers": [spec]}}
    arch["layers"][0] = spec


@pytest.mark.parametrize("change, match", [
    (lambda a: a["layers"][3]["config"]["block"]["config"]["layers"][0].update(type="Tanh"),
     r"layer 3 \(Residual\) has a bad config: unknown layer type 'Tanh'; register"),
    (lambda a: a["layers"][3]["config"].update(block=[]),
     r"layer 3 \(Residual\) has a bad config"),
    (lambda a: a["layers"][5]["config"].update(shortcut=None),
     r"holds members the architecture does not name|shortcut"),
    (lambda a: a["layers"][3]["config"]["block"]["config"]["layers"][0]["config"].update(
        out_channels=5), r"layer 3 \(Residual\) block\.0\.weight"),
    (lambda a: nest(a, 40), r"nested more than 32 deep"),
    (lambda a: a["layers"][3]["config"]["block"]["config"].update(layers="x" * 10),
     r"bad config"),
])
def test_crafted_nested_architectures_are_one_valueerror(tmp_path, change, match):
    path, bad = tmp_path / "m.npz", tmp_path / "bad.npz"
    tiny_resnet(dtype=np.float32).save(path)
    edit_architecture(path, bad, change)
    with pytest.raises(ValueError, match=match):
        ConvNet.load(bad)


def test_version_2_files_still_load(tmp_path, rng):
    """A flat model written as version 2 (before containers) loads as before."""
    net = ConvNet([Conv2D(1, 2, 3, rng=rng), ReLU(), Flatten(), Dense(2 * 25, 3, rng=rng)],
                  input_shape=(1, 5, 5))
    path, old = tmp_path / "m.npz", tmp_path / "v2.npz"
    net.save(path)
    edit_architecture(path, old, lambda a: a.update(version=2))
    x = rng.random((2, 1, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(ConvNet.load(old).forward(x), net.eval().forward(x))


def test_dropout_inside_a_container_resumes_bit_identically(tmp_path, rng):
    """A checkpoint keeps the generator of a Dropout held by a Sequential (its path "1.1")."""
    def build():
        r = np.random.default_rng(2)
        return ConvNet([Conv2D(1, 3, 3, rng=r), Sequential([ReLU(), Dropout(0.3, rng=5)]),
                        Flatten(), Dense(3 * 36, 4, rng=r)], input_shape=(1, 6, 6))
    x, y = rng.random((12, 1, 6, 6)).astype(np.float32), rng.integers(0, 4, 12)
    whole = build()
    whole.fit(x, y, epochs=2, batch_size=4, seed=1, verbose=False)
    ck = tmp_path / "ck.npz"
    first = build()
    first.fit(x, y, epochs=1, batch_size=4, seed=1, verbose=False, checkpoint=ck)
    resumed = build()
    resumed.fit(x, y, epochs=2, batch_size=4, seed=1, verbose=False, resume=ck)
    for (_, p, _), (_, q, _) in zip(whole.parameters(), resumed.parameters(), strict=True):
        np.testing.assert_array_equal(p, q)


def test_a_registered_layer_of_your_own_saves_and_loads(tmp_path, rng):
    class Scale(Layer):
        """y = factor * x."""

        def __init__(self, factor=2.0):
            super().__init__()
            self.factor = float(factor)

        def forward(self, x):
            return x * x.dtype.type(self.factor)

        def backward(self, dy, need_dx=True):
            return dy * dy.dtype.type(self.factor) if need_dx else None

        def config(self):
            return {"factor": self.factor}

    net = ConvNet([Conv2D(1, 2, 3, rng=rng), Scale(3.0), Flatten(), Dense(2 * 16, 3, rng=rng)],
                  input_shape=(1, 4, 4))
    path = tmp_path / "own.npz"
    net.save(path)
    from fastcnn import layers

    try:
        with pytest.raises(ValueError, match=r"unknown type 'Scale' \(a layer of your own: "
                                             r"decorate its class with fastcnn.layers.register"):
            ConvNet.load(path)
        register(Scale)
        x = rng.random((2, 1, 4, 4)).astype(np.float32)
        np.testing.assert_array_equal(ConvNet.load(path).forward(x), net.eval().forward(x))
        with pytest.raises(ValueError, match="already registered"):
            register(type("Scale", (Layer,), {}))
        with pytest.raises(TypeError, match="Layer subclass"):
            register(int)
    finally:
        layers.LAYER_TYPES.pop("Scale", None)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_small_resnet_trains_like_pytorch(rng, optimizer):
    """Forward, every gradient and one optimizer step of a small ResNet (BatchNorm in training
    mode, identity and projection shortcuts, global average) against PyTorch autograd, on
    each backend, float64."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    x, y = rng.standard_normal((4, 2, 8, 8)), rng.integers(0, 5, 4)

    class TBlock(nn.Module):
        def __init__(self, c, f, stride):
            super().__init__()
            self.main = nn.Sequential(nn.Conv2d(c, f, 3, stride, 1), nn.BatchNorm2d(f),
                                      nn.ReLU(), nn.Conv2d(f, f, 3, 1, 1), nn.BatchNorm2d(f))
            self.short = None if (c == f and stride == 1) else nn.Sequential(
                nn.Conv2d(c, f, 1, stride, 0), nn.BatchNorm2d(f))

        def forward(self, t):
            return self.main(t) + (t if self.short is None else self.short(t))

    def torch_twin(net):
        tnet = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
                             TBlock(4, 4, 1), nn.ReLU(), TBlock(4, 6, 2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).double()
        theirs = [p for p in tnet.parameters()]
        ours = [p for _, p, _ in net.parameters()]
        assert [tuple(p.shape) for p in theirs] == [p.shape for p in ours]
        with torch.no_grad():
            for t, p in zip(theirs, ours, strict=True):
                t.copy_(torch.from_numpy(p))
        return tnet

    for name in ("naive", "numpy", "numba"):
        with use_backend(name):
            net = tiny_resnet(seed=4)
            tnet = torch_twin(net)
            logits = net.forward(x)
            loss = net.loss.forward(logits, y)
            net.backward(net.loss.backward())
            tlogits = tnet(torch.from_numpy(x))
            tloss = nn.functional.cross_entropy(tlogits, torch.from_numpy(y))
            tloss.backward()
            np.testing.assert_allclose(logits, tlogits.detach().numpy(), rtol=1e-10, atol=1e-12)
            assert loss == pytest.approx(tloss.item(), rel=1e-10)
            for (pname, _, g), t in zip(net.parameters(), tnet.parameters(), strict=True):
                np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-12,
                                           err_msg=f"{name}: {pname}")
            if optimizer == "sgd":
                ours, theirs = SGD(lr=0.1, momentum=0.9), torch.optim.SGD(
                    tnet.parameters(), lr=0.1, momentum=0.9)
            else:
                ours, theirs = AdamW(lr=0.01, weight_decay=0.1), torch.optim.AdamW(
                    tnet.parameters(), lr=0.01, weight_decay=0.1)
            ours.step(net)
            theirs.step()
            for (pname, p, _), t in zip(net.parameters(), tnet.parameters(), strict=True):
                # atol: a convolution's bias before BatchNorm has a gradient of rounding noise
                # (~1e-17), which Adam's normalisation turns into steps of ~1e-11 either way
                np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-10, atol=1e-9,
                                           err_msg=f"{name} after {optimizer}: {pname}")


@pytest.mark.parametrize("name", ["simple", "complex", "modern", "resnet"])
def test_every_built_in_model_takes_grey_or_colour_images_and_any_class_count(name, rng):
    from fastcnn import models

    for shape, classes in (((1, 28, 28), 10), ((3, 32, 32), 7)):
        net = models.build(name, input_shape=shape, classes=classes)
        assert net.input_shape == shape and net.output_shapes()[-1] == (classes,)
        x = rng.random((4, *shape)).astype(np.float32)
        before = [p.copy() for _, p, _ in net.parameters()]
        net.fit(x, rng.integers(0, classes, 4), epochs=1, batch_size=2, verbose=False)
        assert any(not np.array_equal(a, p) for a, (_, p, _) in zip(before, net.parameters(),
                                                                    strict=True))
        assert net.predict(x).shape == (4,)
    with pytest.raises(ValueError, match="each side needs at least"):
        models.build(name, input_shape=(1, 1, 1))


def test_the_resnet_is_residual_and_its_summary_counts_its_flops():
    from fastcnn import models

    net = models.build("resnet")
    assert sum(isinstance(layer, Residual) for layer in net.layers) == 6
    assert sum(layer.shortcut is not None for layer in net.layers
               if isinstance(layer, Residual)) == 2  # the two stride-2 blocks project
    assert net.num_params() == 175_530
    assert 40e6 < net.flops() < 41e6


def test_errors_about_the_layout_of_images_and_labels_say_how_to_fix_them(rng):
    from fastcnn import models

    grey, colour = models.build("simple"), models.build("simple", input_shape=(3, 32, 32))
    y = rng.integers(0, 10, 4)
    cases = [
        (colour, rng.random((4, 32, 32, 3)).astype(np.float32), y, r"x.transpose\(0, 3, 1, 2\)"),
        (grey, rng.random((4, 28, 28)).astype(np.float32), y, r"x\[:, None\]"),
        (colour, rng.random((3, 32, 32)).astype(np.float32), y, r"x\[None\]"),
        (grey, rng.random((4, 1, 28, 28)).tolist(), y, r"np.asarray\(x\)"),
        (grey, rng.random((4, 1, 28, 28)), y.astype(float), r"y.astype\(int\)"),
        (grey, rng.random((4, 1, 28, 28)), np.eye(10)[y], r"y.argmax\(1\)"),
        (grey, rng.random((4, 1, 28, 28)), list(y), r"np.asarray\(y\)"),
    ]
    for net, x, labels, match in cases:
        with pytest.raises((TypeError, ValueError), match=match):
            net.fit(x, labels, epochs=1, verbose=False)
    with pytest.raises(ValueError, match=r"x.transpose\(0, 3, 1, 2\)"):
        colour.predict(rng.random((2, 32, 32, 3)).astype(np.float32))


def test_fastcnn_summary_prints_a_saved_models_tree(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "r.npz"
    tiny_resnet(dtype=np.float32).save(path)
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "summary", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "input (2, 8, 8), 5 classes" in run.stdout
    assert "  Sequential(5 layers)" in run.stdout and "FLOPs per image" in run.stdout
    missing = subprocess.run([sys.executable, "-m", "fastcnn.cli", "summary",
                              str(tmp_path / "none.npz")], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "no model file" in missing.stderr


def test_per_channel_normalisation_is_computed_applied_saved_and_checked(tmp_path, rng):
    from fastcnn import models

    x = rng.integers(0, 256, (40, 3, 6, 6), dtype=np.uint8)
    x[:, 1] //= 4  # a darker green
    y = rng.integers(0, 10, 40)
    net = models.build("simple", input_shape=(3, 6, 6)).set_normalization(x=x)
    mean, std = net.normalization
    scaled = x / 255.0
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 2, 3)), rtol=1e-8)
    prepared = net.prepare_batch(x, np.arange(40))
    np.testing.assert_allclose(prepared.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(prepared.std(axis=(0, 2, 3)), 1, rtol=1e-4)
    net.fit(x, y, epochs=1, batch_size=8, verbose=False)
    path = tmp_path / "n.npz"
    net.save(path)
    loaded = ConvNet.load(path)
    np.testing.assert_array_equal(loaded.normalization[0], mean)
    np.testing.assert_array_equal(loaded.predict_proba(x), net.predict_proba(x))
    plain = ConvNet.load(path).set_normalization()  # off: other outputs
    assert not np.allclose(plain.predict_proba(x), net.predict_proba(x))
    with pytest.raises(ValueError, match="need 3 values"):
        net.set_normalization([0.5, 0.5], [0.2, 0.2])
    with pytest.raises(ValueError, match="std finite and > 0"):
        net.set_normalization([0.5] * 3, [0.2, 0.0, 0.2])
    for bad in ({"mean": [0.1, 0.2, 0.3], "std": [1, -1, 1]}, {"mean": [0.1] * 3},
                {"mean": ["a"] * 3, "std": [1] * 3}, [1, 2]):
        edit_architecture(path, tmp_path / "bad.npz", lambda a, b=bad: a.update(normalization=b))
        with pytest.raises(ValueError, match="normalization"):
            ConvNet.load(tmp_path / "bad.npz")


def test_a_resumed_run_keeps_its_normalisation(tmp_path, rng):
    from fastcnn import models

    x, y = rng.integers(0, 256, (24, 3, 6, 6), dtype=np.uint8), rng.integers(0, 10, 24)
    whole = models.build("simple", input_shape=(3, 6, 6)).set_normalization(x=x)
    whole.fit(x, y, epochs=2, batch_size=8, seed=1, verbose=False)
    ck = tmp_path / "ck.npz"
    first = models.build("simple", input_shape=(3, 6, 6)).set_normalization(x=x)
    first.fit(x, y, epochs=1, batch_size=8, seed=1, checkpoint=ck, verbose=False)
    resumed = models.build("simple", input_shape=(3, 6, 6))  # none of its own
    resumed.fit(x, y, epochs=2, batch_size=8, resume=ck, verbose=False)
    for (_, p, _), (_, q, _) in zip(whole.parameters(), resumed.parameters(), strict=True):
        np.testing.assert_array_equal(p, q)
