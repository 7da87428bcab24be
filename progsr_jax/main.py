"""Train progressive face super-resolution.

    python -m progsr_jax.main --config=configs/step3.py --workdir=DIR \
        [--config.data.root=CELEBA_ROOT] [--config.fan.checkpoint=FAN_DIR] [--config.<field>=...]

Re-running the same command on the same workdir resumes from its latest
checkpoint.  On a multi-host TPU pod or multi-GPU cluster add
``--multihost`` on every host (calls ``jax.distributed.initialize()``).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from progsr_jax.errors import UserError, run_cli

FLAGS = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py[:variant]).",
                                lock_config=True)
MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")


def _main(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS.workdir:
        raise UserError("--workdir is required")
    config = flags.FLAGS.config
    if config is None:
        raise UserError("--config is required, e.g. --config=configs/step3.py")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax's INFO lines off the console
    import jax
    if MULTIHOST.value:
        jax.distributed.initialize()
    from progsr_jax import train
    train.train_and_evaluate(config, flags.FLAGS.workdir)


def main() -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)

    def runner(argv):
        run_cli(lambda: _main(argv))

    try:
        app.run(runner, flags_parser=_parse_flags)
    except UserError as e:  # raised while parsing
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        msg = str(e).splitlines()[0]
        raise UserError(msg) from None
    except Exception as e:  # config file errors (missing file, bad variant, bad override)
        raise UserError(f"could not load the configuration: {str(e).splitlines()[0]}") from None


if __name__ == "__main__":
    main()
