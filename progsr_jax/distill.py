r"""Distil the landmark network ("fan_squeeze" student) from precomputed teacher heatmaps.

    python -m progsr_jax.distill --config=configs/distill_fan.py --workdir=DIR \
        --config.teacher_heatmaps=HM_DIR --config.data.root=CELEBA_ROOT \
        [--config.val.teacher_heatmaps=HM_VAL_DIR] [--config.<field>=...]
    python -m progsr_jax.distill --config=configs/distill_fan.py --workdir=DIR --eval_only \
        --config.val.teacher_heatmaps=HM_VAL_DIR --config.data.root=CELEBA_ROOT [--fan=FAN_DIR]

The teacher heatmaps come from ``tools/convert_fan_weights.py teacher-heatmaps``.
Re-running the same command resumes.  Several hosts: the same command on every
host with ``--multihost`` (as for ``python -m progsr_jax.main``).  What the run
writes: :mod:`progsr_jax.training.distill.trainer`.
"""

from __future__ import annotations

from absl import flags

from progsr_jax import cli
from progsr_jax.errors import UserError
from progsr_jax.training import distributed
from progsr_jax.training.distill import trainer as distill


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the "
                        "distilled student.", flag_values=fv)
    flags.DEFINE_bool("eval_only", False, "Only compute the validation NME of --fan (default: "
                      "the workdir's student) and write WORKDIR/eval_nme.json.", flag_values=fv)
    flags.DEFINE_string("fan", None, "With --eval_only: a FAN folder to evaluate.",
                        flag_values=fv)
    distributed.define_flags(fv)


def main(argv=None) -> int:
    fv = cli.parse(argv, define, __doc__, config="configs/distill_fan.py[:paper|cpu|smoke]")
    if fv.eval_only and fv.multihost:
        raise UserError("--eval_only runs on one process; leave out --multihost")
    distributed.initialize(fv)

    if fv.eval_only:
        distill.evaluate_only(fv.config, fv.workdir, fv.fan)
        return 0
    cli.require(fv, "workdir")
    if fv.fan:
        raise UserError("--fan is only used with --eval_only")
    distill.train_and_evaluate(fv.config, fv.workdir)
    return 0


if __name__ == "__main__":
    cli.run(main)
