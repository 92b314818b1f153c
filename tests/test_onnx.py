"""ONNX export and import: every model and every layer type runs in onnxruntime as in fastcnn;
fastcnn -> ONNX -> fastcnn gives the same parameters and outputs bit for bit; PyTorch's exports of
the same models import; hostile ONNX files are one ValueError each, found cheaply.

These tests need onnx and onnxruntime (pip install -e ".[onnx]", in the dev extra); without
them they skip, unless FASTCNN_REQUIRE_ONNX=1 (CI sets it) makes that a failure.

Tolerances: probabilities (fastcnn's ``predict_proba`` against the exported ``probabilities``)
within rtol 1e-5, atol 1e-6. Scores (logits) within rtol 1e-5 and an atol of 1e-5 times the
largest score: a score near 0 is the sum of terms as large as the largest, and both engines
round those in float32 in their own order (both are that close to a float64 run of the model).
"""

import importlib.util
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import fastcnn
from fastcnn import ConvNet, cli, datasets, layers, models, onnx_export, onnx_import
from fastcnn.layers import (
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
    Residual,
    Sequential,
)

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
if not HAVE_ONNX and os.environ.get("FASTCNN_REQUIRE_ONNX") == "1":
    raise RuntimeError("FASTCNN_REQUIRE_ONNX=1 but onnx or onnxruntime is missing: pip install "
                       "-e '.[onnx]'")
pytestmark = pytest.mark.skipif(not HAVE_ONNX, reason="onnx/onnxruntime not installed "
                                                      "(the onnx extra)")
SHAPES = [(1, 28, 28), (3, 32, 32)]


def session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared; the sums are the same
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def trained_ish(net, rng, x):
    """BatchNorm running statistics from a batch of ``x`` (the activations' own, so that they
    matter), scales and shifts away from 1 and 0; in inference mode."""
    norms = [layer for _, layer in net.walk() if isinstance(layer, (BatchNorm1D, BatchNorm2D))]
    for layer in norms:
        layer.momentum = 1.0  # running statistics := this batch's
    if norms:
        net.train()
        net.forward(net.prepare_batch(x, np.arange(len(x))))
    for layer in norms:
        layer.momentum = 0.1
        c = layer.channels
        layer.params["weight"][:] = rng.uniform(0.5, 1.5, c)
        layer.params["bias"][:] = rng.normal(0, 0.2, c)
    return net.eval()


def images(rng, n, shape):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def assert_like_fastcnn(net, path, x):
    """onnxruntime on ``path`` gives ``net``'s scores and probabilities for uint8 images x."""
    prepared = net.prepare_batch(x, np.arange(len(x)))
    outputs = session(path).run(None, {"images": prepared})
    scores = net.forward(prepared)
    assert [o.shape for o in outputs] == [scores.shape] * len(outputs)
    assert all(o.dtype == np.float32 for o in outputs)
    np.testing.assert_allclose(outputs[0], scores, rtol=1e-5,
                               atol=1e-5 * np.abs(scores).max())
    if len(outputs) > 1:
        np.testing.assert_allclose(outputs[1], net.predict_proba(x), rtol=1e-5, atol=1e-6)
    return outputs


def arrays(net):
    """Every parameter and buffer, in the network's walk order."""
    return [p for _, p, _ in net.parameters()] + [b for _, b in net.buffers()]


def assert_same_network(a, b):
    assert [p.shape for p in arrays(a)] == [p.shape for p in arrays(b)]
    for p, q in zip(arrays(a), arrays(b), strict=True):
        assert p.dtype == q.dtype == np.float32
        assert np.array_equal(p, q)  # bit for bit (no NaN here)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", models.MODELS)
