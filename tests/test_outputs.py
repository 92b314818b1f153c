"""Outputs are files: a destination that is a device, a FIFO or a folder where nothing can be
created is refused before any work, two outputs of one run never name the same file, and a
write that fails names its path."""

import errno
import os
import stat

import numpy as np
import pytest

from fastcnn import atomic, cli
from fastcnn.models import simple_cnn


def tiny_data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20)


def fit_refuses(error, message, **kw):
    """fit with ``kw`` fails with ``error`` before its first step."""
    net, steps = simple_cnn(), []
    net.gradient_hook = lambda net: steps.append(1)
    x, y = tiny_data()
    with pytest.raises(error, match=message):
        net.fit(x, y, epochs=1, verbose=False, **kw)
    assert steps == []


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_a_fifo_is_not_replaced(fifo):
    fit_refuses(ValueError, "it is a FIFO, not a regular file", checkpoint=fifo)
    with pytest.raises(ValueError, match="it is a FIFO"):
        simple_cnn().save(fifo)
    with pytest.raises(ValueError, match="not replacing .*fifo: it is a FIFO"):
        atomic.atomic_write(fifo, lambda f: f.write(b"x"))  # checked again at the rename
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root (the FIFO test "
                                               "above checks the same rule)")
def test_a_device_is_not_replaced(tmp_path):
    """fit(checkpoint="/dev/null") as root replaced /dev/null with a regular file; this test
    makes a null device of its own, so that a regression cannot break the machine's."""
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    fit_refuses(ValueError, f"cannot write the checkpoint to {null}: it is a character "
                            "device, not a regular file", checkpoint=null)
    with pytest.raises(ValueError, match="it is a character device"):
        simple_cnn().save(null)
    assert stat.S_ISCHR(os.stat(null).st_mode)


def test_a_link_to_a_regular_file_is_written_through(tmp_path):
    target = tmp_path / "real.npz"
    target.write_bytes(b"old")
    (tmp_path / "link.npz").symlink_to(target)
    simple_cnn().save(tmp_path / "link.npz")
    assert (tmp_path / "link.npz").is_symlink() and target.stat().st_size > 1000


@pytest.mark.parametrize("kw, error, message", [
    ({"checkpoint": ""}, ValueError, "the path of the checkpoint is empty"),
    ({"checkpoint": 123}, TypeError, "the path of the checkpoint must be a str or a "
                                     "pathlib.Path, got 123"),
    ({"resume": ""}, ValueError, "the path of the checkpoint to resume from is empty"),
    ({"checkpoint": "/proc/ck.npz"}, PermissionError,
     "cannot write the checkpoint to /proc/ck.npz: no file can be created in /proc"),
])
def test_bad_paths_are_named_before_training(kw, error, message):
    fit_refuses(error, message, **kw)


def test_a_gradient_hook_that_is_not_a_function_is_named():
    net = simple_cnn()
    net.gradient_hook = 5
    with pytest.raises(TypeError, match="net.gradient_hook must be a function called as "
                                        r"hook\(net\), or None; got 5"):
        net.fit(*tiny_data(), verbose=False)


def test_a_failed_write_names_its_path_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"old")

    def disk_full(f):
        f.write(b"new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device") as e:
        atomic.atomic_write(path, disk_full)
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "{d}/x.npz", "--save", "{d}/x.npz"], "--save and --checkpoint would both "
                                                           "write"),
    (["--checkpoint", "{d}/m.history.json", "--save", "{d}/m.npz"],
     "--save's history and --checkpoint would both write"),
    (["--checkpoint", "{d}/ck.npz", "--plot", "{d}/ck.npz"], "--checkpoint and --plot's folder "
                                                             "would both write"),
    (["--save", "{d}/pics/history.json", "--plot", "{d}/pics"], "--save and --plot's "
                                                                "history.json would both write"),
])
def test_outputs_of_one_run_that_collide_are_refused_before_training(tmp_path, capsys, flags,
                                                                     message):
    (tmp_path / "pics").mkdir()
    code = cli.main(["train", *[f.format(d=tmp_path) for f in flags]])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "give each its own path" in err, err
    assert not list(tmp_path.glob("*.npz"))


def test_bench_json_and_plot_on_one_file_are_refused(tmp_path, capsys):
    path = tmp_path / "out"
    assert cli.main(["bench", "--json", str(path), "--plot", str(path)]) == 1
    assert "--json and --plot would both write" in capsys.readouterr().err
