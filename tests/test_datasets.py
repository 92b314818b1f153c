import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.server
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fastcnn import datasets
from fastcnn.idx import read_idx, write_idx

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, rng, name, dtype):
    a = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_idx_gzip_is_detected_from_bytes_not_name(tmp_path):
    write_idx(tmp_path / "plain-name", np.arange(6, dtype=np.uint8), compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), np.arange(6))


def test_idx_errors_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / "x.idx"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    good = path.read_bytes()
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match=r"magic.idx: not an IDX file"):
        read_idx(tmp_path / "magic.idx")
    (tmp_path / "short.idx").write_bytes(good[:-100])
    with pytest.raises(ValueError, match=r"short.idx: truncated.*7840 payload bytes.*7740"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "long.idx").write_bytes(good + b"\0")
    with pytest.raises(ValueError, match="long.idx: has trailing bytes"):
        read_idx(tmp_path / "long.idx")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-30])
    with pytest.raises(ValueError, match="cut.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "tiny").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="tiny: too short"):
        read_idx(tmp_path / "tiny")


def write_fake_dataset(folder, rng, n_train=12, n_test=5, n_test_labels=None):
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / FILES[0], rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(folder / FILES[1], rng.integers(0, 10, n_train, dtype=np.uint8))
    write_idx(folder / FILES[2], rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(folder / FILES[3], rng.integers(0, 10, n_test_labels or n_test, dtype=np.uint8))


def test_mnist_sample_is_real_digits_in_the_documented_shape():
    (x, y), (xt, yt) = datasets.load("mnist-sample")
    assert x.shape == (8000, 1, 28, 28) and xt.shape == (2000, 1, 28, 28)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 == x.min() and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10)) == set(np.unique(yt))
    (xr, _), _ = datasets.load("mnist-sample", raw=True)
    assert xr.dtype == np.uint8 and xr.shape == x.shape
    size = sum(p.stat().st_size for p in datasets.SAMPLE_DIR.glob("*.gz"))
    assert size <= 2_000_000


def test_load_reads_a_local_folder_and_checks_label_counts(tmp_path, rng):
    write_fake_dataset(tmp_path / "mnist", rng)
    (x, y), (xt, yt) = datasets.load("mnist", data_dir=tmp_path, download=False)
    assert x.shape == (12, 1, 28, 28) and yt.shape == (5,)
    write_fake_dataset(tmp_path / "fashion-mnist", rng, n_test_labels=4)
    with pytest.raises(ValueError, match="5 images but.*4 labels"):
        datasets.load("fashion-mnist", data_dir=tmp_path, download=False)


