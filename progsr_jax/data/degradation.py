"""Realistic low-resolution inputs: blur, resize, noise and JPEG, drawn per image.

The paper makes every 16x16 input by the clean chain (bilinear 128 -> 64 ->
32 -> 16).  Faces from cameras are blurred, noisy and compressed; this module
makes such inputs from the 128x128 image at batch time (never cached), as
Real-ESRGAN / BSRGAN / GFPGAN do for their training data:

1. blur at 128x128 (isotropic, anisotropic or generalised Gaussian kernel),
2. resize to 16x16 ('chain' = the paper's bilinear chain, 'area', 'bilinear'
   or 'bicubic'), optionally through a random intermediate size,
3. noise (Gaussian, colour or gray; or Poisson),
4. JPEG at a random quality,
5. optionally a second pass (blur, resize, noise, JPEG) from the intermediate
   size down to 16x16, as in Real-ESRGAN.

Everything an image gets is drawn from ``np.random.default_rng([seed, step,
position, TAG])`` where ``position`` is the image's place in the global batch,
so a batch is a pure function of ``(seed, step)`` and resuming or splitting
the batch over devices or hosts gives the same inputs.

Libraries: the blurs and JPEG are OpenCV (``filter2D``, ``sepFilter2D`` for
the isotropic kernels; ``imencode``/``imdecode``, byte-identical to PIL's
JPEG round trip), resizes are PIL (the library of the paper's chain), noise
is numpy.

The parameters: ``config.data.degradation`` (``configs/step3.py``) holds a
``preset`` and every :class:`Spec` field; :func:`from_config` turns it into
the preset's :class:`Spec` with the fields set over it (or None: the paper's
clean chain), checking every value.  The presets' sources are in
``configs/step3.py``'s docstring.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import cv2
import ml_collections
import numpy as np
from PIL import Image

from progsr_jax.errors import UserError

#: Separates this module's random streams from the data order's.
TAG = 0x5EED_DE6
_PIL_FILTERS = {"area": Image.BOX, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
#: Kernel radius limit in 128x128 pixels: kernels span 3 sigma of the spec's largest
#: sigma, at most this (at sigma 6, 2.7 sigma; the kernel is normalised).
MAX_RADIUS = 16


# ------------------------------------------------------------------ the model's parameters
LR_SIZE = 16
HR_SIZE = 128
BLUR_KINDS = ("iso", "aniso", "generalized")
RESIZE_MODES = ("chain", "area", "bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class Spec:
    """The degradation model: each operation's probability and ranges.

    Ranges are ``(low, high)``, drawn uniformly.  Sigmas of the first blur
    are in 128x128 pixels, of the second in pixels of the intermediate size;
    noise sigmas in 0..255 grey levels.
    """

    clean_prob: float = 0.0  # images left on the paper's clean chain
    blur_prob: float = 0.0
    blur_kinds: tuple = (1.0, 0.0, 0.0)  # weights of iso, aniso, generalized
    blur_sigma: tuple = (0.5, 2.0)
    blur_beta: tuple = (0.5, 4.0)  # generalized Gaussian shape (1 = Gaussian)
    resize_modes: tuple = ("chain",)  # chosen uniformly
    resize_mid_prob: float = 0.0  # resize through a random intermediate side first
    resize_mid: tuple = (24, 64)  # that side, in pixels
    noise_prob: float = 0.0
    noise_sigma: tuple = (1.0, 10.0)  # Gaussian noise std, grey levels
    poisson_prob: float = 0.0  # of the noisy images, the fraction with Poisson noise
    poisson_scale: tuple = (0.05, 1.0)
    gray_noise_prob: float = 0.0  # same noise in all three channels
    jpeg_prob: float = 0.0
    jpeg_quality: tuple = (60, 95)
    second_prob: float = 0.0  # a second pass from the intermediate size
    second_blur_sigma: tuple = (0.2, 1.5)

    @property
    def max_sigma(self) -> float:
        return float(self.blur_sigma[1]) if self.blur_prob > 0 else 0.0


#: Named presets.  ``mild``: GFPGAN's training degradations (blur sigma 0.1-10
#: at 512 px -> 0.025-2.5 at 128; iso/aniso 1:1; noise 0-20; JPEG 60-100).
#: ``real``: Real-ESRGAN's (blur sigma 0.2-3 at its 4x scale -> 0.4-6 at our
#: 8x; iso/aniso/generalized 0.45/0.25/0.15 with generalized beta 0.5-4;
#: area/bilinear/bicubic; first resize to 0.15-1x of 128 px; Gaussian noise
#: 1-30 or Poisson 0.05-3, half each, 40% gray; JPEG 30-95; a second pass with
#: probability 0.8, blur sigma 0.2-1.5).  Neither preset leaves clean images;
#: a training recipe sets ``clean_prob``.
PRESETS: dict[str, Spec | None] = {
    "none": None,
    "mild": Spec(blur_prob=1.0, blur_kinds=(0.5, 0.5, 0.0), blur_sigma=(0.025, 2.5),
                 resize_modes=RESIZE_MODES, noise_prob=1.0, noise_sigma=(0.0, 20.0),
                 jpeg_prob=1.0, jpeg_quality=(60, 100)),
    "real": Spec(blur_prob=1.0, blur_kinds=(0.45, 0.25, 0.15), blur_sigma=(0.4, 6.0),
                 blur_beta=(0.5, 4.0), resize_modes=("area", "bilinear", "bicubic"),
                 resize_mid_prob=0.9, resize_mid=(16, 96), noise_prob=1.0,
                 noise_sigma=(1.0, 30.0), poisson_prob=0.5, poisson_scale=(0.05, 3.0),
                 gray_noise_prob=0.4, jpeg_prob=1.0, jpeg_quality=(30, 95), second_prob=0.8,
                 second_blur_sigma=(0.2, 1.5)),
}
FIELDS = tuple(f.name for f in dataclasses.fields(Spec))


def config_fields(preset: str = "none"):
    """``config.data.degradation``: ``preset`` plus every :class:`Spec` field as a placeholder.

    A field left ``None`` takes the preset's value; a set one overrides it.
    """
    placeholder = ml_collections.config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.preset = preset
    for f in dataclasses.fields(Spec):
        c[f.name] = placeholder(tuple if isinstance(f.default, tuple) else float)
    return c


def describe(cfg: Any) -> str:
    """``preset real, jpeg_quality=(40, 90)``: the preset and the fields set over it."""
    if cfg is None or isinstance(cfg, str):
        return f"preset {cfg or 'none'}"
    extra = [f"{k}={_get(cfg, k)!r}" for k in FIELDS if _get(cfg, k) is not None]
    return ", ".join([f"preset {_get(cfg, 'preset') or 'none'}"] + extra)


def _get(cfg: Any, name: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get(name)
    try:
        return getattr(cfg, name)
    except (AttributeError, KeyError):
        return None


def from_config(cfg: Any) -> Spec | None:
    """The :class:`Spec` of a config (``preset`` + overrides), a preset name, or None (off).

    Raises UserError (one line) for an unknown preset, overrides without a
    preset, or any value out of range.
    """
    if cfg is None or isinstance(cfg, str):
        cfg = {"preset": cfg or "none"}
    preset = _get(cfg, "preset") or "none"
    if preset not in PRESETS:
        raise UserError(f"unknown degradation preset {preset!r}; expected one of "
                        f"{', '.join(PRESETS)}")
    overrides = {k: _get(cfg, k) for k in FIELDS if _get(cfg, k) is not None}
    base = PRESETS[preset]
    if base is None:
        if overrides:
            raise UserError(f"degradation.{sorted(overrides)[0]} is set but degradation.preset "
                            "is 'none'; choose a preset (mild or real) to change")
        return None
    spec = dataclasses.replace(base, **overrides)
    check(spec)
    return spec


def _fail(message: str) -> None:
    raise UserError(f"invalid config: degradation.{message}")


def check(spec: Spec) -> None:
    """UserError for any value of ``spec`` out of its range."""
    for name in ("clean_prob", "blur_prob", "resize_mid_prob", "noise_prob", "poisson_prob",
                 "gray_noise_prob", "jpeg_prob", "second_prob"):
        v = getattr(spec, name)
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            _fail(f"{name} must be a probability in [0, 1], got {v!r}")
    for name, lo_limit in (("blur_sigma", 0.0), ("blur_beta", 0.0), ("resize_mid", LR_SIZE),
                           ("noise_sigma", 0.0), ("poisson_scale", 0.0),
                           ("jpeg_quality", 1), ("second_blur_sigma", 0.0)):
        v = getattr(spec, name)
        if (not isinstance(v, (tuple, list)) or len(v) != 2
                or not all(isinstance(x, (int, float)) for x in v)
                or not lo_limit <= v[0] <= v[1]):
            _fail(f"{name} must be (low, high) with {lo_limit} <= low <= high, got {v!r}")
    if spec.jpeg_quality[1] > 100:
        _fail(f"jpeg_quality must lie in 1..100, got {spec.jpeg_quality!r}")
    if spec.resize_mid[1] > HR_SIZE:
        _fail(f"resize_mid must lie in {LR_SIZE}..{HR_SIZE}, got {spec.resize_mid!r}")
    if spec.blur_sigma[1] > 8.0:
        _fail(f"blur_sigma must be at most 8 (pixels of 128x128), got {spec.blur_sigma!r}")
    k = spec.blur_kinds
    if (not isinstance(k, (tuple, list)) or len(k) != len(BLUR_KINDS)
            or any(not isinstance(x, (int, float)) or x < 0 for x in k) or sum(k) <= 0):
        _fail(f"blur_kinds must be {len(BLUR_KINDS)} non-negative weights of "
              f"{', '.join(BLUR_KINDS)} with a positive sum, got {k!r}")
    modes = spec.resize_modes
    if (not isinstance(modes, (tuple, list)) or not modes
            or any(m not in RESIZE_MODES for m in modes)):
        _fail(f"resize_modes must be a non-empty tuple of {', '.join(RESIZE_MODES)}, "
              f"got {modes!r}")


# ------------------------------------------------------------------ drawing
@dataclasses.dataclass(frozen=True)
class Plan:
    """What one image gets; ``None`` fields are operations it skips."""

    clean: bool
    blur: tuple | None  # (kind, sigma_x, sigma_y, theta, beta) at 128 px
    mode: str
    mid: int | None  # intermediate side
    noise: tuple | None  # ('gauss' | 'poisson', amount, gray)
    jpeg: int | None
    second: tuple | None  # (blur sigma at mid, mode, noise, jpeg) of the second pass


def _u(rng: np.random.Generator, r: Sequence[float]) -> float:
    return float(rng.uniform(r[0], r[1]))


def _draw_noise(rng: np.random.Generator, spec: Spec) -> tuple | None:
    if rng.random() >= spec.noise_prob:
        return None
    gray = bool(rng.random() < spec.gray_noise_prob)
    if rng.random() < spec.poisson_prob:
        return ("poisson", _u(rng, spec.poisson_scale), gray)
    return ("gauss", _u(rng, spec.noise_sigma), gray)


def _draw_jpeg(rng: np.random.Generator, spec: Spec) -> int | None:
    if rng.random() >= spec.jpeg_prob:
        return None
    lo, hi = int(round(spec.jpeg_quality[0])), int(round(spec.jpeg_quality[1]))
    return int(rng.integers(lo, hi + 1))


def draw(spec: Spec, seed: int, step: int, position: int) -> Plan:
    """The plan of the image at ``position`` of batch ``step``: a pure function of its arguments."""
    rng = np.random.default_rng([int(seed), int(step), int(position), TAG])
    if rng.random() < spec.clean_prob:
        return Plan(True, None, "chain", None, None, None, None)
    blur = None
    if rng.random() < spec.blur_prob:
        w = np.asarray(spec.blur_kinds, np.float64)
        kind = BLUR_KINDS[int(rng.choice(len(BLUR_KINDS), p=w / w.sum()))]
        sx = _u(rng, spec.blur_sigma)
        sy = sx if kind == "iso" else _u(rng, spec.blur_sigma)
        theta = float(rng.uniform(0.0, math.pi)) if kind != "iso" else 0.0
        beta = _u(rng, spec.blur_beta) if kind == "generalized" else 1.0
        blur = (kind, sx, sy, theta, beta)
    mode = spec.resize_modes[int(rng.integers(len(spec.resize_modes)))]
    second_pass = rng.random() < spec.second_prob
    mid = None
    if second_pass or rng.random() < spec.resize_mid_prob:
        mid = int(rng.integers(int(spec.resize_mid[0]), int(spec.resize_mid[1]) + 1))
    noise = _draw_noise(rng, spec)
    jpeg = _draw_jpeg(rng, spec)
    second = None
    if second_pass:
        sigma2 = _u(rng, spec.second_blur_sigma)
        mode2 = spec.resize_modes[int(rng.integers(len(spec.resize_modes)))]
        second = (sigma2, mode2, _draw_noise(rng, spec), _draw_jpeg(rng, spec))
    return Plan(False, blur, mode, mid, noise, jpeg, second)


# --------------------------------------------------------------- operations
def kernel(kind: str, sigma_x: float, sigma_y: float, theta: float, beta: float,
           radius: int) -> np.ndarray:
    """A normalised (2r+1, 2r+1) float64 kernel.

    ``k(d) = exp(-0.5 * (d^T C^-1 d) ** beta)`` with ``C = R(theta) diag(sx^2, sy^2)
    R(theta)^T``: a Gaussian for ``beta = 1`` (``iso``: sx = sy), the
    generalised Gaussian otherwise.
    """
    ax = np.arange(-radius, radius + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy  # coordinates along the kernel's own axes
    v = -s * xx + c * yy
    q = (u / max(sigma_x, 1e-6)) ** 2 + (v / max(sigma_y, 1e-6)) ** 2
    k = np.exp(-0.5 * q ** beta)
    return k / k.sum()


@functools.lru_cache(maxsize=1)
def _cv2():
    cv2.setNumThreads(1)  # batches are spread over worker processes, one thread each
    return cv2


def blur(images: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Each (H, W, C) image convolved with its own (K, K) kernel; reflect padding.

    ``images``: (B, H, W, C) uint8 or float32; ``kernels``: (B, K, K), K odd
    (our kernels are point-symmetric, so correlation = convolution).  Returns
    float32 (B, H, W, C).  OpenCV's ``filter2D`` per image (border
    ``REFLECT_101``, numpy's ``reflect``).
    """
    cv2 = _cv2()
    out = np.empty(images.shape, np.float32)
    for i, (img, k) in enumerate(zip(images, kernels)):
        out[i] = cv2.filter2D(np.ascontiguousarray(img), cv2.CV_32F, k.astype(np.float32),
                              borderType=cv2.BORDER_REFLECT_101)
    return out


