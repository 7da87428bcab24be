"""Evaluation: image-quality metrics, super-resolution and landmark evaluation.

* :mod:`~progsr_jax.evaluation.metrics`: PSNR, SSIM, MS-SSIM, LPIPS, Y-channel
  metrics and the authors' released batch-wise ("pfsr") protocol.
* :mod:`~progsr_jax.evaluation.crops`: what the commands share: landmark
  crops and ``.pts`` points, the threaded file loader, output folders.
* :mod:`~progsr_jax.evaluation.sr`: super-resolution evaluation (model or
  bicubic/bilinear baseline), ``python -m progsr_jax.evaluate``.
* :mod:`~progsr_jax.evaluation.landmarks`: landmark NME of a converted FAN,
  ``python -m progsr_jax.evaluate_landmarks``.
* :mod:`~progsr_jax.evaluation.teacher_nme`: the distillation trainer's
  validation NME of a student against its teacher, and landmark overlays.
"""
