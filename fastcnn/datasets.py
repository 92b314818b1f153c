"""Datasets: MNIST, Fashion-MNIST, CIFAR-10 and the real-MNIST sample shipped inside the package.

``load(name)`` returns ``((x_train, y_train), (x_test, y_test))``: images (N, C, H, W), float32
in [0, 1] (or the raw uint8 with ``raw=True``), labels int64: 1x28x28 grey digits and clothes,
3x32x32 colour photos for CIFAR-10 (its binary version, read from the archive without
extracting it; never the pickled one).

Full datasets are looked for in ``$FASTCNN_DATA/<name>/`` (default ``~/.cache/fastcnn/<name>/``),
then in known system copies, then downloaded from the standard mirrors (HTTPS ones first) into
the first folder. A download is capped at the file's published size, every read has a timeout
and the whole file a deadline, and it is checked against its published MD5 before it is renamed
into place: a failed download leaves no partial file and no empty folder behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from . import atomic
from .idx import read_idx

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
SAMPLE_DIR = Path(__file__).parent / "data" / "mnist-sample"


class DatasetUnavailable(OSError):
    """A dataset is neither on disk nor downloadable; the message says where to put its files."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    # role -> (file name, MD5 and size in bytes of the file as the mirrors serve it)
    files: dict
    mirrors: tuple = ()  # base URLs, tried in order (HTTPS ones first, see fetch)
    system_dirs: tuple = ()  # folders where a distribution may have installed the files
    system_package: str = ""  # the Debian package that installs them there
    # files (relative to the dataset's folder) that stand in for the download when present
    # (CIFAR-10's archive, extracted)
    extracted: tuple = ()


_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542),
}
# Every read waits at most READ_TIMEOUT seconds; a whole file gets DEADLINE_BASE seconds plus
# its size at MIN_RATE bytes per second (a mirror that trickles a byte at a time is given up).
READ_TIMEOUT = 30.0
DEADLINE_BASE = 60.0
MIN_RATE = 32 * 1024

DATASETS = {
    "mnist": DatasetSpec(
        "mnist",
        _MNIST_FILES,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        {
            "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                             26421880),
            "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                             29515),
            "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                            4422102),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                            5148),
        },
        mirrors=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        system_package="dataset-fashion-mnist",
    ),
}
# CIFAR-10, binary version: one archive of six files of records (a label byte, then 32x32 red,
# green and blue planes), five of training images and one of test images, 10,000 each.
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_RECORD = 1 + 3 * 32 * 32
DATASETS["cifar-10"] = DatasetSpec(
    "cifar-10",
    {"archive": ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", 170052171)},
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    extracted=tuple(f"{CIFAR_DIR}/{name}" for name in (*CIFAR_TRAIN, CIFAR_TEST)),
)
NAMES = ("mnist-sample", *DATASETS, "folder")
_DIGITS = tuple(str(d) for d in range(10))
CLASS_NAMES = {
    "mnist-sample": _DIGITS,
    "mnist": _DIGITS,
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "cifar-10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"),
}


def class_names(name, data_dir=None):
    """The names of a dataset's classes, in label order (``"fashion-mnist"``: T-shirt/top, ...;
    ``"folder"``: the class folders of the picture tree ``data_dir``)."""
    if name == "folder":
        return folder_classes(_tree(data_dir))
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {NAMES}")
    return CLASS_NAMES[name]


def data_home() -> Path:
    """Root of the dataset cache: ``$FASTCNN_DATA``, else ``~/.cache/fastcnn``."""
    return Path(os.environ.get("FASTCNN_DATA") or Path.home() / ".cache" / "fastcnn")


def load(name, data_dir=None, download=True, raw=False, size=None):
    """Load a dataset by name: ``"mnist-sample"``, ``"mnist"``, ``"fashion-mnist"`` or
    ``"cifar-10"``; or ``"folder"``: your picture tree at ``data_dir`` (see ``from_folder``,
    which ``size`` is passed to).

    data_dir: the folder holding ``<name>/`` (default ``data_home()``); download: fetch what is
    missing; raw: keep images as uint8 0..255 instead of float32 0..1.
    """
    if name == "folder":
        train, test = from_folder(_tree(data_dir), size=size)
        if not raw:
            train, test = ((x.astype(np.float32) / np.float32(255), y) for x, y in (train, test))
        return train, test
    if name == "mnist-sample":
        folder = SAMPLE_DIR
        files = {role: fname for role, (fname, *_) in _MNIST_FILES.items()}
    elif name == "cifar-10":
        return _read_cifar(locate(DATASETS[name], data_dir, download), raw)
    elif name in DATASETS:
        spec = DATASETS[name]
        folder = locate(spec, data_dir, download)
        files = {role: _existing(folder, fname).name
                 for role, (fname, *_) in spec.files.items()}
    else:
        raise ValueError(f"Unknown dataset {name!r}. Expected one of {NAMES}.")
    train = _read_split(folder / files["train_images"], folder / files["train_labels"], raw)
    test = _read_split(folder / files["test_images"], folder / files["test_labels"], raw)
    return train, test


