r"""Train progressive face super-resolution.

    python -m progsr_jax.main --config=configs/step3.py --workdir=DIR \
        [--config.data.root=CELEBA_ROOT] [--config.fan.checkpoint=FAN_DIR] [--config.<field>=...]

Without ``--config.data.root`` CelebA comes through TensorFlow Datasets.
Re-running the same command on the same workdir resumes from its latest
checkpoint.  On a TPU pod slice or several GPU hosts run the same command
on every host with ``--multihost`` (and ``--coordinator_address``,
``--num_processes``, ``--process_id`` where JAX cannot detect them); the
workdir must be a folder every host shares.
"""

from __future__ import annotations

from absl import flags

from progsr_jax import cli
from progsr_jax.training import distributed
from progsr_jax.training.sr import trainer as sr


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.",
                        flag_values=fv)
    distributed.define_flags(fv)


def main(argv=None) -> int:
    fv = cli.parse(argv, define, __doc__, config="configs/step3.py[:paper|cpu|demo|smoke]")
    cli.require(fv, "workdir")
    distributed.initialize(fv)

    sr.train_and_evaluate(fv.config, fv.workdir)
    return 0


if __name__ == "__main__":
    cli.run(main)
