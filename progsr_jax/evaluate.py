r"""Evaluate a super-resolution model (or a bilinear/bicubic baseline) on a data set.

Usage::

    python -m progsr_jax.evaluate --checkpoint=WORKDIR --data_root=/data/celeba \
        --split=test --output=/tmp/eval [--method=model|bicubic|bilinear] \
        [--protocol=standard|pfsr] [--batch_size=16] [--source=celeba|folder|faces68|tfds] \
        [--crop=auto|celeba|square|landmarks] [--offset=N] [--limit=N] [--noclip] [--nolpips]
    python -m progsr_jax.evaluate --checkpoint=WORKDIR --source=tfds --split=test \
        --output=/tmp/eval      # CelebA's test partition through TensorFlow Datasets
    python -m progsr_jax.evaluate --checkpoint=WORKDIR --source=paired \
        --lr_dir=bench/lr16 --hr_dir=bench/hr128 --output=/tmp/eval   # inputs made elsewhere
    python -m progsr_jax.evaluate --checkpoint=WORKDIR --data_root=/data/celeba --split=val \
        --degradation=real --degradation_seed=0 --output=/tmp/eval   # degraded inputs

Data: the paper's preprocessing (:func:`progsr_jax.data.preprocess`): center
crop 178 (CelebA; ``--source=folder`` uses the center square), PIL bilinear
resize to 128, then 64, 32, 16.  The 16x16 image is the input, the 128x128
image the target.  ``--source=tfds`` reads CelebA's ``--split`` through
TensorFlow Datasets (``celeb_a``; ``--data_root``, if given, is TFDS's
data_dir), with the same preprocessing.  ``--source=faces68`` (or ``--crop=landmarks``) is the
unaligned-face setting: a square of side ``--crop_scale`` (default 1.9) times
the larger side of the 68 landmarks' bounding box, centred ``--crop_shift``
(0.17) x side above the box centre - the framing of the CelebA crops - is cut
out of each image (black outside the photo), then the same 128/64/32/16 chain
is applied.  Images need a ``.pts`` file beside them (300-W format).

``--source=paired``: 16x16 inputs made elsewhere (``--lr_dir``), used
exactly as given, scored against the 128x128 images of ``--hr_dir`` with the
same file stem (path under the folder without extension); files without a
partner, stems used twice and images of another size are skipped and named.
``--degradation=mild|real`` replaces any other source's 16x16 input by one
degraded from its 128x128 image (:mod:`progsr_jax.data.degradation`), file
``i`` by ``(--degradation_seed, 0, i)``: a fixed degraded test set.

Methods: ``bicubic``/``bilinear`` resize the 16x16 uint8 input to the output
size with PIL (``Image.BICUBIC``/``Image.BILINEAR``); ``model`` runs
:func:`progsr_jax.inference.load` on ``--checkpoint``.  A model still at step
1 or 2 is scored at its output size (32 or 64) against the matching target.

Outputs are mapped to [0, 1] as ``0.5 * x + 0.5`` and, under the standard
protocol, clipped to [0, 1]; under ``--protocol=pfsr`` they stay unclipped,
as in the authors' released ``eval.py``, which neither clips nor quantises
(``--clip``/``--noclip`` override).  They are not
quantised to uint8 here either.  Targets are the uint8 images / 255.

Protocols (see :mod:`progsr_jax.evaluation.metrics`): ``standard`` = mean of
per-image metrics; ``pfsr`` = the released eval: batches of ``--batch_size``
(16) in file order, batch-MSE PSNR, batch-mean SSIM, the released MS-SSIM formula,
mean over batches.  ``psnr``/``ssim``/``ms_ssim`` in metrics.json follow the
protocol; ``lpips``, ``psnr_y`` and ``ssim_y`` are always per-image means (the
released eval has none of them), and ``per_image_mean`` holds every metric
under the standard protocol.

Writes ``OUTPUT/metrics.json``, ``OUTPUT/per_image.csv`` (per-image values,
under either protocol) and ``OUTPUT/comparison.png`` (rows: best, median and
worst image by PSNR; columns: LR nearest-upsampled | bicubic | SR | HR).
Unreadable files are skipped and listed in metrics.json (``skipped``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import flags

from progsr_jax import cli
from progsr_jax.data import crops
from progsr_jax.evaluation import sr


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "training workdir, checkpoint directory or "
                        "converted official checkpoint (needed for --method=model)",
                        flag_values=fv)
    flags.DEFINE_string("data_root", None, "data folder (CelebA root, or any image folder)",
                        flag_values=fv)
    flags.DEFINE_string("split", "test", "CelebA split: train, val, test or all", flag_values=fv)
    flags.DEFINE_string("output", None, "output folder for metrics.json, per_image.csv, "
                        "comparison.png", flag_values=fv)
    flags.DEFINE_enum("method", "model", sr.METHODS, "what produces the SR images",
                      flag_values=fv)
    flags.DEFINE_enum("protocol", "standard", sr.PROTOCOLS, "standard: mean per-image "
                      "metrics; pfsr: the authors' released batch-wise evaluation",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "batch size (the pfsr protocol's batch)",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("source", "celeba", sr.SOURCES, "celeba: partition file; folder: all "
                      "images under data_root; faces68: images with .pts landmarks; tfds: "
                      "CelebA through TensorFlow Datasets; paired: --lr_dir and --hr_dir",
                      flag_values=fv)
    flags.DEFINE_enum("crop", "auto", sr.CROPS, "auto: celeba for celeba, square for folder, "
                      "landmarks for faces68", flag_values=fv)
    flags.DEFINE_float("crop_scale", crops.DEFAULT_CROP_SCALE, "landmark crop: side = "
                       "crop_scale * larger side of the landmarks' bounding box", flag_values=fv)
    flags.DEFINE_float("crop_shift", crops.DEFAULT_CROP_SHIFT, "landmark crop: the crop centre "
                       "is crop_shift * side above the landmarks' box centre", flag_values=fv)
    flags.DEFINE_integer("limit", None, "evaluate only the first N files (after --offset)",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("offset", 0, "skip the first N files (in the split's order)",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_boolean("clip", None, "clip SR outputs to [0, 1] before scoring (default: "
                         "yes, except under --protocol=pfsr, whose released eval does not clip)",
                         flag_values=fv)
    flags.DEFINE_boolean("lpips", True, "compute LPIPS (VGG16; the slowest metric on CPU)",
                         flag_values=fv)
    flags.DEFINE_integer("workers", 2, "image decoding threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show a progress bar", flag_values=fv)
    flags.DEFINE_string("lr_dir", None, "--source=paired: folder of 16x16 inputs",
                        flag_values=fv)
    flags.DEFINE_string("hr_dir", None, "--source=paired: folder of 128x128 targets (same "
                        "file stems)", flag_values=fv)
    flags.DEFINE_string("degradation", "none", "none, mild or real: degrade the 16x16 inputs "
                        "from the 128x128 images (progsr_jax.data.degradation)", flag_values=fv)
    flags.DEFINE_integer("degradation_seed", 0, "seed of --degradation's fixed test set",
                         lower_bound=0, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    cfg = sr.EvalConfig(**{f.name: fv[f.name].value for f in dataclasses.fields(sr.EvalConfig)})
    if cfg.clip is None:
        cfg.clip = cfg.protocol != "pfsr"
    result = sr.evaluate(cfg)
    print(sr.summary(result))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable file(s); see metrics.json")
    print(f"wrote {os.path.abspath(cfg.output)}/{{metrics.json,per_image.csv,comparison.png}}")
    return 0


if __name__ == "__main__":
    cli.run(main)
