"""Face detection with five landmarks: the MTCNN cascade in numpy around jitted Flax nets.

The algorithm is facenet-pytorch's ``detect_face`` (itself a port of the
original MATLAB/Caffe MTCNN), reproduced step for step so that the
converted weights behave as they were tuned to; the pipeline parity test
compares the two on real photos.  Steps:

1. Image pyramid: scales ``m * factor**k`` with ``m = 12 / min_face`` while
   the shorter side times the scale stays >= 12; each level is the photo
   resized to ``(int(h*s + 1), int(w*s + 1))`` by area averaging (PyTorch's
   ``interpolate(mode="area")``, i.e. adaptive average pooling).
2. P-Net on every level; cells with face probability >= ``thresholds[0]``
   become 12/s boxes; NMS (IoU 0.5) within each level, then NMS (IoU 0.7)
   over all levels; box regression; boxes made square.
3. R-Net on 24x24 area-resized crops (clamped to the photo); probability >
   ``thresholds[1]``; NMS (0.7); regression; square.
4. O-Net on 48x48 crops; probability > ``thresholds[2]``; five landmarks;
   regression; NMS with the "Min" overlap (intersection over the smaller
   box, 0.7).

Speed and compilation.  All pyramid levels are packed into one canvas
(:func:`pack_levels`) and P-Net runs once per photo (photos over ~1,500 px
spread their largest levels over a few canvases, :func:`group_levels`); its
mask input makes every level's outputs exactly those it would have alone.  Canvas sides are
rounded up to a few sizes and R-/O-Net batches to powers of two, so the
number of compiled programs stays small (5 P-Net canvases, 6 R-Net and 3
O-Net batch sizes over 150 photos of 178-200 px).  Resampling reads one
integral image per photo instead of calling BLAS.  About 0.035 s (median) per
~200 px photo on two busy CPU cores after compilation.

Coordinates are those of facenet-pytorch: ``(x, y)`` in pixels of the
photo, x to the right, y down, with pixel centres at integers (so they match
0-based ``.pts`` annotations up to the detector's own bias).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from progsr_jax.errors import UserError
from progsr_jax.photo import mtcnn

MIN_FACE = 20
THRESHOLDS = (0.6, 0.7, 0.7)
FACTOR = 0.709
MAX_CANVAS = 1 << 21  # pixels of one packed P-Net canvas, unless a single level is larger
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face.

    ``box``: (x0, y0, x1, y1) in photo pixels; ``landmarks``: (5, 2) float32
    (x, y) in the order of :data:`LANDMARK_NAMES` -- left/right as seen in the
    image, facenet-pytorch's order; ``score``: O-Net's face probability.
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    def box_with_landmarks(self) -> np.ndarray:
        """``box`` enlarged (never shrunk) so that the five landmarks lie inside it.

        MTCNN places the landmarks in O-Net's input box and regresses the box
        afterwards, so a point can end up slightly outside (profile faces,
        faces cut by the photo's edge).  The points are never clipped: they
        drive the alignment.
        """
        box = np.asarray(self.box, np.float64).copy()
        pts = np.asarray(self.landmarks, np.float64)
        box[:2] = np.minimum(box[:2], pts.min(axis=0))
        box[2:] = np.maximum(box[2:], pts.max(axis=0))
        return box

    def to_json(self) -> dict:
        """``box`` (:meth:`box_with_landmarks`), ``landmarks``, ``score`` as plain numbers."""
        return {"box": [float(v) for v in self.box_with_landmarks()],
                "landmarks": [[float(x), float(y)] for x, y in self.landmarks],
                "score": float(self.score)}


# ---------------------------------------------------------------------------
# Area resampling (PyTorch's interpolate(mode="area") == adaptive average pooling)
#
# Output pixel (i, j) of an (h, w) -> (oh, ow) resize is the mean of the
# input rectangle rows [floor(i*h/oh), ceil((i+1)*h/oh)) x columns likewise,
# so every resize the cascade needs -- the pyramid levels and the 24/48 px
# crops -- is a set of rectangle means, read off one integral image with
# four gathers.  No BLAS call: small matrix products thrash when the two
# cores are busy elsewhere.


def integral_image(img: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H+1, W+1, C) float64 with ``ii[y, x] = img[:y, :x].sum((0, 1))``."""
    h, w, c = img.shape
    ii = np.zeros((h + 1, w + 1, c), np.float64)
    np.cumsum(img, axis=0, dtype=np.float64, out=ii[1:, 1:])
    np.cumsum(ii[1:, 1:], axis=1, out=ii[1:, 1:])
    return ii


def _bins(start, length, n_out: int):
    """Adaptive-pooling bin edges: ``start + floor(i*L/n)``, ``start + ceil((i+1)*L/n)``."""
    i = np.arange(n_out)
    length = np.asarray(length)[..., None]
    lo = (i * length) // n_out
    hi = -((-(i + 1) * length) // n_out)
    return np.asarray(start)[..., None] + lo, np.asarray(start)[..., None] + hi


def rect_means(ii: np.ndarray, y0, y1, x0, x1, out_h: int, out_w: int) -> np.ndarray:
    """Area resize of the regions [y0, y1) x [x0, x1) (arrays of K) to (K, out_h, out_w, C) float32."""
    ys, ye = _bins(y0, np.asarray(y1) - np.asarray(y0), out_h)  # (K, out_h)
    xs, xe = _bins(x0, np.asarray(x1) - np.asarray(x0), out_w)  # (K, out_w)
    ys, ye = ys[:, :, None], ye[:, :, None]
    xs, xe = xs[:, None, :], xe[:, None, :]
    total = ii[ye, xe] - ii[ys, xe] - ii[ye, xs] + ii[ys, xs]
    return (total / ((ye - ys) * (xe - xs))[..., None]).astype(np.float32)


def area_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C) float32, as ``interpolate(mode="area")``."""
    h, w = img.shape[:2]
    return rect_means(integral_image(img), [0], [h], [0], [w], height, width)[0]


# ---------------------------------------------------------------------------
# Pyramid and packing


def pyramid_scales(height: int, width: int, min_face: float = MIN_FACE,
                   factor: float = FACTOR) -> list[float]:
    """Scales at which a ``min_face`` face becomes P-Net's 12 px window, down to 12 px images."""
    m = 12.0 / min_face
    minl = min(height, width) * m
    scales, s = [], m
    while minl >= 12:
        scales.append(s)
        s *= factor
        minl *= factor
    return scales


def _canvas_bucket(n: int) -> int:
    """Rounds a canvas side up to a multiple of 1/8 of its power of two (>= 32)."""
    step = max(32, 1 << max(0, (int(n) - 1).bit_length() - 3))
    return -(-int(n) // step) * step


def pack_levels(sizes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Shelf-packs (h, w) pyramid levels into one canvas; returns (canvas (H, W), origins (y, x)).

    Origins are even, so P-Net's stride-2 output grid of each level lines up
    with the canvas's.  The canvas is as wide as the two largest levels side
    by side; later levels fill shelves below.
    """
    even = [(h + h % 2, w + w % 2) for h, w in sizes]
    width = _canvas_bucket(sum(w for _, w in even[:2]))
    origins, x, y, shelf = [], 0, 0, 0
    for h, w in even:
        if x + w > width:
            x, y, shelf = 0, y + shelf, 0
        origins.append((y, x))
        x += w
        shelf = max(shelf, h)
    return (_canvas_bucket(y + shelf), width), origins


def group_levels(sizes: Sequence[tuple[int, int]], max_pixels: int = MAX_CANVAS) -> list[range]:
    """Splits the levels (largest first) into runs whose packed canvas has at most ``max_pixels``.

    A photo of a few hundred pixels is one run, one P-Net call; the first
    levels of a large photo get canvases of their own, which bounds P-Net's
    memory (its first layer has ten channels) to about 40 bytes a pixel of
    ``max_pixels``.
    """
    groups, i = [], 0
    while i < len(sizes):
        j = i + 1
        while j < len(sizes):
            (ch, cw), _ = pack_levels(sizes[i:j + 1])
            if ch * cw > max_pixels:
                break
            j += 1
        groups.append(range(i, j))
        i = j
    return groups


# ---------------------------------------------------------------------------
# Box arithmetic (float32, in facenet-pytorch's order of operations)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """torchvision's ``nms``: highest score first, drop boxes with IoU > threshold (areas without +1)."""
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x1 - x0) * (y1 - y0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
        ih = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
        inter = iw * ih
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return np.asarray(keep, np.int64)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """The last stage's NMS: overlap = intersection / smaller area, areas with +1 (MTCNN's 'Min')."""
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(scores)  # ascending; the best is taken from the end
    keep = []
    while order.size:
        i, rest = order[-1], order[:-1]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        order = rest[iw * ih / np.minimum(areas[i], areas[rest]) <= threshold]
    return np.asarray(keep, np.int64)


def square(boxes: np.ndarray) -> np.ndarray:
    """Grows each box to a square around its centre (MTCNN's ``rerec``)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Applies R-/O-Net's offsets, fractions of the box's size counted with +1 (``bbreg``)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] = boxes[:, 0] + reg[:, 0] * w
    out[:, 1] = boxes[:, 1] + reg[:, 1] * h
    out[:, 2] = boxes[:, 2] + reg[:, 2] * w
    out[:, 3] = boxes[:, 3] + reg[:, 3] * h
    return out


def crop_batch(ii: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ``size`` x ``size`` crops of the boxes, clamped to the photo (MTCNN's ``pad``).

    ``ii`` is the photo's :func:`integral_image`.  Boxes are truncated to
    integers and read as 1-based inclusive pixel ranges; a box clamped to the
    photo is squeezed, not padded.  Returns the crops and the indices of the
    boxes that kept a non-empty area.
    """
    h, w = ii.shape[0] - 1, ii.shape[1] - 1
    ib = np.trunc(boxes[:, :4]).astype(np.int64)
    x0 = np.maximum(ib[:, 0], 1)
    y0 = np.maximum(ib[:, 1], 1)
    x1 = np.minimum(ib[:, 2], w)
    y1 = np.minimum(ib[:, 3], h)
    valid = np.nonzero((y1 > y0 - 1) & (x1 > x0 - 1))[0]
    crops = rect_means(ii, y0[valid] - 1, y1[valid], x0[valid] - 1, x1[valid], size, size)
    return mtcnn.normalise(crops), valid


# ---------------------------------------------------------------------------
# The cascade


def as_rgb_array(img) -> np.ndarray:
    """A PIL image (any mode) or an (H, W[, C]) array -> (H, W, 3) float32 in [0, 255]."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float32)
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise UserError(f"expected an RGB image (H, W, 3), got an array of shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if np.issubdtype(arr.dtype, np.floating) and 0 < arr.max(initial=0) <= 1.0:
        raise UserError("float images must be in [0, 255] like uint8 ones (got values <= 1)")
    return np.ascontiguousarray(arr[..., :3], dtype=np.float32)


class Detector:
    """MTCNN with fixed settings; ``detector(img) -> list[Face]`` (best score first).

    Args:
      weights: folder with ``pnet.pt``/``rnet.pt``/``onet.pt``; default: the
        installed ``facenet-pytorch`` wheel (see :mod:`progsr_jax.photo.mtcnn`).
      min_face: smallest face side, in photo pixels, the pyramid looks for.
      thresholds: face-probability thresholds of P-, R- and O-Net.
      factor: ratio between pyramid scales.

    ``max_canvas`` (pixels) caps one P-Net canvas; see :func:`group_levels`.
    """

    max_canvas = MAX_CANVAS

    def __init__(self, weights: str | os.PathLike | None = None, min_face: float = MIN_FACE,
                 thresholds: Sequence[float] = THRESHOLDS, factor: float = FACTOR,
                 nets: mtcnn.Nets | None = None):
        if min_face <= 0:
            raise UserError(f"min_face must be positive, got {min_face}")
        if not 0 < factor < 1:
            raise UserError(f"factor must be in (0, 1), got {factor}")
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise UserError(f"thresholds must be three probabilities (P-, R-, O-Net), got {thresholds!r}")
        self.nets = nets if nets is not None else _nets(weights)
        self.min_face = float(min_face)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)

    def __call__(self, img) -> list[Face]:
        ii = integral_image(as_rgb_array(img))
        boxes = self.stage1(ii)
        boxes = self.stage2(ii, boxes)
        boxes, points = self.stage3(ii, boxes)
        return [Face(box=b[:4].copy(), landmarks=p, score=float(b[4])) for b, p in zip(boxes, points)]

    def stage1(self, ii: np.ndarray) -> np.ndarray:
        """P-Net proposals: (K, 5) float32 boxes (x0, y0, x1, y1, score), squared.

        ``ii``, here and in the other stages: the photo's :func:`integral_image`.
        """
        h, w = ii.shape[0] - 1, ii.shape[1] - 1
        scales = pyramid_scales(h, w, self.min_face, self.factor)
        if not scales:
            return np.zeros((0, 5), np.float32)
        sizes = [(int(h * s + 1), int(w * s + 1)) for s in scales]
        found = []
        for group in group_levels(sizes, self.max_canvas):
            found += self._pnet_group(ii, [scales[k] for k in group], [sizes[k] for k in group])
        if not found:
            return np.zeros((0, 5), np.float32)
        cand = np.concatenate(found, axis=0)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
        bw = cand[:, 2] - cand[:, 0]
        bh = cand[:, 3] - cand[:, 1]
        boxes = np.stack([cand[:, 0] + cand[:, 5] * bw, cand[:, 1] + cand[:, 6] * bh,
                          cand[:, 2] + cand[:, 7] * bw, cand[:, 3] + cand[:, 8] * bh,
                          cand[:, 4]], axis=1).astype(np.float32)
        return square(boxes)

    def _pnet_group(self, ii, scales, sizes) -> list[np.ndarray]:
        """P-Net over levels packed in one canvas; per level, its candidates after NMS (0.5)."""
        h, w = ii.shape[0] - 1, ii.shape[1] - 1
        (ch, cw), origins = pack_levels(sizes)
        canvas = np.zeros((ch, cw, 3), np.float32)
        mask = np.zeros((ch - 2, cw - 2), bool)
        for (lh, lw), (oy, ox) in zip(sizes, origins):
            canvas[oy:oy + lh, ox:ox + lw] = mtcnn.normalise(rect_means(ii, [0], [h], [0], [w], lh, lw)[0])
            mask[oy:oy + lh - 2, ox:ox + lw - 2] = True
        prob, reg = self.nets.pnet(canvas, mask)
        found = []
        for s, (lh, lw), (oy, ox) in zip(scales, sizes, origins):
            oh, ow = -(-(lh - 2) // 2) - 4, -(-(lw - 2) // 2) - 4
            p = prob[oy // 2:oy // 2 + oh, ox // 2:ox // 2 + ow]
            r = reg[oy // 2:oy // 2 + oh, ox // 2:ox // 2 + ow]
            yy, xx = np.nonzero(p >= self.thresholds[0])
            if len(yy) == 0:
                continue
            cells = np.stack([xx, yy], axis=1).astype(np.float32)
            q1 = np.floor((2 * cells + 1) / np.float32(s))
            q2 = np.floor((2 * cells + 12) / np.float32(s))
            cand = np.concatenate([q1, q2, p[yy, xx, None], r[yy, xx]], axis=1).astype(np.float32)
            found.append(cand[nms(cand[:, :4], cand[:, 4], 0.5)])
        return found

    def stage2(self, ii: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """R-Net refinement of the proposals: (K', 5), squared."""
        if len(boxes) == 0:
            return boxes
        crops, valid = crop_batch(ii, boxes, mtcnn.INPUT_SIZES["rnet"])
        boxes = boxes[valid]
        score, reg = self.nets.rnet(crops)
        keep = score > self.thresholds[1]
        boxes = np.concatenate([boxes[keep, :4], score[keep, None]], axis=1).astype(np.float32)
        reg = reg[keep]
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        return square(regress(boxes[pick], reg[pick]))

    def stage3(self, ii: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """O-Net: final (F, 5) boxes and (F, 5, 2) landmarks."""
        if len(boxes) == 0:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        crops, valid = crop_batch(ii, boxes, mtcnn.INPUT_SIZES["onet"])
        boxes = boxes[valid]
        score, reg, pts = self.nets.onet(crops)
        keep = score > self.thresholds[2]
        boxes = np.concatenate([boxes[keep, :4], score[keep, None]], axis=1).astype(np.float32)
        reg, pts = reg[keep], pts[keep]
        bw = boxes[:, 2:3] - boxes[:, 0:1] + 1
        bh = boxes[:, 3:4] - boxes[:, 1:2] + 1
        points = np.stack([bw * pts[:, :5] + boxes[:, 0:1] - 1,
                           bh * pts[:, 5:] + boxes[:, 1:2] - 1], axis=-1).astype(np.float32)
        boxes = regress(boxes, reg)
        pick = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        return boxes[pick], points[pick]


@functools.lru_cache(maxsize=4)
def _nets(weights: str | os.PathLike | None) -> mtcnn.Nets:
    return mtcnn.Nets.load(weights)


def detect(img, *, min_face: float = MIN_FACE, thresholds: Sequence[float] = THRESHOLDS,
           factor: float = FACTOR, weights: str | os.PathLike | None = None) -> list[Face]:
    """Every face in ``img`` (PIL image or array) with five landmarks, best score first.

    The networks are loaded once per ``weights`` folder and kept.
    """
    return Detector(weights, min_face, thresholds, factor)(img)
