"""Predicting your own images: a picture file (PNG, JPEG, ...; needs Pillow, ``pip install -e
".[image]"``) or an array, brought to the model's input the way the training images were made.

MNIST's digits were made like this (LeCun et al.): white ink on black, the digit's bounding box
fitted in 20x20 pixels keeping its aspect ratio (anti-aliased, hence grey levels), then placed in a
28x28 field so that its centre of mass sits at the centre. ``to_model_input`` does the same, after
finding which side is ink: a photo of a dark pen on light paper is inverted (the paper's level,
read from the picture's border, becomes black). Fashion-MNIST's products fill their 28x28 field
instead (``style="fashion"``); ``style="none"`` only scales the whole picture to 28x28.
Photos for a colour model (CIFAR-10's 3x32x32, say) are scaled whole to its input, in colour
(``style="photo"``, the only style a 3-channel model takes).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


class AmbiguousBackground(UserWarning):
    """A picture whose border is partly dark and partly light: which side is ink was a guess."""


INK_STYLES = ("digit", "fashion", "none")  # to_model_input's: grey pictures of ink
STYLES = (*INK_STYLES, "photo")
# Pictures are refused before they are decoded when larger than this: a 24-megapixel camera's
# photo fits, and reading one takes about 1 GB at its peak. A side longer than MAX_SIDE is
# refused too (a 3 x 13,000,000 strip is within MAX_PIXELS but not a picture of anything).
MAX_PIXELS = 25_000_000
MAX_SIDE = 30_000


def read_gray(path):
    """The picture at ``path`` as a (H, W) float32 array in [0, 1], 1 = white: turned upright
    as its EXIF orientation says, transparent pixels on white, every bit of a 16- or 32-bit
    grey picture kept. Its size is checked before it is decoded."""
    return _read(path, _gray)


def read_rgb(path):
    """The picture at ``path`` as a (H, W, 3) float32 array in [0, 1] (red, green, blue):
    upright, transparent pixels on white, grey pictures as equal channels; checked like
    ``read_gray``."""
    return _read(path, _rgb)


def _read(path, decode):
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError as e:
        raise ImportError('reading picture files needs Pillow: pip install -e ".[image]" (or '
                          "pip install Pillow)") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no picture at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                raise ValueError(f"{path} is {w}x{h} pixels; fastcnn reads pictures of at most "
                                 f"{MAX_PIXELS:,} pixels and {MAX_SIDE:,} on a side: scale it "
                                 "down first")
            gray = decode(ImageOps.exif_transpose(im), path)
    except Image.DecompressionBombError as e:  # Pillow's own limit, met while opening
        raise ValueError(f"{path} is larger than fastcnn reads (at most {MAX_PIXELS:,} pixels "
                         f"and {MAX_SIDE:,} on a side): {e}") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not a picture Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt files
        raise ValueError(f"{path} could not be read as a picture: {e}") from None
    return gray


def _gray(im, path):
    """A decoded picture as grey floats in [0, 1]."""
    from PIL import Image

    if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # 16-bit PNG, 32-bit TIFF, ...
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{path} holds NaN or infinite pixel values")
        return _unit_range(a, 65535 if im.mode.startswith("I;16") else None).astype(np.float32)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels count as the background: composite on white
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255


def _rgb(im, path):
    """A decoded picture as red, green and blue floats in [0, 1]."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # deep grey: every bit, as grey
        return np.repeat(_gray(im, path)[:, :, None], 3, axis=2)
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255


