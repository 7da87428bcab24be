"""Progressive face SR trained up to stage 1 (32x32 output).

Paper recipe (50k iterations per stage at stages 1-2, 100k at stage 3, batch 16)::

    python -m progsr_jax.main --config=configs/step1.py --workdir=/tmp/progsr_step1 \
        --config.data.root=/path/to/celeba [--config.fan.checkpoint=/path/to/converted_fan]

Variants: `configs/step1.py:smoke` (built-in synthetic faces, tiny model, minutes on a
CPU) and `configs/step1.py:cpu` (real faces, a budget for 2 CPU cores).
"""

from progsr_jax.config_lib import recipe


def get_config(arg=None):
    return recipe(1, arg)
