"""Faces in a photo, super-resolved and blended back: the pipeline behind ``infer --mode=photo``.

    from progsr_jax import inference, photo
    sr = inference.load("/runs/pfsr")                  # a step-3 (128x128) model
    restored, faces = photo.restore(sr, img)
    restored.save("restored.png")
    faces[0].box, faces[0].landmarks, faces[0].score, faces[0].transform
    faces[0].aligned, faces[0].lr, faces[0].sr         # uint8 128x128 / 16x16 / 128x128

Steps, for one photo (:func:`restore_photo`):

1. :class:`~progsr_jax.photo.detection.Detector` finds every face and its
   five landmarks (``min_face``; then ``only_center_face`` / ``max_faces``
   choose among them, see :func:`select_faces`).
2. Each face is warped onto the aligned-CelebA frame (178x218) by the
   similarity transform that puts its landmarks on the template
   (:mod:`~progsr_jax.photo.align`), then goes through the training chain
   ``data.preprocess(aligned, crop='celeba')``: centre crop 178, 128 (the
   ``aligned`` crop), 64, 32, 16 (``lr``).
3. All faces of the photo go through the model in one call, padded to the
   next power of two (at most ``batch_size``; more faces take several calls
   of that size), so a process compiles a few batch shapes however many
   photos it sees.
4. Each 128x128 result (``sr``) is warped back and blended with a feathered
   mask into the photo upscaled ``upscale`` times with PIL bicubic
   (:func:`~progsr_jax.photo.paste.paste_back`); outside every mask the
   output *is* that bicubic upscale.

``upscale``: ``"auto"`` (default) or a positive number.  The model turns a
16x16 face into 128x128, 8x; a face whose crop square spans ``d`` photo
pixels gets its result at the model's own resolution when the photo is
upscaled ``128 / d`` times (:func:`~progsr_jax.photo.paste.native_upscale`,
taken for the *smallest* face so that no face's result is shrunk).
``"auto"`` is that factor clamped to [1, 8] (never smaller than the input;
at most the model's factor, reached by faces of 16 px or less) and further
lowered so that the output stays within :data:`AUTO_MAX_PIXELS`; with no face
it is 1 (the photo is written unchanged).  A number is used as given (the
output must stay within ``progsr_jax.data.images.MAX_IMAGE_PIXELS``).

The JSON ``box`` contains the landmarks: MTCNN computes the landmarks from
O-Net's input box and only then regresses the box, so a point can fall a
little outside the final box (profile faces, faces cut by the photo's edge).
The box is then *enlarged* to contain the five points; the points are never
clipped, since they drive the alignment.  Boxes and points are in pixels of
the input photo (pixel centres at integers) and may extend past its edges.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from progsr_jax.data import images
from progsr_jax.errors import UserError
from progsr_jax.inference import batching
from progsr_jax.photo import align, paste
from progsr_jax.photo.detection import MIN_FACE, Detector, Face

AUTO_RANGE = (1.0, 8.0)
#: Faces whose aligned crop spans more photo pixels than this are left as they are.
#: The model sees 16 px whatever the face's size; measured on the 240 CelebA validation
#: faces of the README's table, bicubic from a face of d px scores (PSNR at 128 px)
#: 22.97 dB at d = 20 and 23.53 dB at d = 22, against 23.39 dB for the ``:cpu`` model
#: from 16 px: above about 22 px the face's own pixels are worth more than the model.
DEFAULT_MAX_FACE = 22.0
#: ``upscale="auto"`` keeps the output at most this many pixels (a 4000x3000
#: photo with a small face would otherwise become ~200 megapixels).
AUTO_MAX_PIXELS = 40_000_000
DEFAULT_BATCH = batching.DEFAULT_BATCH


@dataclasses.dataclass(frozen=True)
class RestoredFace:
    """One face of a photo and what the pipeline made of it.

    ``box``: (x0, y0, x1, y1), the detector's box enlarged, if needed, to
    contain the landmarks; ``landmarks``: (5, 2) (x, y), left eye, right
    eye, nose tip, left and right mouth corner (as seen in the image);
    ``score``: the detector's face probability; ``transform``: (2, 3),
    photo pixels -> the 178x218 aligned-CelebA frame; ``aligned``: the
    128x128 uint8 crop the model's input was made from; ``lr``: the 16x16
    uint8 input; ``sr``: the 128x128 uint8 result (None when not restored);
    ``span``: photo pixels across the aligned crop; ``restored``: False for a
    face left as it is, ``reason`` says why.
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float
    transform: np.ndarray
    aligned: np.ndarray
    lr: np.ndarray
    sr: np.ndarray | None
    span: float = 0.0
    restored: bool = True
    reason: str | None = None

    def to_json(self, **files: str) -> dict:
        """The ``faces.json`` entry; ``files`` (``aligned=``, ``lr=``, ``sr=``) are its image paths."""
        out = {"box": [round(float(v), 3) for v in self.box],
               "landmarks": [[round(float(x), 3), round(float(y), 3)] for x, y in self.landmarks],
               "score": round(float(self.score), 6),
               "transform": [[float(v) for v in row] for row in self.transform],
               "span": round(float(self.span), 2), "restored": bool(self.restored)}
        if self.reason:
            out["reason"] = self.reason
        out.update(files)
        return out


