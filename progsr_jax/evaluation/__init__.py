"""Evaluation: image-quality metrics, super-resolution and landmark evaluation.

* :mod:`~progsr_jax.evaluation.metrics`: PSNR, SSIM, MS-SSIM, LPIPS, Y-channel
  metrics, the authors' released batch-wise ("pfsr") protocol, landmark NME.
* :mod:`~progsr_jax.evaluation.inputs`: inputs other than the clean chain:
  paired LR/HR folders (``--source=paired``) and fixed degraded test sets.
* :mod:`~progsr_jax.evaluation.sr`: super-resolution evaluation (model or
  bicubic/bilinear baseline), ``python -m progsr_jax.evaluate``.
* :mod:`~progsr_jax.evaluation.landmarks`: landmark NME of a converted FAN,
  ``python -m progsr_jax.evaluate_landmarks``.
* :mod:`~progsr_jax.evaluation.sweep_plot`: the face-size sweep's plot
  (``tools/face_size_sweep.py``).

The files are read with :mod:`progsr_jax.data.crops` and
:mod:`progsr_jax.data.reading`.  Nothing here imports
:mod:`progsr_jax.training`; the trainers' validators
(``training/sr/validation.py``, ``training/distill/validation.py``) build on
:mod:`~progsr_jax.evaluation.metrics` and :mod:`progsr_jax.inference`.
"""
