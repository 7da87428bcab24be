"""Training: one small shared core and the two trainers built on it.

Shared by both trainers:

* :mod:`~progsr_jax.training.config`: finding and loading config files (the
  recipes of a checkout or of the installed package); the one validator style.
* :mod:`~progsr_jax.training.core`: mesh and shardings, stop-on-signal, the
  in-graph non-finite check and the loop with its log/checkpoint cadence.
* :mod:`~progsr_jax.training.resume`: Orbax save, resume, the config check of
  a resumed run (on the checkpoint format of :mod:`progsr_jax.inference.checkpoints`).
* :mod:`~progsr_jax.training.reporting`: console/log.txt, metrics.jsonl,
  TensorBoard, progress bar, image grids.
* :mod:`~progsr_jax.training.distributed`: several hosts (``--multihost``):
  launch flags, replicated state, one writer, agreed stop, data prepared once.

The trainers:

* :mod:`progsr_jax.training.sr`: progressive face super-resolution,
  ``python -m progsr_jax.main``.
* :mod:`progsr_jax.training.distill`: the landmark student,
  ``python -m progsr_jax.distill``.

The layers below (``nets/``, ``inference/``, ``evaluation/``, ``photo/``,
``data/``) never import this package.
"""