@dataclasses.dataclass(frozen=True)
class Restoration:
    """:func:`restore_photo`'s result: the restored RGB image, the faces, the scale used and
    ``coverage`` ((H_out, W_out) float32, the largest feathered-mask value on each output pixel;
    0 where the output is the plain bicubic upscale)."""

    image: Image.Image
    faces: list[RestoredFace]
    upscale: float
    coverage: np.ndarray


def select_faces(faces: Sequence[Face], size: tuple[int, int], max_faces: int | None = None,
                 only_center_face: bool = False) -> list[Face]:
    """The faces to restore, in the detector's order (best score first).

    ``only_center_face``: the one whose box centre is nearest the photo's
    centre.  ``max_faces``: the ``max_faces`` largest (box area).
    """
    faces = list(faces)
    if only_center_face and faces:
        centre = (np.asarray(size, np.float64) - 1) / 2
        faces = [min(faces, key=lambda f: float(np.hypot(*((f.box[:2] + f.box[2:]) / 2 - centre))))]
    if max_faces is not None:
        if max_faces < 1:
            raise UserError(f"max_faces must be at least 1, got {max_faces}")
        if len(faces) > max_faces:
            area = [float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])) for f in faces]
            keep = set(np.argsort(area, kind="stable")[::-1][:max_faces].tolist())
            faces = [f for i, f in enumerate(faces) if i in keep]
    return faces


