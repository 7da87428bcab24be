"""What a super-resolution config must hold, and how the trainer reads it.

The recipes themselves are in ``configs/step{1,2,3}.py``; this module checks
one (:func:`validate`) and derives what the trainer needs from it.
"""

from __future__ import annotations

from progsr_jax.data import SOURCES, degradation
from progsr_jax.training.config import Checks

LOSS_TERMS = ("pixel", "perceptual", "adversarial", "heatmap", "attention")


def d_width(config) -> float:
    """The discriminator's width multiplier (``model.d_width``, or ``model.width`` when unset)."""
    w = config.model.d_width
    return float(config.model.width if w is None else w)


def loss_weights(config, stage: int) -> dict[str, float]:
    w = config.loss[f"stage{stage}"]
    return {k: float(w[k]) for k in LOSS_TERMS}


def validate(config, num_devices: int = 1) -> None:
    """Raises UserError with a one-line message for any invalid value."""
    c = Checks(config)
    c.batch(num_devices)
    c.one_of("start_stage", (1, 2, 3))
    c.one_of("final_stage", (1, 2, 3))
    if config.start_stage > config.final_stage:
        c.fail(f"start_stage {config.start_stage} is after final_stage {config.final_stage}")
    steps = tuple(config.stage_steps)
    if len(steps) != 3 or any((not isinstance(s, int)) or s < 0 for s in steps):
        c.fail(f"stage_steps must be three non-negative integers, got {steps!r}")
    if any(steps[k - 1] == 0 for k in range(config.start_stage, config.final_stage + 1)):
        c.fail(f"stage_steps {steps} gives zero iterations to a trained stage")
    c.non_negative("fade_steps")
    c.positive("model.width", "optim.lr")
    c.positive("model.d_width", allow_none=True)
    c.one_of("model.dtype", ("float32", "bfloat16"))
    c.one_of("optim.decay", ("none", "cosine"))
    c.one_of("loss.pixel", ("l1", "mse"))
    c.one_of("loss.heatmap_norm", ("own", "pfsr_code"))
    for k in (1, 2, 3):
        c.non_negative(*(f"loss.stage{k}.{t}" for t in LOSS_TERMS))
    c.data_source(SOURCES, need_root=("folder",))  # celeba without a root: through TFDS
    degradation.from_config(config.data.get("degradation"))  # UserError for a bad value
    c.workers()
    c.positive_int("data.prefetch")
    c.positive_int("log_every", "checkpoint_every", "sample_every", "eval_every",
                   "keep_checkpoints", "val.batch_size")
    if not isinstance(config.val.num_images, int) or config.val.num_images < 0:
        c.fail(f"val.num_images must be a non-negative integer (0: no validation), "
               f"got {config.val.num_images!r}")
