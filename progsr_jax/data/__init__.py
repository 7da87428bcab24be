"""Data: the paper's preprocessing, the sources, the decode cache and batching.

The path of an image through the pipeline:

1. :mod:`~progsr_jax.data.splits` lists the image files of a split (CelebA
   official or Kaggle layout, or any folder of images);
   :mod:`~progsr_jax.data.celeba_tfds` reads CelebA through TFDS instead and
   :mod:`~progsr_jax.data.synthetic` draws procedural faces with landmarks.
2. :mod:`~progsr_jax.data.images` decodes one file to RGB and applies the
   paper's preprocessing (center crop 178, bilinear 128 -> 64 -> 32 -> 16).
3. :mod:`~progsr_jax.data.dataset` (:func:`build_dataset`) does that once
   for every file, in worker processes, into the memory-mapped
   :mod:`~progsr_jax.data.cache`.
4. :mod:`~progsr_jax.data.batches` draws deterministic batches (a pure
   function of ``(seed, step)``, degraded on the fly by
   :mod:`~progsr_jax.data.degradation` if asked) and makes them ahead in
   worker processes with grain (:class:`InputPipeline`), onto the devices.

:mod:`~progsr_jax.data.teacher` reads the teacher heatmaps used to distil the
landmark network; :mod:`~progsr_jax.data.reading` decodes a list of files in
threads for the commands (evaluate, infer) and :mod:`~progsr_jax.data.writing`
is where every command writes (never over an input, checked before anything
is created, atomically).  The names below are the public API of the package.
"""

from progsr_jax.data.batches import (
                                     BatchLoader,
                                     InputPipeline,
                                     WorkerDied,
                                     assemble,
                                     batch_indices,
                                     gather,
                                     get_batch,
                                     local_rows,
                                     measure_throughput,
                                     workers_for,
)
from progsr_jax.data.cache import PREPROCESS_VERSION, Dataset
from progsr_jax.data.dataset import SOURCES, build_dataset
from progsr_jax.data.images import (
                                     CELEBA_CROP,
                                     CROPS,
                                     RESOLUTIONS,
                                     BadImage,
                                     center_crop,
                                     open_image,
                                     preprocess,
                                     to_float,
                                     to_uint8,
                                     upscale,
)
from progsr_jax.data.splits import IMAGE_EXTENSIONS, list_files

__all__ = [
    "BadImage", "BatchLoader", "CELEBA_CROP", "CROPS", "Dataset", "IMAGE_EXTENSIONS",
    "InputPipeline", "PREPROCESS_VERSION", "RESOLUTIONS", "SOURCES", "WorkerDied", "assemble",
    "batch_indices", "build_dataset", "center_crop", "gather", "get_batch", "list_files",
    "local_rows", "measure_throughput", "open_image", "preprocess", "to_float", "to_uint8",
    "upscale", "workers_for",
]
