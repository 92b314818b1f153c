"""ONNX import: the ONNX graphs fastcnn can represent, as a ConvNet (``ConvNet.from_onnx``).

Read: fastcnn's own exports (``onnx_export``) and the same layer set as other exporters write
it (PyTorch's: Conv with BatchNorm folded in, Gemm with transB=1, Flatten, ...). A chain of
Conv, Relu, MaxPool, AveragePool, GlobalAveragePool + Flatten, Flatten, Gemm,
BatchNormalization (inference), Dropout and Identity nodes becomes a list of layers; a tensor
read by two nodes starts a residual, ended by the Add that joins the two branches (the Add
reading the fork tensor itself: an identity shortcut; else the branch feeding the Add's first
input is the block, the other the shortcut, each a Sequential); a Softmax that gives the
graph's output is left to ``predict_proba``. Anything else is a ValueError that names the
node and its operator.

Like model files (``serialize``), an ONNX file is trusted for nothing and checked before
anything it merely claims is allocated: its size; then, parsed (protobuf, external data never
followed), every tensor's declared size against the data it holds, no tensor stored outside
the file, no subgraphs, functions or sparse tensors, at most ``MAX_NODES`` nodes, nodes in
an order where each reads only what earlier ones wrote (no cycles); then the layers, whose
errors name the node and what fastcnn cannot represent; last ``onnx.checker``, for what the
layers do not look at. Every failure is one ValueError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .layers import MAX_DEPTH, Residual, Sequential
from .onnx_export import require_onnx
from .onnx_layers import CONVERTERS, FOLLOWED_BY, Invalid, softmax_axis, where

MAX_FILE_BYTES = 1 << 30  # a protobuf holds at most 2 GiB; models fastcnn trains are far smaller
MAX_NODES = 4096  # a 3-stage ResNet of 2 blocks a stage has 60; ResNet-1001 about 3,000
MAX_TENSOR_VALUES = 1 << 28  # values in one tensor (1 GiB of float32)
MAX_METADATA_BYTES = 1 << 20
MIN_OPSET = 9  # BatchNormalization without "spatial", Flatten, Gemm, pooling as read here


def load(cls, path):
    """The ConvNet (built by ``cls``) in the ONNX file ``path``, in inference mode; a file
    that is not an ONNX model fastcnn can represent is a ValueError naming the file and why."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an ONNX model")
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    size = path.stat().st_size
    try:
        if size > MAX_FILE_BYTES:
            raise Invalid(f"it is {size:,} bytes, more than the {MAX_FILE_BYTES:,} fastcnn reads")
        with open(path, "rb") as f:
            data = f.read(size + 1)  # NOTE: read(n) allocates n bytes first, whatever it finds
        return from_bytes(cls, data)
    except Invalid as e:
        raise ValueError(f"{path} is not an ONNX model fastcnn can import: {e}") from None


def from_bytes(cls, data):
    """``load`` for the bytes of a file (Invalid, without the file's name, on failure)."""
    onnx = require_onnx()
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError) as e:
        raise Invalid(f"not an ONNX protobuf (truncated or corrupt?): {e}") from None
    return from_model(cls, model)


def from_model(cls, model):
    """The ConvNet of a parsed ``onnx.ModelProto``, after every check ``load`` makes."""
    onnx = require_onnx()
    check_structure(model)
    net = _Reader(model).network(cls)  # first: its errors name the node and what is wrong
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise Invalid(f"onnx.checker refuses it: {str(e).strip().splitlines()[0][:300]}") \
            from None
    return net


# -- cheap checks, before anything is allocated -------------------------------------------------