def photo_input(picture, shape):
    """A picture, (H, W) grey or (H, W, 3) colour, in [0, 1] or uint8, scaled whole (area
    averaging) to a model input of ``shape`` (C, H, W): colour for 3 channels, grey for 1."""
    a = np.asarray(picture)
    if a.dtype == np.uint8:
        a = a / 255
    elif a.dtype.kind != "f" or not np.isfinite(a).all():
        raise ValueError("a picture must be uint8 or finite floats in [0, 1]")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3) or min(a.shape[:2]) < 2:
        raise ValueError(f"a picture must be (H, W) grey or (H, W, 3) colour, at least 2x2, "
                         f"got shape {a.shape}")
    c, h, w = shape
    if c not in (1, 3):
        raise ValueError(f"pictures become 1- or 3-channel inputs; the model takes {c}")
    if c == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif c == 1 and a.shape[2] == 3:
        a = a @ np.array([0.299, 0.587, 0.114])[:, None]  # ITU-R 601 luma, as Pillow's "L"
    out = np.stack([_resize_area(a[:, :, k], h, w) for k in range(c)])
    return np.clip(out, 0, 1).astype(np.float32)


def _unit_range(a, top=None):
    """Values of a deep grey picture in [0, 1]: divided by its format's white (``top``), or by
    the first of 1, 255, 65535 that holds them all; values outside those, stretched from their
    least to their largest."""
    lo, hi = float(a.min()), float(a.max())
    if top is None:
        top = next((t for t in (1, 255, 65535) if lo >= 0 and hi <= t), None)
    if top is not None:
        return a / top
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _resize_area(img, out_h, out_w):
    """Resize by area averaging: each output pixel is the mean of the input area it covers
    (a box filter, exact for any ratio; upscaling repeats pixels)."""
    def weights(n_in, n_out):
        # overlap of output cell [o, o+1) * n_in/n_out with input cell [i, i+1)
        edges = np.arange(n_out + 1) * (n_in / n_out)
        lo, hi = edges[:-1, None], edges[1:, None]
        i = np.arange(n_in)[None, :]
        overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)
        return overlap / overlap.sum(axis=1, keepdims=True)

    return weights(img.shape[0], out_h) @ img @ weights(img.shape[1], out_w).T


def _ink(gray, invert):
    """Ink as light-on-dark in [0, 1], the background at 0 (its level read from the border)."""
    gray = np.asarray(gray, dtype=np.float64)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if invert == "auto":
        invert = background > 0.5
        dark = float(np.mean(border < 0.5))
        if 0.2 <= dark <= 0.8:  # a border of both: a desk's edge in the frame, a shadow
            warnings.warn(AmbiguousBackground(
                f"the picture's border is {dark:.0%} dark and {1 - dark:.0%} light: took it as "
                f"{'dark ink on light paper' if invert else 'light ink on a dark background'}; "
                f"crop the picture to the paper, or say which with --invert yes/no "
                f"(invert=True/False)"), stacklevel=3)
    if invert:
        gray, background = 1 - gray, 1 - background
    peak = float(gray.max())
    if peak - background < 0.1:
        raise ValueError("the picture holds no ink: nothing stands out from its background")
    return np.clip((gray - background) / (peak - background), 0, 1)


def _crop_to_ink(ink, threshold=0.2):
    rows = np.flatnonzero((ink > threshold).any(axis=1))
    cols = np.flatnonzero((ink > threshold).any(axis=0))
    return ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


def _fit(ink, box):
    """Scale so the longer side is ``box`` pixels, keeping the aspect ratio."""
    h, w = ink.shape
    scale = box / max(h, w)
    return _resize_area(ink, max(1, round(h * scale)), max(1, round(w * scale)))


def _place(img, size, centre_of_mass):
    """Put ``img`` in a size x size black field: its centre of mass (or its middle) at the
    field's centre, clipped at the edges."""
    h, w = img.shape
    if centre_of_mass and img.sum() > 0:
        cy = float((img.sum(axis=1) * np.arange(h)).sum() / img.sum())
        cx = float((img.sum(axis=0) * np.arange(w)).sum() / img.sum())
    else:
        cy, cx = (h - 1) / 2, (w - 1) / 2
    top, left = round((size - 1) / 2 - cy), round((size - 1) / 2 - cx)
    field = np.zeros((size, size))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, size), min(left + w, size)
    field[y0:y1, x0:x1] = img[y0 - top: y1 - top, x0 - left: x1 - left]
    return field


