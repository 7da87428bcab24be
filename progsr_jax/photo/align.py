"""Aligning a detected face to the aligned-CelebA frame, and making the model's input from it.

The paper's model only knows faces framed like CelebA's ``img_align_celeba``
(178x218, eyes level at a fixed height), cropped and shrunk by the training
chain (centre crop 178, 128 -> 64 -> 32 -> 16).  A face in a photo is brought
into that frame by the similarity transform that maps its five detected
landmarks onto :data:`TEMPLATE`, then goes through the same chain
(:func:`model_inputs`, i.e. ``progsr_jax.data.preprocess``).

Conventions
-----------
Points are ``(x, y)`` in pixel-index coordinates: the centre of pixel
``[row i, column j]`` is ``(j, i)`` (as the detector and the 300-W ``.pts``
files).  A *transform* is a 2x3 matrix ``M`` with ``M @ [x, y, 1]`` mapping
input-photo coordinates to coordinates in the 178x218 aligned frame.
PIL's ``Image.transform`` puts pixel centres at ``+0.5``; :func:`pil_affine`
converts.

The template
------------
CelebA's documentation says the aligned images were made by a similarity
transform from the two eye locations (its own annotations) and a resize to
178x218.  The detector's points on those images are therefore what an
aligned face looks like *to this detector*: :data:`TEMPLATE` is their mean,
measured with :func:`measure_template` (``progsr_jax.photo.detection``, MTCNN
with facenet-pytorch 2.6.0's weights, default settings, the detection
closest to the frame centre) on 600 images drawn with
``numpy.random.default_rng(0).choice(train_files, 600, replace=False)`` from
the 4,591 train-partition images in ``shared/data/celeba`` (``train_files``
sorted as in ``Eval/list_eval_partition.txt``); 597 had a face.  Standard
deviations over those images, in pixels (x, y): eyes (1.9, 1.4) and (1.6,
1.4), nose (6.3, 4.4), mouth corners (3.1, 2.2) and (3.2, 1.9).

Which points drive the transform (:data:`TEMPLATE_WEIGHTS`) was chosen by
how close the transform of an already aligned image comes to the identity
(300 validation-partition images, medians of |translation of the frame
centre|, |scale - 1|, |rotation|):

=====================  ========  =======  ========
weights (eyes, nose,    transl.   scale    rotation
mouth corners)
=====================  ========  =======  ========
eyes only (1, 0, 0)     0.92 px   4.36 %   1.06 deg
all equal (1, 1, 1)     1.46 px   2.64 %   0.63 deg
(2, 0, 1), chosen       0.99 px   2.15 %   0.64 deg
=====================  ========  =======  ========

Eyes alone (the exact CelebA recipe) pass the detector's eye noise straight
into scale and rotation: two points fix all four parameters.  The nose tip
moves most with head pose (6 px spread) and only adds translation error.
Eyes at twice the mouth corners' weight, nose left out, gave the transform
closest to the identity; 55% of the images are within 2 px, 3% and 2 deg on
all three counts at once (eyes only: 29%, all equal: 43%).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from progsr_jax import data
from progsr_jax.errors import UserError
from progsr_jax.photo import detection as detect_lib

ALIGNED_SIZE = (178, 218)  # (width, height) of img_align_celeba
CROP_SIZE = 178  # the training chain's CenterCrop(178): rows 20..197 of the aligned frame
CROP_TOP = (ALIGNED_SIZE[1] - CROP_SIZE + 1) // 2  # 20, torchvision's int(round(40 / 2))
CROP_LEFT = 0
FRAME_CENTRE = np.array([(ALIGNED_SIZE[0] - 1) / 2, (ALIGNED_SIZE[1] - 1) / 2])

# Mean MTCNN landmarks on aligned CelebA (see the module docstring): left eye,
# right eye, nose tip, left and right mouth corner, (x, y) in the 178x218 frame.
TEMPLATE = np.array([
    [70.12, 112.31],
    [109.20, 112.22],
    [89.09, 136.55],
    [71.96, 153.74],
    [106.83, 153.53],
], dtype=np.float64)
TEMPLATE_WEIGHTS = (2.0, 2.0, 0.0, 1.0, 1.0)


# ---------------------------------------------------------------------------
# Similarity transforms


def estimate_similarity(src, dst, weights: Sequence[float] | None = None) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) with ``M @ src ~ dst``.

    Weighted Umeyama (1991) without reflection: minimises
    ``sum_i w_i |s R src_i + t - dst_i|^2`` over rotations ``R`` (det +1),
    ``s > 0`` and ``t``.  Points with weight 0 are ignored.

    Args:
      src, dst: (N, 2) corresponding points.
      weights: (N,) non-negative; default all 1.

    Returns:
      (2, 3) float64 matrix ``[s R | t]``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise UserError(f"estimate_similarity needs two (N, 2) point arrays, got {src.shape} and {dst.shape}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(src),) or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise UserError(f"weights must be {len(src)} non-negative numbers, got {weights!r}")
    if np.count_nonzero(w) < 2 or not np.all(np.isfinite(src[w > 0])) or not np.all(np.isfinite(dst[w > 0])):
        raise UserError("a similarity transform needs at least two finite points with positive weight")
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = float(np.sum(w * np.sum(s_c * s_c, axis=1)))
    if var_s <= 1e-12:
        raise UserError("the source points coincide; no similarity transform is defined")
    cov = (d_c * w[:, None]).T @ s_c
    u, sig, vt = np.linalg.svd(cov)
    d = np.diag([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d)) / var_s
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], axis=1)


def alignment_transform(landmarks, weights: Sequence[float] = TEMPLATE_WEIGHTS) -> np.ndarray:
    """The transform (photo -> aligned frame) that puts five landmarks on :data:`TEMPLATE`."""
    pts = np.asarray(landmarks, np.float64)
    if pts.shape != (5, 2):
        raise UserError(f"expected five (x, y) landmarks, got shape {pts.shape}")
    return estimate_similarity(pts, TEMPLATE, weights)


def to3x3(m) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.vstack([m[:2], [0.0, 0.0, 1.0]])


def invert(m) -> np.ndarray:
    """Inverse of a 2x3 affine transform."""
    return np.linalg.inv(to3x3(m))[:2]


def compose(*ms) -> np.ndarray:
    """``compose(a, b)`` applies ``b`` first, then ``a`` (like matrix products)."""
    out = np.eye(3)
    for m in ms:
        out = out @ to3x3(m)
    return out[:2]


def apply(m, pts) -> np.ndarray:
    """Maps (N, 2) points through a 2x3 transform."""
    pts = np.asarray(pts, np.float64)
    return pts @ np.asarray(m)[:, :2].T + np.asarray(m)[:, 2]


def similarity_params(m) -> dict:
    """Scale, rotation (degrees, counter-clockwise in image axes) and how far the frame centre moves.

    The translation is measured at the aligned frame's centre,
    ``|M c - c|``, not as ``M[:, 2]`` (which mixes in rotation about the
    top-left corner).
    """
    m = np.asarray(m, np.float64)
    scale = float(np.hypot(m[0, 0], m[1, 0]))
    rotation = float(np.degrees(np.arctan2(m[1, 0], m[0, 0])))
    shift = apply(m, FRAME_CENTRE[None])[0] - FRAME_CENTRE
    return {"scale": scale, "rotation": rotation, "translation": float(np.hypot(*shift)),
            "shift": (float(shift[0]), float(shift[1]))}


# ---------------------------------------------------------------------------
# Warping


def pil_affine(out_to_in) -> tuple[float, ...]:
    """PIL ``Image.AFFINE`` data for a transform from output to input pixel-index coordinates."""
    m = np.asarray(out_to_in, np.float64)
    t = m[:, 2] + 0.5 - m[:, :2] @ np.array([0.5, 0.5])
    return (m[0, 0], m[0, 1], t[0], m[1, 0], m[1, 1], t[1])


def warp_to_aligned(img: Image.Image, transform, resample=Image.BICUBIC) -> Image.Image:
    """The 178x218 aligned-frame image of a face: ``out(M p) = img(p)``.

    PIL's affine warp samples without low-pass filtering, which aliases when
    it shrinks.  For a face more than twice the aligned size, the region
    around it is first box-reduced by an integer factor (``Image.reduce``,
    a proper average) so that the warp itself shrinks by less than 2x.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    m = np.asarray(transform, np.float64)
    scale = similarity_params(m)["scale"]
    inv = invert(m)  # aligned -> photo
    k = int(np.floor(1.0 / scale)) if scale > 0 else 1
    if k >= 2:
        w, h = ALIGNED_SIZE
        corners = apply(inv, [[-1, -1], [w, -1], [-1, h], [w, h]])
        margin = 4 * k
        x0 = int(max(0, np.floor(corners[:, 0].min()) - margin))
        y0 = int(max(0, np.floor(corners[:, 1].min()) - margin))
        x1 = int(min(img.width, np.ceil(corners[:, 0].max()) + margin))
        y1 = int(min(img.height, np.ceil(corners[:, 1].max()) + margin))
        if x1 - x0 >= k and y1 - y0 >= k:
            x1 = x0 + (x1 - x0) // k * k
            y1 = y0 + (y1 - y0) // k * k
            img = img.reduce(k, box=(x0, y0, x1, y1))
            # reduced pixel j covers photo pixels x0 + k*j ... x0 + k*j + k-1
            reduced_to_photo = np.array([[k, 0, x0 + (k - 1) / 2], [0, k, y0 + (k - 1) / 2]], np.float64)
            inv = compose(invert(reduced_to_photo), inv)
    return img.transform(ALIGNED_SIZE, Image.AFFINE, pil_affine(inv), resample=resample)


