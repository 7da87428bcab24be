"""The landmark-network distillation trainer, ``python -m progsr_jax.distill``.

* :mod:`~progsr_jax.training.distill.config`: checks ``configs/distill_fan.py``.
* :mod:`~progsr_jax.training.distill.data`: images and teacher heatmaps of a split.
* :mod:`~progsr_jax.training.distill.state`: the student's state and its EMA.
* :mod:`~progsr_jax.training.distill.optim`: the optimisers (Adam, Muon) and
  the learning-rate schedule.
* :mod:`~progsr_jax.training.distill.augment`: flips, shifts and zooms applied
  to an image and its heatmaps alike.
* :mod:`~progsr_jax.training.distill.conv_taps`: the tap-by-tap convolution
  weight gradient (fast on XLA:CPU).
* :mod:`~progsr_jax.training.distill.step`: the loss, its gradient, the update.
* :mod:`~progsr_jax.training.distill.validation`: the student's NME against its
  teacher, and overlays.
* :mod:`~progsr_jax.training.distill.trainer`: ``train_and_evaluate`` and
  ``evaluate_only``.
"""
