"""One image: decoding any file to RGB, the paper's preprocessing, pixel conversions.

* :func:`open_image` decodes one file into an RGB PIL image, refusing
  unusable files with :class:`BadImage` (never a raw PIL exception).
* :func:`preprocess` applies the paper's preprocessing: center crop 178x178,
  resize to 128x128, then sequential bilinear downsampling 128 -> 64 -> 32 -> 16.
* :func:`to_float` / :func:`to_uint8`: the project's one conversion between
  uint8 pixels and the models' float32 range ``[-1, 1]``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageCms

from progsr_jax.errors import UserError

RESOLUTIONS = (16, 32, 64, 128)

#: Images with more pixels than this are refused as possible decompression
#: bombs (same value as PIL's default ``Image.MAX_IMAGE_PIXELS``).  Read at
#: call time, so tests and users may change it.
MAX_IMAGE_PIXELS = 89_478_485

#: Side of the paper's CelebA center crop.
CELEBA_CROP = 178

CROPS = ("celeba", "square", "none")


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1]: ``x / 127.5 - 1`` (the models' input range)."""
    y = np.asarray(x).astype(np.float32)
    y /= np.float32(127.5)
    y -= np.float32(1.0)
    return y


def to_uint8(x) -> np.ndarray:
    """Model output in [-1, 1] -> uint8 pixels: ``round((x + 1) * 127.5)``, clipped to 0..255."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class BadImage(Exception):
    """An image file that cannot be used; ``str(exc)`` is a short reason."""


def _to_uint8_from_int(arr: np.ndarray, mode: str) -> np.ndarray:
    """Maps an integer grayscale array (16-bit or 32-bit) to uint8 by scaling.

    16-bit modes (``I;16*``) and mode ``I`` whose values fit 0..65535 are scaled
    with ``v * 255 / 65535`` (i.e. 65535 -> 255, not clipped at 255).  Mode
    ``I`` data outside 0..65535 (genuine 32-bit) is stretched linearly from its
    own min..max to 0..255.
    """
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
        out = np.round(arr * (255.0 / 65535.0))
    elif hi > lo:
        out = np.round((arr - lo) * (255.0 / (hi - lo)))
    else:
        out = np.zeros_like(arr)
    return np.clip(out, 0, 255).astype(np.uint8)


def _to_uint8_from_float(arr: np.ndarray) -> np.ndarray:
    """Maps a float image (mode ``F``) to uint8.

    Values already in [0, 1] are multiplied by 255; anything else is stretched
    linearly from its min..max to 0..255.  NaN/inf become 0.
    """
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        out = arr * 255.0
    elif hi > lo:
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(arr)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _composite_on_black(img: Image.Image) -> Image.Image:
    """RGBA -> RGB by compositing on a black background (rgb * alpha / 255)."""
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (0, 0, 0))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts a loaded PIL image of any mode to RGB.

    * ``RGB``: unchanged.  ``L``, ``1``, ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV``,
      ``LAB``: PIL's own conversion (``1`` gives 0/255).
    * With transparency (``LA``, ``PA``, ``RGBA``, ``RGBa``, ``La`` and ``P``
      with a transparent palette entry): **composited on black**, i.e. each
      pixel becomes ``rgb * alpha / 255``.  Fully transparent areas are black
      whatever colour the file stores under them.
    * ``I;16``, ``I;16B``, ``I;16L``, ``I``: scaled to 8 bit (see
      :func:`_to_uint8_from_int`), then gray -> RGB.  ``F``: see
      :func:`_to_uint8_from_float`.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        has_alpha = "transparency" in img.info
        return _composite_on_black(img) if has_alpha else img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_on_black(img)
    if mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N, ...
        gray = _to_uint8_from_int(np.asarray(img), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        gray = _to_uint8_from_float(np.asarray(img))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "LAB":
        # PIL has no direct LAB -> RGB conversion; go through an ICC transform.

        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(img, transform)
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, HSV


def open_image(path: str | os.PathLike, min_size: int = 32,
               max_pixels: int | None = None) -> Image.Image:
    """Opens an image file and returns a fully decoded RGB PIL image.

    The file is used as stored: EXIF orientation is not applied (the same as
    the paper's loader, ``Image.open(...).convert('RGB')``).  Animated images
    (GIF, WebP) give their first frame.  Truncated files are detected only
    while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (PIL's default).

    Args:
      path: the image file.
      min_size: smallest acceptable width and height, in pixels.
      max_pixels: largest acceptable ``width * height``; ``None`` uses the
        module constant :data:`MAX_IMAGE_PIXELS` (read at call time).

    Raises:
      BadImage: with a short reason, for a missing or empty file, a file that
        is not an image, a truncated or corrupt image, an image smaller than
        ``min_size`` on either side, or one above the pixel limit (possible
        decompression bomb).  No PIL exception escapes.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise BadImage(f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns (and above 2x its limit raises) for huge images: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if limit is not None and w * h > limit:
                    raise BadImage(f"too many pixels ({w}x{h} = {w * h} > limit {limit}); "
                                   "possible decompression bomb")
                if w < min_size or h < min_size:
                    raise BadImage(f"too small ({w}x{h}, minimum side is {min_size})")
                img.load()  # full decode: truncation and corruption show up here
                rgb = _to_rgb(img)
                rgb.load()
                if rgb is img:
                    rgb = img.copy()  # detach from the file before it is closed
                return rgb
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"refused as possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e) or type(e).__name__
        if "truncated" in text:
            raise BadImage(f"truncated image ({text})") from None
        raise BadImage(f"corrupt image ({text})") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise all sorts of things
        raise BadImage(f"cannot decode ({type(e).__name__}: {e})") from None


def _center_crop_box(w: int, h: int, cw: int, ch: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop placement: Python's round() on half the slack."""
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return left, top, left + cw, top + ch


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """``torchvision.transforms.CenterCrop(size)`` on a PIL image.

    If the image is smaller than ``size`` on a side it is first zero-padded on
    that side (``(size - w) // 2`` left, ``(size - w + 1) // 2`` right, and the
    same for top/bottom), exactly as torchvision does.
    """
    w, h = img.size
    if w < size or h < size:
        pad_l = (size - w) // 2 if size > w else 0
        pad_t = (size - h) // 2 if size > h else 0
        pad_r = (size - w + 1) // 2 if size > w else 0
        pad_b = (size - h + 1) // 2 if size > h else 0
        padded = Image.new(img.mode, (w + pad_l + pad_r, h + pad_t + pad_b), 0)
        padded.paste(img, (pad_l, pad_t))
        img = padded
        w, h = img.size
        if w == size and h == size:
            return img
    return img.crop(_center_crop_box(w, h, size, size))


def preprocess(img: Image.Image, crop: str = "celeba") -> dict[int, np.ndarray]:
    """The paper's preprocessing of one RGB image.

    Args:
      img: an RGB PIL image (see :func:`open_image`).
      crop: ``"celeba"``: ``CenterCrop(178)`` (torchvision semantics, including
        zero padding of smaller images); ``"square"``: center square of side
        ``min(w, h)``; ``"none"``: the image must already be square.

    Returns:
      ``{128: uint8 (128,128,3), 64: ..., 32: ..., 16: ...}``: the crop resized
      to 128x128 with PIL bilinear (antialiased when shrinking, like
      torchvision's ``Resize`` on PIL images), then each smaller resolution
      resized from the previous one (128 -> 64 -> 32 -> 16), also bilinear.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if crop == "celeba":
        img = center_crop(img, CELEBA_CROP)
    elif crop == "square":
        side = min(w, h)
        img = img.crop(_center_crop_box(w, h, side, side))
    elif crop == "none":
        if w != h:
            raise UserError(f"crop='none' needs square images, got {w}x{h} "
                            "(use crop='square' or crop='celeba')")
    else:
        raise UserError(f"unknown crop {crop!r}; expected one of {', '.join(CROPS)}")
    out: dict[int, np.ndarray] = {}
    current = img
    for r in sorted(RESOLUTIONS, reverse=True):
        current = current.resize((r, r), Image.BILINEAR)
        out[r] = np.asarray(current, dtype=np.uint8)
    return {r: out[r] for r in RESOLUTIONS}


#: The baselines :func:`upscale` knows (PIL filters).
UPSCALE_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def upscale(lr_u8: np.ndarray, size: int, method: str = "bicubic") -> np.ndarray:
    """The baseline: (B, h, w, 3) uint8 -> (B, size, size, 3) uint8 with PIL's ``method`` filter.

    ``"bicubic"`` is the bicubic baseline every score and image of the
    project compares against (evaluation, validation during training, grids).
    """
    resample = UPSCALE_FILTERS[method]
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), resample), np.uint8)
                     for x in np.asarray(lr_u8, np.uint8)])