def check_structure(model):
    """Invalid unless ``model`` is a self-contained, acyclic, bounded ONNX graph."""
    if model.ir_version < 3 or not model.HasField("graph"):
        raise Invalid("it has no IR version or no graph: not an ONNX model")
    if len(model.functions):
        raise Invalid(f"it defines {len(model.functions)} functions; fastcnn reads plain graphs")
    opsets = {o.domain: o.version for o in model.opset_import}
    version = opsets.get("", opsets.get("ai.onnx"))
    onnx = require_onnx()
    if version is None or not MIN_OPSET <= version <= onnx.defs.onnx_opset_version():
        raise Invalid(f"its default opset is {version}; fastcnn reads opsets {MIN_OPSET} to "
                      f"{onnx.defs.onnx_opset_version()}")
    graph = model.graph
    if len(graph.node) > MAX_NODES:
        raise Invalid(f"its graph has {len(graph.node):,} nodes (at most {MAX_NODES:,})")
    if len(graph.sparse_initializer):
        raise Invalid("it holds sparse initializers")
    if len(graph.initializer) > 4 * MAX_NODES:
        raise Invalid(f"it holds {len(graph.initializer):,} initializers")
    for t in graph.initializer:
        check_tensor(t, f"initializer {t.name!r}")
    for i, node in enumerate(graph.node):
        _check_attributes(i, node)
    _check_order(graph)
    size = sum(len(p.key) + len(p.value) for p in model.metadata_props)
    if size > MAX_METADATA_BYTES:
        raise Invalid(f"its metadata_props hold {size:,} bytes (at most {MAX_METADATA_BYTES:,})")


def _np_types():
    from onnx import TensorProto as T

    # data type -> (numpy dtype, the typed field that holds its values when not raw)
    return {T.FLOAT: (np.float32, "float_data"), T.DOUBLE: (np.float64, "double_data"),
            T.INT64: (np.int64, "int64_data"), T.INT32: (np.int32, "int32_data"),
            T.INT16: (np.int16, "int32_data"), T.INT8: (np.int8, "int32_data"),
            T.UINT8: (np.uint8, "int32_data"), T.UINT16: (np.uint16, "int32_data"),
            T.BOOL: (np.bool_, "int32_data"), T.FLOAT16: (np.float16, "int32_data"),
            T.UINT32: (np.uint32, "uint64_data"), T.UINT64: (np.uint64, "uint64_data")}


def check_tensor(t, what):
    """The tensor's declared size is the data it holds, in this file, and bounded."""
    from onnx import TensorProto

    if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
        where_to = next((e.value for e in t.external_data if e.key == "location"), "?")
        raise Invalid(f"{what} is stored outside the file (external data {where_to[:100]!r}); "
                      f"fastcnn reads self-contained ONNX files only")
    if t.HasField("segment"):
        raise Invalid(f"{what} is a segment of a tensor")
    dims = list(t.dims)
    if any(d < 0 for d in dims) or len(dims) > 8:
        raise Invalid(f"{what} has dimensions {dims[:10]}")
    count = int(np.prod(dims, dtype=object)) if dims else 1
    if count > MAX_TENSOR_VALUES:
        raise Invalid(f"{what} declares {count:,} values (dims {dims}; at most "
                      f"{MAX_TENSOR_VALUES:,})")
    types = _np_types()
    if t.data_type not in types:
        raise Invalid(f"{what} has data type {t.data_type}, which fastcnn does not read")
    dtype, field = types[t.data_type]
    held = len(getattr(t, field))
    if t.raw_data and held:
        raise Invalid(f"{what} holds both raw and typed data")
    if t.raw_data:
        need = count * np.dtype(dtype).itemsize
        if len(t.raw_data) != need:
            raise Invalid(f"{what} declares dims {dims} ({need:,} bytes) but holds "
                          f"{len(t.raw_data):,} bytes")
    elif held != count:
        raise Invalid(f"{what} declares dims {dims} ({count:,} values) but holds {held:,}")


def _check_attributes(i, node):
    from onnx import AttributeProto as A

    for a in node.attribute:
        if a.type in (A.GRAPH, A.GRAPHS) or len(a.graphs) or a.HasField("g"):
            raise Invalid(f"{where(i, node)} holds a subgraph (attribute {a.name!r}); fastcnn "
                          f"reads plain graphs")
        if a.type in (A.SPARSE_TENSOR, A.SPARSE_TENSORS) or a.HasField("sparse_tensor"):
            raise Invalid(f"{where(i, node)} holds a sparse tensor")
        for t in (*([a.t] if a.HasField("t") else []), *a.tensors):
            check_tensor(t, f"{where(i, node)} attribute {a.name!r}")


