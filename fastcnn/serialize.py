"""Model files: one .npz (a zip of .npy members, never unpickled) holding the parameters and, as
UTF-8 bytes, a JSON description of the architecture.

Saving writes a temporary file beside the destination and renames it into place (see
``atomic``), so a crash never leaves half a model behind. Loading trusts nothing in the file and
checks it in order, before it allocates anything the file merely claims:

1. the zip directory: only stored or deflated, unencrypted ``.npy`` members, each no larger
   than the file could hold, no duplicate names;
2. the architecture record (at most 1 MiB of JSON): its format and version, an input shape of
   at most ``MAX_INPUT_VALUES`` values, at least one layer, each of a known type with a valid
   configuration;
3. every parameter's ``.npy`` header against the shape and dtype that the architecture implies
   (computed without allocating), and the member's size against that header; no extra members;
4. only then the layers (which must fit together and end in a flat vector of class scores) and
   the arrays themselves, which must be finite; the zip's CRC-32 covers every byte read.

Every failure is one ValueError that names the file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from . import atomic
from .layers import LAYER_TYPES

FORMAT = "fastcnn-model"
# 2 added buffers (BatchNorm's running statistics), 3 containers (Sequential, Residual: nested
# configs, array keys dotted inside them); files of every earlier version still load
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MAX_ARCHITECTURE_BYTES = 1 << 20
MAX_INPUT_VALUES = 1 << 28  # values in one input image (C * H * W): 1 GB of float32
# Deflate cannot expand more than about 1032:1; a member claiming more is not a real one.
_DEFLATE_MAX_RATIO = 1032
# Members a checkpoint adds (fastcnn.training), which loading it as a model skips.
CHECKPOINT_MEMBERS = ("optimizer.", "best.", "order.npy")
_NPY_HEADER_MAX = 1 << 16


def check_destination(path):
    """Fail before training, not after, when ``path`` cannot be written."""
    return atomic.check_destination(path, "model")


def save(net, path):
    check_destination(path)
    arrays = model_arrays(net)
    atomic.atomic_write(path, lambda f: np.savez(f, **arrays))


def model_arrays(net, extra_records=None):
    """The arrays of a model file: "architecture" (JSON bytes) and "layer<i>.<key>" for every
    parameter and buffer; ``extra_records`` (a JSON-able dict) is added to the architecture
    record (checkpoints keep their state there)."""
    layers, arrays = [], {}
    for i, layer in enumerate(net.layers):
        layers.append({"type": type(layer).__name__, "config": layer.config(),
                       "params": {k: list(p.shape) for k, p in layer.params.items()},
                       "buffers": {k: list(b.shape) for k, b in layer.buffers.items()}})
        for key, a in (*layer.params.items(), *layer.buffers.items()):
            arrays[f"layer{i}.{key}"] = a
    arch = {"format": FORMAT, "version": VERSION, "input_shape": net.input_shape, "layers": layers,
            **(extra_records or {})}
    if net.dataset is not None:
        arch["dataset"] = net.dataset
    if net.class_names is not None:
        arch["class_names"] = list(net.class_names)
    if net.normalization is not None:
        arch["normalization"] = {"mean": [float(v) for v in net.normalization[0]],
                                 "std": [float(v) for v in net.normalization[1]]}
    arrays["architecture"] = np.frombuffer(json.dumps(arch).encode(), dtype=np.uint8)
    return arrays


class Invalid(ValueError):
    """What is wrong with a file, without its name (``load`` adds it once, at the top)."""


def load(cls, path, extra=None, kind="model file"):
    """The network in ``path``. ``extra``: a function called as ``extra(z, arch, members, net)``
    with the open zip, the checked architecture record, the remaining members and the network
    read so far, whose result is returned beside the network (checkpoints read their state this
    way); its ``Invalid`` errors are reported like the file's, as a ``kind`` that is not valid."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a fastcnn {kind}")
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} at {path}")
    try:
        return _load(cls, path, extra)
    except Invalid as e:
        raise ValueError(f"{path} is not a valid fastcnn {kind}: {e}") from None
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a valid fastcnn {kind} (not a zip archive, or "
                         f"truncated or corrupt): {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is not a valid fastcnn {kind}: its architecture record "
                         f"is nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - whatever a crafted file provokes is the file's fault
        raise ValueError(f"{path} is not a valid fastcnn {kind} (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e


def _load(cls, path, read_extra):
    file_size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        members = _check_directory(z, file_size)
        arch = _read_architecture(z, members)
        net, specs = _plan(cls, arch)
        expected = {f"layer{i}.{key}.npy" for i, layer_specs in enumerate(specs)
                    for key in layer_specs}
        others = {name: info for name, info in members.items()
                  if name not in expected and name != "architecture.npy"}
        if read_extra is None and "checkpoint" in arch:  # a checkpoint is a model file too
            others = {name: info for name, info in others.items()
                      if not name.startswith(CHECKPOINT_MEMBERS)}
        if read_extra is None and others:
            raise Invalid(f"it holds members the architecture does not name: "
                       f"{', '.join(sorted(others)[:5])}")
        for i, layer_specs in enumerate(specs):
            for key, (shape, dtype) in layer_specs.items():
                name = f"layer{i}.{key}.npy"
                if name not in members:
                    raise Invalid(f"layer {i} ({arch['layers'][i]['type']}) has no {key} array")
                check_header(z, members[name], f"layer {i} ({arch['layers'][i]['type']}) {key}",
                             shape, dtype)
        # Every size the file claims agrees with the bytes it holds: now allocate and read.
        for i, spec in enumerate(arch["layers"]):
            try:
                layer = LAYER_TYPES[spec["type"]](**spec.get("config", {}))
                if set(layer.params) | set(layer.buffers) != set(specs[i]):
                    raise ValueError("its arrays differ from its specification")
            except (TypeError, ValueError) as e:
                raise Invalid(f"layer {i} ({spec['type']}) has a bad config: {e}") from None
            try:
                net.add(layer)  # checks that it fits what comes before it
            except ValueError as e:
                raise Invalid(str(e)) from None
            for key, p in (*layer.params.items(), *layer.buffers.items()):
                what = f"layer {i} ({spec['type']}) {key}"
                stored = read_member(z, members[f"layer{i}.{key}.npy"], what)
                if stored.shape != p.shape or stored.dtype != p.dtype:  # headers were checked
                    raise Invalid(f"{what} is {stored.dtype}{stored.shape}, expected "
                                  f"{p.dtype}{p.shape}")
                p[...] = stored
        result = read_extra(z, arch, others, net) if read_extra is not None else None
    try:
        net.num_classes()
    except ValueError as e:
        raise Invalid(str(e)) from None
    net.dataset, net.class_names = _labels(arch, net.num_classes())
    if "normalization" in arch:
        record = arch["normalization"]
        if not isinstance(record, dict) or set(record) != {"mean", "std"} or not all(
                isinstance(v, list) and all(type(e) in (int, float) for e in v)
                for v in record.values()):
            raise Invalid("its normalization must be {mean: [numbers], std: [numbers]}")
        try:
            net.set_normalization(record["mean"], record["std"])
        except ValueError as e:
            raise Invalid(f"its normalization: {e}") from None
    net.eval()  # a loaded model infers until told to train
    return net if read_extra is None else (net, result)


def _labels(arch, classes):
    """(dataset, class names) from the record, each None where the file has none (files of
    earlier versions)."""
    dataset, names = arch.get("dataset"), arch.get("class_names")
    if dataset is not None and (not isinstance(dataset, str) or not 0 < len(dataset) <= 200):
        raise Invalid(f"its dataset must be a name of 1 to 200 characters, got "
                      f"{str(dataset)[:60]!r}")
    if names is not None:
        if not isinstance(names, list) or len(names) != classes or not all(
                isinstance(n, str) and 0 < len(n) <= 200 for n in names):
            raise Invalid(f"its class_names must be {classes} names (one per class, 1 to 200 "
                          f"characters each), got {str(names)[:80]}")
        names = tuple(names)
    return dataset, names


def _check_directory(z, file_size):
    members = {}
    for info in z.infolist():
        name = info.filename
        if name in members:
            raise Invalid(f"member {name!r} appears twice")
        if not name.endswith(".npy"):
            raise Invalid(f"member {name!r} is not a .npy array")
        if info.flag_bits & 0x1:
            raise Invalid(f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise Invalid(f"member {name!r} uses zip compression method {info.compress_type}; "
                       f"model files are stored or deflated")
        if info.compress_size > file_size:
            raise Invalid(f"member {name!r} claims {info.compress_size} bytes, more than the whole "
                       f"file ({file_size} bytes): truncated?")
        limit = (info.compress_size if info.compress_type == zipfile.ZIP_STORED
                 else info.compress_size * _DEFLATE_MAX_RATIO + 1024)
        if info.file_size > limit:
            raise Invalid(f"member {name!r} claims to expand to {info.file_size} bytes from "
                       f"{info.compress_size}")
        members[name] = info
    if "architecture.npy" not in members:
        raise Invalid("it has no architecture record")
    return members


def _npy_header(f, what):
    """(shape, fortran_order, dtype, header length) from an open .npy member."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=
                                                                    _NPY_HEADER_MAX)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=
                                                                    _NPY_HEADER_MAX)
    else:
        raise Invalid(f"{what}: unsupported .npy version {version}")
    if dtype.hasobject:
        raise Invalid(f"{what} holds Python objects; model files hold numbers only")
    return shape, fortran, dtype, f.tell()


def read_member(z, info, what):
    """The array of a member whose header was checked (``check_header``): never unpickled,
    nothing after it, finite where it holds floats."""
    with z.open(info) as f:
        stored = np.lib.format.read_array(f, allow_pickle=False)
        if f.read(1):
            raise Invalid(f"{what} has bytes after its array")
    if stored.dtype.kind == "f" and not np.isfinite(stored).all():
        raise Invalid(f"{what} holds {np.count_nonzero(~np.isfinite(stored))} NaN or infinite "
                      f"values")
    return stored


def check_header(z, info, what, shape, dtype, source="the architecture"):
    """The member's ``.npy`` header says ``shape`` and ``dtype`` (what ``source`` calls for),
    and its size is what they need: checked before anything is read or allocated."""
    with z.open(info) as f:
        got_shape, _, got_dtype, header = _npy_header(f, what)
    if got_shape != shape or got_dtype != dtype:
        got = f"{got_dtype}{got_shape}"
        raise Invalid(f"{what} is {got}, {source} says {dtype}{shape}")
    need = header + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if info.file_size != need:
        raise Invalid(f"{what}: the member holds {info.file_size} bytes, its header needs {need}")


def _read_architecture(z, members):
    info = members["architecture.npy"]
    if info.file_size > MAX_ARCHITECTURE_BYTES:
        raise Invalid(f"its architecture record is {info.file_size} bytes (at most "
                   f"{MAX_ARCHITECTURE_BYTES})")
    with z.open(info) as f:
        shape, _, dtype, _ = _npy_header(f, "the architecture record")
        if dtype != np.uint8 or len(shape) != 1:
            raise Invalid(f"its architecture record is {dtype}{shape}, not bytes")
        raw = f.read(MAX_ARCHITECTURE_BYTES + 1)
    if len(raw) != shape[0]:
        raise Invalid(f"its architecture record holds {len(raw)} bytes, its header says {shape[0]}")
    try:
        arch = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Invalid(f"its architecture record is not JSON: {e}") from None
    if not isinstance(arch, dict):
        raise Invalid(f"its architecture record is a JSON {type(arch).__name__}, not an object")
    if arch.get("format") != FORMAT or arch.get("version") not in READABLE_VERSIONS:
        raise Invalid(f"unknown format {arch.get('format')!r} version {arch.get('version')!r} "
                   f"(this fastcnn reads {FORMAT!r} versions "
                   f"{', '.join(map(str, READABLE_VERSIONS))})")
    return arch


def _plan(cls, arch):
    """The empty network (input shape checked) and each layer's {key: (shape, dtype)}, from the
    architecture alone: nothing the file claims is allocated here."""
    shape = arch.get("input_shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(type(s) is int and s >= 1 for s in shape)):
        raise Invalid(f"input_shape must be 3 positive ints (C, H, W), got {shape!r}")
    if shape[0] * shape[1] * shape[2] > MAX_INPUT_VALUES:
        raise Invalid(f"input_shape {shape} holds more than {MAX_INPUT_VALUES} values")
    layers = arch.get("layers")
    if not isinstance(layers, list) or not layers:
        raise Invalid(f"it has no layers (layers: {str(layers)[:40]})")
    specs = []
    for i, spec in enumerate(layers):
        if not isinstance(spec, dict):
            raise Invalid(f"layer {i} is a JSON {type(spec).__name__}, not an object")
        layer_type = LAYER_TYPES.get(spec.get("type")) if isinstance(spec.get("type"),
                                                                      str) else None
        if layer_type is None:
            raise Invalid(f"layer {i} has unknown type {str(spec.get('type'))[:40]!r} (a layer "
                          f"of your own: decorate its class with fastcnn.layers.register, "
                          f"then load)")
        config = spec.get("config", {})
        if not isinstance(config, dict):
            raise Invalid(f"layer {i} ({spec['type']}) has a config that is not an object")
        try:
            declared = {**layer_type.param_specs(**config), **layer_type.buffer_specs(**config)}
            specs.append({k: (tuple(s), np.dtype(d)) for k, (s, d) in declared.items()})
        except (TypeError, ValueError) as e:
            raise Invalid(f"layer {i} ({spec['type']}) has a bad config: {e}") from None
    return cls(input_shape=tuple(shape)), specs
