"""The progressive face super-resolution trainer, ``python -m progsr_jax.main``.

* :mod:`~progsr_jax.training.sr.config`: checks ``configs/step{1,2,3}.py``.
* :mod:`~progsr_jax.training.sr.trainer`: ``create_train_state``, the jitted
  ``train_step`` of each stage, ``train_and_evaluate``.
* :mod:`~progsr_jax.training.sr.validation`: PSNR/SSIM of the generator and
  of bicubic on held-out faces during training.
"""
