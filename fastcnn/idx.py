"""The IDX file format of MNIST: a 4-byte magic (0, 0, type code, number of dimensions), one
big-endian uint32 per dimension, then the payload, row-major. Plain or gzip-compressed (detected
from the bytes, not the file name)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

# type code -> big-endian dtype
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzip) into an array of its declared shape and type.

    The payload is streamed straight into the array (no second copy of a 47 MB file in memory).
    A foreign, truncated or over-long file is a ValueError naming the file and what is wrong.
    """
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            return _read_idx_stream(f, path)
    except (OSError, EOFError, zlib.error) as e:
        if not gzipped:
            raise
        raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e


def _read_idx_stream(f, path):
    magic = f.read(4)
    if len(magic) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(magic)} bytes)")
    zero1, zero2, code, ndim = magic
    if zero1 != 0 or zero2 != 0 or code not in IDX_TYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {magic.hex()})")
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = IDX_TYPES[code]
    data = np.empty(dims, dtype)
    got = f.readinto(memoryview(data).cast("B")) if data.size else 0
    trailing = len(f.read(1 << 16))
    if got != data.nbytes or trailing:
        what = "truncated" if got < data.nbytes else "has trailing bytes"
        raise ValueError(f"{path}: {what}: dimensions {dims} need {data.nbytes} payload bytes, "
                         f"the file has {got + trailing}{'+' if trailing == 1 << 16 else ''}")
    return data if dtype.itemsize == 1 else data.astype(dtype.newbyteorder("="))


def write_idx(path, array, compress=None) -> None:
    """Write ``array`` as IDX; gzip when ``compress`` is true (default: when the name ends in .gz).

    The gzip header carries no timestamp, so the same array always gives the same bytes.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"IDX cannot store dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got shape {array.shape}")
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes())
    if path.name.endswith(".gz") if compress is None else compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
