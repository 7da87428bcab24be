"""Precomputed teacher heatmaps (written by ``tools/convert_fan_weights.py teacher-heatmaps``).

On-disk format of a teacher folder
----------------------------------
``meta.json``
    ``{"format": "progsr_teacher_heatmaps", "version": 1, "teacher": "fan4"|"distilled",
    "dtype": "float16"|"uint8"|"float32", "num_images": N, "shape": [64, 64, 68],
    "chunk_size": C, "weights_sha256": ..., "source", "split", "data_root", ...}``
``files.txt``
    one image path per line, relative to the data root, in row order.
``heatmaps.npy``
    an ``.npy`` array of shape (N, 64, 64, 68) (NHWC, like the Flax models),
    read memory-mapped.  Default dtype float16: 557 KB per image (about 89 GB
    for the 162,770 CelebA training images); the rounding error is at most
    2**-11 relative (about 2.4e-4 absolute for values below 0.5), far below
    what the distillation loss can resolve.  With ``dtype=uint8`` (279 KB per
    image, about 45 GB) each image's channel ``c`` is stored as
    ``round((h - lo) / scale)`` with ``lo``/``scale`` in ``scale.npy``
    (float32, (N, 68, 2)); the error is at most ``scale / 2`` = (max - min) / 510
    of that channel.  ``float32`` stores the exact values (1.1 MB per image).
``progress.json``
    ``{"done": [chunk indices], "bad": {"row": "reason"}}``: which chunks of C
    images are complete (the writer resumes from it) and which images could
    not be decoded (their rows hold zeros).

:func:`open` returns a reader whose items are float32 (64, 64, 68) arrays.
"""

from __future__ import annotations

import builtins
import json
import os
from typing import Iterable, Sequence

import numpy as np

from progsr_jax.errors import UserError

FORMAT = "progsr_teacher_heatmaps"
VERSION = 1
HEATMAP_SHAPE = (64, 64, 68)
DTYPES = ("float16", "uint8", "float32")
META_FILE = "meta.json"
FILES_FILE = "files.txt"
HEATMAPS_FILE = "heatmaps.npy"
SCALE_FILE = "scale.npy"
PROGRESS_FILE = "progress.json"


def num_chunks(num_images: int, chunk_size: int) -> int:
    return (num_images + chunk_size - 1) // chunk_size


def read_json(path: str) -> dict:
    with builtins.open(path) as f:
        return json.load(f)


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with builtins.open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def quantize_uint8(hm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W, C) float -> uint8 codes and per-(image, channel) ``[lo, scale]`` (B, C, 2)."""
    hm = np.asarray(hm, np.float32)
    lo = hm.min(axis=(1, 2))
    hi = hm.max(axis=(1, 2))
    scale = (hi - lo) / 255.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.rint((hm - lo[:, None, None, :]) / scale[:, None, None, :])
    return np.clip(q, 0, 255).astype(np.uint8), np.stack([lo, scale], axis=-1).astype(np.float32)


def dequantize_uint8(q: np.ndarray, lo_scale: np.ndarray) -> np.ndarray:
    lo = lo_scale[..., 0][:, None, None, :]
    scale = lo_scale[..., 1][:, None, None, :]
    return q.astype(np.float32) * scale + lo


class TeacherHeatmaps:
    """Reader of a teacher folder: ``files``, ``len()``, ``[i]`` -> float32 (64, 64, 68), ``get``."""

    def __init__(self, directory: str, allow_incomplete: bool = False):
        self.directory = directory
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.isfile(meta_path):
            raise UserError(f"{directory} holds no teacher heatmaps (no {META_FILE}); create them "
                            "with: python tools/convert_fan_weights.py teacher-heatmaps ...")
        try:
            self.meta = read_json(meta_path)
        except (OSError, ValueError) as e:
            raise UserError(f"{meta_path} is unreadable: {e}") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise UserError(f"{meta_path} is not a version-{VERSION} teacher heatmap folder")
        self.dtype = self.meta["dtype"]
        if self.dtype not in DTYPES:
            raise UserError(f"{meta_path}: unknown dtype {self.dtype!r}")
        with builtins.open(os.path.join(directory, FILES_FILE)) as f:
            self.files = [ln.rstrip("\n") for ln in f if ln.rstrip("\n")]
        n = int(self.meta["num_images"])
        if len(self.files) != n:
            raise UserError(f"{directory}: {FILES_FILE} lists {len(self.files)} files, "
                            f"meta.json says {n}")
        progress = read_json(os.path.join(directory, PROGRESS_FILE))
        self.bad = {int(k): v for k, v in progress.get("bad", {}).items()}
        done = set(progress.get("done", []))
        missing = num_chunks(n, int(self.meta["chunk_size"])) - len(done)
        if missing and not allow_incomplete:
            raise UserError(f"{directory} is incomplete ({missing} chunks of "
                            f"{self.meta['chunk_size']} images missing); rerun the same "
                            "teacher-heatmaps command to resume")
        self.complete = not missing
        self._hm = np.load(os.path.join(directory, HEATMAPS_FILE), mmap_mode="r")
        if self._hm.shape != (n,) + HEATMAP_SHAPE:
            raise UserError(f"{directory}: {HEATMAPS_FILE} has shape {self._hm.shape}, "
                            f"expected {(n,) + HEATMAP_SHAPE}")
        self._scale = None
        if self.dtype == "uint8":
            self._scale = np.load(os.path.join(directory, SCALE_FILE), mmap_mode="r")
        self._index = None

    def __reduce__(self):
        """Pickled as its folder: a worker process opens the heatmaps (memory-mapped), it
        does not receive a copy of them."""
        return TeacherHeatmaps, (self.directory, not self.complete)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (len(indices), 64, 64, 68) heatmaps for the given rows."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"teacher heatmap index out of range (0..{len(self) - 1})")
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to the page cache
        out = np.empty((idx.size,) + HEATMAP_SHAPE, np.float32)
        raw = self._hm[idx[order]]
        if self.dtype == "uint8":
            out[order] = dequantize_uint8(raw, np.asarray(self._scale[idx[order]]))
        else:
            out[order] = raw.astype(np.float32)
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        if not isinstance(i, (int, np.integer)):
            raise TypeError("use .get(indices) for several rows")
        return self.get([int(i)])[0]

    def indices_for(self, paths: Iterable[str]) -> np.ndarray:
        """Row indices of image ``paths`` (absolute or relative), matched by their last path parts."""
        if self._index is None:
            by_name: dict[str, int] = {}
            for i, f in enumerate(self.files):
                by_name[f] = i
                by_name.setdefault(os.path.basename(f), i)
            self._index = by_name
        out = []
        for p in paths:
            p = os.fspath(p).replace(os.sep, "/")
            parts = p.split("/")
            for k in range(len(parts)):
                key = "/".join(parts[k:])
                if key in self._index:
                    out.append(self._index[key])
                    break
            else:
                raise UserError(f"{p} has no teacher heatmap in {self.directory}")
        return np.asarray(out, np.int64)


def open(directory: str | os.PathLike, allow_incomplete: bool = False) -> TeacherHeatmaps:  # noqa: A001
    """Opens a teacher heatmap folder for reading (memory-mapped)."""
    return TeacherHeatmaps(os.fspath(directory), allow_incomplete=allow_incomplete)