def _check_order(graph):
    """Each node reads only the graph's inputs, initializers and earlier nodes' outputs, and
    each tensor has one writer: nodes in topological order, hence no cycle."""
    known = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in known:
                raise Invalid(f"{where(i, node)} reads tensor {name[:100]!r}, which no input, "
                              f"initializer or earlier node gives (a cycle, nodes out of "
                              f"order, or a missing tensor)")
        for name in node.output:
            if name in known:
                raise Invalid(f"{where(i, node)} writes tensor {name[:100]!r}, which already "
                              f"exists")
            if name:
                known.add(name)
    for v in graph.output:
        if v.name not in known:
            raise Invalid(f"its output {v.name[:100]!r} is computed by no node")


# -- the graph as layers ---------------------------------------------------------------------

class _Reader:
    """Walks a checked graph from its input to its output, turning nodes into layers."""

    def __init__(self, model):
        self.model, graph = model, model.graph
        # NOTE: one list of the nodes, used throughout: protobuf may hand out a new Python
        # object for graph.node[i] at every access, and nodes are told apart by identity here
        self.nodes = list(graph.node)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.consts = {t.name: t for t in graph.initializer}
        data = self._fold_constants(graph)
        self.input, self.input_shape, self.input_dtype = self._input(graph)
        self.output, terminal = self._output(graph)
        self.consumers = {}
        for node in data:
            if node is terminal:
                continue
            for name in node.input:
                if name and name not in self.consts:
                    self.consumers.setdefault(name, []).append(node)
        self.data = [n for n in data if n is not terminal]
        self.seen = set()

    def where(self, node):
        return where(self.index[id(node)], node)

    def _fold_constants(self, graph):
        """Constant nodes, and Identity nodes of constants (PyTorch writes one where two
        initializers hold equal values), join the constants; the rest are the data nodes."""
        data = []
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                names = [a.name for a in node.attribute]
                if names != ["value"] or not node.attribute[0].HasField("t") or len(
                        node.output) != 1:
                    raise Invalid(f"{self.where(node)}: fastcnn reads Constant nodes of one "
                                  f"'value' tensor, not {names}")
                self.consts[node.output[0]] = node.attribute[0].t  # checked: check_tensor
            elif (node.op_type == "Identity" and len(node.input) == len(node.output) == 1
                    and node.input[0] in self.consts):
                self.consts[node.output[0]] = self.consts[node.input[0]]
            else:
                data.append(node)
        for node in data:
            if node.domain not in ("", "ai.onnx") or node.op_type not in CONVERTERS:
                raise Invalid(f"{self.where(node)}: operator {node.op_type!r}"
                              f"{' of domain ' + repr(node.domain) if node.domain else ''} "
                              f"has no fastcnn layer; fastcnn reads "
                              f"{', '.join(sorted(CONVERTERS))}")
        return data

    def _input(self, graph):
        from onnx import TensorProto

        inputs = [v for v in graph.input if v.name not in self.consts]
        if len(inputs) != 1:
            raise Invalid(f"it has {len(inputs)} inputs besides its initializers; a fastcnn "
                          f"model has one, the images")
        v = inputs[0]
        kind = v.type.tensor_type
        types = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}
        if not v.type.HasField("tensor_type") or kind.elem_type not in types:
            raise Invalid(f"its input {v.name[:100]!r} is not a float32 or float64 tensor")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
        if len(dims) != 4 or not all(d and d > 0 for d in dims[1:]):
            raise Invalid(f"its input {v.name[:100]!r} must be images (N, C, H, W) with fixed "
                          f"C, H and W, got dimensions {[d or '?' for d in dims]}")
        if dims[1] * dims[2] * dims[3] > MAX_TENSOR_VALUES:
            raise Invalid(f"its input images of {dims[1:]} are too large")
        return v.name, tuple(dims[1:]), np.dtype(types[kind.elem_type])

    def _output(self, graph):
        """(the class scores' tensor, the Softmax node that turns them into the graph's
        probabilities output, or None)."""
        producer = {o: n for n in self.nodes for o in n.output}
        names = [v.name for v in graph.output]
        softmax = [producer[n] for n in names
                   if n in producer and producer[n].op_type == "Softmax"]
        if not 1 <= len(names) <= 2 or len(softmax) > 1 or (len(names) == 2 and (
                not softmax or softmax[0].input[0] not in names)):
            raise Invalid(f"its outputs {names[:4]} are not class scores (and their softmax)")
        if not softmax:
            return names[0], None
        node = softmax[0]
        axis = softmax_axis(self, node)
        if axis not in (1, -1):
            raise Invalid(f"{self.where(node)} takes the softmax over axis {axis}, not the "
                          f"classes")
        return node.input[0], node

    def network(self, cls):
        layers, end, join, shape = self.chain(self.input, self.input_shape, 0)
        if join is not None:
            raise Invalid(f"{self.where(join)} adds tensors that do not fork from one: not a "
                          f"residual connection fastcnn can represent")
        missed = [n for n in self.data if id(n) not in self.seen]
        if missed:
            raise Invalid(f"{self.where(missed[0])} is not on the path from the input to the "
                          f"output")
        if not layers:
            raise Invalid("its graph computes nothing")
        net = cls(input_shape=self.input_shape)
        for layer in layers:
            try:
                net.add(layer)
            except ValueError as e:
                raise Invalid(str(e)) from None
        try:
            net.num_classes()
        except ValueError as e:
            raise Invalid(str(e)) from None
        bad = net.nonfinite_parameter()
        if bad:
            raise Invalid(f"its {bad} holds NaN or infinite values")
        _restore_metadata(net, {p.key: p.value for p in self.model.metadata_props})
        return net.eval()

    def chain(self, t, shape, depth, first=None):
        """The layers from tensor ``t`` (per-image shape ``shape``) on, taking node ``first``
        first if given, until the graph's output or an Add: (layers, the last tensor, that
        Add or None, its shape)."""
        layers = []
        while True:
            users = [first] if first is not None else self.consumers.get(t, [])
            first = None
            if t == self.output and users:
                raise Invalid(f"its output tensor {t!r} is also read by {self.where(users[0])}")
            if not users:
                if t != self.output:
                    raise Invalid(f"tensor {t[:100]!r} is read by nothing and is not the "
                                  f"output")
                return layers, t, None, shape
            if len(users) > 2:
                raise Invalid(f"tensor {t[:100]!r} is read by {len(users)} nodes; fastcnn "
                              f"represents two (a residual connection)")
            if len(users) == 2:
                layer, t, shape = self.residual(t, shape, users, depth)
                layers.append(layer)
                continue
            node = users[0]
            if node.op_type == "Add":
                return layers, t, node, shape
            layer, t = self.convert(node, t, shape)
            if layer is not None:
                layers.append(layer)
                shape = self.shape_after(layer, shape, node)

    def convert(self, node, t, shape):
        self.seen.add(id(node))
        data = [name for name in node.input if name and name not in self.consts]
        if data != [node.input[0]]:
            raise Invalid(f"{self.where(node)} must read one computed tensor, its first input; "
                          f"it reads {data[:4]}")
        outputs = [o for o in node.output[1:] if o]
        if any(self.consumers.get(o) or o == self.output for o in outputs):
            raise Invalid(f"{self.where(node)}: fastcnn gives only its first output")
        try:
            layer = CONVERTERS[node.op_type](self, node, shape)
        except Invalid:
            raise
        except (ValueError, TypeError) as e:  # a layer's own check of what the node gave
            raise Invalid(f"{self.where(node)}: {e}") from None
        out = node.output[0]
        follow = FOLLOWED_BY.get(node.op_type)
        if follow is not None:  # GlobalAveragePool: (N, C, 1, 1) -> Flatten -> (N, C)
            users = self.consumers.get(out, [])
            if len(users) != 1 or users[0].op_type != follow:
                raise Invalid(f"{self.where(node)} must be followed by {follow} alone "
                              f"(fastcnn's GlobalAvgPool2D gives (N, C))")
            CONVERTERS[follow](self, users[0], (shape[0], 1, 1))
            self.seen.add(id(users[0]))
            out = users[0].output[0]
        return layer, out

    def shape_after(self, layer, shape, node):
        try:
            return tuple(layer.output_shape(shape))
        except ValueError as e:
            raise Invalid(f"{self.where(node)}: {e}") from None

    def residual(self, t, shape, users, depth):
        """The Residual that forks at tensor ``t``: (layer, the Add's output, its shape)."""
        if depth >= MAX_DEPTH:
            raise Invalid(f"its residual connections are nested more than {MAX_DEPTH} deep")
        adds = [u for u in users if u.op_type == "Add"]
        if len(adds) == 2 or (adds and users[0] is users[1]):
            raise Invalid(f"{self.where(adds[0])} adds tensor {t[:100]!r} to itself or to "
                          f"another Add; not a residual connection fastcnn can represent")
        if adds:  # one branch is the Add itself: an identity shortcut
            join = adds[0]
            other = users[1] if users[0] is join else users[0]
            block, end, reached, out = self.chain(t, shape, depth + 1, first=other)
            self._check_join(join, reached, {end, t}, t)
            return self._residual(join, block, None, out)
        branches = [self.chain(t, shape, depth + 1, first=u) for u in users]
        join = branches[0][2]
        self._check_join(join, branches[1][2], {branches[0][1], branches[1][1]}, t)
        if join.input[0] != branches[0][1]:
            branches.reverse()  # the block feeds the Add's first input
        (block, _, _, out), (short, _, _, side) = branches
        if side != out:
            raise Invalid(f"{self.where(join)} adds tensors of shapes {out} and {side}")
        return self._residual(join, block, short, out)

    def _check_join(self, join, reached, ends, t):
        if (join is None or reached is not join or len(join.input) != 2
                or set(join.input) != ends):
            raise Invalid(f"the two branches from tensor {t[:100]!r} do not end in one Add of "
                          f"the two: not a residual connection fastcnn can represent")
        self.seen.add(id(join))
        if len(join.output) != 1 or join.attribute:
            raise Invalid(f"{self.where(join)} must have one output and no attributes")

    def _residual(self, join, block, short, shape):
        if not block:  # a branch of Identity nodes only: that one is the identity shortcut
            block, short = short, None
        if not block:
            raise Invalid(f"{self.where(join)} adds a tensor to itself")
        block = Sequential(block)
        short = Sequential(short) if short else None
        return Residual(block, short), join.output[0], shape