def _existing(folder, fname):
    """``fname`` in ``folder``, or its decompressed twin (name without .gz); None if neither."""
    for candidate in (folder / fname, folder / fname.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder, spec):
    folder = Path(folder)
    if spec.extracted and all((folder / f).is_file() for f in spec.extracted):
        return True
    return all(_existing(folder, f) for f, *_ in spec.files.values())


def locate(spec, data_dir=None, download=True) -> Path:
    """The folder holding all of ``spec``'s files: the cache, a system copy, or a fresh download."""
    cache = Path(data_dir or data_home()) / spec.name
    for folder in (cache, *map(Path, spec.system_dirs)):
        if _complete(folder, spec):
            return folder
    if not download:
        raise DatasetUnavailable(_missing_message(spec, cache, "downloading is turned off"))
    fetch(spec, cache)
    return cache


def fetch(spec, dest, progress=None) -> None:
    """Download every file of ``spec`` missing from ``dest``, trying each mirror in turn, HTTPS
    mirrors first.

    A file is written to a temporary name, capped at its published size, its MD5 checked, and
    only then renamed into place: a failed or corrupted download leaves nothing behind, and the
    folders this call created are removed again if they are empty. Temporary files left by a
    download that was killed are removed by the next one.
    """
    dest = Path(dest)
    created = _missing_folders(dest)
    dest.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty() if progress is None else progress
    mirrors = sorted(spec.mirrors, key=lambda url: not url.startswith("https://"))
    try:
        for fname, md5, size in spec.files.values():
            if _existing(dest, fname):
                continue
            errors = []
            for base in mirrors:
                url = base.rstrip("/") + "/" + fname
                try:
                    _download(url, dest / fname, md5, size, progress)
                    break
                except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
                    errors.append(f"{url}: {e}")
            else:
                tried = "; ".join(errors) or "no mirrors are known"
                raise DatasetUnavailable(_missing_message(spec, dest, f"download failed ({tried})"))
    except BaseException:
        for folder in created:  # deepest first; only the empty ones we made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _missing_folders(folder):
    """The folders from ``folder`` up that do not exist yet, deepest first."""
    missing = []
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _download(url, path, md5, size, progress):
    deadline = time.monotonic() + DEADLINE_BASE + size / MIN_RATE
    with atomic.temporary_beside(path, suffix=".part") as (out, tmp):
        digest = hashlib.md5()
        got = 0
        with urllib.request.urlopen(url, timeout=READ_TIMEOUT) as resp:
            announced = resp.headers.get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) != size:
                raise ValueError(f"the mirror announces {announced} bytes, the file has {size}")
            bar = _bar(size, path.name, progress)
            try:
                while chunk := resp.read1(1 << 16):
                    got += len(chunk)
                    if got > size:
                        raise ValueError(f"the mirror sent more than the file's {size} bytes")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"gave up after {DEADLINE_BASE + size / MIN_RATE:.0f}"
                                           f" s with {got} of {size} bytes")
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
        if got != size:
            raise ValueError(f"the download ended after {got} of {size} bytes")
        if digest.hexdigest() != md5:
            raise ValueError(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}")
        atomic.commit(out, tmp, path)


def _bar(total, name, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"downloading {name}", unit="B", unit_scale=True,
                leave=False, disable=not enabled, file=sys.stderr)


def _missing_message(spec, folder, why):
    names = ", ".join(f for f, *_ in spec.files.values())
    text = (f"could not get the {spec.name} dataset: {why}. Put {names} (gzip or uncompressed) "
            f"in {folder}/, or set FASTCNN_DATA to a folder that holds {spec.name}/.")
    if spec.system_package and spec.system_dirs and shutil.which("apt-get"):
        text += (f" On this system `apt-get install {spec.system_package}` installs it in "
                 f"{spec.system_dirs[0]}/, where fastcnn finds it.")
    return text


def _read_split(images_path, labels_path, raw):
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (N, H, W), got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: expected uint8 labels (N,), got "
                         f"{labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path.name} holds {len(images)} images but "
                         f"{labels_path.name} holds {len(labels)} labels ({labels_path.parent})")
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must be 0..9, found {labels.max()}")
    x = images[:, None, :, :]
    if not raw:
        x = x.astype(np.float32) / np.float32(255)
    return x, labels.astype(np.int64)


def _read_cifar(folder, raw):
    """CIFAR-10's splits from ``folder``: the extracted files if all are there, else straight
    from the archive (only its six regular files, by name; nothing is written or unpickled)."""
    folder = Path(folder)
    extracted = folder / CIFAR_DIR
    if all((extracted / name).is_file() for name in (*CIFAR_TRAIN, CIFAR_TEST)):
        def read(name):
            return (extracted / name).read_bytes(), extracted / name
        return _cifar_splits(read, raw)
    archive = folder / DATASETS["cifar-10"].files["archive"][0]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            def read(name):
                where = f"{archive} member {CIFAR_DIR}/{name}"
                try:
                    member = tar.getmember(f"{CIFAR_DIR}/{name}")
                except KeyError:
                    raise ValueError(f"{archive}: no {CIFAR_DIR}/{name} in the archive") from None
                if not member.isfile() or member.size > 10**9:
                    raise ValueError(f"{where}: not a regular file of records")
                return tar.extractfile(member).read(member.size + 1), where
            return _cifar_splits(read, raw)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{archive}: not a readable CIFAR-10 archive (truncated or corrupt?): "
                         f"{e}") from None


