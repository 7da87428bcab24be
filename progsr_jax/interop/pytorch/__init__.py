"""PyTorch reference code (needs the ``torch`` extra: ``pip install -e '.[torch]'``).

* :mod:`~progsr_jax.interop.pytorch.reference`: the paper's G, D,
  VGG16 features and one training iteration, written from PAPER_FACTS.
* :mod:`~progsr_jax.interop.pytorch.fan4`: face-alignment's FAN(4) teacher and
  the ``fan_squeeze`` student, as used by ``tools/convert_fan_weights.py``.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    from progsr_jax.errors import UserError

    raise UserError("this needs PyTorch: pip install torch (see README, 'Installation')") from e
