"""Model files as an attacker would write them: every bad file is one ValueError naming it, found
before anything the file merely claims is allocated; saving behaves like open(path, "wb")."""

import io
import json
import os
import signal
import stat
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcnn import Conv2D, ConvNet, Dense, Flatten, MaxPool2D, ReLU, serialize
from fastcnn.models import simple_cnn


def npy(array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def arch_bytes(arch):
    return npy(np.frombuffer(json.dumps(arch).encode(), np.uint8))


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    """members: name -> bytes (a whole .npy member)."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def good_members(net=None):
    net = net or simple_cnn(seed=0)
    layers, members = [], {}
    for i, layer in enumerate(net.layers):
        layers.append({"type": type(layer).__name__, "config": layer.config(), "params": {}})
        for key, p in layer.params.items():
            members[f"layer{i}.{key}.npy"] = npy(p)
    arch = {"format": "fastcnn-model", "version": 1, "input_shape": list(net.input_shape),
            "layers": layers}
    return arch, members


def load_fails(path, match):
    with pytest.raises(ValueError, match=rf"{path.name} is not a valid fastcnn model "
                                         rf"file.*{match}"):
        ConvNet.load(path)


def test_the_helpers_write_a_loadable_model(tmp_path):
    arch, members = good_members()
    path = write_zip(tmp_path / "ok.npz", {"architecture.npy": arch_bytes(arch), **members})
    x = np.random.default_rng(0).integers(0, 255, (3, 1, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(ConvNet.load(path).predict_proba(x),
                                  simple_cnn(seed=0).predict_proba(x))
    deflated = write_zip(tmp_path / "deflated.npz", {"architecture.npy": arch_bytes(arch),
                                                     **members}, zipfile.ZIP_DEFLATED)
    assert ConvNet.load(deflated).num_params() == 15_770


def _edit(name):
    """An architecture edited as named, and the members that still go with it."""
    arch, members = good_members()
    layers = arch["layers"]
    {"list": lambda: arch.clear() or arch.update(list=True),
     "other format": lambda: arch.update(format="other"),
     "version 99": lambda: arch.update(version=99),
     "layers as strings": lambda: arch.update(layers=["Conv2D", "ReLU"]),
     "no layers": lambda: arch.update(layers=[]),
     "layers null": lambda: arch.update(layers=None),
     "unknown type": lambda: arch.update(layers=[layers[0], {"type": "Evil"}]),
     "bad config": lambda: layers[0]["config"].update(kernel_size=-3),
     "extra config key": lambda: layers[2]["config"].update(evil=1),
     "overflowing input": lambda: arch.update(input_shape=[2 ** 40] * 3),
     "float input": lambda: arch.update(input_shape=[1, 28.5, 28]),
     "not flat": lambda: arch.update(layers=layers[:3]),
     "misfit": lambda: arch.update(input_shape=[1, 30, 30])}[name]()
    if name in ("layers as strings", "no layers", "layers null", "unknown type", "not flat"):
        members = {k: v for k, v in members.items() if k.startswith("layer0.")}
    return arch, members


@pytest.mark.parametrize("edit, match", [
    ("other format", "unknown format 'other'"),
    ("version 99", "version 99"),
    ("layers as strings", "layer 0 is a JSON str"),
    ("no layers", "it has no layers"),
    ("layers null", "it has no layers"),
    ("unknown type", "layer 1 has unknown type 'Evil'"),
    ("bad config", r"layer 0 \(Conv2D\) has a bad config"),
    ("extra config key", r"layer 2 \(MaxPool2D\) has a bad config"),
    ("overflowing input", "input_shape .* holds more than"),
    ("float input", "input_shape must be 3 positive ints"),
    ("not flat", "last layer gives .* not a vector of class scores"),
    ("misfit", r"Dense.*does not match its input"),
])
def test_crafted_architectures_are_one_valueerror(tmp_path, edit, match):
    arch, members = _edit(edit)
    path = write_zip(tmp_path / "crafted.npz", {"architecture.npy": arch_bytes(arch), **members})
    load_fails(path, match)


@pytest.mark.parametrize("record, match", [([], "JSON list, not an object"),
                                           (None, "JSON NoneType, not an object"),
                                           ("text", "JSON str, not an object")])
def test_architecture_records_that_are_not_objects(tmp_path, record, match):
    path = write_zip(tmp_path / "crafted.npz", {"architecture.npy": arch_bytes(record)})
    load_fails(path, match)


def test_json_nested_100000_deep(tmp_path):
    raw = ("[" * 100_000 + "]" * 100_000).encode()
    path = write_zip(tmp_path / "deep.npz",
                     {"architecture.npy": npy(np.frombuffer(raw, np.uint8))})
    load_fails(path, "nested too deeply|not an object")


def test_member_without_an_npy_header(tmp_path):
    arch, members = good_members()
    members["layer0.weight.npy"] = b"\x00" * 300
    path = write_zip(tmp_path / "raw.npz", {"architecture.npy": arch_bytes(arch), **members})
    load_fails(path, "")
    path = write_zip(tmp_path / "rawarch.npz", {"architecture.npy": b"{}"})
    load_fails(path, "")


def test_encrypted_member(tmp_path):
    arch, members = good_members()
    path = write_zip(tmp_path / "enc.npz", {"architecture.npy": arch_bytes(arch), **members})
    data = bytearray(path.read_bytes())
    # set the 'encrypted' flag of every entry, in the local headers and the central directory
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        while at != -1:
            data[at + offset] |= 1
            at = data.find(sig, at + 4)
    path.write_bytes(bytes(data))
    load_fails(path, "encrypted")


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_unsupported_compression(tmp_path, method):
    arch, members = good_members()
    path = write_zip(tmp_path / "bz.npz", {"architecture.npy": arch_bytes(arch), **members},
                     method)
    load_fails(path, f"compression method {method}")


def test_a_header_claiming_a_terabyte_costs_nothing(tmp_path):
    arch, members = good_members()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (1 << 19, 1 << 19)})
    members["layer4.weight.npy"] = header.getvalue() + b"\x00" * 64
    path = write_zip(tmp_path / "tb.npz", {"architecture.npy": arch_bytes(arch), **members})
    load_fails(path, r"layer 4 \(Dense\) weight is float32\(524288, 524288\)")


def test_a_1kb_file_declaring_a_huge_dense_layer_allocates_nothing_big(tmp_path):
    arch = {"format": "fastcnn-model", "version": 1, "input_shape": [1, 20000, 1],
            "layers": [{"type": "Flatten", "config": {}},
                       {"type": "Dense", "config": {"in_features": 20000, "out_features": 20000,
                                                    "dtype": "float64"}}]}
    members = {"layer1.weight.npy": npy(np.zeros((2, 2))), "layer1.bias.npy": npy(np.zeros(2))}
    path = write_zip(tmp_path / "huge.npz", {"architecture.npy": arch_bytes(arch), **members})
    assert path.stat().st_size < 2048
    tracemalloc.start()
    try:
        load_fails(path, r"layer 1 \(Dense\) weight is float64\(2, 2\), the architecture says "
                         r"float64\(20000, 20000\)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak


def test_a_member_claiming_more_bytes_than_its_header_needs(tmp_path):
    """A deflated member that expands past its array (a zip bomb behind a small header)."""
    arch, members = good_members()
    members["layer0.bias.npy"] = members["layer0.bias.npy"] + b"\x00" * (1 << 22)
    path = write_zip(tmp_path / "bomb.npz", {"architecture.npy": arch_bytes(arch), **members},
                     zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 200_000
    load_fails(path, r"layer 0 \(Conv2D\) bias: the member holds \d+ bytes, its header needs")
    big_arch = npy(np.zeros(serialize.MAX_ARCHITECTURE_BYTES + 10, np.uint8))
    path = write_zip(tmp_path / "bigarch.npz", {"architecture.npy": big_arch},
                     zipfile.ZIP_DEFLATED)
    load_fails(path, "architecture record is .* bytes \\(at most")


@pytest.mark.parametrize("key", ["layer0.weight", "layer0.bias", "layer4.weight", "layer4.bias"])
@pytest.mark.parametrize("change", ["shape", "dtype", "missing", "nan"])
def test_every_parameter_is_checked(tmp_path, key, change):
    """Each key on its own: a check applied to the weights only would let a bias through."""
    path = tmp_path / "m.npz"
    simple_cnn().save(path)
    with np.load(path) as z:
        arrays = dict(z)
    a = arrays[key]
    if change == "shape":
        arrays[key] = a.reshape(-1)[:1]
    elif change == "dtype":
        arrays[key] = a.astype(np.float64)
    elif change == "missing":
        del arrays[key]
    else:
        arrays[key] = a.copy()
        arrays[key].reshape(-1)[-1] = np.nan
    np.savez(path, **arrays)
    i, name = key[5], key.split(".")[1]
    what = {"shape": "is float32", "dtype": "is float64", "missing": f"has no {name} array",
            "nan": f"{name} holds 1 NaN or infinite"}[change]
    load_fails(path, rf"layer {i} \((Conv2D|Dense)\).*{what}")


def test_extra_members_are_refused(tmp_path):
    path = tmp_path / "m.npz"
    simple_cnn().save(path)
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(path, **arrays, layer9_weight=np.zeros(3, np.float32))
    load_fails(path, "members the architecture does not name: layer9_weight.npy")


def test_a_folder_is_not_a_model_file(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a fastcnn model file"):
        ConvNet.load(tmp_path)


def test_not_a_zip_and_empty_file(tmp_path):
    for name, data in (("text.npz", b"hello, not a model"), ("empty.npz", b"")):
        (tmp_path / name).write_bytes(data)
        load_fails(tmp_path / name, "not a zip archive")


# -- fuzzing: whatever the bytes, load returns a network or raises one ValueError naming the file

def _small_model_bytes():
    net = ConvNet([Conv2D(1, 2, 3, rng=0), ReLU(), MaxPool2D(2), Flatten(), Dense(8, 3, rng=0)],
                  input_shape=(1, 4, 4))
    buf = io.BytesIO()
    arch, members = good_members(net)
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("architecture.npy", arch_bytes(arch))
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


SMALL_MODEL = _small_model_bytes()


def load_or_one_valueerror(path):
    try:
        ConvNet.load(path)
    except ValueError as e:
        assert f"{path.name} is not a valid fastcnn model file" in str(e)


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, len(SMALL_MODEL) - 1), st.integers(0, 255)),
                      min_size=1, max_size=8),
       cut=st.integers(0, len(SMALL_MODEL)))
def test_fuzzed_model_bytes(tmp_path, edits, cut):
    data = bytearray(SMALL_MODEL)
    for at, value in edits:
        data[at] = value
    path = tmp_path / "fuzz.npz"
    path.write_bytes(bytes(data[:cut] if cut > 10 else data))
    load_or_one_valueerror(path)


SMALL_ARCH, SMALL_MEMBERS = good_members(ConvNet(
    [Conv2D(1, 2, 3, rng=0), ReLU(), MaxPool2D(2), Flatten(), Dense(8, 3, rng=0)],
    input_shape=(1, 4, 4)))
SMALL_JSON = json.dumps(SMALL_ARCH).encode()


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(member=st.sampled_from(["architecture", *sorted(SMALL_MEMBERS)]),
       edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1,
                      max_size=6))
def test_fuzzed_members_inside_a_valid_zip(tmp_path, member, edits):
    """Bytes edited inside the JSON text or a .npy header, then zipped with a valid CRC, so the
    edits reach the parsers rather than the zip's checksum."""
    members = {"architecture.npy": SMALL_JSON, **SMALL_MEMBERS}
    name = member if member.endswith(".npy") else "architecture.npy"
    data = bytearray(members[name])
    for at, value in edits:
        data[at % len(data)] = value
    members[name] = bytes(data)
    members["architecture.npy"] = npy(np.frombuffer(members["architecture.npy"], np.uint8))
    load_or_one_valueerror(write_zip(tmp_path / "fuzz.npz", members))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)
