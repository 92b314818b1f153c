"""Augmentation on the fly: random translations (a crop of the zero-padded image) and
horizontal flips, drawn anew for every batch of training.

``fit(augment="crop,flip")`` or ``fastcnn train --augment crop,flip``. The draws of a batch
come from a generator seeded by (the run's augmentation key, epoch, batch, process), so the
same run gives the same weights, and a resumed run (the key is in the checkpoint) continues
exactly. Flips suit photos and clothes, not digits (a mirrored 2 is no 2): off unless asked.
"""

from __future__ import annotations

import numba
import numpy as np

DEFAULT_CROP = 4  # pixels of translation each way for "crop" (CIFAR's usual 4 of 32)


class Augment:
    """``crop``: each image moved by up to ``crop`` pixels each way (a random crop of the image
    padded with ``crop`` zeros); ``flip``: each image mirrored left-right with probability 1/2."""

    def __init__(self, crop=0, flip=False):
        if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 0:
            raise ValueError(f"crop must be a whole number of pixels >= 0, got {crop!r}")
        if not isinstance(flip, (bool, np.bool_)):
            raise TypeError(f"flip must be True or False, got {flip!r}")
        self.crop, self.flip = int(crop), bool(flip)

    @classmethod
    def parse(cls, spec):
        """None, an ``Augment``, or text: "crop", "crop=2", "flip", "crop,flip", "none"."""
        if spec is None or isinstance(spec, Augment):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"augment must be a string such as 'crop,flip' or an Augment, got "
                            f"{type(spec).__name__}")
        crop, flip = 0, False
        for part in (p.strip() for p in spec.split(",")):
            name, _, value = part.partition("=")
            if name == "crop":
                try:
                    crop = int(value) if value else DEFAULT_CROP
                except ValueError:
                    raise ValueError(f"augment: crop={value!r} is not a whole number of "
                                     f"pixels") from None
            elif name == "flip" and not value:
                flip = True
            elif name in ("none", "") and not value:
                continue
            else:
                raise ValueError(f"augment: unknown {part!r}; expected 'crop', 'crop=N', "
                                 f"'flip' or 'none', comma-separated")
        made = cls(crop, flip)
        return made if made else None

    def __bool__(self):
        return bool(self.crop or self.flip)

    def __str__(self):
        parts = ([f"crop={self.crop}"] if self.crop else []) + (["flip"] if self.flip else [])
        return ",".join(parts) or "none"

    def __repr__(self):
        return f"Augment(crop={self.crop}, flip={self.flip})"

    def __eq__(self, other):
        return isinstance(other, Augment) and (self.crop, self.flip) == (other.crop, other.flip)

    def __hash__(self):
        return hash((self.crop, self.flip))

    def check(self, shape):
        """ValueError unless images of per-sample ``shape`` (C, H, W) can take it."""
        if self.crop and self.crop >= min(shape[1], shape[2]):
            raise ValueError(f"augment crop={self.crop} moves {shape[1]}x{shape[2]} images by "
                             f"their whole size; use fewer pixels")

    def apply(self, batch, rng, out=None):
        """The batch (N, C, H, W), each image moved and/or mirrored as drawn from ``rng``;
        written to ``out`` (another array of the batch's shape and dtype) if given."""
        n, c, h, w = batch.shape
        out = np.empty_like(batch) if out is None else out[:n]
        k = self.crop
        dy = rng.integers(-k, k + 1, n, dtype=np.int64) if k else np.zeros(n, np.int64)
        dx = rng.integers(-k, k + 1, n, dtype=np.int64) if k else np.zeros(n, np.int64)
        mirror = rng.random(n) < 0.5 if self.flip else np.zeros(n, bool)
        _move(batch, dy, dx, mirror, out)
        return out


@numba.njit(cache=True, nogil=True)
def _move(batch, dy, dx, mirror, out):
    """out[i, :, r, s] = batch[i, :, r + dy[i], s' + dx[i]] where that lies in the image, else 0
    (the zero padding a move uncovers); s' = w - 1 - s for a mirrored image, s otherwise.
    Compiled (and without the GIL, so that it runs beside the training step's kernels): a
    batch's copies in NumPy cost a tenth of a small model's step."""
    n, c, h, w = batch.shape
    for i in range(n):
        for ch in range(c):
            for r in range(h):
                source = r + dy[i]
                for s in range(w):
                    col = (w - 1 - s if mirror[i] else s) + dx[i]
                    inside = 0 <= source < h and 0 <= col < w
                    out[i, ch, r, s] = batch[i, ch, source, col] if inside else 0
