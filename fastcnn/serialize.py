"""Model files: one .npz (read with allow_pickle=False) holding the parameters and, as UTF-8 bytes,
a JSON description of the architecture. Written to a temporary file and renamed into place, so a
crash never leaves half a model behind; every array's shape and dtype is checked when read, and the
zip's CRC-32 catches flipped bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .layers import LAYER_TYPES

FORMAT = "fastcnn-model"
VERSION = 1


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(net, path):
    layers, arrays = [], {}
    for i, layer in enumerate(net.layers):
        layers.append({"type": type(layer).__name__, "config": layer.config(),
                       "params": {k: list(p.shape) for k, p in layer.params.items()}})
        for key, p in layer.params.items():
            arrays[f"layer{i}.{key}"] = p
    arch = {"format": FORMAT, "version": VERSION, "input_shape": net.input_shape, "layers": layers}
    arrays["architecture"] = np.frombuffer(json.dumps(arch).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load(cls, path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "architecture" not in z.files:
                raise ValueError("it has no architecture record")
            arch = json.loads(z["architecture"].tobytes().decode())
            if arch.get("format") != FORMAT or arch.get("version") != VERSION:
                raise ValueError(f"unknown format {arch.get('format')!r} v{arch.get('version')}")
            net = cls(input_shape=arch["input_shape"])
            for i, spec in enumerate(arch["layers"]):
                layer = _build_layer(spec)
                for key, p in layer.params.items():
                    stored = z[f"layer{i}.{key}"]
                    if stored.shape != p.shape or stored.dtype != p.dtype:
                        raise ValueError(
                            f"layer {i} ({spec['type']}) {key} is {stored.dtype}{stored.shape}, "
                            f"the architecture says {p.dtype}{p.shape}")
                    p[...] = stored
                net.add(layer)
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid fastcnn model file (truncated or corrupt?): "
                         f"{e}") from e
    return net


def _build_layer(spec):
    cls = LAYER_TYPES.get(spec.get("type"))
    if cls is None:
        raise ValueError(f"unknown layer type {spec.get('type')!r}")
    return cls(**spec.get("config", {}))