def _cifar_splits(read, raw):
    def split(names):
        parts = [_cifar_records(*read(name)) for name in names]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return (x if raw else x.astype(np.float32) / np.float32(255)), y
    return split(CIFAR_TRAIN), split((CIFAR_TEST,))


def _cifar_records(data, where):
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) from one file's bytes."""
    if not data or len(data) % CIFAR_RECORD:
        raise ValueError(f"{where}: {len(data)} bytes is not a whole number of "
                         f"{CIFAR_RECORD}-byte records (a label byte and 32x32x3 pixels)")
    records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{where}: labels must be 0..9, found {labels.max()}")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


# -- your own pictures: a train/ and a test/ folder, each with one folder per class ------------

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _tree(data_dir):
    if data_dir is None:
        raise ValueError("the folder dataset is your picture tree: give its path as data_dir "
                         "(--data-dir), holding train/<class>/ and test/<class>/")
    return data_dir


def folder_classes(path):
    """The class names of a picture tree: the folders in ``path/train``, sorted."""
    train = Path(path) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{path} has no train/ folder: a picture tree is "
                                f"train/<class>/*.png and test/<class>/*.png")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{train} holds {len(classes)} class folder(s); a classifier needs at "
                         f"least 2 (one folder of pictures per class)")
    return tuple(classes)


def from_folder(path, size=None, channels=None):
    """Your pictures as a dataset: ``path/train/<class>/*`` and ``path/test/<class>/*`` (PNG,
    JPEG, ...; needs Pillow), labels numbered by the sorted class names (``folder_classes``).
    Returns ``((x_train, y_train), (x_test, y_test))``, uint8 images (N, C, H, W) as
    ``load(..., raw=True)`` gives. size: (H, W) (or one int) to resize every picture to;
    without it they must all have one size. channels: 1 (grey) or 3 (colour); by default 3 if
    any training picture is in colour. Each picture is turned upright as its EXIF says,
    transparency on white; an unreadable file, an empty class or a picture of another size is
    an error naming it."""
    from .predict import _read

    classes = folder_classes(path)
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
            raise ValueError(f"size must be (H, W) of positive ints or one int, got {size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    splits = {}
    for split in ("train", "test"):
        folder = Path(path) / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{path} has no {split}/ folder")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir()
                       and not p.name.startswith("."))
        if split == "test" and set(found) - set(classes):
            raise ValueError(f"{folder} has classes that train/ lacks: "
                             f"{sorted(set(found) - set(classes))}")
        files = []
        for label, name in enumerate(classes):
            pictures = sorted(p for p in (folder / name).glob("*")
                              if p.suffix.lower() in PICTURE_SUFFIXES and p.is_file()) \
                if (folder / name).is_dir() else []
            if split == "train" and not pictures:
                raise ValueError(f"{folder / name} holds no pictures "
                                 f"({', '.join(PICTURE_SUFFIXES)})")
            files += [(p, label) for p in pictures]
        splits[split] = files
    if channels is None:
        channels = 3 if any(_is_colour(p) for p, _ in splits["train"]) else 1
    first = None  # (path, shape) of the first picture: without size, all must have its shape
    out = []
    for split in ("train", "test"):
        images = []
        for p, _ in splits[split]:
            a = _read(p, lambda im, where, c=channels: _decoded(im, c, size))
            first = first or (p, a.shape)
            if a.shape != first[1]:
                raise ValueError(f"{p} is {a.shape[1]}x{a.shape[0]} pixels, {first[0]} "
                                 f"{first[1][1]}x{first[1][0]}: give size=(H, W) "
                                 f"(--image-size) to resize them all")
            images.append(a)
        x = (np.stack(images).transpose(0, 3, 1, 2) if images else
             np.zeros((0, channels, *first[1][:2]), np.uint8))
        out.append((np.ascontiguousarray(x),
                    np.array([label for _, label in splits[split]], np.int64)))
    return out[0], out[1]


def _is_colour(path):
    """Whether a picture has colour: not a grey mode, and not a palette of greys."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16"):
                return False
            if im.mode != "P":
                return True
            rgb = np.asarray(im.convert("RGB"))
            return not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    except OSError:
        return False  # read (and named) below


def _decoded(im, channels, size):
    """A decoded picture as uint8 (H, W, channels), resized to size (H, W) if given."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    im = im.convert("RGB" if channels == 3 else "L")
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a if a.ndim == 3 else a[:, :, None]