def test_load_honours_fastcnn_data_and_says_where_files_go(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("FASTCNN_DATA", str(tmp_path))
    with pytest.raises(datasets.DatasetUnavailable, match=rf"t10k-labels.*{tmp_path}/mnist/"):
        datasets.load("mnist", download=False)
    write_fake_dataset(tmp_path / "mnist", rng, n_train=3)
    (x, _), _ = datasets.load("mnist", download=False)
    assert len(x) == 3
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
        datasets.load("cifar")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def running(handler):
    """An HTTP server on 127.0.0.1 with ``handler``, on a free port, stopped afterwards."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def serve(folder):
    """A server of the files in ``folder``."""
    return running(functools.partial(_Quiet, directory=str(folder)))


def spec_for(folder, mirrors, corrupt=None):
    files = {}
    for role, fname in zip(datasets.ROLES, FILES, strict=True):
        data = (folder / fname).read_bytes()
        md5 = hashlib.md5(data).hexdigest()
        files[role] = (fname, "0" * 32 if fname == corrupt else md5, len(data))
    return datasets.DatasetSpec("mnist", files, mirrors=tuple(mirrors))


def test_download_uses_the_second_mirror_when_the_first_is_dead(tmp_path, rng, monkeypatch):
    write_fake_dataset(tmp_path / "www" / "good", rng)
    with serve(tmp_path / "www") as url:
        spec = spec_for(tmp_path / "www" / "good", [f"{url}/dead/", f"{url}/good/"])
        monkeypatch.setitem(datasets.DATASETS, "mnist", spec)
        (x, y), (xt, yt) = datasets.load("mnist", data_dir=tmp_path / "cache")
    assert x.shape == (12, 1, 28, 28) and len(yt) == 5
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(FILES)
    for fname in FILES:
        assert (tmp_path / "cache/mnist" / fname).read_bytes() == (
            tmp_path / "www/good" / fname).read_bytes()


def test_checksum_mismatch_is_rejected_and_leaves_nothing(tmp_path, rng):
    write_fake_dataset(tmp_path / "www", rng)
    dest = tmp_path / "cache"
    with serve(tmp_path / "www") as url:
        spec = spec_for(tmp_path / "www", [url], corrupt=FILES[0])
        with pytest.raises(datasets.DatasetUnavailable, match="checksum mismatch.*" + str(dest)):
            datasets.fetch(spec, dest, progress=False)
    assert not dest.exists()  # no partial file, and no empty folder made for nothing


def test_every_mirror_dead_names_each_url_and_the_folder(tmp_path, rng):
    write_fake_dataset(tmp_path / "www", rng)
    with serve(tmp_path / "www") as url:
        spec = spec_for(tmp_path / "www", [f"{url}/a/", f"{url}/b/"])
        with pytest.raises(datasets.DatasetUnavailable) as err:
            datasets.fetch(spec, tmp_path / "cache", progress=False)
    message = str(err.value)
    assert f"{url}/a/train-images" in message and f"{url}/b/train-images" in message
    assert "404" in message and str(tmp_path / "cache") in message
    assert not (tmp_path / "cache").exists()


# -- hostile mirrors: bounded in bytes and time, and they stop by themselves -------------------


class _Hostile(http.server.BaseHTTPRequestHandler):
    mode = "forever"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        if self.mode == "wrong length":
            self.send_header("Content-Length", "999999999")
        self.end_headers()
        started = time.monotonic()
        try:
            if self.mode == "forever":  # at most 64 MiB or 20 s, whichever comes first
                for _ in range(1024):
                    if time.monotonic() - started > 20:
                        break
                    self.wfile.write(b"\0" * 65536)
            elif self.mode == "trickle":  # a byte every 0.1 s, for at most 20 s
                while time.monotonic() - started < 20:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass


def serve_hostile(mode):
    return running(type("Handler", (_Hostile,), {"mode": mode}))


def small_spec(url, size=5000):
    files = {role: (fname, "0" * 32, size) for role, fname in zip(datasets.ROLES, FILES,
                                                                   strict=True)}
    return datasets.DatasetSpec("mnist", files, mirrors=(url + "/",))


@pytest.mark.parametrize("mode, message", [("forever", "sent more than the file's 5000 bytes"),
                                           ("wrong length", "announces 999999999 bytes"),
                                           ("trickle", "gave up after 1 s")])
def test_hostile_mirrors_are_given_up_and_leave_nothing(tmp_path, monkeypatch, mode, message):
    monkeypatch.setattr(datasets, "DEADLINE_BASE", 1.0)
    monkeypatch.setattr(datasets, "MIN_RATE", 1e12)
    dest = tmp_path / "cache" / "deeper" / "mnist"
    started = time.monotonic()
    with serve_hostile(mode) as url:
        with pytest.raises(datasets.DatasetUnavailable, match=message):
            datasets.fetch(small_spec(url), dest, progress=False)
    assert time.monotonic() - started < 15
    assert list(tmp_path.iterdir()) == []  # no .part file, no empty folders


def test_a_killed_downloads_part_file_is_removed_by_the_next(tmp_path, rng):
    write_fake_dataset(tmp_path / "www", rng)
    dest = tmp_path / "cache"
    dest.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = dest / f".{FILES[0]}.{dead}.abcd1234.part"
    stale.write_bytes(b"half a download")
    with serve(tmp_path / "www") as url:
        datasets.fetch(spec_for(tmp_path / "www", [url]), dest, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)


def test_https_mirrors_are_tried_first(tmp_path, monkeypatch):
    tried = []

    def record(url, *args):
        tried.append(url.rsplit("/", 1)[0])
        raise OSError("no network in this test")

    monkeypatch.setattr(datasets, "_download", record)
    spec = datasets.DatasetSpec("x", {"train_images": ("f.gz", "0" * 32, 1)},
                                mirrors=("http://a.example/", "https://b.example/",
                                         "http://c.example/", "https://d.example/"))
    with pytest.raises(datasets.DatasetUnavailable):
        datasets.fetch(spec, tmp_path / "x", progress=False)
    assert tried == ["https://b.example", "https://d.example", "http://a.example",
                     "http://c.example"]
    assert all(spec.mirrors[0].startswith("https://") for spec in datasets.DATASETS.values())


@pytest.mark.parametrize("has_apt", [True, False])
def test_missing_fashion_mnist_says_how_to_install_it_where_apt_exists(tmp_path, monkeypatch,
                                                                       has_apt):
    spec = dataclasses.replace(datasets.DATASETS["fashion-mnist"],
                               system_dirs=(str(tmp_path / "nowhere"),))
    monkeypatch.setitem(datasets.DATASETS, "fashion-mnist", spec)
    monkeypatch.setattr(datasets.shutil, "which",
                        lambda name: "/usr/bin/apt-get" if has_apt else None)
    with pytest.raises(datasets.DatasetUnavailable) as err:
        datasets.load("fashion-mnist", data_dir=tmp_path, download=False)
    assert ("apt-get install dataset-fashion-mnist" in str(err.value)) == has_apt


# -- CIFAR-10 (binary version), on crafted files of its format: no copy can be downloaded here --


def cifar_records(rng, n):
    """n records: a label byte, then 32x32 red, green and blue planes."""
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    return np.concatenate([labels[:, None], pixels], axis=1).tobytes(), labels, pixels


def write_cifar(folder, rng, counts=(3, 2, 1, 2, 3, 4), archive=True, edit=None):
    """The six files of CIFAR-10's binary version with ``counts`` records each (the real ones
    hold 10,000), as its archive (or extracted); returns the images and labels written."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    names = [*datasets.CIFAR_TRAIN, datasets.CIFAR_TEST]
    files, written = {}, []
    for name, n in zip(names, counts, strict=True):
        data, labels, pixels = cifar_records(rng, n)
        files[name] = data
        written.append((labels, pixels))
    if edit is not None:
        edit(files)
    if archive:
        with tarfile.open(folder / "cifar-10-binary.tar.gz", "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{datasets.CIFAR_DIR}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        (folder / datasets.CIFAR_DIR).mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / datasets.CIFAR_DIR / name).write_bytes(data)
    return written


@pytest.mark.parametrize("archive", [True, False])
def test_cifar10_is_read_from_its_archive_or_extracted(tmp_path, rng, archive):
    written = write_cifar(tmp_path / "cifar-10", rng, archive=archive)
    (x, y), (xt, yt) = datasets.load("cifar-10", data_dir=tmp_path, download=False, raw=True)
    assert x.shape == (11, 3, 32, 32) and x.dtype == np.uint8 and xt.shape == (4, 3, 32, 32)
    assert y.dtype == np.int64
    labels, pixels = written[0]
    np.testing.assert_array_equal(y[:3], labels)
    np.testing.assert_array_equal(x[0, 0].reshape(-1), pixels[0, :1024])  # red plane first
    np.testing.assert_array_equal(x[0, 2].reshape(-1), pixels[0, 2048:])  # then green, blue
    np.testing.assert_array_equal(yt, written[5][0])
    (xf, _), _ = datasets.load("cifar-10", data_dir=tmp_path, download=False)
    assert xf.dtype == np.float32 and xf.max() <= 1.0
    np.testing.assert_allclose(xf, x / 255, rtol=1e-6)
    assert datasets.class_names("cifar-10")[3] == "cat"


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.update({"test_batch.bin": f["test_batch.bin"][:-7]}),
     "not a whole number of 3073-byte records"),
    (lambda f: f.update({"data_batch_2.bin": b"\x0c" + f["data_batch_2.bin"][1:]}),
     "labels must be 0..9, found 12"),
    (lambda f: f.pop("data_batch_4.bin"), "no cifar-10-batches-bin/data_batch_4.bin"),
    (lambda f: f.update({"data_batch_1.bin": b""}), "0 bytes is not a whole number"),
])
def test_a_bad_cifar10_file_is_named(tmp_path, rng, edit, match):
    write_cifar(tmp_path / "cifar-10", rng, edit=edit)
    with pytest.raises(ValueError, match=match):
        datasets.load("cifar-10", data_dir=tmp_path, download=False)


