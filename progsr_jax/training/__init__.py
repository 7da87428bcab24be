"""Training: one small shared core and the two trainers built on it.

Shared by both trainers:

* :mod:`~progsr_jax.training.config`: loading config files; the one validator style.
* :mod:`~progsr_jax.training.core`: mesh and shardings, stop-on-signal, the
  in-graph non-finite check and the loop with its log/checkpoint cadence.
* :mod:`~progsr_jax.training.checkpoint`: Orbax save, resume, config check.
* :mod:`~progsr_jax.training.reporting`: console/log.txt, metrics.jsonl,
  TensorBoard, progress bar, image grids.
* :mod:`~progsr_jax.training.distributed`: several hosts (``--multihost``):
  launch flags, replicated state, one writer, agreed stop, data prepared once.

The trainers:

* :mod:`~progsr_jax.training.sr` (+ :mod:`~progsr_jax.training.sr_config`):
  progressive face super-resolution, ``python -m progsr_jax.main``.
* :mod:`~progsr_jax.training.distill` (+ ``distill_config``, ``distill_data``,
  ``distill_step``): the landmark student, ``python -m progsr_jax.distill``.
"""
