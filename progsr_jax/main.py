r"""Train progressive face super-resolution.

    python -m progsr_jax.main --config=configs/step3.py --workdir=DIR \
        [--config.data.root=CELEBA_ROOT] [--config.fan.checkpoint=FAN_DIR] [--config.<field>=...]

Without ``--config.data.root`` CelebA comes through TensorFlow Datasets.
Re-running the same command on the same workdir resumes from its latest
checkpoint.  On a multi-host TPU pod or multi-GPU cluster add
``--multihost`` on every host (calls ``jax.distributed.initialize()``).
"""

from __future__ import annotations

from absl import flags

from progsr_jax import cli


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.",
                        flag_values=fv)
    flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.",
                      flag_values=fv)


def main(argv=None) -> int:
    fv = cli.parse(argv, define, __doc__, config="configs/step3.py[:paper|cpu|demo|smoke]")
    cli.require(fv, "workdir")
    import jax

    if fv.multihost:
        jax.distributed.initialize()
    from progsr_jax.training import sr

    sr.train_and_evaluate(fv.config, fv.workdir)
    return 0


if __name__ == "__main__":
    cli.run(main)