layer_specs = st.fixed_dictionaries({
    "type": st.sampled_from(["Conv2D", "Dense", "ReLU", "MaxPool2D", "Flatten", "Evil"]),
    "config": st.dictionaries(st.sampled_from(["in_channels", "out_channels", "kernel_size",
                                               "stride", "padding", "pool_size", "in_features",
                                               "out_features", "dtype"]),
                              st.integers(-3, 40) | st.sampled_from(["same", "valid", "float32",
                                                                     "float16", "int8"]) |
                              json_values, max_size=6)})


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(-1, 40) | json_values, max_size=4) | json_values,
       layers=st.lists(layer_specs, max_size=5) | json_values, version=st.sampled_from([1, 2]))
def test_fuzzed_architectures(tmp_path, shape, layers, version):
    arch = {"format": "fastcnn-model", "version": version, "input_shape": shape, "layers": layers}
    members = {}
    if isinstance(layers, list):  # arrays of roughly the right names, random sizes
        for i in range(len(layers)):
            members[f"layer{i}.weight.npy"] = npy(np.zeros((2, 1, 3, 3), np.float32))
            members[f"layer{i}.bias.npy"] = npy(np.zeros(2, np.float32))
    load_or_one_valueerror(write_zip(tmp_path / "fuzz.npz",
                                     {"architecture.npy": arch_bytes(arch), **members}))


