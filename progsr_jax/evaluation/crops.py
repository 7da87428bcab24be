"""What the evaluation commands share: face crops, the threaded file loader, output folders.

``evaluate``, ``evaluate_landmarks`` and ``infer`` all read a list of image
files, decode them in threads (:func:`iter_loaded`, batched by
:func:`loaded_batches`), skip the unreadable ones with a reason, and write
into a folder checked up front (:func:`check_output`).

Landmark crops (the unaligned-face setting): a square of side
``crop_scale`` x the larger side of the 68 landmarks' bounding box, centred
``crop_shift`` x side above the box centre (:func:`landmark_box`), black
outside the photo (:func:`crop_square`); the points come from the 300-W
``.pts`` file beside each image (:func:`read_landmarks`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from progsr_jax import data
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


# ---------------------------------------------------------------- loading
def iter_loaded(files: Sequence[str], load: Callable[[str], Any], workers: int = 2,
                window: int = 64) -> Iterator[tuple[str, Any, str | None]]:
    """Yields ``(path, value, None)`` or ``(path, None, reason)`` in file order.

    Decoding runs in ``workers`` threads, at most ``window`` files ahead.
    ``data.BadImage`` (and ValueError/OSError from the landmark files) become
    a skip reason; anything else propagates.
    """
    def guarded(path):
        try:
            return load(path), None
        except (data.BadImage, ValueError, OSError) as e:
            return None, str(e) or type(e).__name__

    if workers <= 1:
        for p in files:
            yield (p,) + guarded(p)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        it = iter(files)
        pending = collections.deque((p, ex.submit(guarded, p))
                                    for p in itertools.islice(it, window))
        while pending:
            p, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(guarded, nxt)))
            yield (p,) + fut.result()


def loaded_batches(files: Sequence[str], load: Callable[[str], Any], batch_size: int,
                   skipped: list[tuple[str, str]], workers: int = 2, desc: str = "",
                   progress: bool = True) -> Iterator[list[tuple[str, Any]]]:
    """Yields lists of up to ``batch_size`` ``(path, value)`` in file order, with a progress bar.

    Files :func:`iter_loaded` cannot use are appended to ``skipped`` as
    ``(path, reason)``; only the last batch is smaller.
    """
    from tqdm import tqdm

    batch: list[tuple[str, Any]] = []
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress,
              file=sys.stderr) as bar:
        for path, value, reason in iter_loaded(files, load, workers):
            bar.update(1)
            if reason is not None:
                skipped.append((path, reason))
                continue
            batch.append((path, value))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


# ---------------------------------------------------------------- outputs
def make_writable_dir(path: str, name: str) -> None:
    """Creates ``path`` and writes a probe file; UserError ``cannot write to {name}``."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {name}: {e.strerror or e}") from None


def check_output(path: str | None) -> str:
    """The absolute ``--output`` folder, created and writable; UserError otherwise."""
    if not path:
        raise UserError("--output=DIR is required")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output exists and is not a folder: {path}")
    make_writable_dir(path, f"--output={path}")
    return path


def rel_path(path: str, root: str) -> str:
    """``path`` relative to ``root`` when it lies under it, else unchanged."""
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
