"""The decode cache: preprocessed images of a split as memory-mapped ``.npy`` files.

A cache entry is a folder ``<cache_dir>/<source>-<split>-<key>`` holding
``images{16,32,64,128}.npy`` (uint8, ``(N, r, r, 3)``), ``meta.json`` (file
names, skipped files, :data:`PREPROCESS_VERSION`) and, for synthetic faces,
``landmarks.npy``.  :class:`CacheWriter` fills a temporary folder and renames
it into place when complete, so a killed run never leaves a half-written
entry; :func:`open_cache` opens a finished one as read-only memory maps.
:func:`by_path` / :func:`opened` let those maps cross to a worker process as
their file names: the worker opens the cache, it does not receive a copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import shutil
import time
import uuid
from typing import Any, Sequence

import numpy as np

from progsr_jax.data.images import RESOLUTIONS
from progsr_jax.errors import UserError

#: Bump whenever decoding or preprocessing changes: it is part of the cache key,
#: so old caches are ignored instead of silently reused.
PREPROCESS_VERSION = 1


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


@dataclasses.dataclass(frozen=True)
class MappedFile:
    """A read-only memory map of a whole ``.npy`` file, named by its path.

    What :func:`by_path` puts in place of such an array before it is pickled
    for a worker process: pickling the array itself would copy its bytes
    (numpy pickles a ``memmap`` as a plain array).
    """

    path: str
    shape: tuple
    dtype: str

    def open(self) -> np.ndarray:
        arr = np.load(self.path, mmap_mode="r")
        if arr.shape != self.shape or arr.dtype.str != self.dtype:
            raise RuntimeError(f"{self.path} changed since it was opened: {arr.dtype} "
                               f"{arr.shape}, expected {self.dtype} {self.shape}")
        return arr


def by_path(tree: Any) -> Any:
    """``tree`` (an array, or a dict of them) with every read-only memory map of a whole
    ``.npy`` file replaced by its :class:`MappedFile`; other values as they are (an
    array in memory is pickled by value).  :func:`opened` undoes it."""
    if isinstance(tree, dict):
        return {k: by_path(v) for k, v in tree.items()}
    if (isinstance(tree, np.memmap) and isinstance(tree.base, mmap.mmap)
            and tree.mode == "r" and tree.filename and tree.filename.endswith(".npy")):
        return MappedFile(tree.filename, tuple(tree.shape), tree.dtype.str)
    return tree


def opened(tree: Any) -> Any:
    """The inverse of :func:`by_path`: each :class:`MappedFile` opened (memory-mapped)."""
    if isinstance(tree, dict):
        return {k: opened(v) for k, v in tree.items()}
    return tree.open() if isinstance(tree, MappedFile) else tree


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "progsr_jax")


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def file_signature(paths: Sequence[str]) -> list[Any]:
    """``[name, size, mtime_ns]`` per file (None size for missing files)."""
    sig: list[Any] = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append([p, st.st_size, st.st_mtime_ns])
        except OSError:
            sig.append([p, None, None])
    return sig


def open_cache(entry: str) -> Dataset | None:
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


class CacheWriter:
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
            if open_cache(self.entry) is None:
                # A broken leftover (not written by this code's atomic rename):
                # replace it.
                shutil.rmtree(self.entry, ignore_errors=True)
                os.replace(self.tmp, self.entry)
            else:
                # Another process finished the same entry first: use theirs.
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        ds = open_cache(self.entry)
        if ds is None:
            raise UserError(f"cache entry {self.entry} could not be read back after writing")
        return ds

    def abort(self):
        if self.tmp is not None:
            self.images = {}
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def clean_stale_tmp(cache_dir: str, max_age_s: float = 24 * 3600):
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