def to_model_input(gray, style="digit", invert="auto", size=28):
    """A (H, W) grey picture in [0, 1] (1 = white, or uint8) as a (1, size, size) float32 input:
    light ink on black, prepared as MNIST's digits (``style="digit"``), Fashion-MNIST's products
    (``"fashion"``: fitted in the whole field, centred) or just scaled (``"none"``). invert:
    "auto" (from the border: light paper is inverted), True or False."""
    if style not in INK_STYLES:
        raise ValueError(f"style must be one of {INK_STYLES} (photos: photo_input), got "
                         f"{style!r}")
    if invert not in ("auto", True, False):
        raise ValueError(f"invert must be 'auto', True or False, got {invert!r}")
    gray = np.asarray(gray)
    if gray.ndim != 2 or min(gray.shape) < 2:
        raise ValueError(f"a picture must be a 2-D grey array of at least 2x2, got shape "
                         f"{gray.shape}")
    if gray.dtype == np.uint8:
        gray = gray / 255
    elif gray.dtype.kind != "f" or not np.isfinite(gray).all():
        raise ValueError("a picture must be uint8 or finite floats in [0, 1]")
    ink = _ink(gray, invert)
    if style == "none":
        out = _resize_area(ink, size, size)
    elif style == "fashion":
        out = _place(_fit(_crop_to_ink(ink, 0.05), size), size, centre_of_mass=False)
    else:
        out = _place(_fit(_crop_to_ink(ink), round(size * 20 / 28)), size, centre_of_mass=True)
    return np.clip(out, 0, 1).astype(np.float32)[None]


def top_classes(net, image, class_names=None, top=3, style="digit", invert="auto"):
    """The ``top`` most likely classes for one picture (a path, or a grey or colour array) as
    a list of (class index, class name, probability), most likely first. A model of 3-channel
    input takes the picture as a photo, whatever ``style`` says."""
    return rank(net, model_input(net, image, style, invert), class_names, top)


def rank(net, x, class_names=None, top=3):
    """``top_classes`` of a prepared input ``x`` (C, H, W)."""
    proba = net.predict_proba(x[None].astype(net.dtype))[0]
    names = [str(i) for i in range(len(proba))] if class_names is None else list(class_names)
    order = np.argsort(-proba, kind="stable")[: max(1, top)]
    return [(int(k), names[k], float(proba[k])) for k in order]


def model_input(net, image, style="digit", invert="auto"):
    """One picture (a path, or an array) prepared as the model's input (C, H, W) float32 in
    [0, 1]: what ``top_classes`` feeds the model (``fastcnn predict --show-input`` saves it)."""
    shape = tuple(net.input_shape) if net.input_shape is not None else (1, 28, 28)
    if shape[0] == 3:
        style = "photo"
    if style == "photo":
        picture = read_rgb(image) if isinstance(image, str | Path) else image
    else:
        picture = read_gray(image) if isinstance(image, str | Path) else image
    try:
        if style == "photo":
            x = photo_input(picture, shape)
        else:
            x = to_model_input(picture, style=style, invert=invert, size=shape[1])
    except ValueError as e:
        if not isinstance(image, str | Path):
            raise
        raise ValueError(f"{image}: {e}") from None
    if net.input_shape is not None and tuple(net.input_shape) != x.shape:
        raise ValueError(f"the model expects inputs of shape {tuple(net.input_shape)}, the "
                         f"prepared picture is {x.shape}")
    return x


def save_input(x, path):
    """A prepared input (C, H, W) in [0, 1] as a PNG (grey, or colour for 3 channels),
    written atomically."""
    from PIL import Image

    from . import atomic

    a = np.clip(np.asarray(x) * 255 + 0.5, 0, 255).astype(np.uint8)
    im = Image.fromarray(a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0)))
    atomic.atomic_write(path, lambda f: im.save(f, format="PNG"))