def parse_upscale(value) -> str | float:
    """``"auto"`` or a positive float, from a flag string or a number; UserError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (np.isfinite(number) and number > 0):
        raise UserError(f"upscale must be 'auto' or a positive number, got {value!r}")
    return number


def choose_upscale(upscale, size: tuple[int, int], transforms: Sequence) -> float:
    """The output scale for a photo of ``size`` (w, h); see the module docstring."""
    upscale = parse_upscale(upscale)
    w, h = size
    if upscale == "auto":
        if not transforms:
            return 1.0
        lo, hi = AUTO_RANGE
        u = min(max(paste.native_upscale(transforms), lo), hi)
        u = min(u, max(lo, float(np.sqrt(AUTO_MAX_PIXELS / (w * h)))))
        return float(u)

    out_w, out_h = paste.output_size(size, upscale)
    limit = images.MAX_IMAGE_PIXELS  # read at call time, like data.open_image
    if limit is not None and out_w * out_h > limit:
        raise UserError(f"upscale {upscale:g} would make a {out_w}x{out_h} image "
                        f"(more than {limit} pixels); choose a smaller --upscale")
    return upscale


def super_resolve(sr, lr: np.ndarray, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """(N, 16, 16, 3) uint8 -> (N, 128, 128, 3) uint8 in calls padded to powers of two.

    Up to ``batch_size`` faces go in one call, padded with zeros to the next
    power of two (capped at ``batch_size``); more take several calls
    (:func:`progsr_jax.inference.batching.super_resolve`).
    """
    size = int(getattr(sr, "output_size", paste.SR_SIZE))
    if size != paste.SR_SIZE:
        raise UserError(f"the photo pipeline needs a model with {paste.SR_SIZE}x{paste.SR_SIZE} "
                        f"outputs (stage 3); this one makes {size}x{size}")
    return batching.super_resolve(sr, np.asarray(lr, np.uint8), batch_size)


def restore_photo(sr, img, *, upscale="auto", detector: Detector | None = None,
                  min_face: float = MIN_FACE, max_faces: int | None = None,
                  only_center_face: bool = False, detector_weights: str | os.PathLike | None = None,
                  batch_size: int = DEFAULT_BATCH, max_face: float | None = None) -> Restoration:
    """Detects, aligns, super-resolves and pastes back every face of ``img``.

    Args:
      sr: a step-3 model, ``x (N, 16, 16, 3) in [-1, 1] -> (N, 128, 128, 3)``
        (:func:`progsr_jax.inference.load`).
      img: a PIL image (any mode; converted to RGB) or an (H, W[, C]) uint8 array.
      upscale: ``"auto"`` or a positive number (module docstring).
      detector: a :class:`Detector` to reuse; default one with ``min_face``
        and ``detector_weights`` (the installed facenet-pytorch wheel's).
      min_face: smallest face side searched for, in photo pixels.
      max_faces, only_center_face: see :func:`select_faces`.
      batch_size: most faces per model call.
      max_face: faces whose aligned crop spans more photo pixels are left
        exactly as they are (not restored, not pasted; ``restored=False``
        with the reason); None or 0 (the default here) restores every face;
        ``infer --mode=photo`` uses :data:`DEFAULT_MAX_FACE`.

    Returns:
      a :class:`Restoration` (image, faces, upscale, coverage).
    """
    if isinstance(img, Image.Image):
        photo = img.convert("RGB") if img.mode != "RGB" else img
    else:
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise UserError(f"expected a PIL image or a uint8 array, got an array of {arr.dtype}")
        if arr.ndim == 3:
            arr = arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]
        photo = Image.fromarray(arr).convert("RGB")
    parse_upscale(upscale)  # a bad value fails before any work
    det = detector if detector is not None else Detector(detector_weights, min_face=min_face)
    found = select_faces(det(photo), photo.size, max_faces, only_center_face)
    if max_face is not None and not max_face >= 0:
        raise UserError(f"max_face must be >= 0 (0: restore every face), got {max_face}")
    transforms, aligned, lr, spans = [], [], [], []
    for face in found:
        frame, m = align.align_face(photo, face.landmarks)
        chain = align.model_inputs(frame)
        transforms.append(m)
        aligned.append(chain[128])
        lr.append(chain[16])
        spans.append(align.CROP_SIZE / align.similarity_params(m)["scale"])
    keep = [i for i, d in enumerate(spans) if not max_face or d <= max_face]
    scale = choose_upscale(upscale, photo.size, [transforms[i] for i in keep])
    results = super_resolve(sr, np.asarray([lr[i] for i in keep], np.uint8).reshape(-1, 16, 16, 3),
                            batch_size)
    image, coverage = paste.paste_back(photo, list(results), [transforms[i] for i in keep],
                                       upscale=scale)
    sr_of = dict(zip(keep, results))
    faces = [RestoredFace(box=f.box_with_landmarks(), landmarks=np.asarray(f.landmarks, np.float64),
                          score=float(f.score), transform=np.asarray(transforms[i], np.float64),
                          aligned=aligned[i], lr=lr[i], sr=sr_of.get(i), span=spans[i],
                          restored=i in sr_of,
                          reason=None if i in sr_of else
                          f"aligned crop spans {spans[i]:.0f} px > max_face {max_face:g} px: "
                          "its own pixels carry more detail than the model's 16x16 input")
             for i, f in enumerate(found)]
    return Restoration(image=image, faces=faces, upscale=scale, coverage=coverage)


def restore(sr, img, **kwargs) -> tuple[Image.Image, list[RestoredFace]]:
    """``(restored RGB image, [RestoredFace])``; the arguments of :func:`restore_photo`."""
    r = restore_photo(sr, img, **kwargs)
    return r.image, r.faces
