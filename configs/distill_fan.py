"""Distils the landmark network (the paper's "fan_squeeze" student) from teacher heatmaps.

Paper recipe (MSE to the teacher heatmaps, Adam lr 1e-4, batch 16, up to 100k
iterations)::

    python -m progsr_jax.distill --config=configs/distill_fan.py --workdir=/tmp/fan_student \
        --config.teacher_heatmaps=/data/teacher_hm/train --config.data.root=/path/to/celeba \
        [--config.val.teacher_heatmaps=/data/teacher_hm/val]

Variants: `configs/distill_fan.py:cpu` (the released architecture in about 15
minutes on 2 CPU cores, validation included) and `configs/distill_fan.py:smoke`
(built-in synthetic faces, a narrow student, a few iterations; for tests).
See :mod:`progsr_jax.distill` for every field.
"""

from progsr_jax.distill import get_config as _get_config


def get_config(arg=None):
    return _get_config(arg)
