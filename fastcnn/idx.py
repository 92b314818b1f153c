"""The IDX file format of MNIST: a 4-byte magic (0, 0, type code, number of dimensions), one
big-endian uint32 per dimension, then the payload, row-major. Plain or gzip-compressed (detected
from the bytes, not the file name)."""

from __future__ import annotations

import gzip
import math
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


MAX_DIMS = 32  # NumPy's limit on older versions; real IDX files have 1 to 4
_DEFLATE_MAX_RATIO = 1032  # gzip (deflate) cannot expand data more than about 1032:1
_CHUNK = 1 << 20


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzip) into an array of its declared shape and type.

    The header is checked against the file's size before anything is allocated (a header that
    claims 10^12 items in a small file is an error, not a MemoryError), and the payload is
    streamed straight into the array in chunks: no second copy, also for gzip. A foreign,
    truncated or over-long file is a ValueError naming the file and what is wrong.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            return _read_idx_stream(f, path, size, gzipped)
    except (OSError, EOFError, zlib.error) as e:
        if not gzipped:
            raise
        raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e


def _read_idx_stream(f, path, size, gzipped):
    magic = f.read(4)
    if len(magic) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(magic)} bytes)")
    zero1, zero2, code, ndim = magic
    if zero1 != 0 or zero2 != 0 or code not in IDX_TYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {magic.hex()})")
    if ndim > MAX_DIMS:
        raise ValueError(f"{path}: declares {ndim} dimensions; IDX files here have at most "
                         f"{MAX_DIMS}")
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = IDX_TYPES[code]
    need = math.prod(dims) * dtype.itemsize  # a Python int: no overflow
    header = 4 + 4 * ndim
    if not gzipped and need != size - header:
        what = "truncated" if need > size - header else "has trailing bytes"
        raise ValueError(f"{path}: {what}: dimensions {dims} need {need} payload bytes, the "
                         f"file has {size - header}")
    if gzipped and need + header > size * _DEFLATE_MAX_RATIO:
        raise ValueError(f"{path}: truncated: dimensions {dims} need {need} payload bytes, more "
                         f"than {size} bytes of gzip data can hold")
    try:
        data = np.empty(dims, dtype)
    except (ValueError, MemoryError) as e:  # e.g. a zero dimension beside ones past int64
        raise ValueError(f"{path}: cannot hold dimensions {dims} of {dtype}: {e}") from None
    view = memoryview(data.reshape(-1)).cast("B") if data.size else memoryview(b"")
    got = 0
    while got < len(view):
        n = f.readinto(view[got : got + _CHUNK])
        if not n:
            break
        got += n
    trailing = len(f.read(1 << 16))
    if got != need or trailing:
        what = "truncated" if got < need else "has trailing bytes"
        raise ValueError(f"{path}: {what}: dimensions {dims} need {need} payload bytes, the "
                         f"file has {got + trailing}{'+' if trailing == 1 << 16 else ''}")
    if dtype.itemsize == 1:
        return data
    return data.byteswap(inplace=True).view(dtype.newbyteorder("="))  # in place: no copy


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
    if array.ndim == 0 or array.ndim > MAX_DIMS:
        raise ValueError(f"IDX needs 1 to {MAX_DIMS} dimensions, got shape {array.shape}")
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes())
    if path.name.endswith(".gz") if compress is None else compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