def test_a_corrupt_cifar10_archive_is_named(tmp_path, rng):
    write_cifar(tmp_path / "cifar-10", rng)
    path = tmp_path / "cifar-10" / "cifar-10-binary.tar.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 archive"):
        datasets.load("cifar-10", data_dir=tmp_path, download=False)


def test_cifar10_downloads_its_archive_checks_it_and_reads_it(tmp_path, rng, monkeypatch):
    written = write_cifar(tmp_path / "www", rng)
    data = (tmp_path / "www" / "cifar-10-binary.tar.gz").read_bytes()
    with serve(tmp_path / "www") as url:
        spec = dataclasses.replace(
            datasets.DATASETS["cifar-10"], mirrors=(f"{url}/",),
            files={"archive": ("cifar-10-binary.tar.gz", hashlib.md5(data).hexdigest(),
                               len(data))})
        monkeypatch.setitem(datasets.DATASETS, "cifar-10", spec)
        (x, y), _ = datasets.load("cifar-10", data_dir=tmp_path / "cache", raw=True)
        np.testing.assert_array_equal(y[:3], written[0][0])
        assert (tmp_path / "cache/cifar-10/cifar-10-binary.tar.gz").read_bytes() == data
        wrong = dataclasses.replace(spec, files={"archive": ("cifar-10-binary.tar.gz", "0" * 32,
                                                             len(data))})
        monkeypatch.setitem(datasets.DATASETS, "cifar-10", wrong)
        with pytest.raises(datasets.DatasetUnavailable, match="checksum mismatch"):
            datasets.load("cifar-10", data_dir=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_the_real_cifar10_archive_is_named_with_its_published_checksum():
    spec = datasets.DATASETS["cifar-10"]
    assert spec.files["archive"] == ("cifar-10-binary.tar.gz",
                                     "c32a1d4ab5d03f1284b67883e8d87530", 170052171)
    assert spec.mirrors[0].startswith("https://")


def test_fastcnn_train_on_cifar10_builds_a_colour_model(tmp_path, rng):
    import os

    write_cifar(tmp_path / "data" / "cifar-10", rng, counts=(16, 16, 16, 16, 16, 20))
    env = dict(os.environ, FASTCNN_DATA=str(tmp_path / "data"))
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "train", "--dataset", "cifar-10",
                          "--model", "resnet", "--epochs", "1", "--batch-size", "16",
                          "--save", str(tmp_path / "m.npz")], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "test accuracy" in run.stdout and "cifar-10: 72 training" in run.stdout
    from fastcnn import ConvNet

    net = ConvNet.load(tmp_path / "m.npz")
    assert net.input_shape == (3, 32, 32) and net.class_names[0] == "airplane"


