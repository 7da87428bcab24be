"""What a landmark-distillation config must hold (the recipe: ``configs/distill_fan.py``)."""

from __future__ import annotations

from progsr_jax.data import SOURCES
from progsr_jax.training.config import Checks

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "muon")


def validate(config, num_devices: int = 1) -> None:
    """Raises UserError with a one-line message for any invalid value."""
    c = Checks(config)
    if not config.teacher_heatmaps:
        c.fail("teacher_heatmaps is not set: pass --config.teacher_heatmaps=DIR (a folder written "
               "by tools/convert_fan_weights.py teacher-heatmaps)")
    c.positive_int("batch_size", "steps", "log_every", "eval_every", "checkpoint_every",
                   "keep_checkpoints", "val.batch_size")
    c.batch(num_devices)
    c.positive("lr", "model.width", "kl_temperature")
    c.one_of("conv_grad", ("auto", "taps", "xla"))
    c.one_of("output_grad", ("exact", "straight_through"))
    c.one_of("optimizer", OPTIMIZERS)
    if config.optimizer == "muon":
        c.positive("muon_lr")
        c.in_range("muon_beta", 0, 1)
    c.non_negative("kl_weight", "model.output_init_scale")
    c.in_range("ema_decay", 0, 1)
    c.in_range("augment.scale", 0, 0.5)
    c.in_range("augment.shift", 0, 16)
    if not isinstance(config.augment.flip, bool):
        c.fail(f"augment.flip must be True or False, got {config.augment.flip!r}")
    c.one_of("lr_schedule", SCHEDULES)
    if not isinstance(config.warmup_steps, int) or not 0 <= config.warmup_steps < config.steps:
        c.fail(f"warmup_steps must be an integer in [0, steps), got {config.warmup_steps!r}")
    # Teacher heatmaps are matched to images by file name, which TFDS does not keep:
    # CelebA needs its folder here.
    c.data_source(SOURCES)
    c.workers()
    if not config.val.teacher_heatmaps:
        c.in_range("val.fraction", 0, 1)
    sizes = tuple(config.val.sizes)
    if not sizes or any(s not in (64, 128) for s in sizes):
        c.fail(f"val.sizes must be a non-empty subset of (64, 128), got {sizes!r}")
    c.positive_int("val.max_images", "val.max_images_128", allow_none=True)
