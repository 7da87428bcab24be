"""Augmentation of the distillation batches: zoom, shift and mirror of a face and its heatmaps.

The same geometric transform is applied to the image and to its teacher
heatmaps; a mirrored face also swaps its left and right points
(:data:`FLIP_PERMUTATION`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------
# Augmentation (config.augment): the same geometric transform applied to the
# image and to its teacher heatmaps, drawn per example from (seed, step).

# The left-right correspondence of the 68 points (iBUG / 300-W order, 0-based):
# in a horizontally mirrored face, point k lies where point FLIP_PERMUTATION[k]
# of the original face lies, mirrored (jaw 0-16 reversed, brows 17-21 <-> 26-22,
# nose bridge 27-30 unchanged, nostrils 31-35 reversed, eyes 36-41 <-> 45-42/47-46,
# outer lips 48-54 reversed and 55-59 reversed, inner lips 60-64 and 65-67
# reversed).  It is its own inverse.
FLIP_PERMUTATION = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # eyebrows
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65],  # inner lips
    np.int32)


def uses_augmentation(config) -> bool:
    a = config.augment
    return bool(a.flip) or float(a.scale) > 0 or float(a.shift) > 0


def resampling_matrix(size: int, scale, shift, flip):
    """(B, size, size) bilinear resampling matrices of one image axis.

    Output pixel ``j`` reads the input at ``c + m (j - c) / scale - shift`` with ``c =
    (size - 1) / 2`` and ``m = -1`` where ``flip``, else 1 (positions clamped to the
    image: the border pixels extend outwards).  With scale 1 and shift 0 the matrix
    is the identity, or the exact mirror ``j -> size - 1 - j``.
    """
    c = (size - 1) / 2.0
    j = jnp.arange(size, dtype=jnp.float32)
    m = jnp.where(flip, -1.0, 1.0)[:, None]
    src = c + m * (j[None, :] - c) / scale[:, None] - shift[:, None]
    src = jnp.clip(src, 0.0, size - 1.0)
    i0 = jnp.floor(src)
    frac = src - i0
    i0 = i0.astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, size - 1)
    return ((1.0 - frac)[..., None] * jax.nn.one_hot(i0, size, dtype=jnp.float32)
            + frac[..., None] * jax.nn.one_hot(i1, size, dtype=jnp.float32))


def transform(x, y, scale, shift_x, shift_y, flip):
    """Applies per-example zoom ``scale`` (about the image centre), shift (pixels, + =
    right/down) and horizontal ``flip`` to images ``x`` (B, H, W, 3) and their
    heatmaps ``y`` (B, H, W, 68) alike; flipped heatmaps also swap the left and right
    points (:data:`FLIP_PERMUTATION`).  Separable, as two matrix products per array."""
    _, h, w, _ = x.shape
    ry = resampling_matrix(h, scale, shift_y, jnp.zeros_like(flip))
    rx = resampling_matrix(w, scale, shift_x, flip)
    y = jnp.where(flip[:, None, None, None], jnp.take(y, jnp.asarray(FLIP_PERMUTATION), axis=-1),
                  y)

    def apply(a):
        a = jnp.einsum("bip,bpqc->biqc", ry, a, precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum("bjq,biqc->bijc", rx, a, precision=jax.lax.Precision.HIGHEST)

    return apply(x), apply(y)


def augment(config, key, x, y):
    """Random :func:`transform` of a batch: each example flipped with probability 1/2
    (``augment.flip``), zoomed by a factor uniform in ``1 +- augment.scale`` and
    shifted by up to ``augment.shift`` pixels along each axis."""
    b = x.shape[0]
    kf, ks, kt = jax.random.split(key, 3)
    a = config.augment
    flip = jax.random.bernoulli(kf, 0.5, (b,)) if a.flip else jnp.zeros((b,), bool)
    scale = 1.0 + float(a.scale) * jax.random.uniform(ks, (b,), minval=-1.0, maxval=1.0)
    shift = float(a.shift) * jax.random.uniform(kt, (2, b), minval=-1.0, maxval=1.0)
    return transform(x, y, scale, shift[0], shift[1], flip)
