r"""Progressive face super-resolution trained up to stage 2 (16x16 -> 64x64).

    python -m progsr_jax.main --config=configs/step2.py --workdir=/runs/pfsr_step2 \
        [--config.data.root=/path/to/celeba]

The recipe of ``configs/step3.py`` (read it for every field and the paper's
numbers), stopped after stage 2: 50k + 50k iterations of batch 16.  Variants as
there: ``:paper``, ``:cpu``, ``:demo``, ``:smoke``.
"""

from progsr_jax.training.config import sibling


def get_config(variant="paper"):
    c = sibling(__file__, "step3.py", variant)
    c.final_stage = 2
    return c
