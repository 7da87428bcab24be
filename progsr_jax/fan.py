"""The distilled face-alignment network ("fan_squeeze") of the paper, in Flax.

Layout of the released ``compressed_model_011000.pth`` (a whole-module pickle
of ``fan_model.fan_squeeze``; see ``shared/README.md``)::

    conv      Conv2d(3 -> 32, k5, p2)
    layers.0  Conv2d(32 -> 64, k3, p1)   layers.1 BatchNorm2d(64)   layers.2 LeakyReLU(0.01)
    layers.3  Conv2d(64 -> 128, k3, p1)  layers.4 BatchNorm2d(128)  layers.5 LeakyReLU(0.01)
    layers.6  Conv2d(128 -> 128, k3, p1) layers.7 BatchNorm2d(128)  layers.8 LeakyReLU(0.01)
    layers.9  Conv2d(128 -> 68, k3, p1)  layers.10 LeakyReLU(0.01)

All convolutions have stride 1, so the output has the input's resolution.
321,412 learnable parameters at width 1.0.  Flax names follow
:mod:`progsr_jax.interop.state_dict` (``layers.1.running_mean`` <->
``batch_stats/layers_1/running_mean``).  Note: the released module was
pickled in training mode (``training=True``); the heatmap loss here uses it in
evaluation mode (running statistics) unless ``train=True`` is passed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from progsr_jax.landmarks import NUM_LANDMARKS
from progsr_jax.layers import BatchNorm2d, Conv2d

STUDENT_FAN_PARAMS = 321_412
_CHANNELS = (32, 64, 128, 128)
LEAKY_SLOPE = 0.01  # negative slope of every LeakyReLU, the output's included
OUTPUT_LAYER = "layers_9"  # the last convolution (68 heatmaps)


def _leaky_relu(x):
    return jax.nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


class StudentFAN(nn.Module):
    """Distilled FAN: NHWC RGB in [0, 1], any size -> (N, H, W, 68) heatmaps.

    ``width`` scales the hidden channel counts (1.0 = the released network).
    """

    width: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c0, c1, c2, c3 = (max(1, int(round(c * self.width))) for c in _CHANNELS)
        x = x.astype(self.dtype)
        x = Conv2d(c0, 5, 2, dtype=self.dtype, name="conv")(x)
        for conv_idx, feats in ((0, c1), (3, c2), (6, c3)):
            x = Conv2d(feats, 3, 1, dtype=self.dtype, name=f"layers_{conv_idx}")(x)
            x = BatchNorm2d(dtype=self.dtype, name=f"layers_{conv_idx + 1}")(x, train=train)
            x = _leaky_relu(x)
        x = Conv2d(NUM_LANDMARKS, 3, 1, dtype=self.dtype, name=OUTPUT_LAYER)(x)
        return _leaky_relu(x)


def init_variables(module: StudentFAN, size: int = 64, seed: int = 0) -> dict:
    """Randomly initialised variables (``params`` and ``batch_stats``)."""
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return module.init(jax.random.PRNGKey(seed), x)


def abstract_variables(module: StudentFAN) -> dict:
    """Shapes/dtypes of the variables, without computing anything."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))

