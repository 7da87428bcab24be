"""Building a dataset: list the files, decode them once (in worker processes), cache them.

:func:`build_dataset` is the one entry point of the data pipeline: it turns a
data config (source, root, split, ...) into a :class:`~progsr_jax.data.cache.Dataset`
whose arrays are memory-mapped from the decode cache; the next run with the
same files opens the cache directly.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from PIL import Image

from progsr_jax import progress as progress_lib
from progsr_jax.data import cache as cache_lib
from progsr_jax.data import celeba_tfds, synthetic
from progsr_jax.data import images as images_lib
from progsr_jax.data.cache import CacheWriter, Dataset
from progsr_jax.data.images import CROPS, RESOLUTIONS, BadImage, open_image, preprocess
from progsr_jax.data.splits import scan_split
from progsr_jax.errors import UserError

SOURCES = ("synthetic", "celeba", "folder", "tfds")

# How many skipped files the summary line names (the rest are only counted).
_SUMMARY_NAMES = 10
# Below this many files, decoding runs in-process even if num_workers > 0:
# starting worker processes would cost more than it saves.
_MIN_FILES_FOR_POOL = 64


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


def _decode_files(paths: list[str], writer: CacheWriter, *, pool: Any, num_workers: int,
                  min_size: int, crop: str, progress: bool) -> list[tuple[str, str]]:
    """Decodes ``paths`` into ``writer`` (in ``pool`` if given, else in-process).

    Returns the ``(file, reason)`` of the files that could not be used.
    """
    work = functools.partial(_decode_one, min_size=min_size,
                             max_pixels=images_lib.MAX_IMAGE_PIXELS, crop=crop)
    bad: list[tuple[str, str]] = []
    bar = progress_lib.bar(len(paths), "decoding images", "img", disable=not progress)
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


def build_dataset(cfg: Any, *, progress: bool = True,
                  log: Callable[[str], Any] = print) -> Dataset:
    """Builds (or opens from the cache) the preprocessed dataset described by ``cfg``.

    Config fields (attributes of an ``ml_collections.ConfigDict``, a dict or any
    object; missing ones take the defaults shown):

    * ``source``: ``'synthetic'`` | ``'celeba'`` | ``'folder'`` | ``'tfds'``.
      ``'celeba'`` without a ``root`` reads CelebA through TFDS (``'tfds'``).
    * ``root`` (None): data root; required for folder; for celeba the official
      or Kaggle layout (without it: TFDS).
    * ``tfds_data_dir`` (None: TFDS's default, ``~/tensorflow_datasets``) and
      ``tfds_manual_dir`` (None: ``<data_dir>/downloads/manual``): see
      :mod:`progsr_jax.data.celeba_tfds`.  For ``source='tfds'`` a ``root``
      is taken as the data_dir when ``tfds_data_dir`` is not set.
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
    that change the result, and :data:`~progsr_jax.data.cache.PREPROCESS_VERSION`)
    and returned as read-only memory maps of the cache.

    Raises:
      UserError: bad config, missing data, or nothing usable left.
    """
    source = _cfg(cfg, "source", None)
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; expected one of {', '.join(SOURCES)}")
    root = _cfg(cfg, "root", None)
    tfds_data_dir = _cfg(cfg, "tfds_data_dir", None) or (root if source == "tfds" else None)
    tfds_manual_dir = _cfg(cfg, "tfds_manual_dir", None)
    if source == "celeba" and not root:
        source = "tfds"
        log(f"data: data.root is not set: reading CelebA through "
            f"{celeba_tfds.describe(tfds_data_dir)}")
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
    key_parts: dict[str, Any] = {"version": cache_lib.PREPROCESS_VERSION, "source": source,
                                 "split": split, "crop": crop}
    if source in ("celeba", "folder"):
        entries = scan_split(source, root, split)
        if max_images is not None:
            entries = entries[:max_images]  # first N of the split, present or not
        paths = [p for p, exists in entries if exists]
        missing = [p for p, exists in entries if not exists]
        if not paths:
            raise UserError(f"the first {max_images} files of split {split!r} are all "
                            "missing on disk")
        key_parts.update(root=os.path.abspath(os.path.expanduser(str(root))), min_size=min_size,
                         max_pixels=images_lib.MAX_IMAGE_PIXELS,
                         files=cache_lib.file_signature(paths), missing=sorted(missing))
    elif source == "synthetic":
        key_parts.update(num=num_synthetic, seed=seed)
    else:  # tfds
        key_parts.update(root=os.path.abspath(tfds_data_dir) if tfds_data_dir else None,
                         max_images=max_images)

    entry: str | None = None
    if cache_dir not in ("", False):
        cache_dir = os.path.abspath(os.path.expanduser(
            str(cache_dir or cache_lib.default_cache_dir())))
        label = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{source}-{split}")
        entry = os.path.join(cache_dir, f"{label}-{cache_lib.cache_key(key_parts)}")
        ds = cache_lib.open_cache(entry)
        if ds is not None:
            log(f"data: {len(ds)} {source}/{split} images from cache {entry}")
            _report_skipped(ds, len(ds) + len(ds.skipped), strict, log)
            return ds
        try:
            os.makedirs(cache_dir, exist_ok=True)
            cache_lib.clean_stale_tmp(cache_dir)
        except OSError as e:
            log(f"data: cannot use cache folder {cache_dir} ({e}); keeping images in memory")
            entry = None

    # ---- decode -----------------------------------------------------------
    if source == "synthetic":
        ds = _build_synthetic(num_synthetic, seed, entry, progress)
    elif source == "tfds":
        ds = celeba_tfds.build(tfds_data_dir, tfds_manual_dir, split, max_images, entry, progress)
    else:
        # Start the workers before creating any cache file (see _start_pool).
        use_pool = num_workers > 0 and len(paths) >= _MIN_FILES_FOR_POOL
        num_workers = min(num_workers, len(paths))
        pool = _start_pool(num_workers, log) if use_pool else None
        writer = None
        try:
            writer = CacheWriter(entry, len(paths), with_landmarks=False)
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
    writer = CacheWriter(entry, n, with_landmarks=True)
    try:
        for i in progress_lib.track(range(n), n, "synthetic faces", "img", disable=not progress):
            face, lm = synthetic.make_face(synthetic.face_rng(seed, i))
            arrays = preprocess(Image.fromarray(face), crop="none")
            writer.put(i, [arrays[r] for r in RESOLUTIONS], lm)
        files = [f"synthetic/{seed}/{i:06d}" for i in range(n)]
        return writer.commit(files, [])
    finally:
        writer.abort()