def blur_separable(img: np.ndarray, kernel_1d: np.ndarray) -> np.ndarray:
    """(H, W, C) image blurred by the outer product of a symmetric 1-D kernel; float32.

    The isotropic Gaussians (``outer(k, k)`` is :func:`kernel`'s ``iso``
    kernel), in two 1-D passes: OpenCV's ``sepFilter2D``, same border as
    :func:`blur`.
    """
    cv2 = _cv2()
    k = np.asarray(kernel_1d, np.float32)
    return cv2.sepFilter2D(np.ascontiguousarray(img), cv2.CV_32F, k, k,
                           borderType=cv2.BORDER_REFLECT_101)


def gaussian_1d(sigma: float, radius: int) -> np.ndarray:
    """The normalised 1-D Gaussian whose outer product is ``kernel('iso', sigma, ...)``."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float64) / sigma) ** 2)
    return k / k.sum()


def _quantise(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL.

    ``chain``: bilinear halvings (the paper's 128 -> 64 -> 32 -> 16) while
    the side stays >= ``size``, then one bilinear step to ``size``.
    """
    im = Image.fromarray(img)
    if mode == "chain":
        side = im.size[0]
        while side // 2 >= size and side != size:
            side //= 2
            im = im.resize((side, side), Image.BILINEAR)
        if side != size:
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)
    return np.asarray(im.resize((size, size), _PIL_FILTERS[mode]))


