"""ONNX export: a ConvNet as an ONNX graph that onnxruntime (or any ONNX runtime) runs without
fastcnn, built with the ``onnx`` package's helper API (``pip install 'fastcnn[onnx]'``).

The graph: input ``images`` (N, C, H, W) float32, N symbolic, prepared as fastcnn prepares
images (uint8 pixels x 1/255, then ``(x - mean[c]) / std[c]`` where the model normalises);
output ``scores`` (N, K), the class scores (logits) ``ConvNet.forward`` gives in inference
mode; with ``softmax=True`` a second output ``probabilities`` (N, K). One layer, one node:
Conv2D -> Conv, ReLU -> Relu, MaxPool2D -> MaxPool, AvgPool2D -> AveragePool, GlobalAvgPool2D
-> GlobalAveragePool + Flatten, Flatten -> Flatten, Dense -> Gemm (transB=1: fastcnn's weight
is (out, in), stored as it is), BatchNorm2D/1D -> BatchNormalization (running statistics);
Sequential -> its layers in line; Residual -> its block, its shortcut and an Add; Dropout
(the identity at inference) -> nothing. Node and initializer names are the layers' paths
(``layer3.block.0``, ``layer3.block.0.weight``), the names ``ConvNet.parameters`` uses.

What a consumer needs to prepare images, and the class names, go in ``metadata_props``
(``METADATA_KEYS``) and the model's ``doc_string``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from . import __version__, atomic
from .layers import (
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

# Opset 17 (ONNX 1.12, 2022) expresses every layer here with today's operator versions, and
# runtimes from onnxruntime 1.12 on run it; IR version 8 is the one that goes with it (the
# onnx package would otherwise stamp its newest IR, which older runtimes refuse).
OPSET = 17
IR_VERSION = 8
INPUT, OUTPUT, PROBABILITIES = "images", "scores", "probabilities"

# metadata_props: key -> what its value is (all strings; JSON where it holds a list)
METADATA_KEYS = {
    "fastcnn_version": "the fastcnn version that wrote the file",
    "fastcnn_dtype": "the model's dtype in fastcnn (float64 models are written as float32)",
    "input_shape": "JSON [C, H, W] of one image",
    "input_scale": "1/255: uint8 pixels (0..255) are multiplied by it",
    "normalization_mean": "JSON list, one value per channel, subtracted after scaling",
    "normalization_std": "JSON list, one value per channel, divided by after subtracting",
    "class_names": "JSON list of K names, one per output",
    "dataset": "the name of the dataset the model was trained on",
}


def require_onnx():
    """The ``onnx`` module, or an ImportError saying how to install it."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError(f"ONNX export and import need the onnx package ({e}): "
                          f"pip install 'fastcnn[onnx]'") from None
    return onnx


def export(net, path, softmax=False):
    """Write ``net`` to ``path`` as an ONNX model (atomically: a failure leaves no half file)."""
    atomic.check_destination(path, "ONNX model")
    model = to_model(net, softmax)
    data = model.SerializeToString()
    atomic.atomic_write(path, lambda f: f.write(data))


def to_model(net, softmax=False):
    """``net`` as an ``onnx.ModelProto``, checked by ``onnx.checker`` (full check). A float64
    model is written in float32 with a UserWarning; a layer with no ONNX form, a network
    without an input shape or class scores, or a parameter holding NaN or inf is a ValueError."""
    onnx = require_onnx()
    from onnx import TensorProto, helper

    if net.input_shape is None:
        raise ValueError("the network has no input_shape: build it with input_shape= (or run "
                         "a batch through it) before exporting")
    classes = net.num_classes()
    net.check_parameters()
    if net.dtype != np.float32:
        # NOTE: onnxruntime's CPU provider has no float64 Conv, so a double graph would not run
        warnings.warn(f"the model is {net.dtype}; ONNX export writes its parameters as float32, "
                      f"which onnxruntime runs convolutions in (its outputs differ from "
                      f"fastcnn's {net.dtype} ones by float32 rounding)", UserWarning,
                      stacklevel=3)
    graph = _Graph()
    x = INPUT
    for i, layer in enumerate(net.layers):
        x = graph.layer(f"layer{i}", layer, x)
    graph.rename_output(x, OUTPUT)
    c, h, w = net.input_shape
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", classes])]
    if softmax:
        graph.node("Softmax", [OUTPUT], PROBABILITIES, "softmax", axis=1)
        outputs.append(helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT,
                                                     ["N", classes]))
    images = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", c, h, w])
    images.doc_string = _PREPARE
    onnx_graph = helper.make_graph(graph.nodes, "fastcnn", [images], outputs, graph.initializers)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fastcnn", producer_version=__version__,
                              doc_string=_doc(net, softmax))
    model.ir_version = IR_VERSION
    helper.set_model_props(model, metadata(net))
    onnx.checker.check_model(model, full_check=True)
    return model


