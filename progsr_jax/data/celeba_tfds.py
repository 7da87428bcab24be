"""CelebA through TensorFlow Datasets (``celeb_a``), decoded into the same cache.

On first use TFDS downloads and prepares ``celeb_a`` in its ``data_dir``
(``~/tensorflow_datasets`` unless ``data.tfds_data_dir`` says otherwise): the
aligned 178x218 images (about 1.4 GB of downloads, 1.4 GB prepared; TFDS's
catalogue gives the sizes), with the official train / validation / test
partition (162,770 / 19,867 / 19,962).  The images then go through the same
preprocessing as the folder source (:func:`~progsr_jax.data.images.preprocess`,
CenterCrop 178, bilinear 128 -> 64 -> 32 -> 16) into the decode cache, once.

The official files live on Google Drive, whose daily quota CelebA often
exceeds.  When TFDS cannot download, :func:`build` stops with one line saying
what to do: put the five official files in TFDS's manual-download folder
(:data:`MANUAL_FILES`, ``data.tfds_manual_dir``, by default
``<data_dir>/downloads/manual``), where TFDS takes them instead of
downloading, or point ``data.root`` at an extracted CelebA folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request

import numpy as np
from PIL import Image

from progsr_jax import progress as progress_lib
from progsr_jax.data.cache import CacheWriter, Dataset
from progsr_jax.data.images import RESOLUTIONS, preprocess
from progsr_jax.errors import UserError

NAME = "celeb_a"
SPLITS = {"train": ("train",), "val": ("validation",), "valid": ("validation",),
          "validation": ("validation",), "test": ("test",),
          "all": ("train", "validation", "test")}
#: The official files TFDS's celeb_a builder downloads (its checksums name them);
#: placed in the manual-download folder they are used instead of a download.
MANUAL_FILES = ("img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt",
                "list_landmarks_align_celeba.txt", "identity_CelebA.txt")
#: Reached before a download is attempted, so that an offline machine gets its
#: answer in seconds instead of after minutes of retries.
PROBE_URLS = ("https://storage.googleapis.com", "https://drive.google.com")


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                            "tensorflow_datasets")


def manual_dir_for(data_dir: str | None, manual_dir: str | None) -> str:
    """TFDS's manual-download folder: ``manual_dir``, or ``<data_dir>/downloads/manual``."""
    if manual_dir:
        return os.path.abspath(os.path.expanduser(manual_dir))
    return os.path.join(os.path.abspath(os.path.expanduser(data_dir or default_data_dir())),
                        "downloads", "manual")


def describe(data_dir: str | None) -> str:
    """Where the data come from, for the log."""
    return f"TensorFlow Datasets {NAME} (data_dir {data_dir or default_data_dir()})"


def _import_tfds():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up lines
    try:
        import tensorflow_datasets as tfds  # optional dependency
    except ImportError:
        raise UserError("source='tfds' needs tensorflow-datasets: "
                        "pip install 'progsr_jax[tfds]'") from None
    return tfds


@contextlib.contextmanager
def _quiet():
    """TFDS's and urllib3's warnings (deprecations, retries) off the console."""
    loggers = [logging.getLogger(n) for n in ("absl", "urllib3", "tensorflow")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _what_to_do(manual: str) -> str:
    return (f"either put the official CelebA files ({', '.join(MANUAL_FILES)}; from "
            f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html) in {manual} (TFDS's "
            "manual-download folder, --config.data.tfds_manual_dir) and rerun, or point "
            "--config.data.root at an extracted CelebA folder (Img/img_align_celeba/ and "
            "Eval/list_eval_partition.txt, or Kaggle's layout)")


def probe_network() -> str | None:
    """None when one of :data:`PROBE_URLS` answers, else the last error in a few words."""
    error = None
    for url in PROBE_URLS:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10):
                return None
        except urllib.error.HTTPError:  # the host answered: the network is there
            return None
        except Exception as e:  # noqa: BLE001 - DNS, refused, proxy, TLS: all mean "cannot reach"
            reason = getattr(e, "reason", e)
            error = f"{url.split('//')[1]} cannot be reached ({reason})"
    return error


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "checksum" in text.lower() or "quota" in text.lower() or "html" in text.lower():
        return ("Google Drive refused the download (CelebA's files are often over Drive's "
                f"daily download quota): {text[:160]}")
    return f"{type(e).__name__}: {text[:200]}"


def prepare(data_dir: str | None, manual_dir: str | None):
    """The prepared ``celeb_a`` builder; downloads and prepares it on first use."""
    tfds = _import_tfds()
    manual = manual_dir_for(data_dir, manual_dir)
    with _quiet():
        builder = tfds.builder(NAME, data_dir=data_dir)
        if builder.is_prepared():
            return builder
        have_manual = all(os.path.isfile(os.path.join(manual, f)) for f in MANUAL_FILES)
        if not have_manual:
            offline = probe_network()
            if offline:
                raise UserError(f"CelebA is not prepared in {builder.data_dir} and cannot be "
                                f"downloaded: {offline}; {_what_to_do(manual)}")
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - every download/prepare failure is the user's to fix
            raise UserError(f"TFDS could not download CelebA: {_reason(e)}; "
                            f"{_what_to_do(manual)}") from None
    return builder


def _open(data_dir: str | None, manual_dir: str | None, split: str, max_images: int | None):
    """(number of examples, iterator of uint8 (218, 178, 3) images) of a split, in TFDS order."""
    if split not in SPLITS:
        raise UserError(f"unknown tfds split {split!r}; expected one of {', '.join(SPLITS)}")
    tfds = _import_tfds()
    builder = prepare(data_dir, manual_dir)
    with _quiet():
        ds = builder.as_dataset(split="+".join(SPLITS[split]), shuffle_files=False)
        total = int(ds.cardinality())
        if total < 0:  # unknown: the split sizes TFDS recorded
            total = sum(builder.info.splits[p].num_examples for p in SPLITS[split])
        if max_images is not None:
            total = min(total, max_images)
            ds = ds.take(max_images)
    return total, (ex["image"] for ex in tfds.as_numpy(ds))


def build(data_dir: str | None, manual_dir: str | None, split: str, max_images: int | None,
          entry: str | None, progress: bool) -> Dataset:
    """Decodes a ``celeb_a`` split into the cache entry ``entry`` (None: in memory).

    Files are named ``celeb_a/<split>/<index>`` (TFDS keeps no file names).
    """
    total, images = _open(data_dir, manual_dir, split, max_images)
    if total == 0:
        raise UserError(f"tfds celeb_a split {split!r} is empty")
    writer = CacheWriter(entry, total, with_landmarks=False)
    try:
        count = 0
        with _quiet():
            for i, image in enumerate(progress_lib.track(images, total, "tfds celeb_a", "img",
                                                         disable=not progress)):
                if i >= total:
                    break
                arrays = preprocess(Image.fromarray(np.asarray(image, np.uint8)), crop="celeba")
                writer.put(i, [arrays[r] for r in RESOLUTIONS])
                count += 1
        if count == 0:
            raise UserError(f"tfds celeb_a split {split!r} gave no images")
        files = [f"{NAME}/{split}/{i:06d}" for i in range(count)]
        return writer.commit(files, [])
    finally:
        writer.abort()