def add_noise(img: np.ndarray, noise: tuple, rng: np.random.Generator) -> np.ndarray:
    """uint8 image + Gaussian (std in grey levels) or Poisson noise, quantised.

    Poisson: ``(poisson(x * 256) / 256 - x) * scale`` with ``x`` in [0, 1]
    (an 8-bit image's photon-count model, as in Real-ESRGAN), so its std at
    level ``x`` is ``255 * scale * sqrt(x / 256)``.
    """
    kind, amount, gray = noise
    x = img.astype(np.float32)
    shape = x.shape[:2] + (1,) if gray else x.shape
    if kind == "gauss":
        n = rng.standard_normal(shape, dtype=np.float32) * np.float32(amount)
    else:
        base = x.mean(axis=-1, keepdims=True) if gray else x
        lam = base / np.float32(255.0) * 256.0
        n = (rng.poisson(lam).astype(np.float32) / 256.0 - lam / 256.0) * 255.0 * amount
    return _quantise(x + n)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip at ``quality``: baseline, 4:2:0 chroma subsampling.

    OpenCV's codec (libjpeg), 4x faster than PIL's for these small images and
    byte-identical to PIL's round trip at PIL's defaults (the tests check it).
    """
    cv2 = _cv2()
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {img.shape}")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def _after_blur(img: np.ndarray, plan: Plan, rng: np.random.Generator) -> np.ndarray:
    """Resize (through ``mid``), noise, JPEG and the second pass of one blurred 128 image."""
    if plan.second is None:
        if plan.mid is not None:
            img = resize(img, plan.mid, plan.mode)
        img = resize(img, LR_SIZE, plan.mode)
        if plan.noise is not None:
            img = add_noise(img, plan.noise, rng)
        if plan.jpeg is not None:
            img = jpeg(img, plan.jpeg)
        return img
    img = resize(img, plan.mid, plan.mode)
    if plan.noise is not None:
        img = add_noise(img, plan.noise, rng)
    if plan.jpeg is not None:
        img = jpeg(img, plan.jpeg)
    sigma2, mode2, noise2, jpeg2 = plan.second
    img = _quantise(blur_separable(img, gaussian_1d(sigma2, max(1, int(math.ceil(3 * sigma2))))))
    img = resize(img, LR_SIZE, mode2)
    if noise2 is not None:
        img = add_noise(img, noise2, rng)
    if jpeg2 is not None:
        img = jpeg(img, jpeg2)
    return img


def _degrade(hr: np.ndarray, spec: Spec, seed: int, step: int,
             positions: np.ndarray) -> np.ndarray:
    plans = [draw(spec, seed, step, int(p)) for p in positions]
    images = list(hr)
    radius = max(1, min(MAX_RADIUS, int(math.ceil(3 * spec.max_sigma))))
    for i, plan in enumerate(plans):
        if plan.blur is None:
            continue
        kind, sx, sy, theta, beta = plan.blur
        if kind == "iso":
            images[i] = _quantise(blur_separable(hr[i], gaussian_1d(sx, radius)))
        else:
            images[i] = _quantise(blur(hr[i:i + 1], kernel(*plan.blur, radius)[None])[0])
    lr = np.empty((len(plans), LR_SIZE, LR_SIZE, 3), np.uint8)
    for i, plan in enumerate(plans):
        if plan.clean:
            lr[i] = resize(images[i], LR_SIZE, "chain")
            continue
        # The noise stream: its own seed sequence, independent of the plan's draws.
        rng = np.random.default_rng([int(seed), int(step), int(positions[i]), TAG, 1])
        lr[i] = _after_blur(images[i], plan, rng)
    return lr


def degrade(hr: np.ndarray, spec: Spec, seed: int, step: int,
            positions: Sequence[int] | None = None) -> np.ndarray:
    """16x16 inputs degraded from 128x128 images: (B, 128, 128, 3) uint8 -> (B, 16, 16, 3) uint8.

    Image ``i`` gets :func:`draw` ``(spec, seed, step, positions[i])``
    (``positions`` default ``0..B-1``: the places in the global batch) and a
    noise stream of its own from the same numbers, so its result depends on
    nothing else in the batch (the input pipeline makes batches in worker
    processes, :class:`progsr_jax.data.InputPipeline`).
    """
    hr = np.asarray(hr)
    if hr.ndim != 4 or hr.shape[1:] != (HR_SIZE, HR_SIZE, 3) or hr.dtype != np.uint8:
        raise ValueError(f"expected uint8 (B, {HR_SIZE}, {HR_SIZE}, 3), got {hr.dtype} "
                         f"{hr.shape}")
    b = hr.shape[0]
    positions = np.arange(b) if positions is None else np.asarray(positions)
    if positions.shape != (b,):
        raise ValueError(f"positions must have shape ({b},), got {positions.shape}")
    return _degrade(hr, spec, seed, step, positions)