# -- your own picture tree ----------------------------------------------------------------------

needs_pillow = pytest.mark.skipif(__import__("importlib").util.find_spec("PIL") is None,
                                  reason="the image extra (Pillow) is not installed")


def picture_tree(root, rng, classes=("cat", "dog", "eel"), per_class=(4, 2), size=(10, 12),
                 colour=True):
    from PIL import Image

    for split, count in zip(("train", "test"), per_class, strict=True):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                a = rng.integers(0, 256, (*size, 3) if colour else size, dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@needs_pillow
def test_a_picture_tree_is_a_dataset(tmp_path, rng):
    root = picture_tree(tmp_path / "pets", rng)
    (tmp_path / "pets" / "train" / "cat" / "notes.txt").write_text("not a picture")  # ignored
    (x, y), (xt, yt) = datasets.from_folder(root)
    assert x.shape == (12, 3, 10, 12) and x.dtype == np.uint8 and xt.shape == (6, 3, 10, 12)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and yt.tolist() == [0, 0, 1, 1, 2, 2]
    from PIL import Image

    png = np.asarray(Image.open(root / "train" / "cat" / "1.png"))
    np.testing.assert_array_equal(x[1].transpose(1, 2, 0), png)  # lossless, as stored
    assert datasets.class_names("folder", root) == ("cat", "dog", "eel")
    (g, _), _ = datasets.from_folder(root, size=(6, 6), channels=1)
    assert g.shape == (12, 1, 6, 6)
    grey = picture_tree(tmp_path / "grey", rng, colour=False)
    assert datasets.from_folder(grey)[0][0].shape[1] == 1  # grey pictures: one channel
    (f, _), _ = datasets.load("folder", grey)
    assert f.dtype == np.float32 and f.max() <= 1


@needs_pillow
def test_a_bad_picture_tree_is_named(tmp_path, rng):
    from PIL import Image

    root = picture_tree(tmp_path / "a", rng)
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(root / "train" / "dog" / "odd.png")
    with pytest.raises(ValueError, match=r"odd.png is 7x7 pixels.*give size"):
        datasets.from_folder(root)
    assert datasets.from_folder(root, size=8)[0][0].shape == (13, 3, 8, 8)
    (root / "train" / "dog" / "odd.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"odd.png"):
        datasets.from_folder(root, size=8)
    root = picture_tree(tmp_path / "b", rng)
    (root / "train" / "fox").mkdir()
    with pytest.raises(ValueError, match=r"fox holds no pictures"):
        datasets.from_folder(root)
    root = picture_tree(tmp_path / "c", rng, classes=("one",))
    with pytest.raises(ValueError, match="at least 2"):
        datasets.from_folder(root)
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        datasets.from_folder(tmp_path / "nothing")
    root = picture_tree(tmp_path / "d", rng)
    (root / "test" / "owl").mkdir()
    with pytest.raises(ValueError, match=r"classes that train/ lacks: \['owl'\]"):
        datasets.from_folder(root)
    with pytest.raises(ValueError, match="give its path as data_dir"):
        datasets.load("folder")


@needs_pillow
def test_fastcnn_train_on_a_picture_tree(tmp_path, rng):
    root = picture_tree(tmp_path / "pets", rng, per_class=(10, 3), size=(12, 12))
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(
        root / "train" / "eel" / "big.png")
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "train", "--dataset", "folder",
                          "--data-dir", str(root), "--image-size", "12", "--epochs", "1",
                          "--save", str(tmp_path / "m.npz")], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "folder: 28 training, 3 validation, 9 test images" in run.stdout
    from fastcnn import ConvNet

    net = ConvNet.load(tmp_path / "m.npz")
    assert net.input_shape == (3, 12, 12) and net.class_names == ("cat", "dog", "eel")
