"""Flax layers with PyTorch semantics and PyTorch parameter names.

Each layer stores its parameters under the names PyTorch uses (``weight``,
``bias``, ``weight_orig``, ``running_mean``, ``running_var``) so that a
parameter tree maps one-to-one onto a PyTorch ``state_dict``
(see :mod:`progsr_jax.interop.state_dict`).  Only the memory layout differs:

* convolution weights are stored HWIO (PyTorch: OIHW),
* transposed-convolution weights are stored (kh, kw, in, out) (PyTorch: in, out, kh, kw),
* linear weights are stored (in, out) (PyTorch: out, in).

All layers compute in ``dtype`` (float32 or bfloat16) and keep float32
parameters.  Images are NHWC.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


def _torch_uniform(bound: float):
    """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv2d(x, w, b, padding: int, dtype):
    """NHWC x HWIO convolution with stride 1 and symmetric zero padding."""
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), w.astype(dtype), window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if b is not None:
        y = y + b.astype(dtype)
    return y


class _Conv(nn.Module):
    """The fields of a stride-1 square convolution ("same" padding by default)."""

    features: int
    kernel_size: int = 3
    padding: int = 1
    dtype: Dtype = jnp.float32

    def weight_shape(self, x) -> tuple[tuple[int, ...], int]:
        """(HWIO weight shape, fan-in) for input ``x``."""
        cin, k = x.shape[-1], self.kernel_size
        return (k, k, cin, self.features), cin * k * k


class Conv2d(_Conv):
    """``torch.nn.Conv2d`` (stride 1): params ``weight`` (HWIO) and ``bias``."""

    @nn.compact
    def __call__(self, x):
        shape, fan_in = self.weight_shape(x)
        bound = 1.0 / math.sqrt(fan_in)
        w = self.param("weight", _torch_uniform(bound), shape)
        b = self.param("bias", _torch_uniform(bound), (self.features,))
        return conv2d(x, w, b, self.padding, self.dtype)


class _EqualLRConv(_Conv):
    """The wrapped conv of an EqualConv2d: ``weight_orig`` ~ N(0, 1), bias 0."""

    @nn.compact
    def __call__(self, x):
        shape, fan_in = self.weight_shape(x)
        w = self.param("weight_orig", nn.initializers.normal(1.0), shape)
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        scale = math.sqrt(2.0 / fan_in)  # equalized learning rate (He constant)
        return conv2d(x, w * scale, b, self.padding, self.dtype)


class EqualConv2d(_Conv):
    """Equalized-learning-rate conv; PyTorch keys ``<name>.conv.weight_orig/bias``."""

    @nn.compact
    def __call__(self, x):
        return _EqualLRConv(self.features, self.kernel_size, self.padding, self.dtype,
                            name="conv")(x)


class Linear(nn.Module):
    """``torch.nn.Linear``: params ``weight`` (in, out) and ``bias``."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        bound = 1.0 / math.sqrt(cin)
        w = self.param("weight", _torch_uniform(bound), (cin, self.features))
        b = self.param("bias", _torch_uniform(bound), (self.features,))
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype)) + b.astype(self.dtype)


class BatchNorm2d(nn.Module):
    """``torch.nn.BatchNorm2d`` with its exact semantics.

    Training: normalise with the batch mean and biased variance over
    (N, H, W), and update ``running_mean``/``running_var`` (the latter with the
    unbiased variance) with momentum 0.1, as PyTorch does.  Evaluation: use
    the running statistics.  Statistics and the normalisation are computed in
    float32 whatever the layer's dtype, and only the result is cast to it:
    in bfloat16 the backward pass of a batch-normalised layer sums terms that
    nearly cancel, and summed in bfloat16 they leave little of the gradient
    (measured: 40-200% error in G's weight gradients, and a quarter-width G
    trained 2 dB below its float32 twin).  Under
    ``jax.jit`` with a batch sharded over devices the reductions are global,
    so N devices normalise exactly like one device with the same global batch.
    """

    momentum: float = 0.1
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "running_var", jnp.ones, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        if train:
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            n = x.shape[0] * x.shape[1] * x.shape[2]
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        scale = weight * jax.lax.rsqrt(var + self.eps)
        shift = bias - mean * scale
        return (xf * scale + shift).astype(self.dtype)


class ConvTranspose2d(nn.Module):
    """``torch.nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)``, sub-pixel form.

    The parameter ``weight`` is PyTorch's (in, out, 4, 4) tensor stored as
    (4, 4, in, out).  Output pixel (2i+a, 2j+b) only sees input rows
    {i-1, i} (a=0, kernel rows 3, 1) or {i, i+1} (a=1, kernel rows 2, 0), and
    likewise for columns.  So the layer is one 2x2 convolution with 4*out
    channels (one per phase (a, b)) on the input padded by one, followed by
    a depth-to-space shuffle.  It computes exactly what the transposed
    convolution computes with no zero taps, and its gradient is an ordinary
    convolution gradient (XLA:CPU's transposed-convolution gradient is very
    slow).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w_, cin = x.shape
        # PyTorch's ConvTranspose2d init: fan_in computed from weight.size(1) * k * k.
        bound = 1.0 / math.sqrt(self.features * 16)
        w = self.param("weight", _torch_uniform(bound), (4, 4, cin, self.features))
        b = self.param("bias", _torch_uniform(bound), (self.features,))
        # Phase kernel K[dy, dx, c, (a, b, o)] = w[3 - 2*dy - a, 3 - 2*dx - b, c, o].
        idx = jnp.array([[3, 1], [2, 0]])  # [phase, tap] -> kernel index
        k = w[idx[:, :, None, None], idx[None, None, :, :]]  # (a, dy, b, dx, cin, out)
        k = jnp.transpose(k, (1, 3, 4, 0, 2, 5)).reshape(2, 2, cin, 4 * self.features)
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = jax.lax.conv_general_dilated(
            xp, k.astype(self.dtype), (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (n, h+1, w+1, 4*out)
        y = y.reshape(n, h + 1, w_ + 1, 2, 2, self.features)
        rows = []
        for a in range(2):
            cols = [y[:, a:a + h, bb:bb + w_, a, bb, :] for bb in range(2)]
            rows.append(jnp.stack(cols, axis=3))  # (n, h, w, 2[b], out)
        y = jnp.stack(rows, axis=2)  # (n, h, 2[a], w, 2[b], out)
        y = y.reshape(n, 2 * h, 2 * w_, self.features)
        return y + b.astype(self.dtype)


def avg_pool2(x):
    """2x2 average pooling, stride 2 (``F.avg_pool2d(x, 2)``)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_nearest2(x):
    """Nearest-neighbour 2x upsampling (``F.interpolate(scale_factor=2)``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def count_params(params) -> int:
    """Number of parameters (array elements) in a parameter tree."""
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


def safe_sqrt(x):
    """sqrt with a zero (not NaN) gradient at 0; the forward value is exact.

    The minibatch-std channel is sqrt(var) over the batch, whose gradient is
    0/0 where every image of the batch has the same value (e.g. saturated or
    constant outputs early in training); PyTorch's ``std`` returns NaN there.
    """
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)
