"""Convolution weight gradients as one matrix product per kernel tap (a custom VJP).

Used by the distillation step on CPUs where XLA's own convolution weight
gradient is slow (``conv_grad`` of the distillation config); see the
comment below for when it pays off.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from progsr_jax import xla_flags
from progsr_jax.nets.layers import Conv2d

# Convolution weight gradients as matrix products.  Without YNNPACK's dot
# fusions (see progsr_jax/xla_flags.py) XLA:CPU computes the weight gradient of
# a convolution (a convolution over the batch and image axes) about 4x slower
# than the forward convolution; written as one matrix product per kernel tap,
# sum_{n,h,w} x[n, h+i, w+j, :]^T g[n, h, w, :], it takes about as long as the
# forward pass.  With YNNPACK (progsr_jax's default) XLA's own gradient is the
# faster one on two or more cores (a train step of the student at batch 4 on 2
# cores: 0.31 s against 0.36 s with the taps) and the taps only win on a single
# core (0.61 s against 0.72 s), so conv_grad='auto' takes the taps on a CPU
# when the process may use only one core or YNNPACK is off.  The values are the
# same up to float32 summation order.


def _conv(x, w, padding: int):
    return jax.lax.conv_general_dilated(x, w, window_strides=(1, 1),
                                        padding=((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_tap_grad(x, w, padding: int):
    """Stride-1 NHWC x HWIO convolution whose weight gradient is computed tap by tap."""
    return _conv(x, w, padding)


def _conv_tap_grad_fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _conv_tap_grad_bwd(padding, residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda v: _conv(v, w, padding), x)[1](g)[0]
    kh, kw, cin, cout = w.shape
    _, h, wd, _ = g.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    g2 = g.reshape(-1, cout)
    taps = [xp[:, i:i + h, j:j + wd, :].reshape(-1, cin).T @ g2
            for i in range(kh) for j in range(kw)]
    return dx, jnp.stack(taps).reshape(kh, kw, cin, cout).astype(w.dtype)


conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


def tap_grad_interceptor(next_fun, args, kwargs, context):
    """Flax method interceptor: :class:`layers.Conv2d` calls go through :func:`conv_tap_grad`."""
    mod = context.module
    if isinstance(mod, Conv2d) and context.method_name == "__call__":
        x = args[0].astype(mod.dtype)
        w = mod.get_variable("params", "weight").astype(mod.dtype)
        b = mod.get_variable("params", "bias").astype(mod.dtype)
        return conv_tap_grad(x, w, mod.padding) + b
    return next_fun(*args, **kwargs)


def use_tap_grad(config) -> bool:
    """Whether the train step uses :func:`conv_tap_grad` (``conv_grad``: see above for auto)."""
    if config.conv_grad == "auto":
        return jax.default_backend() == "cpu" and (_cpu_cores() < 2 or not xla_flags.ynn_flag_set())
    return config.conv_grad == "taps"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
