"""ONNX nodes as fastcnn layers: one converter per operator that ``onnx_import`` reads.

A converter takes the reader (its constants and dtype), the node and the per-image shape of the
node's input, checks every attribute (one fastcnn cannot represent, or one it does not know, is
``Invalid`` naming the node), and returns the layer (None for a node that computes nothing at
inference) with its parameters copied bit for bit from the node's constant inputs.
"""

from __future__ import annotations

import numpy as np

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
)


class Invalid(ValueError):
    """What is wrong with an ONNX model, without the file's name (``load`` adds it)."""


def where(index, node):
    """'node 3 "name" (Op)': how every message names a node."""
    name = f" {node.name[:100]!r}" if node.name else ""
    return f"node {index}{name} ({node.op_type})"


def attributes(reader, node, allowed):
    """{name: value} of the node's attributes, each one of ``allowed`` (name -> default)."""
    from onnx import helper

    found = dict(allowed)
    for a in node.attribute:
        if a.name not in allowed:
            raise Invalid(f"{reader.where(node)}: fastcnn does not read its attribute {a.name!r}")
        value = helper.get_attribute_value(a)
        found[a.name] = value.decode() if isinstance(value, bytes) else value
    return found


def constant(reader, node, position, what, shape=None):
    """The node's input ``position`` as an array: a constant of the network's float type (the
    first one read sets it), of ``shape`` where given."""
    from onnx import numpy_helper

    name = node.input[position] if len(node.input) > position else ""
    if name not in reader.consts:
        raise Invalid(f"{reader.where(node)}: its {what} must be a constant (an initializer), "
                      f"got {'nothing' if not name else repr(name[:100])}")
    t = reader.consts[name]
    array = numpy_helper.to_array(t)  # its size was checked against its dims (check_tensor)
    if array.dtype not in (np.float32, np.float64) or array.dtype != reader.input_dtype:
        raise Invalid(f"{reader.where(node)}: its {what} is {array.dtype}, the images "
                      f"{reader.input_dtype}")
    if shape is not None and array.shape != tuple(shape):
        raise Invalid(f"{reader.where(node)}: its {what} has shape {array.shape}, expected "
                      f"{tuple(shape)}")
    return array


def _square(reader, node, what, values, rank=2):
    values = list(values)
    if len(values) != rank or len(set(values)) != 1:
        raise Invalid(f"{reader.where(node)}: {what} {values}; fastcnn takes one value for "
                      f"both axes")
    return int(values[0])


