"""IDX files as an attacker would write them: a header's claims are checked against the file's
size before anything is allocated, and every failure is a ValueError naming the file."""

import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcnn.idx import MAX_DIMS, read_idx, write_idx


def header(code, dims):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dims, code", [
    ((10 ** 6, 10 ** 6), 0x08),                 # 10^12 items
    ((2 ** 32 - 1,) * 4, 0x0E),                 # 2^128 bytes and more
    ((2 ** 32 - 1, 2 ** 32 - 1, 3), 0x08),      # past int64 when multiplied
])
def test_headers_claiming_huge_payloads_are_refused_by_name(tmp_path, gz, dims, code):
    data = header(code, dims) + b"\x00" * 1000
    path = tmp_path / ("huge.gz" if gz else "huge.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=rf"{path.name}: truncated: dimensions .* need \d+ "
                                         rf"payload bytes"):
        read_idx(path)


@pytest.mark.parametrize("ndim", [MAX_DIMS + 1, 65, 255])
def test_too_many_dimensions(tmp_path, ndim):
    path = tmp_path / "dims.idx"
    path.write_bytes(header(0x08, (1,) * ndim) + b"\x00")
    with pytest.raises(ValueError, match=rf"dims.idx: declares {ndim} dimensions"):
        read_idx(path)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_every_type_round_trips_through_big_endian(tmp_path, rng, dtype):
    a = (rng.standard_normal((7, 5, 3)) * 100).astype(dtype)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, a)
        b = read_idx(tmp_path / name)
        assert b.dtype == np.dtype(dtype).newbyteorder("=")
        np.testing.assert_array_equal(a, b)


def test_a_big_gzip_payload_is_not_held_twice(tmp_path):
    """The gzip payload streams into its array in chunks (GzipFile.readinto of the whole array
    at once reads it into a bytes object first: twice the memory)."""
    size = 200 << 20
    path = tmp_path / "big.idx.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header(0x08, (size,)))
        for _ in range(size >> 20):
            f.write(b"\x07" * (1 << 20))
    code = ("import resource, sys; from fastcnn.idx import read_idx\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "a = read_idx(sys.argv[1]); assert a.size == int(sys.argv[2]) and a[-1] == 7\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    run = subprocess.run([sys.executable, "-c", code, str(path), str(size)], capture_output=True,
                         text=True, check=True)
    grown = int(run.stdout)
    assert grown < 1.3 * size, f"peak grew by {grown / 2 ** 20:.0f} MiB for a 200 MiB payload"


def good_file():
    return header(0x08, (3, 4, 5)) + bytes(range(60))


def check_read(tmp_path, data, name):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        a = read_idx(path)
    except ValueError as e:
        assert name in str(e), e
        return
    # whatever loads is exactly what the header says, filled from the file
    assert isinstance(a, np.ndarray) and a.ndim >= 1


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 75), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 80), extra=st.binary(max_size=8), gz=st.booleans())
def test_fuzzed_idx_files(tmp_path, edits, cut, extra, gz):
    data = bytearray(good_file())
    for at, value in edits:
        data[at % len(data)] = value
    data = bytes(data[:cut]) + extra
    check_read(tmp_path, gzip.compress(data) if gz else data, "fuzz.idx")


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x0A]),
       dims=st.lists(st.integers(0, 2 ** 32 - 1), min_size=0, max_size=70),
       payload=st.integers(0, 64), gz=st.booleans())
def test_fuzzed_idx_headers(tmp_path, code, dims, payload, gz):
    data = bytes([0, 0, code, len(dims) % 256]) + struct.pack(f">{len(dims)}I", *dims)
    data += b"\x01" * payload
    check_read(tmp_path, gzip.compress(data) if gz else data, "head.idx")


@pytest.mark.parametrize("name", ["big.idx", "big.idx.gz"])
def test_payloads_longer_than_one_read_chunk_round_trip(tmp_path, rng, name):
    """read_idx streams in 1 MiB chunks: a payload of several chunks, not a whole number of
    them, in a multi-byte type (swapped after the last chunk)."""
    a = rng.integers(-2 ** 31, 2 ** 31, (3, 700, 317), dtype=np.int64).astype(np.int32)
    assert a.nbytes > 2.5 * (1 << 20)
    write_idx(tmp_path / name, a)
    np.testing.assert_array_equal(read_idx(tmp_path / name), a)
