r"""Landmark accuracy (NME) of a converted face-alignment network.

Usage::

    python -m progsr_jax.evaluate_landmarks --fan=DIR --data_root=ROOT \
        [--reference_fan=DIR] [--size=64|128] [--crop=landmarks|square|celeba] \
        [--crop_scale=1.9] [--crop_shift=0.17] [--limit=N] [--output=DIR]

``--fan``/``--reference_fan`` are converted FAN folders
(:func:`progsr_jax.nets.fan.load`).  ``--data_root`` is a folder of images
(searched recursively) with 300-W ``.pts`` files beside them (0-based pixel
coordinates), e.g. ``shared/data/faces68`` or one of its ``afw``,
``helen_train``, ``ffhq`` subfolders.

Each image is cropped to a square (``--crop=landmarks``, the default: side =
``--crop_scale`` x the larger side of the ground-truth landmarks' bounding
box, centred ``--crop_shift`` x side above the box centre - the framing of
the CelebA crops, see :data:`progsr_jax.data.crops.DEFAULT_CROP_SCALE`
-, black outside the photo; ``square``: the image's center square;
``celeba``: the 178x178 center crop), resized to 128 with PIL
bilinear and, for ``--size=64``, on to 64 (the same chain as the training
targets, so the FAN sees what it sees in training).  Ground-truth points are
mapped into that image with the same geometry as the resize (pixel centres
at integers: ``p' = (p - corner + 0.5) * size / side - 0.5``).

The network's heatmaps are decoded with
:func:`progsr_jax.fan_lib.heatmaps_to_landmarks` (argmax +- 0.25 px,
0-based pixel-index coordinates) and rescaled to ``size`` if the heatmaps
have another resolution.  NME (paper Table 1) = mean over the 68 points of
``||p - g||_2 / size``.  Reported: NME against the ground truth (images with
a ``.pts`` file) and, with ``--reference_fan``, against the reference
network's landmarks on the same input (all images), overall and per
top-level subfolder, in percent.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from progsr_jax import cli
from progsr_jax.data import crops
from progsr_jax.evaluation.landmarks import CROPS, SIZES, evaluate_landmarks


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("fan", None, "converted FAN folder to evaluate", flag_values=fv)
    flags.DEFINE_string("data_root", None, "folder of images with .pts files", flag_values=fv)
    flags.DEFINE_string("reference_fan", None, "optional second converted FAN: also report "
                        "the NME against its landmarks", flag_values=fv)
    flags.DEFINE_enum("size", "64", [str(s) for s in SIZES], "input resolution of the FAN",
                      flag_values=fv)
    flags.DEFINE_enum("crop", "landmarks", CROPS, "how each face is cropped", flag_values=fv)
    flags.DEFINE_float("crop_scale", crops.DEFAULT_CROP_SCALE, "landmark crop side / larger "
                       "side of the landmarks' bounding box", flag_values=fv)
    flags.DEFINE_float("crop_shift", crops.DEFAULT_CROP_SHIFT, "landmark crop: the crop centre "
                       "is crop_shift * side above the landmarks' box centre", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per network call", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("limit", None, "use only the first N images", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("output", None, "optional folder for landmarks_metrics.json and "
                        "landmarks_per_image.csv", flag_values=fv)
    flags.DEFINE_integer("workers", 2, "image decoding threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show a progress bar", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    evaluate_landmarks(fv.fan, fv.data_root, fv.reference_fan, size=int(fv.size), crop=fv.crop,
                       crop_scale=fv.crop_scale, crop_shift=fv.crop_shift,
                       batch_size=fv.batch_size, limit=fv.limit,
                       output=fv.output, workers=fv.workers, progress=fv.progress)
    return 0


if __name__ == "__main__":
    cli.run(main)