def _plain(reader, node, a, pads_ok=False):
    """The checks every windowed operator shares: no dilation, symmetric pads (zero unless
    ``pads_ok``), auto_pad only where it means symmetric pads; returns the padding."""
    if any(d != 1 for d in a.get("dilations") or [1]):
        raise Invalid(f"{reader.where(node)}: dilations {list(a['dilations'])}; fastcnn's "
                      f"windows are dense")
    auto = a.get("auto_pad", "NOTSET")
    pads = list(a.get("pads") or [0, 0, 0, 0])
    if auto == "VALID":
        pads = [0, 0, 0, 0]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        # stride 1 and an odd square kernel: "same" pads both sides alike (PyTorch writes this
        # for padding="same"); anything else would pad one side more than the other
        kernel, strides = list(a.get("kernel_shape") or []), list(a.get("strides") or [1, 1])
        if not (len(set(kernel)) == 1 and kernel[0] % 2 == 1 and set(strides) == {1}):
            raise Invalid(f"{reader.where(node)}: auto_pad {auto} with kernel_shape {kernel} "
                          f"and strides {strides} pads unevenly; fastcnn takes explicit, "
                          f"symmetric pads")
        pads = [(kernel[0] - 1) // 2] * 4
    elif auto != "NOTSET":
        raise Invalid(f"{reader.where(node)}: auto_pad {auto}; fastcnn takes explicit pads")
    pad = _square(reader, node, "pads", pads, 4)
    if pad and not pads_ok:
        raise Invalid(f"{reader.where(node)}: pads {pads}; fastcnn's pooling has no padding")
    return pad


def _spatial(reader, node, shape):
    if len(shape) != 3:
        raise Invalid(f"{reader.where(node)} needs images (C, H, W), gets {shape}")


def conv(reader, node, shape):
    a = attributes(reader, node, {"kernel_shape": None, "strides": [1, 1], "pads": None,
                                  "dilations": None, "group": 1, "auto_pad": "NOTSET"})
    _spatial(reader, node, shape)
    pad = _plain(reader, node, a, pads_ok=True)
    if a["group"] != 1:
        raise Invalid(f"{reader.where(node)}: group {a['group']}; fastcnn's Conv2D is "
                      f"group 1 (no grouped or depthwise convolutions)")
    w = constant(reader, node, 1, "weight")
    if w.ndim != 4 or w.shape[1] != shape[0]:
        raise Invalid(f"{reader.where(node)}: weight {w.shape} for input channels {shape[0]}")
    f, c, kh, kw = w.shape
    if a["kernel_shape"] is not None and list(a["kernel_shape"]) != [kh, kw]:
        raise Invalid(f"{reader.where(node)}: kernel_shape {list(a['kernel_shape'])} but weight "
                      f"{w.shape}")
    stride = _square(reader, node, "strides", a["strides"])
    b = (constant(reader, node, 2, "bias", (f,)) if len(node.input) > 2 and node.input[2]
         else np.zeros(f, w.dtype))
    layer = Conv2D(c, f, (kh, kw), stride=stride, padding=pad, dtype=w.dtype)
    return _filled(layer, weight=w, bias=b)


def _filled(layer, **arrays):
    for key, a in arrays.items():
        store = layer.params if key in layer.params else layer.buffers
        store[key][...] = a
    return layer


def pool(kind):
    def convert(reader, node, shape):
        allowed = {"kernel_shape": None, "strides": None, "pads": None, "dilations": None,
                   "auto_pad": "NOTSET", "ceil_mode": 0}
        allowed.update({"storage_order": 0} if kind is MaxPool2D else {"count_include_pad": 0})
        a = attributes(reader, node, allowed)
        _spatial(reader, node, shape)
        _plain(reader, node, a)  # no pads: count_include_pad changes nothing
        if a["kernel_shape"] is None:
            raise Invalid(f"{reader.where(node)} has no kernel_shape")
        size = _square(reader, node, "kernel_shape", a["kernel_shape"])
        stride = _square(reader, node, "strides", a["strides"] or [1, 1])
        if a["ceil_mode"]:
            raise Invalid(f"{reader.where(node)}: ceil_mode 1; fastcnn's pooling drops a "
                          f"partial window (ceil_mode 0)")
        return kind(size, stride)
    return convert


def global_avgpool(reader, node, shape):
    attributes(reader, node, {})
    _spatial(reader, node, shape)
    return GlobalAvgPool2D()


def flatten(reader, node, shape):
    axis = attributes(reader, node, {"axis": 1})["axis"]
    if axis not in (1, -len(shape)):
        raise Invalid(f"{reader.where(node)}: axis {axis}; fastcnn flattens all but the batch "
                      f"axis (axis 1)")
    return Flatten()


def gemm(reader, node, shape):
    a = attributes(reader, node, {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0})
    if len(shape) != 1:
        raise Invalid(f"{reader.where(node)} needs a flat input (N, features), gets {shape}: "
                      f"Flatten first")
    if a["alpha"] != 1 or a["beta"] != 1 or a["transA"]:
        raise Invalid(f"{reader.where(node)}: alpha {a['alpha']}, beta {a['beta']}, transA "
                      f"{a['transA']}; fastcnn's Dense is x @ W.T + b (1, 1, 0)")
    w = constant(reader, node, 1, "weight")
    if w.ndim != 2:
        raise Invalid(f"{reader.where(node)}: weight of shape {w.shape}")
    w = w if a["transB"] else np.ascontiguousarray(w.T)  # fastcnn keeps (out, in)
    out, n_in = w.shape
    b = np.zeros(out, w.dtype)
    if len(node.input) > 2 and node.input[2]:
        b = constant(reader, node, 2, "bias")
        if b.shape not in ((out,), (1, out)):
            raise Invalid(f"{reader.where(node)}: bias of shape {b.shape}, expected ({out},)")
        b = b.reshape(out)
    return _filled(Dense(n_in, out, dtype=w.dtype), weight=w, bias=b)


def _short(value):
    """A float32 attribute as the shortest decimal that rounds to it: 1e-5, not
    9.99999974738e-06 (fastcnn writes its float64 hyper-parameters as float32 attributes)."""
    return float(str(np.float32(value)))


def batchnorm(reader, node, shape):
    a = attributes(reader, node, {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0,
                                  "spatial": 1})
    if a["training_mode"] or a["spatial"] != 1:
        raise Invalid(f"{reader.where(node)}: training_mode {a['training_mode']}, spatial "
                      f"{a['spatial']}; fastcnn reads inference BatchNormalization")
    if len(shape) not in (1, 3):
        raise Invalid(f"{reader.where(node)} gets {shape}; fastcnn normalises (C,) or (C, H, W)")
    c = shape[0]
    arrays = {key: constant(reader, node, i + 1, key, (c,)) for i, key in
              enumerate(("weight", "bias", "running_mean", "running_var"))}
    if not 0 < a["epsilon"] < 1:
        raise Invalid(f"{reader.where(node)}: epsilon {a['epsilon']}; fastcnn takes one in "
                      f"(0, 1)")
    if (arrays["running_var"] < 0).any():
        raise Invalid(f"{reader.where(node)}: its running variance holds negative values")
    kind = BatchNorm2D if len(shape) == 3 else BatchNorm1D
    momentum = _short(1 - _short(a["momentum"]))  # ONNX weighs the old value, fastcnn the new
    layer = kind(c, eps=_short(a["epsilon"]), momentum=min(max(momentum, 0.0), 1.0),
                 dtype=arrays["weight"].dtype)
    return _filled(layer, **arrays)


def dropout(reader, node, shape):
    a = attributes(reader, node, {"ratio": 0.5, "seed": 0, "is_test": 1})
    ratio = a["ratio"]
    if len(node.input) > 1 and node.input[1]:
        ratio = float(_scalar(reader, node, 1, "ratio"))
    if len(node.input) > 2 and node.input[2] and _scalar(reader, node, 2, "training_mode"):
        raise Invalid(f"{reader.where(node)} runs in training mode")
    return Dropout(_short(ratio))


def _scalar(reader, node, position, what):
    from onnx import numpy_helper

    name = node.input[position]
    if name not in reader.consts:
        raise Invalid(f"{reader.where(node)}: its {what} must be a constant")
    value = numpy_helper.to_array(reader.consts[name])
    if value.size != 1:
        raise Invalid(f"{reader.where(node)}: its {what} is not one value")
    return value.reshape(()).item()


def relu(reader, node, shape):
    attributes(reader, node, {})
    return ReLU()


def identity(reader, node, shape):
    attributes(reader, node, {})
    return None


def softmax_axis(reader, node):
    """The axis of a Softmax that gives the graph's output (the only place fastcnn reads one)."""
    return attributes(reader, node, {"axis": -1})["axis"]


def softmax(reader, node, shape):
    raise Invalid(f"{reader.where(node)}: fastcnn reads a Softmax only as the last node, giving "
                  f"the output's probabilities; here it is followed by other nodes")


def add(reader, node, shape):  # reached only where an Add does not join a residual's branches
    raise Invalid(f"{reader.where(node)} does not join two branches of one tensor")


CONVERTERS = {
    "Conv": conv, "Relu": relu, "MaxPool": pool(MaxPool2D), "AveragePool": pool(AvgPool2D),
    "GlobalAveragePool": global_avgpool, "Flatten": flatten, "Gemm": gemm,
    "BatchNormalization": batchnorm, "Dropout": dropout, "Identity": identity,
    "Softmax": softmax, "Add": add,
}
# an operator read only together with the one after it
FOLLOWED_BY = {"GlobalAveragePool": "Flatten"}
