"""Training: one small shared core and the two trainers built on it.

Shared by both trainers:

* :mod:`~progsr_jax.training.config`: loading config files; the one validator style.
* :mod:`~progsr_jax.training.core`: mesh and shardings, stop-on-signal, the
  in-graph non-finite check and the loop with its log/checkpoint cadence.
* :mod:`~progsr_jax.training.checkpoint`: Orbax save, resume, config check
  (on the checkpoint format of :mod:`progsr_jax.checkpoints`).
* :mod:`~progsr_jax.training.reporting`: console/log.txt, metrics.jsonl,
  TensorBoard, progress bar, image grids.
* :mod:`~progsr_jax.training.distributed`: several hosts (``--multihost``):
  launch flags, replicated state, one writer, agreed stop, data prepared once.

The trainers:

* :mod:`~progsr_jax.training.sr` (+ :mod:`~progsr_jax.training.sr_config`):
  progressive face super-resolution, ``python -m progsr_jax.main``.
* :mod:`~progsr_jax.training.distill` (+ ``distill_config``, ``distill_data``,
  ``distill_step``, ``distill_validation``): the landmark student,
  ``python -m progsr_jax.distill``.

Validation during training: :mod:`~progsr_jax.training.sr_validation` (PSNR/SSIM
of the generator and bicubic) and :mod:`~progsr_jax.training.distill_validation`
(the student's NME against its teacher).  The layers below (``inference``,
``checkpoints``, ``evaluation/``, ``photo/``, ``data/``) never import this package.
"""
