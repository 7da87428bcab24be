"""Distils the landmark network (the paper's "fan_squeeze" student) from teacher heatmaps.

Paper recipe (the default: MSE to the teacher heatmaps, Adam lr 1e-4, batch 16,
up to 100k iterations)::

    python -m progsr_jax.distill --config=configs/distill_fan.py --workdir=/tmp/fan_student \
        --config.teacher_heatmaps=/data/teacher_hm/train --config.data.root=/path/to/celeba \
        [--config.val.teacher_heatmaps=/data/teacher_hm/val]

Variants:

* ``configs/distill_fan.py:cpu``: the released architecture in about 15 minutes
  on 2 CPU cores, validation included (2,400 iterations of batch 4).  It
  deviates from the paper's recipe to get there: Adam lr 1.4e-3 (b2 0.99) with
  a warm-up and a cosine decay, the last convolution initialised 100x smaller
  and its LeakyReLU back-propagated straight through, and a small spatial
  softmax KL term next to the MSE (``kl_weight=1e-4``).  Measured: 838 s and
  validation NME64 1.42% against the released FAN (256 CelebA val faces).
* ``configs/distill_fan.py:smoke``: built-in synthetic faces, a narrow student,
  a few iterations; for tests.

See :mod:`progsr_jax.distill` for every field.
"""

from progsr_jax.distill import get_config as _get_config


def get_config(arg=None):
    return _get_config(arg)
