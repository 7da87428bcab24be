"""Loss terms of the paper (eq. 6) with the weights of the authors' training code.

Generator: pixel (L1 by default, MSE selectable), perceptual (VGG16 relu1_2,
relu2_2, relu3_3, relu4_3), adversarial (-mean D(G(x))), heatmap (MSE of
normalised student-FAN heatmaps) and attention (mean(M * |G(x) - y|)).
Discriminator: WGAN-GP with drift.  Landmark distillation: the spatial-softmax
KL of the student's heatmaps to the teacher's (:func:`spatial_softmax_kl`).
All functions are pure and jit-friendly.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from progsr_jax.nets.layers import safe_sqrt

_EPS = 1e-12


def pixel_loss(fake, real, kind: str = "l1"):
    if kind == "l1":
        return jnp.mean(jnp.abs(fake - real))
    if kind == "mse":
        return jnp.mean(jnp.square(fake - real))
    raise ValueError(f"unknown pixel loss {kind!r} (use 'l1' or 'mse')")


def perceptual_loss(feats_fake, feats_real):
    """Sum over the VGG taps of the mean squared feature difference."""
    return sum(jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
               for a, b in zip(feats_fake, feats_real))


def minmax_per_sample(hm, lo=None, hi=None):
    """(hm - min) / (max - min) per sample over (H, W, 68); ``lo``/``hi`` override the statistics."""
    lo = jnp.min(hm, axis=(1, 2, 3), keepdims=True) if lo is None else lo
    hi = jnp.max(hm, axis=(1, 2, 3), keepdims=True) if hi is None else hi
    return (hm - lo) / jnp.maximum(hi - lo, _EPS)


def normalise_heatmaps(hm_fake, hm_real, mode: str = "own"):
    """Min-max normalised heatmaps (fake, real), per sample over (H, W, 68).

    ``mode='own'`` (default) normalises each heatmap with its own min and max.
    ``mode='pfsr_code'`` reproduces the authors' code, which (by a variable
    name typo) normalises the fake heatmaps with their own max but the *real*
    heatmaps' min.
    """
    real = minmax_per_sample(hm_real)
    if mode == "own":
        fake = minmax_per_sample(hm_fake)
    elif mode == "pfsr_code":
        fake = minmax_per_sample(hm_fake, lo=jnp.min(hm_real, axis=(1, 2, 3), keepdims=True))
    else:
        raise ValueError(f"unknown heatmap normalisation {mode!r} (use 'own' or 'pfsr_code')")
    return fake, real


def attention_map(hm_real_normalised):
    """M: max over the 68 channels, min-max normalised with the whole batch's heatmap range.

    As in the authors' code, the range is that of the full normalised heatmap
    tensor (so M is the channel maximum when every sample spans [0, 1]).
    Shape (B, H, W, 1); no gradient flows through it.
    """
    hm = jax.lax.stop_gradient(hm_real_normalised)
    m = jnp.max(hm, axis=-1, keepdims=True)
    lo, hi = jnp.min(hm), jnp.max(hm)
    return (m - lo) / jnp.maximum(hi - lo, _EPS)


def heatmap_and_attention_losses(fan_apply: Callable, fake, real, norm_mode: str = "own"):
    """Heatmap loss MSE(hm_f, hm_r) and attention loss mean(M * |fake - real|).

    ``fan_apply`` maps images in [0, 1] (NHWC) to heatmaps (N, H, W, 68).  The
    fake and the real images go through it in two calls, so that the
    gradient's backward pass covers the fake half only (the real heatmaps are
    targets: forward only).
    """
    hm_f = fan_apply(0.5 * fake + 0.5).astype(jnp.float32)
    hm_r = jax.lax.stop_gradient(fan_apply(0.5 * jax.lax.stop_gradient(real) + 0.5))
    hm_f, hm_r = normalise_heatmaps(hm_f, hm_r.astype(jnp.float32), norm_mode)
    heat = jnp.mean(jnp.square(hm_f - hm_r))
    att = jnp.mean(attention_map(hm_r) * jnp.abs(fake - real))
    return heat, att


def gradient_penalty(d_apply: Callable, real, fake, eps):
    """mean((||grad_xhat sum(D(xhat))||_2 - 1)^2), xhat = eps*real + (1-eps)*fake.

    The gradient is taken with ``jax.grad`` of the summed critic output with
    respect to the interpolated images; its norm is over all pixels of each
    sample.
    """
    xhat = eps * real + (1.0 - eps) * fake
    grads = jax.grad(lambda x: jnp.sum(d_apply(x)))(xhat)
    norms = safe_sqrt(jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=1))
    return jnp.mean(jnp.square(norms - 1.0))


def discriminator_loss(d_apply: Callable, real, fake, eps, gp_weight: float = 10.0,
                       drift: float = 0.001):
    """WGAN-GP with drift: mean D(fake) - [mean D(real) - drift * mean D(real)^2] + gp_weight * GP.

    ``d_apply(x, groups=1)``: the critic's scores of ``x``, with the minibatch
    statistic taken over each of ``groups`` interleaved sets of rows
    (:class:`progsr_jax.models.Discriminator`).  The real and the fake
    images are scored in one call, interleaved as ``[real_0, fake_0, real_1,
    ...]`` (which keeps each device's rows on that device), exactly as two
    calls would score them.
    """
    both = jnp.stack([real, fake], axis=1).reshape((-1,) + real.shape[1:])
    scores = d_apply(both, groups=2).reshape(-1, 2)
    d_real, d_fake = scores[:, 0], scores[:, 1]
    real_term = jnp.mean(d_real) - drift * jnp.mean(jnp.square(d_real))
    gp = gradient_penalty(d_apply, real, fake, eps)
    loss = jnp.mean(d_fake) - real_term + gp_weight * gp
    return loss, {"d_real": jnp.mean(d_real), "d_fake": jnp.mean(d_fake), "gradient_penalty": gp}


def spatial_softmax_kl(target, pred, temperature: float):
    """Mean over images and landmarks of KL(softmax(target / T) || softmax(pred / T)).

    The softmax runs over the pixels of each (N, H, W, C) heatmap channel.  With
    a small temperature (0.02 for heatmaps whose peaks are about 0.5) the
    teacher's distribution sits on the few pixels within about 0.05 of its
    maximum, so the term measures whether the student puts its maximum -- the
    decoded landmark -- on the same pixels, including along the flat ridges of
    the jaw-line heatmaps where the MSE barely depends on it.
    """
    n, h, w, c = target.shape
    lt = jax.nn.log_softmax(target.reshape(n, h * w, c).astype(jnp.float32) / temperature, axis=1)
    lp = jax.nn.log_softmax(pred.reshape(n, h * w, c).astype(jnp.float32) / temperature, axis=1)
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - lp), axis=1))
