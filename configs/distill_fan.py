"""Distils the landmark network (the paper's "fan_squeeze" student) from teacher heatmaps.

Paper recipe (the default: MSE to the teacher heatmaps, Adam lr 1e-4, batch 16,
up to 100k iterations)::

    python -m progsr_jax.distill --config=configs/distill_fan.py --workdir=/tmp/fan_student \
        --config.teacher_heatmaps=/data/teacher_hm/train --config.data.root=/path/to/celeba \
        [--config.val.teacher_heatmaps=/data/teacher_hm/val]

Variants:

* ``configs/distill_fan.py:cpu``: the released architecture in about 12 minutes
  on 2 CPU cores, validation included (1,400 iterations of batch 4).  It
  deviates from the paper's recipe to get there: Muon (lr 0.05) for the
  convolution weights and Adam (lr 1.4e-3, b2 0.99) for the rest, with a
  warm-up and a cosine decay; the last convolution initialised 100x smaller
  and its LeakyReLU back-propagated straight through; and a small spatial
  softmax KL term next to the MSE (``kl_weight=1e-4``).  Measured on the
  4,591 CelebA training images of ``../shared`` with the released distilled
  FAN as teacher: 12 min 8 s wall (start-up and the final validation
  included), validation NME64 1.23% against the teacher on all 780 CelebA
  val faces (NME128 7.2% on 200).
* ``configs/distill_fan.py:smoke``: built-in synthetic faces, a narrow student,
  a few iterations; for tests.

See :mod:`progsr_jax.distill` for every field.
"""

from progsr_jax.distill import get_config as _get_config


def get_config(arg=None):
    return _get_config(arg)