_PREPARE = ("float32 images (N, C, H, W): uint8 pixels times input_scale (1/255), then, where "
            "metadata_props has normalization_mean and normalization_std, minus the mean and "
            "divided by the std of each channel")


def _doc(net, softmax):
    out = "'scores' (N, K): class scores (logits); the highest is the prediction"
    if softmax:
        out += "; 'probabilities' (N, K): their softmax"
    names = ", classes in metadata_props class_names" if net.class_names else ""
    return (f"A fastcnn {__version__} model. Input 'images': {_PREPARE}. Output {out}{names}. "
            f"metadata_props: {json.dumps(METADATA_KEYS)}")


def metadata(net):
    """The metadata_props of ``net``'s ONNX model: ``METADATA_KEYS`` that apply, as strings."""
    props = {"fastcnn_version": __version__, "fastcnn_dtype": net.dtype.name,
             "input_shape": json.dumps(list(net.input_shape)), "input_scale": "1/255"}
    if net.normalization is not None:
        mean, std = net.normalization
        props["normalization_mean"] = json.dumps([float(v) for v in mean])
        props["normalization_std"] = json.dumps([float(v) for v in std])
    if net.class_names is not None:
        props["class_names"] = json.dumps(list(net.class_names))
    if net.dataset is not None:
        props["dataset"] = net.dataset
    return props


class _Graph:
    """Nodes and initializers, appended as the layers are walked."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def node(self, op, inputs, output, name, **attrs):
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def tensor(self, name, array):
        from onnx import numpy_helper

        # NOTE: float32 as it is, bit for bit (a float64 model's values are rounded here)
        self.initializers.append(numpy_helper.from_array(
            np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def params(self, path, layer, keys):
        return [self.tensor(f"{path}.{key}", {**layer.params, **layer.buffers}[key])
                for key in keys]

    def rename_output(self, old, new):
        if old == INPUT:
            raise ValueError("the network computes nothing ONNX can express: its output is its "
                             "input")
        for node in self.nodes:
            node.output[:] = [new if o == old else o for o in node.output]

    def layer(self, path, layer, x):
        """Append ``layer`` (at ``path`` of ``ConvNet.walk``, "layer"-prefixed) reading tensor
        ``x``; returns the name of its output."""
        kind = type(layer)  # exact types: a subclass may compute something else
        if kind is Sequential:
            for i, child in enumerate(layer.layers):
                x = self.layer(f"{path}.{i}", child, x)
            return x
        if kind is Residual:
            y = self.layer(f"{path}.block", layer.block, x)
            side = x if layer.shortcut is None else self.layer(f"{path}.shortcut",
                                                               layer.shortcut, x)
            return self.node("Add", [y, side], path, path)
        if kind is Dropout:
            return x  # the identity at inference
        convert = _CONVERTERS.get(kind)
        if convert is None:
            names = ", ".join(t.__name__ for t in (*_CONVERTERS, Sequential, Residual, Dropout))
            raise ValueError(f"{path} ({kind.__name__}) has no ONNX form: fastcnn exports "
                             f"{names}")
        return convert(self, path, layer, x)


def _conv(g, path, layer, x):
    pad, s = layer.pad, layer.stride
    return g.node("Conv", [x, *g.params(path, layer, ("weight", "bias"))], path, path,
                  kernel_shape=list(layer.kernel_size), strides=[s, s], pads=[pad] * 4,
                  dilations=[1, 1], group=1)


def _pool(op):
    def convert(g, path, layer, x):
        s, k = layer.stride, layer.pool_size
        return g.node(op, [x], path, path, kernel_shape=[k, k], strides=[s, s], pads=[0] * 4)
    return convert


def _global_avgpool(g, path, layer, x):
    pooled = g.node("GlobalAveragePool", [x], f"{path}.pooled", path)
    return g.node("Flatten", [pooled], path, f"{path}.flatten", axis=1)  # (N, C), as fastcnn's


def _batchnorm(g, path, layer, x):
    keys = ("weight", "bias", "running_mean", "running_var")
    # ONNX's momentum weighs the old running value, fastcnn's the batch's (training only)
    return g.node("BatchNormalization", [x, *g.params(path, layer, keys)], path, path,
                  epsilon=layer.eps, momentum=1.0 - layer.momentum)


_CONVERTERS = {
    Conv2D: _conv,
    ReLU: lambda g, path, layer, x: g.node("Relu", [x], path, path),
    MaxPool2D: _pool("MaxPool"),
    AvgPool2D: _pool("AveragePool"),  # no padding in fastcnn: count_include_pad never matters
    GlobalAvgPool2D: _global_avgpool,
    Flatten: lambda g, path, layer, x: g.node("Flatten", [x], path, path, axis=1),
    Dense: lambda g, path, layer, x: g.node(
        "Gemm", [x, *g.params(path, layer, ("weight", "bias"))], path, path, transB=1),
    BatchNorm2D: _batchnorm,
    BatchNorm1D: _batchnorm,
}
