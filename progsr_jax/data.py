"""Data pipeline: decoding, the paper's preprocessing, caching and batching.

Overview
--------
1. :func:`list_files` finds the image files of a split (CelebA official or
   Kaggle layout, or any folder of images).
2. :func:`open_image` decodes one file into an RGB PIL image, refusing
   unusable files with :class:`BadImage` (never a raw PIL exception).
3. :func:`preprocess` applies the paper's preprocessing: center crop 178x178,
   resize to 128x128, then sequential bilinear downsampling 128 -> 64 -> 32 -> 16.
4. :func:`build_dataset` does 1-3 once for every file (optionally in a process
   pool), writes the four resolutions as ``.npy`` files into a cache folder and
   returns a :class:`Dataset` whose arrays are memory-mapped from that cache.
   The next run with the same files opens the cache directly.
5. :func:`batch_indices` / :func:`get_batch` give a deterministic, stateless
   data order (a batch is a pure function of ``(seed, step)``), so resuming
   training at any step reproduces the exact batches.  :class:`Prefetcher`
   produces the batches in a background thread.

Pixel values in batches are float32 in ``[-1, 1]`` (``uint8 / 127.5 - 1``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from progsr_jax.errors import UserError

RESOLUTIONS = (16, 32, 64, 128)

#: Bump whenever decoding or preprocessing changes: it is part of the cache key,
#: so old caches are ignored instead of silently reused.
PREPROCESS_VERSION = 1

#: Images with more pixels than this are refused as possible decompression
#: bombs (same value as PIL's default ``Image.MAX_IMAGE_PIXELS``).  Read at
#: call time, so tests and users may change it.
MAX_IMAGE_PIXELS = 89_478_485

#: Side of the paper's CelebA center crop.
CELEBA_CROP = 178

#: Files with these extensions (case-insensitive) are images for source="folder".
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")

SOURCES = ("synthetic", "celeba", "folder", "tfds")
CROPS = ("celeba", "square", "none")

# CelebA partition ids per split name.
_CELEBA_SPLITS = {
    "train": (0,),
    "val": (1,),
    "valid": (1,),
    "validation": (1,),
    "test": (2,),
    "all": (0, 1, 2),
}
_FOLDER_SPLITS = ("all", "train", "test")

# Where the two known CelebA layouts keep their images and partition file,
# relative to the data root (first existing candidate wins).
_CELEBA_IMAGE_DIRS = (
    os.path.join("Img", "img_align_celeba"),               # official (Google Drive)
    os.path.join("img_align_celeba", "img_align_celeba"),  # Kaggle
    "img_align_celeba",                                     # Kaggle, flattened
)
_CELEBA_PARTITION_FILES = (
    os.path.join("Eval", "list_eval_partition.txt"),  # official
    "list_eval_partition.csv",                         # Kaggle
    "list_eval_partition.txt",
    os.path.join("Eval", "list_eval_partition.csv"),
)

# How many skipped files the summary line names (the rest are only counted).
_SUMMARY_NAMES = 10
# Below this many files, decoding runs in-process even if num_workers > 0:
# starting worker processes would cost more than it saves.
_MIN_FILES_FOR_POOL = 64


# --------------------------------------------------------------------------
# Decoding one image
# --------------------------------------------------------------------------


class BadImage(Exception):
    """An image file that cannot be used; ``str(exc)`` is a short reason."""


def _to_uint8_from_int(arr: np.ndarray, mode: str) -> np.ndarray:
    """Maps an integer grayscale array (16-bit or 32-bit) to uint8 by scaling.

    16-bit modes (``I;16*``) and mode ``I`` whose values fit 0..65535 are scaled
    with ``v * 255 / 65535`` (i.e. 65535 -> 255, not clipped at 255).  Mode
    ``I`` data outside 0..65535 (genuine 32-bit) is stretched linearly from its
    own min..max to 0..255.
    """
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
        out = np.round(arr * (255.0 / 65535.0))
    elif hi > lo:
        out = np.round((arr - lo) * (255.0 / (hi - lo)))
    else:
        out = np.zeros_like(arr)
    return np.clip(out, 0, 255).astype(np.uint8)


def _to_uint8_from_float(arr: np.ndarray) -> np.ndarray:
    """Maps a float image (mode ``F``) to uint8.

    Values already in [0, 1] are multiplied by 255; anything else is stretched
    linearly from its min..max to 0..255.  NaN/inf become 0.
    """
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        out = arr * 255.0
    elif hi > lo:
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(arr)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _composite_on_black(img: Image.Image) -> Image.Image:
    """RGBA -> RGB by compositing on a black background (rgb * alpha / 255)."""
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (0, 0, 0))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts a loaded PIL image of any mode to RGB.

    * ``RGB``: unchanged.  ``L``, ``1``, ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV``,
      ``LAB``: PIL's own conversion (``1`` gives 0/255).
    * With transparency (``LA``, ``PA``, ``RGBA``, ``RGBa``, ``La`` and ``P``
      with a transparent palette entry): **composited on black**, i.e. each
      pixel becomes ``rgb * alpha / 255``.  Fully transparent areas are black
      whatever colour the file stores under them.
    * ``I;16``, ``I;16B``, ``I;16L``, ``I``: scaled to 8 bit (see
      :func:`_to_uint8_from_int`), then gray -> RGB.  ``F``: see
      :func:`_to_uint8_from_float`.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        has_alpha = "transparency" in img.info
        return _composite_on_black(img) if has_alpha else img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_on_black(img)
    if mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N, ...
        gray = _to_uint8_from_int(np.asarray(img), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        gray = _to_uint8_from_float(np.asarray(img))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "LAB":
        # PIL has no direct LAB -> RGB conversion; go through an ICC transform.
        from PIL import ImageCms

        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(img, transform)
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, HSV


def open_image(path: str | os.PathLike, min_size: int = 32,
               max_pixels: int | None = None) -> Image.Image:
    """Opens an image file and returns a fully decoded RGB PIL image.

    The file is used as stored: EXIF orientation is not applied (the same as
    the paper's loader, ``Image.open(...).convert('RGB')``).  Animated images
    (GIF, WebP) give their first frame.  Truncated files are detected only
    while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (PIL's default).

    Args:
      path: the image file.
      min_size: smallest acceptable width and height, in pixels.
      max_pixels: largest acceptable ``width * height``; ``None`` uses the
        module constant :data:`MAX_IMAGE_PIXELS` (read at call time).

    Raises:
      BadImage: with a short reason, for a missing or empty file, a file that
        is not an image, a truncated or corrupt image, an image smaller than
        ``min_size`` on either side, or one above the pixel limit (possible
        decompression bomb).  No PIL exception escapes.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise BadImage(f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x its limit raises) for huge images: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if limit is not None and w * h > limit:
                    raise BadImage(f"too many pixels ({w}x{h} = {w * h} > limit {limit}); "
                                   "possible decompression bomb")
                if w < min_size or h < min_size:
                    raise BadImage(f"too small ({w}x{h}, minimum side is {min_size})")
                img.load()  # full decode: truncation and corruption show up here
                rgb = _to_rgb(img)
                rgb.load()
                if rgb is img:
                    rgb = img.copy()  # detach from the file before it is closed
                return rgb
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"refused as possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e) or type(e).__name__
        if "truncated" in text:
            raise BadImage(f"truncated image ({text})") from None
        raise BadImage(f"corrupt image ({text})") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise all sorts of things
        raise BadImage(f"cannot decode ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------
# The paper's preprocessing
# --------------------------------------------------------------------------


def _center_crop_box(w: int, h: int, cw: int, ch: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop placement: Python's round() on half the slack."""
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return left, top, left + cw, top + ch


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """``torchvision.transforms.CenterCrop(size)`` on a PIL image.

    If the image is smaller than ``size`` on a side it is first zero-padded on
    that side (``(size - w) // 2`` left, ``(size - w + 1) // 2`` right, and the
    same for top/bottom), exactly as torchvision does.
    """
    w, h = img.size
    if w < size or h < size:
        pad_l = (size - w) // 2 if size > w else 0
        pad_t = (size - h) // 2 if size > h else 0
        pad_r = (size - w + 1) // 2 if size > w else 0
        pad_b = (size - h + 1) // 2 if size > h else 0
        padded = Image.new(img.mode, (w + pad_l + pad_r, h + pad_t + pad_b), 0)
        padded.paste(img, (pad_l, pad_t))
        img = padded
        w, h = img.size
        if w == size and h == size:
            return img
    return img.crop(_center_crop_box(w, h, size, size))


def preprocess(img: Image.Image, crop: str = "celeba") -> dict[int, np.ndarray]:
    """The paper's preprocessing of one RGB image.

    Args:
      img: an RGB PIL image (see :func:`open_image`).
      crop: ``"celeba"``: ``CenterCrop(178)`` (torchvision semantics, including
        zero padding of smaller images); ``"square"``: center square of side
        ``min(w, h)``; ``"none"``: the image must already be square.

    Returns:
      ``{128: uint8 (128,128,3), 64: ..., 32: ..., 16: ...}``: the crop resized
      to 128x128 with PIL bilinear (antialiased when shrinking, like
      torchvision's ``Resize`` on PIL images), then each smaller resolution
      resized from the previous one (128 -> 64 -> 32 -> 16), also bilinear.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if crop == "celeba":
        img = center_crop(img, CELEBA_CROP)
    elif crop == "square":
        side = min(w, h)
        img = img.crop(_center_crop_box(w, h, side, side))
    elif crop == "none":
        if w != h:
            raise UserError(f"crop='none' needs square images, got {w}x{h} "
                            "(use crop='square' or crop='celeba')")
    else:
        raise UserError(f"unknown crop {crop!r}; expected one of {', '.join(CROPS)}")
    out: dict[int, np.ndarray] = {}
    current = img
    for r in sorted(RESOLUTIONS, reverse=True):
        current = current.resize((r, r), Image.BILINEAR)
        out[r] = np.asarray(current, dtype=np.uint8)
    return {r: out[r] for r in RESOLUTIONS}


# --------------------------------------------------------------------------
# Listing files
# --------------------------------------------------------------------------


def _first_existing(root: str, candidates: Sequence[str], want_dir: bool) -> str | None:
    for rel in candidates:
        p = os.path.join(root, rel)
        if (os.path.isdir(p) if want_dir else os.path.isfile(p)):
            return p
    return None


def _check_root(root: str | os.PathLike | None, what: str) -> str:
    if root is None or str(root) == "":
        raise UserError(f"{what}: no data root given (set --config.root=/path/to/data)")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.exists(root):
        raise UserError(f"{what}: data root does not exist: {root}")
    if not os.path.isdir(root):
        raise UserError(f"{what}: data root is not a folder: {root}")
    return root


def _read_partition(path: str) -> list[tuple[str, int]]:
    """Reads CelebA's partition file: ``<file> <0|1|2>`` lines or Kaggle's CSV."""
    entries: list[tuple[str, int]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.lower().endswith(".csv"):
                rows = [(i + 1, row) for i, row in enumerate(csv.reader(f))]
                if rows and rows[0][1] and not rows[0][1][-1].strip().lstrip("-").isdigit():
                    rows = rows[1:]  # header "image_id,partition"
            else:
                rows = [(i + 1, line.split()) for i, line in enumerate(f)]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read CelebA partition file {path}: {e}") from None
    for lineno, fields in rows:
        fields = [x.strip() for x in fields if x.strip()]
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise UserError(f"{path}:{lineno}: expected '<file> <0|1|2>', got {' '.join(fields)!r}")
        entries.append((fields[0], int(fields[1])))
    return entries


def _scan_celeba(root: str, split: str) -> list[tuple[str, bool]]:
    """CelebA files of a split in partition-file order, each with "exists on disk"."""
    if split not in _CELEBA_SPLITS:
        raise UserError(f"unknown CelebA split {split!r}; expected one of "
                        f"{', '.join(_CELEBA_SPLITS)}")
    image_dir = _first_existing(root, _CELEBA_IMAGE_DIRS, want_dir=True)
    partition = _first_existing(root, _CELEBA_PARTITION_FILES, want_dir=False)
    if image_dir is None:
        raise UserError(
            f"no CelebA image folder under {root}: expected Img/img_align_celeba/ (official "
            "layout) or img_align_celeba/img_align_celeba/ (Kaggle layout); for a plain "
            "folder of images use source='folder'")
    if partition is None:
        raise UserError(
            f"CelebA partition file not found under {root}: expected "
            "Eval/list_eval_partition.txt (official layout) or list_eval_partition.csv "
            "(Kaggle layout); for a plain folder of images use source='folder'")
    wanted = _CELEBA_SPLITS[split]
    names = [name for name, part in _read_partition(partition) if part in wanted]
    if not names:
        raise UserError(f"CelebA split {split!r} is empty: {partition} lists no file "
                        f"with partition {'/'.join(map(str, wanted))}")
    on_disk = set(os.listdir(image_dir))
    entries = [(os.path.join(image_dir, n), n in on_disk) for n in names]
    if not any(exists for _, exists in entries):
        raise UserError(f"none of the {len(names)} files of CelebA split {split!r} listed in "
                        f"{partition} exist in {image_dir} (e.g. {names[0]})")
    return entries


def _scan_folder(root: str, split: str) -> list[str]:
    """Every image file under ``root`` (recursively), sorted by relative path.

    Hidden files and folders (names starting with ".") are ignored, e.g.
    macOS "._x.jpg" resource forks.  Symlinked folders are followed once.
    """
    if split not in _FOLDER_SPLITS:
        raise UserError(f"source='folder' has no partitions: split must be 'all' "
                        f"(or 'train'/'test', which also mean all files), got {split!r}")
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    found.sort(key=lambda p: os.path.relpath(p, root))
    if not found:
        raise UserError(f"no image files under {root} (looked for "
                        f"{' '.join(IMAGE_EXTENSIONS)}, case-insensitive, recursively)")
    return found


def _scan(source: str, root: Any, split: str) -> list[tuple[str, bool]]:
    """The files of a split in dataset order, each with "exists on disk"."""
    if source == "celeba":
        return _scan_celeba(_check_root(root, "source='celeba'"), split)
    if source == "folder":
        return [(p, True) for p in _scan_folder(_check_root(root, "source='folder'"), split)]
    raise UserError(f"list_files: unknown source {source!r}; expected 'celeba' or 'folder'")


def list_files(source: str, root: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of the image files of a split, in dataset order.

    ``source="celeba"``: the official layout (``root/Img/img_align_celeba/*.jpg``
    with ``root/Eval/list_eval_partition.txt``) or Kaggle's
    (``root/img_align_celeba/img_align_celeba/*.jpg`` with
    ``root/list_eval_partition.csv``); ``split`` is one of train, val
    (valid/validation), test or all; order is the partition file's.  Files
    listed in the partition file but absent on disk are left out here (and
    reported as skipped by :func:`build_dataset`); it is an error only when
    all of them are absent.

    ``source="folder"``: every image file under ``root`` recursively, sorted.
    A folder has no partitions, so ``split`` must be "all"; "train" and
    "test" are accepted and also mean all files.

    Raises:
      UserError: missing root, missing partition file, empty split, no images.
    """
    return [p for p, exists in _scan(source, root, split) if exists]


# --------------------------------------------------------------------------
# Dataset, cache and decoding
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    """Preprocessed images of one split, at every resolution.

    Attributes:
      files: names of the usable examples, in order (absolute paths for
        celeba/folder; ``synthetic/<seed>/<index>`` or ``celeb_a/<split>/<i>``).
      images: resolution -> uint8 array ``(N, r, r, 3)`` for r in
        :data:`RESOLUTIONS`; usually read-only ``np.memmap`` s of the cache.
      landmarks: ``(N, 68, 2)`` float32 (x, y) in 128x128 pixel coordinates
        for the synthetic source, else None.
      skipped: ``(file, reason)`` for every file that could not be used.
    """

    files: list[str]
    images: dict[int, np.ndarray]
    landmarks: np.ndarray | None = None
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    """Reads a config field from a ConfigDict, dict or plain object.

    A missing field, or one set to None, gives ``default``.
    """
    if isinstance(cfg, dict):
        value = cfg.get(name, None)
    else:
        try:
            value = getattr(cfg, name)
        except (AttributeError, KeyError):
            value = None
    return default if value is None else value


def _decode_one(path: str, min_size: int, max_pixels: int, crop: str
                ) -> tuple[str, Any]:
    """Worker: decodes and preprocesses one file; never raises.

    Returns ``("ok", (a16, a32, a64, a128))`` or ``("bad", reason)``.
    """
    try:
        img = open_image(path, min_size=min_size, max_pixels=max_pixels)
        arrays = preprocess(img, crop)
        return "ok", tuple(arrays[r] for r in RESOLUTIONS)
    except BadImage as e:
        return "bad", str(e)
    except UserError as e:  # e.g. crop='none' on a non-square image
        return "bad", str(e)
    except Exception as e:  # noqa: BLE001 - a worker must report, not die
        return "bad", f"{type(e).__name__}: {e}"


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "progsr_jax")


def _cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _file_signature(paths: Sequence[str]) -> list[Any]:
    """``[name, size, mtime_ns]`` per file (None size for missing files)."""
    sig: list[Any] = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append([p, st.st_size, st.st_mtime_ns])
        except OSError:
            sig.append([p, None, None])
    return sig


def _load_cache(entry: str) -> Dataset | None:
    """Opens a finished cache entry (memory-mapped), or None if absent/broken."""
    meta_path = os.path.join(entry, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        images = {r: np.load(os.path.join(entry, f"images{r}.npy"), mmap_mode="r")
                  for r in RESOLUTIONS}
        landmarks = None
        if meta.get("has_landmarks"):
            landmarks = np.load(os.path.join(entry, "landmarks.npy"), mmap_mode="r")
        files = list(meta["files"])
        if any(images[r].shape != (len(files), r, r, 3) for r in RESOLUTIONS):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    skipped = [(str(f), str(reason)) for f, reason in meta.get("skipped", [])]
    return Dataset(files=files, images=images, landmarks=landmarks, skipped=skipped)


class _Writer:
    """Collects preprocessed examples into ``.npy`` files in a temporary folder.

    Arrays are written through ``np.lib.format.open_memmap`` so a full CelebA
    (about 10 GiB at all resolutions) never has to fit in RAM.  ``commit``
    drops the skipped rows, writes ``meta.json`` last and renames the folder
    into place with ``os.replace``: a killed run leaves only a ``.tmp-*``
    folder, never a half-written entry.  With ``entry=None`` (no cache) the
    arrays live in memory.
    """

    def __init__(self, entry: str | None, capacity: int, with_landmarks: bool):
        self.entry = entry
        self.capacity = capacity
        self.tmp: str | None = None
        if entry is not None:
            parent = os.path.dirname(entry)
            self.tmp = os.path.join(
                parent, f".tmp-{os.path.basename(entry)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.makedirs(self.tmp)
            self.images = {r: np.lib.format.open_memmap(
                os.path.join(self.tmp, f"raw{r}.npy"), mode="w+", dtype=np.uint8,
                shape=(capacity, r, r, 3)) for r in RESOLUTIONS}
        else:
            self.images = {r: np.empty((capacity, r, r, 3), np.uint8) for r in RESOLUTIONS}
        self.landmarks = np.zeros((capacity, 68, 2), np.float32) if with_landmarks else None
        self.good = np.zeros(capacity, bool)

    def put(self, i: int, arrays: Sequence[np.ndarray], landmarks: np.ndarray | None = None):
        for r, a in zip(RESOLUTIONS, arrays):
            self.images[r][i] = a
        if landmarks is not None and self.landmarks is not None:
            self.landmarks[i] = landmarks
        self.good[i] = True

    def _compact(self, arr: np.ndarray, path: str | None) -> np.ndarray:
        """The good rows of ``arr``, copied in chunks (to ``path`` if given)."""
        keep = np.flatnonzero(self.good)
        if path is None:
            return arr[keep] if len(keep) != len(arr) else arr
        out = np.lib.format.open_memmap(path, mode="w+", dtype=arr.dtype,
                                        shape=(len(keep),) + arr.shape[1:])
        for start in range(0, len(keep), 4096):
            out[start:start + 4096] = arr[keep[start:start + 4096]]
        out.flush()
        return out

    def commit(self, files: list[str], skipped: list[tuple[str, str]]) -> Dataset:
        if self.tmp is None:
            images = {r: self._compact(a, None) for r, a in self.images.items()}
            lm = None if self.landmarks is None else self._compact(self.landmarks, None)
            return Dataset(files=files, images=images, landmarks=lm, skipped=skipped)
        assert self.entry is not None
        for r in RESOLUTIONS:
            raw_path = os.path.join(self.tmp, f"raw{r}.npy")
            final_path = os.path.join(self.tmp, f"images{r}.npy")
            raw = self.images[r]
            if self.good.all():  # nothing to drop: the raw file is the result
                raw.flush()
            else:
                self._compact(raw, final_path)
            del raw
            self.images[r] = None  # type: ignore[assignment]  # close the memmap
            if self.good.all():
                os.replace(raw_path, final_path)
            else:
                os.remove(raw_path)
        if self.landmarks is not None:
            np.save(os.path.join(self.tmp, "landmarks.npy"), self._compact(self.landmarks, None))
        meta = {"version": PREPROCESS_VERSION, "files": files, "skipped": skipped,
                "has_landmarks": self.landmarks is not None, "created": time.time()}
        with open(os.path.join(self.tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        try:
            os.replace(self.tmp, self.entry)
        except OSError:
            if _load_cache(self.entry) is None:
                # A broken leftover (not written by this code's atomic rename):
                # replace it.
                shutil.rmtree(self.entry, ignore_errors=True)
                os.replace(self.tmp, self.entry)
            else:
                # Another process finished the same entry first: use theirs.
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        ds = _load_cache(self.entry)
        if ds is None:
            raise UserError(f"cache entry {self.entry} could not be read back after writing")
        return ds

    def abort(self):
        if self.tmp is not None:
            self.images = {}
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _clean_stale_tmp(cache_dir: str, max_age_s: float = 24 * 3600):
    """Removes ``.tmp-*`` folders left by runs killed more than a day ago."""
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    now = time.time()
    for name in names:
        if name.startswith(".tmp-"):
            p = os.path.join(cache_dir, name)
            try:
                if now - os.path.getmtime(p) > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _skip_summary(skipped: Sequence[tuple[str, str]], total: int) -> str:
    shown = ", ".join(f"{os.path.basename(f)} ({reason})"
                      for f, reason in skipped[:_SUMMARY_NAMES])
    more = len(skipped) - _SUMMARY_NAMES
    if more > 0:
        shown += f", and {more} more"
    return f"skipped {len(skipped)} of {total} files: {shown}"


def _noop() -> None:
    return None


def _start_pool(num_workers: int, log: Callable[[str], Any]):
    """A started process pool for decoding, or None (decode in-process) if it fails.

    Workers use the "spawn" start method: the parent may already run JAX's
    threads, which ``fork`` must not copy.  Spawned workers re-import the main
    module, so a script that calls :func:`build_dataset` with ``num_workers >
    0`` should have the usual ``if __name__ == "__main__":`` guard
    (``python -m`` entry points have it).  Without it, or when the main module
    cannot be re-imported (code piped through stdin), the workers die at
    start-up; ``concurrent.futures`` reports that (``multiprocessing.Pool``
    would replace them forever) and decoding falls back to in-process with a
    logged hint.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if getattr(mp.current_process(), "_inheriting", False):
        # We are a worker re-importing an unguarded main script: stop here so
        # that the parent notices, instead of running the script in the worker.
        raise RuntimeError("build_dataset called while a worker process starts")
    pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"))
    try:
        pool.submit(_noop).result()  # starts the workers now, before any cache file
    except (BrokenProcessPool, OSError) as e:
        pool.shutdown(wait=False, cancel_futures=True)
        log(f"data: decoding worker processes failed to start ({e}); decoding in-process. "
            "A script that builds the dataset with num_workers > 0 should guard its main "
            "code with 'if __name__ == \"__main__\":' (or set num_workers=0)")
        return None
    return pool


def _decode_files(paths: list[str], writer: _Writer, *, pool: Any, num_workers: int,
                  min_size: int, crop: str, progress: bool) -> list[tuple[str, str]]:
    """Decodes ``paths`` into ``writer`` (in ``pool`` if given, else in-process).

    Returns the ``(file, reason)`` of the files that could not be used.
    """
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    work = functools.partial(_decode_one, min_size=min_size,
                             max_pixels=MAX_IMAGE_PIXELS, crop=crop)
    bad: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), desc="decoding images", unit="img",
               disable=not progress, file=sys.stderr, smoothing=0.05)
    try:
        if pool is not None:
            chunk = max(1, min(64, len(paths) // (num_workers * 8)))
            results = pool.map(work, paths, chunksize=chunk)
        else:
            results = map(work, paths)
        for i, (status, value) in enumerate(results):
            if status == "ok":
                writer.put(i, value)
            else:
                bad.append((paths[i], value))
            bar.update(1)
    except BrokenProcessPool:
        raise UserError("a decoding worker process died (out of memory?); rerun, or use "
                        "fewer workers (num_workers=0 decodes in-process)") from None
    finally:
        bar.close()
    return bad


_TFDS_SPLITS = {"train": ("train",), "val": ("validation",), "valid": ("validation",),
                "validation": ("validation",), "test": ("test",),
                "all": ("train", "validation", "test")}


def _open_tfds(root: str | None, split: str, max_images: int | None):
    """Opens tfds' ``celeb_a``: (number of examples, iterator of uint8 images).

    Images are the aligned 218x178 (HxW) CelebA JPEGs, decoded by tfds.
    """
    try:
        import tensorflow_datasets as tfds  # optional dependency
    except ImportError:
        raise UserError("source='tfds' needs tensorflow-datasets: "
                        "pip install 'progsr_jax[tfds]'") from None
    if split not in _TFDS_SPLITS:
        raise UserError(f"unknown tfds split {split!r}; expected one of {', '.join(_TFDS_SPLITS)}")
    parts = _TFDS_SPLITS[split]
    try:
        builder = tfds.builder("celeb_a", data_dir=root)
        builder.download_and_prepare()
        total = sum(builder.info.splits[p].num_examples for p in parts)
        ds = builder.as_dataset(split="+".join(parts), shuffle_files=False)
    except Exception as e:  # noqa: BLE001 - tfds download/prepare failures are user-facing
        raise UserError(f"tfds could not prepare celeb_a ({split}): {e}") from None
    if max_images is not None:
        total = min(total, max_images)
        ds = ds.take(max_images)
    return total, (ex["image"] for ex in tfds.as_numpy(ds))


def _build_tfds(root: str | None, split: str, max_images: int | None, entry: str | None,
                progress: bool) -> Dataset:
    from tqdm import tqdm

    total, images = _open_tfds(root, split, max_images)
    if total == 0:
        raise UserError(f"tfds celeb_a split {split!r} is empty")
    writer = _Writer(entry, total, with_landmarks=False)
    try:
        count = 0
        for i, image in enumerate(tqdm(images, total=total, desc="tfds celeb_a", unit="img",
                                       disable=not progress, file=sys.stderr)):
            if i >= total:
                break
            arrays = preprocess(Image.fromarray(np.asarray(image, np.uint8)), crop="celeba")
            writer.put(i, [arrays[r] for r in RESOLUTIONS])
            count += 1
        if count == 0:
            raise UserError(f"tfds celeb_a split {split!r} gave no images")
        files = [f"celeb_a/{split}/{i:06d}" for i in range(count)]
        return writer.commit(files, [])
    finally:
        writer.abort()


def build_dataset(cfg: Any, *, progress: bool = True,
                  log: Callable[[str], Any] = print) -> Dataset:
    """Builds (or opens from the cache) the preprocessed dataset described by ``cfg``.

    Config fields (attributes of an ``ml_collections.ConfigDict``, a dict or any
    object; missing ones take the defaults shown):

    * ``source``: ``'synthetic'`` | ``'celeba'`` | ``'folder'`` | ``'tfds'``.
    * ``root`` (None): data root; required for celeba and folder; for tfds the
      ``data_dir`` (None = tfds' default).
    * ``split`` ('train'): see :func:`list_files`; tfds: train / val / test / all.
    * ``cache_dir`` (None -> ``~/.cache/progsr_jax``; ``''`` disables caching).
    * ``num_workers`` (None or -1: ``os.cpu_count()``): decoding processes;
      0 decodes in-process (also used for fewer than 64 files).
    * ``strict`` (False): any skipped file raises a UserError naming it.
    * ``min_size`` (32): smallest usable image side.
    * ``max_images`` (None): use only the first N files of the split.
    * ``num_synthetic`` (2048) and ``seed`` (0): the synthetic dataset (the
      split is ignored there: use another seed for held-out synthetic faces).
    * ``crop`` (extension): 'celeba' | 'square' | 'none'; default 'celeba' for
      celeba/tfds, 'square' for folder (synthetic is always 'none').

    Every file is decoded once; bad files are skipped with their reason and
    summarised in one ``log`` line.  The result is cached (keyed by source,
    absolute root, split, the file list with sizes and mtimes, the options
    that change the result, and :data:`PREPROCESS_VERSION`) and returned as
    read-only memory maps of the cache.

    Raises:
      UserError: bad config, missing data, or nothing usable left.
    """
    source = _cfg(cfg, "source", None)
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; expected one of {', '.join(SOURCES)}")
    root = _cfg(cfg, "root", None)
    split = str(_cfg(cfg, "split", "train") or "train")
    cache_dir = _cfg(cfg, "cache_dir", None)
    num_workers = int(_cfg(cfg, "num_workers", -1))
    if num_workers == -1:
        num_workers = os.cpu_count() or 1
    strict = bool(_cfg(cfg, "strict", False))
    min_size = int(_cfg(cfg, "min_size", 32))
    max_images = _cfg(cfg, "max_images", None)
    num_synthetic = int(_cfg(cfg, "num_synthetic", 2048))
    seed = int(_cfg(cfg, "seed", 0))
    default_crop = {"folder": "square", "synthetic": "none"}.get(source, "celeba")
    crop = "none" if source == "synthetic" else (_cfg(cfg, "crop", None) or default_crop)

    if crop not in CROPS:
        raise UserError(f"unknown crop {crop!r}; expected one of {', '.join(CROPS)}")
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0 (or -1: one per CPU core), got {num_workers}")
    if min_size < 1:
        raise UserError(f"min_size must be >= 1, got {min_size}")
    if max_images is not None:
        max_images = int(max_images)
        if max_images < 1:
            raise UserError(f"max_images must be >= 1 or None, got {max_images}")
    if source == "synthetic" and num_synthetic < 1:
        raise UserError(f"num_synthetic must be >= 1, got {num_synthetic}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")

    # ---- what to decode, and the cache key --------------------------------
    paths: list[str] = []
    missing: list[str] = []
    key_parts: dict[str, Any] = {"version": PREPROCESS_VERSION, "source": source,
                                 "split": split, "crop": crop}
    if source in ("celeba", "folder"):
        entries = _scan(source, root, split)
        if max_images is not None:
            entries = entries[:max_images]  # first N of the split, present or not
        paths = [p for p, exists in entries if exists]
        missing = [p for p, exists in entries if not exists]
        if not paths:
            raise UserError(f"the first {max_images} files of split {split!r} are all "
                            "missing on disk")
        key_parts.update(root=os.path.abspath(os.path.expanduser(str(root))), min_size=min_size,
                         max_pixels=MAX_IMAGE_PIXELS,
                         files=_file_signature(paths), missing=sorted(missing))
    elif source == "synthetic":
        key_parts.update(num=num_synthetic, seed=seed)
    else:  # tfds
        key_parts.update(root=os.path.abspath(root) if root else None, max_images=max_images)

    entry: str | None = None
    if cache_dir not in ("", False):
        cache_dir = os.path.abspath(os.path.expanduser(str(cache_dir or _default_cache_dir())))
        label = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{source}-{split}")
        entry = os.path.join(cache_dir, f"{label}-{_cache_key(key_parts)}")
        ds = _load_cache(entry)
        if ds is not None:
            log(f"data: {len(ds)} {source}/{split} images from cache {entry}")
            _report_skipped(ds, len(ds) + len(ds.skipped), strict, log)
            return ds
        try:
            os.makedirs(cache_dir, exist_ok=True)
            _clean_stale_tmp(cache_dir)
        except OSError as e:
            log(f"data: cannot use cache folder {cache_dir} ({e}); keeping images in memory")
            entry = None

    # ---- decode -----------------------------------------------------------
    if source == "synthetic":
        ds = _build_synthetic(num_synthetic, seed, entry, progress)
    elif source == "tfds":
        ds = _build_tfds(root, split, max_images, entry, progress)
    else:
        # Start the workers before creating any cache file (see _start_pool).
        use_pool = num_workers > 0 and len(paths) >= _MIN_FILES_FOR_POOL
        num_workers = min(num_workers, len(paths))
        pool = _start_pool(num_workers, log) if use_pool else None
        writer = None
        try:
            writer = _Writer(entry, len(paths), with_landmarks=False)
            bad = _decode_files(paths, writer, pool=pool, num_workers=num_workers,
                                min_size=min_size, crop=crop, progress=progress)
            bad_set = {p for p, _ in bad}
            files = [p for p in paths if p not in bad_set]
            skipped = [(p, "listed in the partition file but not found on disk")
                       for p in missing] + bad
            if not files:
                raise UserError(_skip_summary(skipped, len(paths) + len(missing))
                                + " -- no usable images left")
            ds = writer.commit(files, skipped)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if writer is not None:
                writer.abort()
    where = f"cached in {entry}" if entry else "in memory"
    log(f"data: {len(ds)} {source}/{split} images, {where}")
    _report_skipped(ds, len(ds) + len(ds.skipped), strict, log)
    return ds


def _report_skipped(ds: Dataset, total: int, strict: bool, log: Callable[[str], Any]):
    if not ds.skipped:
        return
    summary = _skip_summary(ds.skipped, total)
    if strict:
        raise UserError(f"strict mode: {summary}")
    log(summary)


def _build_synthetic(n: int, seed: int, entry: str | None, progress: bool) -> Dataset:
    from tqdm import tqdm

    from progsr_jax import synthetic

    writer = _Writer(entry, n, with_landmarks=True)
    try:
        for i in tqdm(range(n), desc="synthetic faces", unit="img", disable=not progress,
                      file=sys.stderr):
            face, lm = synthetic.make_face(synthetic.face_rng(seed, i))
            arrays = preprocess(Image.fromarray(face), crop="none")
            writer.put(i, [arrays[r] for r in RESOLUTIONS], lm)
        files = [f"synthetic/{seed}/{i:06d}" for i in range(n)]
        return writer.commit(files, [])
    finally:
        writer.abort()


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.setflags(write=False)
    return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of batch ``step``: a pure function of its arguments.

    The infinite example stream is the concatenation of one permutation per
    epoch; stream position ``k = step * batch_size + j`` is example
    ``permutation(seed, e)[k % num_examples]`` with ``e = k // num_examples``
    and ``permutation(seed, e) = np.random.default_rng([seed, e]).permutation``.
    A batch may straddle two epochs.  No state is kept, so resuming at any
    step gives exactly the batches an uninterrupted run would have seen.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    k = np.arange(batch_size, dtype=np.int64) + np.int64(step) * batch_size
    epochs = k // num_examples
    positions = k % num_examples
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _permutation(num_examples, int(seed), int(e))[positions[sel]]
    return out


def _to_float(x: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]: ``x / 127.5 - 1``."""
    y = x.astype(np.float32)
    y /= np.float32(127.5)
    y -= np.float32(1.0)
    return y


def _gather(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]``, reading a memmap in ascending order for locality."""
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx),) + arr.shape[1:], arr.dtype)
    out[order] = arr[idx[order]]
    return out


def get_batch(ds: Dataset, step: int, batch_size: int, seed: int, stage: int
              ) -> dict[str, np.ndarray]:
    """Batch ``step`` of the deterministic order (see :func:`batch_indices`).

    Returns ``{'lr': float32 (B,16,16,3), 'hr': float32 (B,r,r,3)}`` with
    ``r = 16 * 2**stage`` (stage 1, 2, 3 -> 32, 64, 128; stage 0 gives r = 16),
    values ``uint8 / 127.5 - 1`` in [-1, 1].
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    idx = batch_indices(len(ds), batch_size, seed, step)
    r = 16 * 2 ** stage
    return {"lr": _to_float(_gather(ds.images[16], idx)),
            "hr": _to_float(_gather(ds.images[r], idx))}


class Prefetcher:
    """Produces ``get_batch`` for steps ``start_step .. end_step - 1`` in a thread.

    Iterating yields ``(step, batch)`` in order.  With ``sharding`` (a
    ``jax.sharding.Sharding``) each batch is put on device with
    ``jax.device_put(batch, sharding)`` in the background thread.  At most
    ``buffer`` batches wait in the queue.  An exception in the thread is
    re-raised in the consumer.  Use as a context manager or call
    :meth:`close` to stop early.
    """

    _DONE = object()

    def __init__(self, ds: Dataset, start_step: int, end_step: int, batch_size: int,
                 seed: int, stage: int, sharding: Any = None, buffer: int = 2):
        self.ds, self.start_step, self.end_step = ds, int(start_step), int(end_step)
        self.batch_size, self.seed, self.stage = batch_size, seed, stage
        self.sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(buffer)))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="progsr-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Puts ``item`` unless asked to stop; returns False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            put_on_device = None
            if self.sharding is not None:
                import jax

                put_on_device = functools.partial(jax.device_put, device=self.sharding)
            for step in range(self.start_step, self.end_step):
                if self._stop.is_set():
                    return
                batch: Any = get_batch(self.ds, step, self.batch_size, self.seed, self.stage)
                if put_on_device is not None:
                    batch = put_on_device(batch)
                if not self._put((step, batch)):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        while not self._finished:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                # Closed from elsewhere, or the thread ended without a final item.
                if self._stop.is_set() or (not self._thread.is_alive() and self._queue.empty()):
                    self._finished = True
                    return
                continue
            if item is self._DONE:
                self._finished = True
                return
            if isinstance(item, BaseException):
                self._finished = True
                self.close()
                raise item
            yield item

    def close(self):
        """Stops the thread and drops queued batches; safe to call twice."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._finished = True

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:  # noqa: BLE001
            pass


def measure_throughput(ds: Dataset, batch_size: int = 16, steps: int = 50,
                       stage: int = 3) -> float:
    """Images per second of :func:`get_batch` (one warm-up batch not timed)."""
    get_batch(ds, 0, batch_size, 0, stage)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        get_batch(ds, step, batch_size, 0, stage)
    return steps * batch_size / (time.perf_counter() - t0)
