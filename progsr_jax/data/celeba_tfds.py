"""CelebA through TensorFlow Datasets (``celeb_a``), decoded into the same cache."""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from progsr_jax.data.cache import CacheWriter, Dataset
from progsr_jax.data.images import RESOLUTIONS, preprocess
from progsr_jax.errors import UserError

SPLITS = {"train": ("train",), "val": ("validation",), "valid": ("validation",),
                "validation": ("validation",), "test": ("test",),
                "all": ("train", "validation", "test")}


def _open(root: str | None, split: str, max_images: int | None):
    """Opens tfds' ``celeb_a``: (number of examples, iterator of uint8 images).

    Images are the aligned 218x178 (HxW) CelebA JPEGs, decoded by tfds.
    """
    try:
        import tensorflow_datasets as tfds  # optional dependency
    except ImportError:
        raise UserError("source='tfds' needs tensorflow-datasets: "
                        "pip install 'progsr_jax[tfds]'") from None
    if split not in SPLITS:
        raise UserError(f"unknown tfds split {split!r}; expected one of {', '.join(SPLITS)}")
    parts = SPLITS[split]
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


def build(root: str | None, split: str, max_images: int | None, entry: str | None,
                progress: bool) -> Dataset:
    from tqdm import tqdm

    total, images = _open(root, split, max_images)
    if total == 0:
        raise UserError(f"tfds celeb_a split {split!r} is empty")
    writer = CacheWriter(entry, total, with_landmarks=False)
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