def test_every_model_runs_in_onnxruntime_as_in_fastcnn_and_round_trips(tmp_path, name, shape):
    import onnx

    rng = np.random.default_rng(0)
    net = models.build(name, input_shape=shape, classes=7, seed=1)
    x = images(rng, 16, shape)
    net.set_normalization(x=x)
    net.class_names, net.dataset = tuple(f"class {i}" for i in range(7)), "noise"
    trained_ish(net, rng, x)
    path = tmp_path / "m.onnx"
    net.to_onnx(path, softmax=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["scores", "probabilities"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == list(shape)
    assert not {n.op_type for n in model.graph.node} & {"Dropout"}
    for batch in (7, 1):  # one file, any batch
        assert_like_fastcnn(net, path, x[:batch])

    back = ConvNet.from_onnx(path)
    assert not back.training and back.input_shape == shape
    assert_same_network(net, back)
    if name != "modern":  # modern's Dropout is not exported: the layers after it renumber
        assert [n for n, _, _ in back.parameters()] == [n for n, _, _ in net.parameters()]
        assert [type(la) for _, la in back.walk()] == [type(la) for _, la in net.walk()]
    else:
        assert [type(la) for la in back.layers] == [type(la) for la in net.layers
                                                    if type(la) is not Dropout]
    assert np.array_equal(back.predict_proba(x), net.predict_proba(x))
    assert back.class_names == net.class_names and back.dataset == "noise"
    for mine, theirs in zip(back.normalization, net.normalization, strict=True):
        assert np.array_equal(mine, theirs)


@pytest.mark.parametrize("name", models.MODELS)
def test_trained_models_on_real_digits(tmp_path, name):
    """Each model trained for an epoch on 256 real MNIST digits, then 200 test digits through
    fastcnn and onnxruntime: the same probabilities and the same predicted classes."""
    (x, y), (x_test, _) = datasets.load("mnist-sample", raw=True)
    net = models.build(name)
    net.fit(x[:256], y[:256], epochs=1, batch_size=32, lr=0.02, seed=0, verbose=False)
    net.class_names = tuple(datasets.class_names("mnist-sample"))
    path = tmp_path / "digits.onnx"
    net.to_onnx(path, softmax=True)
    _, probabilities = assert_like_fastcnn(net, path, x_test[:200])
    assert np.array_equal(probabilities.argmax(1), net.predict(x_test[:200]))
    assert (net.predict(x_test[:200]) == ConvNet.from_onnx(path).predict(x_test[:200])).all()


def every_layer_nets(rng):
    """Small nets that hold every layer type fastcnn has, in the ways they combine: strided and
    valid and non-square convolutions, overlapping max and average pools (fastcnn's pools have
    no padding), BatchNorm after convolutions and after a Dense layer, identity and projection
    residuals, a residual inside a residual's block, Sequential inside Sequential at the top,
    Dropout at the top and inside a block."""
    def conv(c, f, k=3, **kw):
        return Conv2D(c, f, k, rng=rng, **kw)

    inner = Residual(Sequential([conv(6, 6), BatchNorm2D(6), ReLU(), Dropout(0.2)]))
    first = ConvNet([
        conv(3, 6, (3, 5), padding=1), ReLU(),
        Residual(Sequential([conv(6, 6), BatchNorm2D(6), ReLU(), inner, conv(6, 6)])),
        MaxPool2D(3, stride=2),
        Sequential([conv(6, 8, stride=2, padding="valid"), Sequential([BatchNorm2D(8), ReLU()])]),
        Residual(Sequential([conv(8, 12, 3, stride=2, padding=1)]),
                 Sequential([conv(8, 12, 1, stride=2, padding=0), BatchNorm2D(12)])),
        AvgPool2D(2, stride=1), Flatten(), Dropout(0.5),
        Dense(12 * 2 * 1, 16, rng=rng), BatchNorm1D(16), ReLU(), Dense(16, 5, rng=rng),
    ], input_shape=(3, 23, 21))
    second = ConvNet([
        conv(1, 4, 5, padding="same"), BatchNorm2D(4), AvgPool2D(3), ReLU(),
        Residual(Sequential([conv(4, 4, 1, padding=0)])), MaxPool2D(2, stride=1),
        GlobalAvgPool2D(), Residual(Sequential([Dense(4, 4, rng=rng), BatchNorm1D(4)])),
        Dense(4, 3, rng=rng),
    ], input_shape=(1, 16, 16))
    return [first, second]


def test_random_nets_of_every_layer_type(tmp_path):
    rng = np.random.default_rng(3)
    nets = every_layer_nets(rng)
    used = {type(layer) for net in nets for _, layer in net.walk()}
    assert used == set(layers.LAYER_TYPES.values())  # a new layer type must be added here
    for i, net in enumerate(nets):
        x = images(rng, 9, net.input_shape)
        trained_ish(net, rng, x)
        path = tmp_path / f"net{i}.onnx"
        net.to_onnx(path, softmax=True)
        for batch in (9, 1):
            assert_like_fastcnn(net, path, x[:batch])
        back = ConvNet.from_onnx(path)
        assert_same_network(net, back)
        assert np.array_equal(back.forward(back.prepare_batch(x, np.arange(9))),
                              net.forward(net.prepare_batch(x, np.arange(9))))
        assert not any(isinstance(la, Dropout) for _, la in back.walk())


def test_the_metadata_says_how_to_prepare_an_image(tmp_path):
    """What the README's example does: a consumer without fastcnn prepares a uint8 picture
    from the metadata alone and gets fastcnn's probabilities and class name."""
    import onnx

    rng = np.random.default_rng(1)
    net = models.build("simple", input_shape=(3, 12, 12), classes=3)
    x = images(rng, 5, (3, 12, 12))
    net.set_normalization(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    net.class_names, net.dataset = ("cat", "dog", "bird"), "pets"
    path = tmp_path / "pets.onnx"
    net.to_onnx(path)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta == {"fastcnn_version": fastcnn.__version__, "fastcnn_dtype": "float32",
                    "input_shape": "[3, 12, 12]", "input_scale": "1/255",
                    "normalization_mean": "[0.5, 0.4, 0.3]",
                    "normalization_std": "[0.2, 0.25, 0.3]",
                    "class_names": '["cat", "dog", "bird"]', "dataset": "pets"}
    assert set(meta) <= set(onnx_export.METADATA_KEYS)
    assert "1/255" in model.doc_string and "normalization_mean" in model.doc_string
    assert model.opset_import[0].version == onnx_export.OPSET and model.ir_version == 8

    sess = session(path)
    meta = sess.get_modelmeta().custom_metadata_map
    mean = np.array(json.loads(meta["normalization_mean"]), np.float32)[:, None, None]
    std = np.array(json.loads(meta["normalization_std"]), np.float32)[:, None, None]
    prepared = ((x / np.float32(255)).astype(np.float32) - mean) / std
    scores = sess.run(["scores"], {"images": prepared.astype(np.float32)})[0]
    names = json.loads(meta["class_names"])
    assert [names[i] for i in scores.argmax(1)] == [net.class_names[i] for i in net.predict(x)]
    np.testing.assert_allclose(scores, net.forward(net.prepare_batch(x, np.arange(5))),
                               rtol=1e-5, atol=1e-6)


def test_a_model_without_labels_or_normalisation_has_no_such_metadata(tmp_path):
    net = models.build("simple")
    net.to_onnx(tmp_path / "plain.onnx")
    back = ConvNet.from_onnx(tmp_path / "plain.onnx")
    assert back.class_names is None and back.dataset is None and back.normalization is None
    import onnx

    keys = {p.key for p in onnx.load(str(tmp_path / "plain.onnx")).metadata_props}
    assert keys == {"fastcnn_version", "fastcnn_dtype", "input_shape", "input_scale"}
    assert [o.name for o in onnx.load(str(tmp_path / "plain.onnx")).graph.output] == ["scores"]


def test_float64_models_export_as_float32_with_a_note(tmp_path):
    rng = np.random.default_rng(2)
    net64 = models.build("complex", dtype=np.float64)
    net32 = models.build("complex", dtype=np.float32)
    for (_, a), (_, b) in zip(net64.walk(), net32.walk(), strict=True):
        for key in a.params:
            b.params[key][...] = a.params[key]
    with pytest.warns(UserWarning, match="float64; ONNX export writes its parameters as "
                                         "float32"):
        net64.to_onnx(tmp_path / "m64.onnx")
    back = ConvNet.from_onnx(tmp_path / "m64.onnx")
    assert back.dtype == np.float32
    assert_same_network(net32, back)  # the float64 values rounded to float32
    x = images(rng, 4, (1, 28, 28))
    assert_like_fastcnn(net32, tmp_path / "m64.onnx", x)
    np.testing.assert_allclose(back.predict_proba(x), net64.predict_proba(x), rtol=1e-4,
                               atol=1e-6)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m64.onnx")).metadata_props}
    assert meta["fastcnn_dtype"] == "float64"


def test_what_cannot_be_exported_is_an_error_naming_it(tmp_path):
    net = models.build("resnet")
    net.layers[3].block.layers[0].params["weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"layer 3 \(Residual\) block.0.weight holds NaN"):
        net.to_onnx(tmp_path / "nan.onnx")

    class Swish(layers.Layer):
        def forward(self, x):
            return x / (1 + np.exp(-x))

    net = ConvNet([Conv2D(1, 2, 3), Residual(Sequential([Swish(), ReLU()])), Flatten(),
                   Dense(2 * 8 * 8, 3)], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"layer1.block.0 \(Swish\) has no ONNX form: fastcnn "
                                         r"exports Conv2D, .*Residual, Dropout"):
        net.to_onnx(tmp_path / "swish.onnx")
    with pytest.raises(ValueError, match="no input_shape"):
        ConvNet([Flatten(), Dense(4, 2)]).to_onnx(tmp_path / "no_shape.onnx")
    with pytest.raises(FileNotFoundError, match="missing"):
        models.build("simple").to_onnx(tmp_path / "missing" / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_without_the_onnx_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastcnn\[onnx\]'"):
        models.build("simple").to_onnx(tmp_path / "m.onnx")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x08")
    with pytest.raises(ImportError, match=r"pip install 'fastcnn\[onnx\]'"):
        ConvNet.from_onnx(tmp_path / "m.onnx")
    code = ("import sys, fastcnn.network, fastcnn.onnx_export, fastcnn.onnx_import, fastcnn.cli;"
            "assert not {'onnx', 'onnxruntime', 'torch'} & set(sys.modules), sorted(sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# -- PyTorch's exporter --------------------------------------------------------------------------

def torch_twin(net):
    """The PyTorch module that computes what fastcnn ``net`` computes, with its values."""
    from fastcnn.bench_worker import copy_weights
    from fastcnn.bench_worker import torch_twin as twin

    tnet = twin(net)
    copy_weights(net, tnet)
    return tnet


def torch_export(tnet, shape, path, dynamic=True):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(tnet.eval(), torch.zeros(2, *shape), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}
                          if dynamic else None)


@pytest.mark.parametrize("name", models.MODELS)
def test_pytorch_exports_of_the_same_models_import(tmp_path, name):
    """The models rebuilt in PyTorch with fastcnn's values, exported by PyTorch's TorchScript
    exporter (which folds each BatchNorm after a convolution into it and leaves Dropout out in
    eval mode), imported: fastcnn's outputs are PyTorch's, on the same images."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    net = models.build(name, seed=2)
    x = images(rng, 6, (1, 28, 28))
    trained_ish(net, rng, x)
    tnet = torch_twin(net)
    path = tmp_path / "torch.onnx"
    torch_export(tnet, (1, 28, 28), path)
    back = ConvNet.from_onnx(path)
    prepared = net.prepare_batch(x, np.arange(6))
    with torch.no_grad():
        expected = tnet(torch.from_numpy(prepared)).numpy()
    got = back.forward(prepared)
    assert got.shape == expected.shape == (6, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    kinds = {type(la) for _, la in back.walk()}
    assert BatchNorm2D not in kinds and Dropout not in kinds  # folded, left out
    assert (Residual in kinds) == (name == "resnet")


def test_same_padding_as_pytorch_writes_it_imports(tmp_path):
    """Conv2d(padding="same") is exported with auto_pad SAME_UPPER and no pads: for a 3x3
    kernel at stride 1 that is padding 1 on every side, and imports as such."""
    torch = pytest.importorskip("torch")
    import onnx

    tnet = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding="same"), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 4))
    torch_export(tnet, (2, 5, 5), tmp_path / "same.onnx")
    conv = onnx.load(str(tmp_path / "same.onnx")).graph.node[0]
    assert {a.name: a for a in conv.attribute}["auto_pad"].s == b"SAME_UPPER"
    back = ConvNet.from_onnx(tmp_path / "same.onnx")
    assert back.layers[0].pad == 1
    x = np.random.default_rng(2).random((3, 2, 5, 5), dtype=np.float32)
    with torch.no_grad():
        expected = tnet(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(back.forward(x), expected, rtol=1e-5, atol=1e-6)


def test_pytorch_batchnorm1d_and_a_fixed_batch_import(tmp_path):
    """PyTorch writes an Identity node for an initializer equal to another (a fresh
    BatchNorm1d's running statistics equal its weight and bias), and a fixed batch of 2 where
    no axis is dynamic."""
    torch = pytest.importorskip("torch")
    net = ConvNet([Flatten(), Dense(16, 8), BatchNorm1D(8), ReLU(), Dense(8, 3)],
                  input_shape=(1, 4, 4)).eval()
    tnet = torch_twin(net)
    torch_export(tnet, (1, 4, 4), tmp_path / "bn1d.onnx", dynamic=False)
    import onnx

    ops = [n.op_type for n in onnx.load(str(tmp_path / "bn1d.onnx")).graph.node]
    assert "Identity" in ops and "BatchNormalization" in ops
    back = ConvNet.from_onnx(tmp_path / "bn1d.onnx")
    assert [type(la) for la in back.layers] == [Flatten, Dense, BatchNorm1D, ReLU, Dense]
    x = np.random.default_rng(5).random((3, 1, 4, 4), dtype=np.float32)
    with torch.no_grad():
        expected = tnet(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(back.forward(x), expected, rtol=1e-5, atol=1e-6)


# -- hostile and foreign files -------------------------------------------------------------------

def exported(tmp_path, name="simple"):
    import onnx

    path = tmp_path / f"{name}.onnx"
    models.build(name).to_onnx(path)
    return onnx.load(str(path))


def write(tmp_path, model, name="bad.onnx"):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def refused(path, match):
    with pytest.raises(ValueError, match=rf"{path.name} is not an ONNX model fastcnn can import: "
                                         rf".*{match}"):
        ConvNet.from_onnx(path)


def test_truncated_empty_and_foreign_files(tmp_path):
    data = (write(tmp_path, exported(tmp_path))).read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    refused(cut, "not an ONNX protobuf|declares")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    refused(empty, "no IR version or no graph")
    npz = tmp_path / "model.npz"
    models.build("simple").save(npz)
    refused(npz, "not an ONNX protobuf")
    text = tmp_path / "notes.onnx"
    text.write_text("just some words, not a model\n")
    refused(text, "not an ONNX protobuf|no IR version or no graph")
    with pytest.raises(ValueError, match="is a folder"):
        ConvNet.from_onnx(tmp_path)
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        ConvNet.from_onnx(tmp_path / "nowhere.onnx")


def test_a_huge_declared_tensor_costs_nothing(tmp_path):
    model = exported(tmp_path)
    weight = next(t for t in model.graph.initializer if t.name == "layer4.weight")
    weight.dims[:] = [100_000, 100_000]  # 40 GB declared, 63 KB held
    path = write(tmp_path, model)
    tracemalloc.start()
    try:
        refused(path, r"initializer 'layer4.weight' declares 10,000,000,000 values")
        weight.dims[:] = [1000, 1568]
        refused(write(tmp_path, model), r"initializer 'layer4.weight' declares dims "
                                        r"\[1000, 1568\] \(6,272,000 bytes\) but holds 62,720")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak


def test_external_data_is_never_followed(tmp_path):
    from onnx import TensorProto

    model = exported(tmp_path)
    weight = next(t for t in model.graph.initializer if t.name == "layer0.weight")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../../etc/passwd"
    refused(write(tmp_path, model), r"initializer 'layer0.weight' is stored outside the file "
                                    r"\(external data '../../../etc/passwd'\)")


def test_a_cycle_and_a_missing_tensor(tmp_path):
    model = exported(tmp_path)
    nodes = model.graph.node  # Conv, Relu, MaxPool, Flatten, Gemm
    nodes[0].input[0] = nodes[2].output[0]  # the Conv reads the MaxPool: a cycle
    refused(write(tmp_path, model), r"node 0 'layer0' \(Conv\) reads tensor 'layer2', which no "
                                    r"input, initializer or earlier node gives \(a cycle")
    model = exported(tmp_path)
    model.graph.node[3].input[0] = "nowhere"
    refused(write(tmp_path, model), r"node 3 'layer3' \(Flatten\) reads tensor 'nowhere'")


def test_a_graph_10000_nodes_deep_is_refused_before_it_is_walked(tmp_path):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", [f"t{i}" if i else "images"], [f"t{i + 1}"])
             for i in range(10_000)]
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info(
        "images", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info(
            "t10000", TensorProto.FLOAT, ["N", 4])])
    refused(write(tmp_path, helper.make_model(graph)), r"its graph has 10,000 nodes \(at most "
                                                       r"4,096\)")


def test_subgraphs_nested_5000_deep_are_refused_by_the_parser(tmp_path):
    """A graph in a node's attribute in a graph ..., written as raw protobuf (the onnx package
    itself refuses to build one): the parser's depth limit, not a crash or a long walk."""
    def field(number, payload):  # a length-delimited protobuf field
        size, varint = len(payload), b""
        while True:
            varint += bytes([(size & 0x7F) | (0x80 if size > 0x7F else 0)])
            size >>= 7
            if not size:
                return bytes([number << 3 | 2]) + varint + payload

    graph = b""
    for _ in range(5000):
        graph = field(1, field(5, field(6, graph)))  # GraphProto.node.attribute.g
    path = tmp_path / "nested.onnx"
    path.write_bytes(b"\x08\x08" + field(7, graph))  # ir_version 8, graph
    refused(path, "not an ONNX protobuf")


def test_subgraphs_functions_and_oversized_files_are_refused(tmp_path, monkeypatch):
    from onnx import TensorProto, helper

    model = exported(tmp_path)
    then = helper.make_graph([], "then", [], [helper.make_tensor_value_info(
        "layer1", TensorProto.FLOAT, None)])
    model.graph.node[1].attribute.append(helper.make_attribute("then_branch", then))
    refused(write(tmp_path, model), r"node 1 'layer1' \(Relu\) holds a subgraph")
    model = exported(tmp_path)
    model.functions.add().name = "f"
    refused(write(tmp_path, model), "it defines 1 functions")
    path = write(tmp_path, exported(tmp_path), "big.onnx")
    monkeypatch.setattr(onnx_import, "MAX_FILE_BYTES", 1000)
    refused(path, r"it is [\d,]+ bytes, more than the 1,000 fastcnn reads")


@pytest.mark.parametrize("op, node", [("LSTM", 1), ("Softmax", 1), ("Sigmoid", 3)])
def test_an_operator_fastcnn_lacks_is_named_with_its_node(tmp_path, op, node):
    model = exported(tmp_path)
    model.graph.node[node].op_type = op
    message = (r"fastcnn reads a Softmax only as the last node" if op == "Softmax"
               else rf"operator '{op}' has no fastcnn layer; fastcnn reads Add, ")
    refused(write(tmp_path, model), rf"node {node} 'layer{node}' \({op}\)(: | )?{message}")


@pytest.mark.parametrize("node, attribute, value, message", [
    (0, "group", 2, r"group 2; fastcnn's Conv2D is group 1"),
    (0, "dilations", [2, 2], r"dilations \[2, 2\]"),
    (0, "pads", [1, 1, 0, 0], r"pads \[1, 1, 0, 0\]; fastcnn takes one value"),
    (0, "strides", [1, 2], r"strides \[1, 2\]"),
    (2, "auto_pad", "SAME_UPPER", r"auto_pad SAME_UPPER with kernel_shape \[2, 2\]"),
    (0, "auto_pad", "SAME_LEFT", "auto_pad SAME_LEFT; fastcnn takes explicit pads"),
    (2, "ceil_mode", 1, "ceil_mode 1"),
    (2, "kernel_shape", [2, 3], r"kernel_shape \[2, 3\]"),
    (3, "axis", 2, "axis 2; fastcnn flattens all but the batch axis"),
    (4, "alpha", 0.5, "alpha 0.5"),
    (4, "custom", 1, "fastcnn does not read its attribute 'custom'"),
])
def test_attributes_fastcnn_cannot_represent_are_named(tmp_path, node, attribute, value,
                                                       message):
    from onnx import helper

    model = exported(tmp_path)
    target = model.graph.node[node]
    kept = [a for a in target.attribute if a.name != attribute]
    del target.attribute[:]
    target.attribute.extend(kept + [helper.make_attribute(attribute, value)])
    if attribute == "auto_pad":
        target.attribute.remove(next(a for a in target.attribute if a.name == "pads"))
    assert target.op_type == ("Conv", "Relu", "MaxPool", "Flatten", "Gemm")[node]
    path = write(tmp_path, model)
    with pytest.raises(ValueError, match=rf"node {node} 'layer{node}' \(\w+\).*{message}"):
        ConvNet.from_onnx(path)


def test_graphs_fastcnn_cannot_represent(tmp_path):
    from onnx import helper

    model = exported(tmp_path, "resnet")
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    adds[0].input[1] = adds[0].input[0]  # the block added to itself: no residual
    refused(write(tmp_path, model), "not a residual connection fastcnn can represent|read by "
                                    "nothing")
    model = exported(tmp_path)
    model.graph.input.append(helper.make_tensor_value_info("extra", 1, ["N", 3]))
    refused(write(tmp_path, model), "it has 2 inputs besides its initializers")
    model = exported(tmp_path)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    refused(write(tmp_path, model), r"fixed C, H and W, got dimensions \['?\?'?, 1, '?\?'?, 28\]")


def test_values_fastcnn_would_not_load_from_its_own_files(tmp_path):
    from onnx import numpy_helper

    model = exported(tmp_path, "modern")
    weights = {t.name: t for t in model.graph.initializer}
    bias = numpy_helper.to_array(weights["layer0.bias"]).copy()
    bias[3] = np.inf
    weights["layer0.bias"].CopyFrom(numpy_helper.from_array(bias, "layer0.bias"))
    refused(write(tmp_path, model), r"its layer 0 \(Conv2D\) bias holds NaN or infinite values")
    model = exported(tmp_path, "modern")
    weights = {t.name: t for t in model.graph.initializer}
    var = -np.ones(32, np.float32)
    weights["layer1.running_var"].CopyFrom(numpy_helper.from_array(var, "layer1.running_var"))
    refused(write(tmp_path, model), r"node 1 'layer1' \(BatchNormalization\): its running "
                                    r"variance holds negative values")


def test_bad_metadata_is_named(tmp_path):
    model = exported(tmp_path)
    prop = model.metadata_props.add()
    prop.key, prop.value = "class_names", '["a", "b"]'
    refused(write(tmp_path, model), "metadata class_names must be a JSON list of 10 names")
    model = exported(tmp_path)
    prop = model.metadata_props.add()
    prop.key, prop.value = "normalization_mean", "[0.5]"
    refused(write(tmp_path, model), "normalization_mean and normalization_std alone")


# -- the command line ------------------------------------------------------------------------------

def test_fastcnn_export_and_import_end_to_end(tmp_path, capsys):
    net = models.build("modern")
    rng = np.random.default_rng(6)
    x = images(rng, 8, (1, 28, 28))
    trained_ish(net, rng, x)
    net.class_names = tuple("0123456789")
    net.save(tmp_path / "m.npz")
    assert cli.main(["export", str(tmp_path / "m.npz"), str(tmp_path / "m.onnx"),
                     "--softmax"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "input images (N, 1, 28, 28) float32, output scores and " \
                               "probabilities (N, 10)" in out
    assert_like_fastcnn(ConvNet.load(tmp_path / "m.npz"), tmp_path / "m.onnx", x)
    assert cli.main(["import", str(tmp_path / "m.onnx"), str(tmp_path / "back.npz")]) == 0
    # modern has 19 layers; its Dropout is not in the ONNX file
    assert "18 layers, 468,202 parameters" in capsys.readouterr().out
    back = ConvNet.load(tmp_path / "back.npz")
    assert back.class_names == net.class_names
    assert_same_network(net, back)

    net64 = models.build("simple", dtype=np.float64)
    net64.save(tmp_path / "m64.npz")
    assert cli.main(["export", str(tmp_path / "m64.npz"), str(tmp_path / "m64.onnx")]) == 0
    assert "note: the model is float64" in capsys.readouterr().err
    assert cli.main(["import", str(tmp_path / "m.npz"), str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastcnn: error: ") and "is not an ONNX model fastcnn can import" in err
    assert not (tmp_path / "x.npz").exists()
