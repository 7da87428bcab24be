"""What the evaluation commands share: face crops and the loaders built on them.

``evaluate`` and ``evaluate_landmarks`` read a list of image files through
:class:`Loader` (or :class:`DatasetLoader` for a built dataset), decoded in
threads by :mod:`progsr_jax.data.loading` (re-exported here:
:func:`iter_loaded`, :func:`loaded_batches`).

Landmark crops (the unaligned-face setting): a square of side
``crop_scale`` x the larger side of the 68 landmarks' bounding box, centred
``crop_shift`` x side above the box centre (:func:`landmark_box`), black
outside the photo (:func:`crop_square`); the points come from the 300-W
``.pts`` file beside each image (:func:`read_landmarks`).
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from progsr_jax import data
from progsr_jax.data.loading import (  # noqa: F401 - re-exported for the commands
    iter_loaded, loaded_batches)
from progsr_jax.errors import UserError

#: Landmark crops imitate the framing of the paper's CelebA crops (178x178 of
#: the aligned images).  Measured with the released distilled FAN on 128
#: CelebA validation images at 64x64: the larger side of the 68 landmarks'
#: bounding box is 0.52 of the crop side (median) and the box centre sits at
#: (0.50, 0.67) of the crop.  So: side = 1.9 x that larger side, and the crop
#: is centred 0.17 x side above the box centre.
DEFAULT_CROP_SCALE = 1.9
DEFAULT_CROP_SHIFT = 0.17
#: The crops :func:`crop_box` places.
BOX_CROPS = ("landmarks", "square", "celeba")


# --------------------------------------------------------- landmark crops
def read_landmarks(image_path: str) -> np.ndarray:
    """The 68 (x, y) points of ``<image>.pts`` beside an image; UserError-free.

    Raises ``ValueError`` (caught by the callers as "skip this file") when
    there is no readable ``.pts`` file.
    """
    from progsr_jax.landmarks import read_pts

    pts_path = os.path.splitext(image_path)[0] + ".pts"
    if not os.path.isfile(pts_path):
        raise ValueError("no .pts landmark file beside the image")
    try:
        pts = np.asarray(read_pts(pts_path), np.float64)
    except Exception as e:  # noqa: BLE001 - any parse problem skips the file
        raise ValueError(f"unreadable .pts file ({e})") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.all(np.isfinite(pts)):
        raise ValueError(f"bad .pts file (points of shape {pts.shape})")
    return pts


def landmark_box(pts: np.ndarray, scale: float = DEFAULT_CROP_SCALE,
                 shift: float = DEFAULT_CROP_SHIFT) -> tuple[int, int, int]:
    """(left, top, side) of the square crop around 2-D points, in integer pixels.

    Side = ``round(scale * max(w, h))`` of the points' bounding box (at least
    1); the crop centre is the box centre moved up by ``shift * side`` (the
    face sits below the centre of a CelebA crop).
    """
    pts = np.asarray(pts, np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    side = max(1, int(round(scale * float(max(hi - lo)))))
    cx, cy = (lo + hi) / 2.0
    cy = cy - shift * side
    left = int(math.floor(cx - side / 2.0 + 0.5))
    top = int(math.floor(cy - side / 2.0 + 0.5))
    return left, top, side


def crop_square(img: Image.Image, left: int, top: int, side: int) -> Image.Image:
    """``img`` cropped to the square; parts outside the photo are black."""
    return img.crop((left, top, left + side, top + side))


def crop_box(w: int, h: int, crop: str, pts: np.ndarray | None,
             crop_scale: float = DEFAULT_CROP_SCALE,
             crop_shift: float = DEFAULT_CROP_SHIFT) -> tuple[int, int, int]:
    """(left, top, side) of the square crop of a w x h image."""
    if crop == "landmarks":
        if pts is None:
            raise ValueError("--crop=landmarks needs a .pts file")
        return landmark_box(pts, crop_scale, crop_shift)
    if crop == "square":
        side = min(w, h)
    elif crop == "celeba":
        side = 178
    else:
        raise UserError(f"unknown --crop={crop}; expected one of {', '.join(BOX_CROPS)}")
    if side <= w and side <= h:  # torchvision CenterCrop placement (Python round)
        return int(round((w - side) / 2.0)), int(round((h - side) / 2.0)), side
    # smaller than the crop: torchvision pads (side - w) // 2 on the left/top
    left = -((side - w) // 2) if side > w else int(round((w - side) / 2.0))
    top = -((side - h) // 2) if side > h else int(round((h - side) / 2.0))
    return left, top, side


def map_points(pts: np.ndarray, left: int, top: int, side: int, size: int) -> np.ndarray:
    """Points of the photo -> the ``size`` x ``size`` resized crop (pixel centres at integers)."""
    pts = np.asarray(pts, np.float64)
    return (pts - np.array([left, top], np.float64) + 0.5) * (size / side) - 0.5


class Loader:
    """Decodes and preprocesses one file: ``(path) -> {128, 64, 32, 16: uint8}``."""

    def __init__(self, crop: str, crop_scale: float = DEFAULT_CROP_SCALE,
                 crop_shift: float = DEFAULT_CROP_SHIFT, min_size: int = 32):
        self.crop, self.crop_scale, self.crop_shift = crop, crop_scale, crop_shift
        self.min_size = min_size

    def __call__(self, path: str) -> dict[int, np.ndarray]:
        img = data.open_image(path, min_size=self.min_size)
        if self.crop == "landmarks":
            left, top, side = landmark_box(read_landmarks(path), self.crop_scale,
                                           self.crop_shift)
            return data.preprocess(crop_square(img, left, top, side), crop="none")
        return data.preprocess(img, crop=self.crop)


class DatasetLoader:
    """``(name) -> {128, 64, 32, 16: uint8}`` of an already built dataset, by file name."""

    def __init__(self, ds):
        self.ds = ds
        self.index = {name: i for i, name in enumerate(ds.files)}

    def __call__(self, name: str) -> dict[int, np.ndarray]:
        i = self.index[name]
        return {r: np.asarray(self.ds.images[r][i]) for r in data.RESOLUTIONS}


def rel_path(path: str, root: str) -> str:
    """``path`` relative to ``root`` when it lies under it, else unchanged."""
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
