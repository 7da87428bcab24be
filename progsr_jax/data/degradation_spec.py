"""The degradation model's parameters: :class:`Spec`, the named presets, the config.

``config.data.degradation`` (``configs/step3.py``) holds a ``preset`` and
every :class:`Spec` field; :func:`from_config` turns it into the preset's
:class:`Spec` with the fields set over it (or None: the paper's clean
chain), checking every value.  :mod:`progsr_jax.data.degradation` applies a
:class:`Spec`; the presets' sources are in ``configs/step3.py``'s docstring.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from progsr_jax.errors import UserError

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
    import ml_collections

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