def _restore_metadata(net, props):
    """Class names, dataset and normalisation from fastcnn's metadata keys, where present."""
    def parsed(key):
        try:
            return json.loads(props[key])
        except (ValueError, RecursionError):
            raise Invalid(f"metadata {key} is not JSON: {props[key][:80]!r}") from None

    if "class_names" in props:
        names, k = parsed("class_names"), net.num_classes()
        if not isinstance(names, list) or len(names) != k or not all(
                isinstance(n, str) and 0 < len(n) <= 200 for n in names):
            raise Invalid(f"metadata class_names must be a JSON list of {k} names (1 to 200 "
                          f"characters each), got {props['class_names'][:80]!r}")
        net.class_names = tuple(names)
    if "dataset" in props:
        if not 0 < len(props["dataset"]) <= 200:
            raise Invalid("metadata dataset must be a name of 1 to 200 characters")
        net.dataset = props["dataset"]
    keys = ("normalization_mean", "normalization_std")
    if any(k in props for k in keys):
        if not all(k in props for k in keys):
            raise Invalid("metadata has one of normalization_mean and normalization_std alone")
        mean, std = parsed(keys[0]), parsed(keys[1])
        if not all(isinstance(v, list) and all(type(e) in (int, float) for e in v)
                   for v in (mean, std)):
            raise Invalid("metadata normalization_mean and normalization_std must be JSON "
                          "lists of numbers")
        try:
            net.set_normalization(mean, std)
        except ValueError as e:
            raise Invalid(f"metadata normalization: {e}") from None
