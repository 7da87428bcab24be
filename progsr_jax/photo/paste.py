"""Pasting super-resolved faces back into an upscaled photo.

The model's 128x128 output covers the training crop of the aligned frame:
the centre 178x178 square (columns 0-177, rows 20-197) of the 178x218
aligned-CelebA image, 128/178 of its resolution.  A face whose transform
``M`` (photo -> aligned frame, :mod:`progsr_jax.photo.align`) has scale
``s`` spans ``178 / s`` photo pixels across that square.

What ``upscale`` means: the output photo is the input enlarged ``upscale``
times (PIL bicubic), and each face is drawn into it from its 128x128 result.
The face's square then spans ``upscale * 178 / s`` output pixels, so the
result is shown at its own resolution -- "the model's 8x" -- only when that
equals 128, i.e. when the face's square spanned 16 photo pixels, the size of
the model's input.  :func:`native_upscale` gives that factor for given faces;
for larger faces any ``upscale`` above it stretches the 128x128 result
(still sharper than the bicubic photo up to the factor at which the photo
itself had more than 16 px across the square, since the model only sees 16).

Blending: each result is warped into the output with the inverse of its
transform and mixed in through a feathered square mask (:func:`feather_mask`:
zero on the crop's border, rising smoothly to one inside).  Pixels where
every mask is exactly zero keep the bicubic upscale's value exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from progsr_jax.errors import UserError
from progsr_jax.photo import align

SR_SIZE = 128
FEATHER_ZERO = 2.0  # SR pixels along the crop border where the mask is 0
FEATHER_RAMP = 14.0  # SR pixels over which it then rises to 1


def sr_to_aligned() -> np.ndarray:
    """2x3 transform from 128x128 result pixels to the aligned frame (pixel-index coordinates)."""
    k = align.CROP_SIZE / SR_SIZE
    # pixel u of the result covers aligned [CROP + k*u, CROP + k*(u+1)) in edge coordinates
    return np.array([[k, 0.0, align.CROP_LEFT + 0.5 * k - 0.5],
                     [0.0, k, align.CROP_TOP + 0.5 * k - 0.5]])


def native_upscale(transforms: Sequence) -> float:
    """The output scale at which the smallest face's result fills 128 px across its square.

    ``128 * s / 178`` for the largest transform scale ``s``; above it every
    face's result is enlarged.
    """
    if not transforms:
        return 1.0
    scales = [align.similarity_params(m)["scale"] for m in transforms]
    return float(SR_SIZE * max(scales) / align.CROP_SIZE)


def output_size(size: tuple[int, int], upscale: float) -> tuple[int, int]:
    if not upscale > 0:
        raise UserError(f"upscale must be positive, got {upscale}")
    w, h = size
    return max(1, round(w * upscale)), max(1, round(h * upscale))


def feather_mask(size: int = SR_SIZE, zero: float = FEATHER_ZERO, ramp: float = FEATHER_RAMP) -> np.ndarray:
    """(size, size) float32: 0 within ``zero`` px of the border, smoothstep to 1 over ``ramp`` px.

    Zero at the border so that the warped mask (bilinear) is zero wherever
    the warped result would mix in pixels from outside the crop.
    """
    d = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float64)
    t = np.clip((d - zero) / ramp, 0.0, 1.0)
    t = t * t * (3 - 2 * t)
    return np.minimum(t[:, None], t[None, :]).astype(np.float32)


def _canvas_to_photo(photo_size, out_size) -> np.ndarray:
    fx = photo_size[0] / out_size[0]
    fy = photo_size[1] / out_size[1]
    return np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5]])


def canvas_to_sr(transform, photo_size, out_size) -> np.ndarray:
    """2x3 transform from output-canvas pixels to a face's 128x128 result pixels."""
    return align.compose(align.invert(sr_to_aligned()), transform, _canvas_to_photo(photo_size, out_size))


def paste_back(photo: Image.Image, results: Sequence, transforms: Sequence, upscale: float = 8.0,
               mask: np.ndarray | None = None,
               weights: Sequence[float] | None = None) -> tuple[Image.Image, np.ndarray]:
    """Blends super-resolved faces into the photo upscaled ``upscale`` times.

    Args:
      photo: the input photo (any mode; converted to RGB).
      results: per face, a 128x128 RGB result (PIL image or uint8/float
        array in [0, 255]).
      transforms: per face, its 2x3 photo -> aligned-frame transform.
      upscale: output size / input size (see the module docstring).
      mask: the feathered mask in result pixels (default :func:`feather_mask`).
      weights: per face, a factor (0..1) on its mask (default 1: the video
        mode's crossfades).

    Returns:
      ``(restored RGB image, coverage)``: ``coverage`` is (H_out, W_out)
      float32, the largest mask value any face put on each output pixel
      (0 = plain bicubic upscale there).  Later faces are drawn over earlier
      ones.
    """
    if len(results) != len(transforms):
        raise UserError(f"{len(results)} results but {len(transforms)} transforms")
    if weights is None:
        weights = [1.0] * len(results)
    if len(weights) != len(results):
        raise UserError(f"{len(results)} results but {len(weights)} weights")
    photo = photo.convert("RGB") if photo.mode != "RGB" else photo
    out_size = output_size(photo.size, upscale)
    canvas = np.asarray(photo.resize(out_size, Image.BICUBIC), dtype=np.uint8).copy()
    coverage = np.zeros((out_size[1], out_size[0]), np.float32)
    mask_img = Image.fromarray(feather_mask() if mask is None else np.asarray(mask, np.float32), mode="F")
    for result, m, weight in zip(results, transforms, weights):
        if not isinstance(result, Image.Image):
            arr = np.clip(np.rint(np.asarray(result, np.float64)), 0, 255).astype(np.uint8)
            result = Image.fromarray(arr)
        result = result.convert("RGB")
        if result.size != (SR_SIZE, SR_SIZE) or mask_img.size != (SR_SIZE, SR_SIZE):
            raise UserError(f"results and mask must be {SR_SIZE}x{SR_SIZE}, got {result.size} and {mask_img.size}")
        to_sr = canvas_to_sr(m, photo.size, out_size)
        # only the part of the canvas the result can reach
        corners = align.apply(align.invert(to_sr), [[-1, -1], [SR_SIZE, -1], [-1, SR_SIZE], [SR_SIZE, SR_SIZE]])
        x0 = int(max(0, np.floor(corners[:, 0].min())))
        y0 = int(max(0, np.floor(corners[:, 1].min())))
        x1 = int(min(out_size[0], np.ceil(corners[:, 0].max()) + 1))
        y1 = int(min(out_size[1], np.ceil(corners[:, 1].max()) + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        sub = align.compose(to_sr, [[1, 0, x0], [0, 1, y0]])
        data = align.pil_affine(sub)
        face = np.asarray(result.transform((x1 - x0, y1 - y0), Image.AFFINE, data, Image.BICUBIC), np.float32)
        alpha = np.asarray(mask_img.transform((x1 - x0, y1 - y0), Image.AFFINE, data, Image.BILINEAR))
        alpha = np.clip(alpha * np.float32(weight), 0.0, 1.0)
        region = canvas[y0:y1, x0:x1]
        blended = region + alpha[..., None] * (face - region)
        canvas[y0:y1, x0:x1] = np.where(alpha[..., None] > 0, np.clip(np.rint(blended), 0, 255), region)
        coverage[y0:y1, x0:x1] = np.maximum(coverage[y0:y1, x0:x1], alpha)
    return Image.fromarray(canvas), coverage
