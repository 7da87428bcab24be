"""PyTorch reference code (needs the ``torch`` extra: ``pip install -e '.[torch]'``).

* :mod:`~progsr_jax.interop.pytorch.reference`: the paper's G, D,
  VGG16 features and one training iteration, written from PAPER_FACTS.
* :mod:`~progsr_jax.interop.pytorch.fan4`: face-alignment's FAN(4) teacher and
  the ``fan_squeeze`` student, as used by ``tools/convert_fan_weights.py``.
* :mod:`~progsr_jax.interop.pytorch.mtcnn`: facenet-pytorch's MTCNN networks,
  for the detector's parity tests.
"""

from progsr_jax.errors import UserError

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise UserError("this needs PyTorch: pip install torch (see README, 'Installation')") from e

#: The PyTorch version the references run on.
TORCH_VERSION = torch.__version__
