"""Evaluation: image-quality metrics, super-resolution and landmark evaluation.

* :mod:`~progsr_jax.evaluation.metrics`: PSNR, SSIM, MS-SSIM, LPIPS, Y-channel
  metrics and the authors' released batch-wise ("pfsr") protocol.
* :mod:`~progsr_jax.data.crops`: what the commands share: landmark
  crops and ``.pts`` points, the file loaders (decoded in threads by
  :mod:`progsr_jax.data.reading`).
* :mod:`~progsr_jax.evaluation.sr`: super-resolution evaluation (model or
  bicubic/bilinear baseline), ``python -m progsr_jax.evaluate``.
* :mod:`~progsr_jax.evaluation.landmarks`: landmark NME of a converted FAN,
  ``python -m progsr_jax.evaluate_landmarks``.

Nothing here imports :mod:`progsr_jax.training`; the trainers' validators
(``training/sr_validation.py``, ``training/distill_validation.py``) build on
:mod:`~progsr_jax.evaluation.metrics` and :mod:`progsr_jax.inference`.
"""