def model_inputs(aligned: Image.Image) -> dict[int, np.ndarray]:
    """The training chain on an aligned image: ``{128, 64, 32, 16}`` uint8 arrays.

    ``data.preprocess(img, crop='celeba')``: centre crop 178x178 (rows 20 to
    197), PIL bilinear resize to 128, then 64, 32, 16, each from the last.
    """
    return data.preprocess(aligned, crop="celeba")


def align_face(img: Image.Image, landmarks, weights: Sequence[float] = TEMPLATE_WEIGHTS):
    """``(aligned 178x218 image, transform)`` for one face's five landmarks."""
    m = alignment_transform(landmarks, weights)
    return warp_to_aligned(img, m), m


# ---------------------------------------------------------------------------
# Measuring the template


def measure_template(images, detector=None) -> tuple[np.ndarray, int]:
    """Mean five-point landmarks of the face nearest the centre of aligned-CelebA images.

    ``images``: iterable of PIL images or paths (178x218 aligned CelebA).
    Returns ``(mean (5, 2), number of images with a face)``.  This is how
    :data:`TEMPLATE` was measured.
    """
    det = detector if detector is not None else detect_lib.Detector()
    points = []
    for item in images:
        img = item if isinstance(item, Image.Image) else Image.open(item)
        faces = det(img)
        if not faces:
            continue
        centre = np.array([img.width - 1, img.height - 1]) / 2
        best = min(faces, key=lambda f: np.hypot(*((f.box[:2] + f.box[2:]) / 2 - centre)))
        points.append(best.landmarks)
    if not points:
        raise UserError("no face found in any of the images")
    return np.mean(np.asarray(points, np.float64), axis=0), len(points)