# -- saving ----------------------------------------------------------------------------------


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_model_file_gets_the_umasks_mode(tmp_path, umask, mask, mode):
    umask(mask)
    simple_cnn().save(tmp_path / "m.npz")
    assert stat.S_IMODE((tmp_path / "m.npz").stat().st_mode) == mode


def test_replacing_keeps_the_old_files_mode(tmp_path, umask):
    path = tmp_path / "m.npz"
    simple_cnn().save(path)
    path.chmod(0o640)
    umask(0o077)
    simple_cnn(seed=1).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_saving_through_a_symlink_writes_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "model.npz"
    simple_cnn(seed=0).save(target)
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    simple_cnn(seed=1).save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    np.testing.assert_array_equal(ConvNet.load(target).layers[0].params["weight"],
                                  simple_cnn(seed=1).layers[0].params["weight"])
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["model.npz"]


def test_saving_to_a_missing_folder_or_a_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the folder .*nowhere does not exist"):
        simple_cnn().save(tmp_path / "nowhere" / "m.npz")
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        simple_cnn().save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_save_killed_midway_leaves_the_old_file_and_its_leftover_is_cleaned(tmp_path):
    path = tmp_path / "m.npz"
    simple_cnn(seed=0).save(path)
    before = path.read_bytes()
    code = ("import os, signal, sys; from fastcnn import atomic\n"
            "with atomic.temporary_beside(sys.argv[1]) as (f, tmp):\n"
            "    f.write(b'x' * 100000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True)
    assert run.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".m.npz.")]
    assert len(leftovers) == 1 and path.read_bytes() == before
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a temporary file of a writer still running is not touched
        busy = tmp_path / f".m.npz.{live.pid}.abcdefgh.tmp"
        busy.write_bytes(b"in progress")
        other = tmp_path / ".m.npz.notapid.tmp"
        other.write_bytes(b"not ours")
        simple_cnn(seed=1).save(path)
        assert not leftovers[0].exists() and busy.exists() and other.exists()
    finally:
        live.kill()
        live.wait()
    assert ConvNet.load(path).num_params() == 15_770
