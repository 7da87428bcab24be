r"""How steady ``infer --mode=video`` is: a synthetic clip with known face paths, three methods.

    python tools/video_steadiness.py --checkpoint=/runs/cpu_real --workdir=/tmp/steady \
        --output=docs/video_steadiness.png            # writes .png and .json
    python tools/video_steadiness.py --checkpoint=... --generator=orbit --workdir=/tmp/steady_b \
        --output=/tmp/steady_b.png                    # the second, differently made clip

1. **The clip** (``make``; ``--generator``).  Faces of the shared data, each on
   its aligned-CelebA frame (178x218) with a soft elliptic cut-out, are drawn
   on a background along a known smooth path -- translation (pan), scale
   (zoom: the aligned crop spans ``--span_min``..``--span_max`` frame pixels,
   12-30 by default) and a little roll -- at ``--upscale`` times the frame
   size (the clean *truth* at the output's resolution).  Each frame is then
   degraded on its own, with a new seed per frame: blur, area (or bicubic)
   downscale to the frame size, sensor noise, JPEG.

   ``pan`` (default): CelebA validation faces from file 600 on, two faces on
   sinusoidal pans with a slow zoom in and out and +-3 degrees of roll, over a
   studio-like gradient with soft shapes that drifts slowly; isotropic blur,
   area downscale, Gaussian noise of 3 grey levels, JPEG 60-80; 25 fps.
   ``orbit``: faces68 faces (Helen, AFW, FFHQ; aligned by their 68 points),
   one on an elliptic orbit and one drifting diagonally, zoom and roll on
   other periods, the mouth opening and closing (a local warp) so that the
   motion gate has real motion to keep, over tilted colour bands and boxes;
   anisotropic blur, bicubic downscale, noise that grows with brightness,
   JPEG 50-90; 30 fps, 4:3.

   Written into ``--workdir``: ``input.mp4`` (the degraded frames, stored
   losslessly), ``truth.mp4`` (the clean frames at the output size,
   lossless) and ``truth.json`` (per frame and face the true transform,
   frame pixels -> aligned frame).  Another generator can write these three
   files and use ``score`` alone.
2. **The methods** (``score``): PIL bicubic upscaling of every frame;
   ``infer --mode=video --nosmooth`` (frame by frame, as ``--mode=photo``);
   ``infer --mode=video`` (smoothed).  Both video runs use ``--upscale``,
   ``--min_face`` and ``--max_face`` (default: infer's defaults for video,
   10 and 22; ``--max_face=0`` restores every face) and lossless output so
   that only the methods differ.
3. **The scores**, per face and frame, on the face template: each output
   frame is warped onto the 128x128 crop of the aligned frame with the TRUE
   transform (as is the truth), and compared inside an ellipse over the face:

   * flicker: mean absolute difference between consecutive frames' crops
     minus the same for the truth (0-255; 0 = no more change than the face
     itself shows);
   * jitter: the frame-to-frame motion of the landmarks that the alignment
     used (the template's five points through the inverse of the transform
     that ``tracks.json`` reports for the face's track) minus the true
     motion, in units of the true inter-ocular distance (bicubic aligns
     nothing: no jitter);
   * fidelity: PSNR of the face region against the truth, per frame, averaged.

   Numbers go to ``<output stem>.json``, the figure (a strip of frames around
   the first face for the truth and the three methods, and flicker over time)
   to ``--output``.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Sequence
from fractions import Fraction

import cv2
import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from progsr_jax import cli, data
from progsr_jax.data.crops import read_pts
from progsr_jax.errors import UserError
from progsr_jax.evaluation.sweep_plot import nice_ticks
from progsr_jax.infer import load_model
from progsr_jax.photo import align, detection, paste
from progsr_jax.video import outputs, restoration, streams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATORS = ("pan", "orbit")
FRAME = (178, 218)
SR = 128
METHODS = ("bicubic", "frame-by-frame", "smoothed")


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "a stage-3 model (training workdir or checkpoint)",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "the figure (.png); the numbers go beside it (.json)",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "where the clip, the truth and the runs are written",
                        flag_values=fv)
    flags.DEFINE_enum("generator", "pan", GENERATORS, "how the clip is made (module docstring)",
                      flag_values=fv)
    flags.DEFINE_enum("step", "all", ("all", "make", "score"), "make: only the clip; score: "
                      "only the methods and scores, on the clip in --workdir", flag_values=fv)
    flags.DEFINE_string("shared", None, "the shared data folder (default: $PROGSR_SHARED, else "
                        "../shared beside the repository)", flag_values=fv)
    flags.DEFINE_integer("frames", 96, "frames in the clip", lower_bound=8, flag_values=fv)
    flags.DEFINE_integer("upscale", 4, "output size / frame size (also the truth's scale)",
                         lower_bound=1, upper_bound=8, flag_values=fv)
    flags.DEFINE_float("span_min", 12.0, "smallest aligned-crop span of a face, frame pixels",
                       lower_bound=4.0, flag_values=fv)
    flags.DEFINE_float("span_max", 30.0, "largest aligned-crop span of a face, frame pixels",
                       lower_bound=4.0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the faces' choice and of every frame's degradation",
                         flag_values=fv)
    flags.DEFINE_string("size", None, "frame size WxH (default: 256x144 for pan, 240x180 for "
                        "orbit)", flag_values=fv)
    flags.DEFINE_integer("faces", 2, "faces in the clip (more than 2: extra faces on slow "
                         "paths, for speed and memory measurements)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("min_face", 10.0, "the detector's --min_face (frame pixels; infer's "
                       "video default)", lower_bound=1.0, flag_values=fv)
    flags.DEFINE_float("max_face", 22.0, "infer's --max_face for both video runs (22: its "
                       "default; 0: every face restored)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_string("detector_weights", None, "MTCNN weights folder (default: the wheel's)",
                        flag_values=fv)
    flags.DEFINE_multi_string("option", [], "NAME=VALUE: a VideoOptions field for the smoothed "
                              "run (e.g. --option=motion_threshold=10), repeatable",
                              flag_values=fv)


# ---------------------------------------------------------------------------
# Faces


def shared_dir(flag: str | None) -> str:
    path = flag or os.environ.get("PROGSR_SHARED") or os.path.join(os.path.dirname(REPO), "shared")
    if not os.path.isdir(os.path.join(path, "data")):
        raise UserError(f"the shared data is not in {path}; set --shared or PROGSR_SHARED")
    return path


def celeba_faces(shared: str, count: int, rng) -> list[Image.Image]:
    """``count`` CelebA validation faces from file 600 on (never used to choose a recipe)."""
    val = data.list_files("celeba", os.path.join(shared, "data", "celeba"), "val")
    if len(val) < 700:
        raise UserError(f"CelebA's val list in {shared} has {len(val)} files; 700 are needed")
    picks = rng.choice(np.arange(600, len(val)), count, replace=False)
    return [data.open_image(val[i]) for i in picks]


def faces68_faces(shared: str, count: int, rng) -> list[Image.Image]:
    """``count`` faces68 faces warped onto the aligned frame by five points from their 68."""
    root = os.path.join(shared, "data", "faces68")
    pts_files = sorted(os.path.join(d, f) for d in (os.path.join(root, s) for s in sorted(os.listdir(root)))
                       if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".pts"))
    if len(pts_files) < count:
        raise UserError(f"faces68 in {shared} has {len(pts_files)} faces")
    out = []
    for i in rng.permutation(len(pts_files)):
        pts = read_pts(pts_files[i])
        five = np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])
        stem = pts_files[i][:-4]
        image = next((stem + e for e in (".jpg", ".png") if os.path.exists(stem + e)), None)
        if image is None:
            continue
        iod = np.linalg.norm(five[1] - five[0])
        if iod < 40:  # too small to be a clean source at the truth's resolution
            continue
        out.append(align.warp_to_aligned(data.open_image(image), align.alignment_transform(five)))
        if len(out) == count:
            break
    return out


def face_alpha() -> np.ndarray:
    """(218, 178) float32: a soft ellipse over head, hair and neck of the aligned frame."""
    w, h = FRAME
    m = Image.new("L", FRAME, 0)
    ImageDraw.Draw(m).ellipse((0.17 * w, 0.07 * h, 0.83 * w, 0.97 * h), fill=255)
    return np.asarray(m.filter(ImageFilter.GaussianBlur(5)), np.float32) / 255.0


# ---------------------------------------------------------------------------
# Paths: per frame and face, (centre x, centre y, span, roll in degrees) in frame pixels


def paths(generator: str, n: int, size: tuple[int, int], span_min: float, span_max: float,
          rng, faces: int = 2) -> np.ndarray:
    """(n, faces, 4): centre of the aligned frame (x, y), span of the aligned crop, roll.

    The first two faces follow the generator's own paths; more faces (for
    speed and memory measurements) glide on slow ellipses spread over the
    frame, each zooming within the span range on its own period.
    """
    two = _two_paths(generator, n, size, span_min, span_max, rng)
    if faces <= 2:
        return two[:, :faces]
    w, h = size
    t = np.arange(n) / 25.0
    extra = []
    for k in range(faces - 2):
        ph = rng.uniform(0, 2 * np.pi, 3)
        cx, cy = w * (0.1 + 0.8 * (k + 0.5) / (faces - 2)), h * (0.22 if k % 2 else 0.8)
        extra.append(np.stack([cx + 0.04 * w * np.cos(0.5 * t + ph[0]),
                               cy + 0.05 * h * np.sin(0.4 * t + ph[0]),
                               (span_min + span_max) / 2 + (span_max - span_min) / 2 *
                               np.sin(0.3 * t + ph[1]), 3.0 * np.sin(0.6 * t + ph[2])], -1))
    return np.concatenate([two, np.stack(extra, 1)], 1)


def _two_paths(generator, n, size, span_min, span_max, rng) -> np.ndarray:
    w, h = size
    t = np.arange(n) / max(n - 1, 1)
    mid, amp = (span_min + span_max) / 2, (span_max - span_min) / 2
    if generator == "pan":
        p0 = rng.uniform(0, 2 * np.pi, 4)
        a = np.stack([w * (0.28 + 0.12 * np.sin(2 * np.pi * 0.9 * t + p0[0])),
                      h * (0.45 + 0.08 * np.sin(2 * np.pi * 0.6 * t + p0[1])),
                      mid + amp * np.cos(2 * np.pi * 1.0 * t),
                      3.0 * np.sin(2 * np.pi * 1.3 * t + p0[2])], -1)
        b = np.stack([w * (0.72 - 0.10 * np.sin(2 * np.pi * 0.7 * t + p0[3])),
                      h * (0.55 + 0.06 * np.cos(2 * np.pi * 0.8 * t)),
                      mid + 0.6 * amp * np.sin(2 * np.pi * 0.8 * t + 1.0),
                      -2.5 * np.cos(2 * np.pi * 1.1 * t)], -1)
        return np.stack([a, b], 1)
    ph = rng.uniform(0, 2 * np.pi, 3)
    a = np.stack([w * (0.33 + 0.14 * np.cos(2 * np.pi * 0.75 * t + ph[0])),
                  h * (0.45 + 0.14 * np.sin(2 * np.pi * 0.75 * t + ph[0])),
                  mid + amp * np.sin(2 * np.pi * 0.55 * t + ph[1]),
                  5.0 * np.sin(2 * np.pi * 0.9 * t + ph[2])], -1)
    b = np.stack([w * (0.62 + 0.16 * t), h * (0.62 - 0.12 * t),
                  span_min + (span_max - span_min) * (0.35 + 0.3 * np.cos(2 * np.pi * 0.4 * t)),
                  -4.0 * np.sin(2 * np.pi * 0.5 * t)], -1)
    return np.stack([a, b], 1)


def transform_of(centre_x, centre_y, span, roll) -> np.ndarray:
    """(2, 3) frame -> aligned transform of a face drawn at this place (frame pixels)."""
    s = span / align.CROP_SIZE
    r = np.radians(roll)
    rot = s * np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    t = np.array([centre_x, centre_y]) - rot @ align.FRAME_CENTRE
    return align.invert(np.concatenate([rot, t[:, None]], 1))


def frame_to_canvas(upscale: int) -> np.ndarray:
    """Frame pixel -> pixel of the canvas ``upscale`` times larger (pixel centres)."""
    u = float(upscale)
    return np.array([[u, 0.0, (u - 1) / 2], [0.0, u, (u - 1) / 2]])


def mouth_warp(face: np.ndarray, opening: float) -> np.ndarray:
    """The aligned face with its mouth opened by ``opening`` (0..1): the lower lip and jaw pulled
    down by up to 6 aligned pixels, smoothly fading out around the mouth."""
    if opening <= 0:
        return face
    h, w = face.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = 89.0, 156.0
    g = np.exp(-(((xx - cx) / 22.0) ** 2 + ((yy - cy - 8) / 16.0) ** 2))
    below = 1.0 / (1.0 + np.exp(-(yy - cy) / 2.0))
    dy = 6.0 * opening * g * below
    return cv2.remap(face, xx, yy - dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


# ---------------------------------------------------------------------------
# Rendering and degradation


def background(generator: str, size: tuple[int, int], rng) -> np.ndarray:
    """A background twice as wide as the canvas (it drifts): float32 (H, 2W, 3)."""
    w, h = size
    W = 2 * w
    yy, xx = np.mgrid[0:h, 0:W].astype(np.float32)
    if generator == "pan":
        top, bottom = np.array([170, 168, 160], np.float32), np.array([90, 100, 116], np.float32)
        rgb = top + (bottom - top) * (yy / h)[..., None] ** 1.2
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(14):
            x, y, r = rng.uniform(0, W), rng.uniform(0, h), rng.uniform(0.04, 0.15) * h
            c = tuple(int(v) for v in rng.uniform(60, 200, 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=c)
        return np.asarray(img.filter(ImageFilter.GaussianBlur(0.02 * h)), np.float32)
    # a street-like backdrop: tilted bands of colour, a textured floor, soft blobs
    u, v = xx / W, yy / h
    rgb = np.stack([95 + 35 * np.sin(9 * u + 3 * v), 100 + 25 * np.sin(7 * u - 2 * v + 1),
                    110 + 30 * np.cos(5 * u + 4 * v)], -1)
    rgb += (v > 0.7)[..., None] * rng.normal(0, 6, (h, W, 1))
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        x, y = rng.uniform(0, W), rng.uniform(0, 0.7 * h)
        bw, bh = rng.uniform(0.03, 0.12) * W, rng.uniform(0.1, 0.4) * h
        draw.rectangle((x, y, x + bw, y + bh), fill=tuple(int(c) for c in rng.uniform(40, 210, 3)))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(0.01 * h)), np.float32)


def render(bg: np.ndarray, drift: float, faces: Sequence[np.ndarray], transforms: Sequence,
           alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One clean canvas (H, W, 3) float32: the background shifted by ``drift`` px and the faces
    drawn with their canvas -> aligned transforms (bicubic, alpha-blended)."""
    w, h = size
    x0 = int(np.floor(drift))
    frac = drift - x0
    canvas = (1 - frac) * bg[:, x0:x0 + w] + frac * bg[:, x0 + 1:x0 + 1 + w]
    for face, m in zip(faces, transforms):
        inv = np.vstack([m, [0, 0, 1]])[:2]  # canvas -> aligned: what cv2 samples
        f = cv2.warpAffine(face, inv, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT)
        a = cv2.warpAffine(alpha, inv, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT)[..., None]
        canvas = canvas * (1 - a) + f * a
    return canvas


def degrade(generator: str, canvas: np.ndarray, factor: int, rng) -> np.ndarray:
    """A clean canvas -> one degraded frame (uint8), with this frame's own random draws."""
    x = canvas
    if generator == "pan":
        x = cv2.GaussianBlur(x, (0, 0), 0.45 * factor)
        h, w = x.shape[0] // factor, x.shape[1] // factor
        x = cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA)
        x = x + rng.normal(0, 3.0, x.shape)
        quality = int(rng.integers(60, 81))
    else:
        angle = rng.uniform(0, 180)
        k = cv2.getGaussianKernel(int(6 * factor) | 1, 0.6 * factor)
        kernel = k @ cv2.getGaussianKernel(int(6 * factor) | 1, 0.25 * factor).T
        rot = cv2.getRotationMatrix2D((kernel.shape[1] / 2 - 0.5, kernel.shape[0] / 2 - 0.5), angle, 1)
        kernel = cv2.warpAffine(kernel, rot, kernel.shape[::-1])
        x = cv2.filter2D(x, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)
        h, w = x.shape[0] // factor, x.shape[1] // factor
        x = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                       np.float32)
        x = x + rng.normal(0, 1, x.shape) * np.sqrt(1.0 + 0.06 * np.clip(x, 0, 255))
        quality = int(rng.integers(50, 91))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def lossless_writer(path: str, size: tuple[int, int], fps: int):
    info = streams.VideoInfo(path=path, width=size[0], height=size[1], rotation=0,
                             time_base=Fraction(1, 90000), rate=Fraction(fps), frames=0,
                             duration=0.0, codec="", audio=())
    return streams.VideoWriter(path, info, size, streams.encoder_settings(path, lossless=True))


def make_clip(generator: str, workdir: str, shared: str, frames: int, upscale: int,
              span_min: float, span_max: float, seed: int, size: tuple[int, int] | None = None,
              count: int = 2, log=print) -> dict:
    """Writes input.mp4, truth.mp4 and truth.json into ``workdir``; returns the truth dict.
    ``size``: the frames' (default: the generator's); ``count``: faces."""
    rng = np.random.default_rng(seed)
    size = size or ((256, 144) if generator == "pan" else (240, 180))
    fps = 25 if generator == "pan" else 30
    sources = (celeba_faces if generator == "pan" else faces68_faces)(shared, count, rng)
    faces = [np.asarray(f.convert("RGB"), np.float32) for f in sources]
    alpha = face_alpha()
    path = paths(generator, frames, size, span_min, span_max, rng, count)
    canvas_size = (size[0] * upscale, size[1] * upscale)
    bg = background(generator, canvas_size, rng)
    to_canvas = frame_to_canvas(upscale)
    os.makedirs(workdir, exist_ok=True)
    src = lossless_writer(os.path.join(workdir, "input.mp4"), size, fps)
    truth = lossless_writer(os.path.join(workdir, "truth.mp4"), canvas_size, fps)
    step = 90000 // fps
    records = []
    try:
        for t in range(frames):
            ms = [transform_of(*path[t, k]) for k in range(len(faces))]
            drawn = list(faces)
            if generator == "orbit":  # the first face talks: mouth open/closed over ~0.6 s
                opening = max(0.0, math.sin(2 * math.pi * t / 18.0)) ** 2
                drawn[0] = mouth_warp(faces[0], opening)
            canvas = render(bg, 0.4 * t * upscale / 4, drawn,
                            [align.compose(m, align.invert(to_canvas)) for m in ms], alpha,
                            canvas_size)
            frame_rng = np.random.default_rng([seed, t, 7])
            src.write(degrade(generator, canvas, upscale, frame_rng), t * step)
            truth.write(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), t * step)
            records.append([[[float(v) for v in row] for row in m] for m in ms])
        src.commit()
        truth.commit()
    except BaseException:
        src.abort()
        truth.abort()
        raise
    info = {"generator": generator, "frames": frames, "fps": fps, "size": list(size),
            "upscale": upscale, "span": [span_min, span_max], "seed": seed,
            "faces": len(faces), "transforms": records}
    with open(os.path.join(workdir, "truth.json"), "w") as f:
        json.dump(info, f)
    log(f"wrote {workdir}/input.mp4, truth.mp4, truth.json: {frames} frames of {size[0]}x"
        f"{size[1]} ({generator}), {len(faces)} faces spanning {span_min:g}-{span_max:g} px")
    return info


# ---------------------------------------------------------------------------
# Scoring


def face_mask() -> np.ndarray:
    """(128, 128) bool: an ellipse over the face (brows to chin) in the 128x128 template crop."""
    m = Image.new("L", (SR, SR), 0)
    ImageDraw.Draw(m).ellipse((64.5 - 33, 75 - 43, 64.5 + 33, 75 + 43), fill=255)
    return np.asarray(m) > 127


def template_crop(image: np.ndarray, transform, frame_size, upscale: int) -> np.ndarray:
    """The 128x128 template crop of a face in an output frame ``upscale`` times the frame size."""
    out_size = (image.shape[1], image.shape[0])
    to_sr = paste.canvas_to_sr(transform, tuple(frame_size), out_size)
    sr_to_canvas = np.vstack([align.invert(to_sr), [0, 0, 1]])[:2]
    return cv2.warpAffine(image.astype(np.float32), sr_to_canvas, (SR, SR),
                          flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def read_frames(path: str):
    for frame in streams.VideoReader(path).frames():
        yield frame.image


def crops_of(frames, truth: dict) -> np.ndarray:
    """(T, faces, 128, 128, 3) float32 template crops of every frame of an output."""
    out = []
    for t, image in enumerate(frames):
        out.append([template_crop(image, np.array(m), truth["size"], truth["upscale"])
                    for m in truth["transforms"][t]])
    return np.asarray(out, np.float32)


def jitter(tracks: dict, truth: dict) -> tuple[float, float, int]:
    """(mean jitter, fraction of face-frames aligned, pairs) from a run's tracks.json."""
    used: dict[tuple[int, int], np.ndarray] = {}
    true = [[np.array(m) for m in ms] for ms in truth["transforms"]]
    for track in tracks["tracks"]:
        for entry in track["per_frame"]:
            t = entry["frame"]
            m = np.array(entry["transform"])
            centre = align.apply(align.invert(m), align.FRAME_CENTRE[None])[0]
            best, dist = None, float("inf")
            for k, mt in enumerate(true[t]):
                c = align.apply(align.invert(mt), align.FRAME_CENTRE[None])[0]
                span = align.CROP_SIZE / align.similarity_params(mt)["scale"]
                d = float(np.hypot(*(centre - c)))
                if d < 0.35 * span and d < dist:
                    best, dist = k, d
            if best is not None and (t, best) not in used:
                used[(t, best)] = align.apply(align.invert(m), align.TEMPLATE)
    errors = []
    for (t, k), p in used.items():
        if (t + 1, k) not in used:
            continue
        q0 = align.apply(align.invert(true[t][k]), align.TEMPLATE)
        q1 = align.apply(align.invert(true[t + 1][k]), align.TEMPLATE)
        iod = np.linalg.norm(q0[1] - q0[0])
        move = (used[(t + 1, k)] - p) - (q1 - q0)
        errors.append(float(np.linalg.norm(move, axis=1).mean() / iod))
    n = len(true) * len(true[0])
    return (float(np.mean(errors)) if errors else float("nan"), len(used) / n, len(errors))


def scores(crops: np.ndarray, truth_crops: np.ndarray, mask: np.ndarray) -> dict:
    """Flicker (mean and per frame pair), PSNR (mean and per frame) over the face mask."""
    diff = np.abs(np.diff(crops, axis=0))[:, :, mask].mean(axis=(2, 3))  # (T-1, faces)
    diff_truth = np.abs(np.diff(truth_crops, axis=0))[:, :, mask].mean(axis=(2, 3))
    flicker = diff - diff_truth
    mse = ((crops - truth_crops) ** 2)[:, :, mask].mean(axis=(2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    return {"flicker": float(flicker.mean()), "flicker_per_face": flicker.mean(0).tolist(),
            "flicker_over_time": flicker.mean(1).tolist(), "psnr": float(psnr.mean()),
            "psnr_per_face": psnr.mean(0).tolist(), "psnr_over_time": psnr.mean(1).tolist()}


def run_video(model, detector, workdir: str, name: str, truth: dict, options: dict,
              max_face: float) -> dict:
    """``infer --mode=video`` on input.mp4 (library call), lossless output."""
    opts = restoration.VideoOptions(upscale=float(truth["upscale"]), max_face=max_face, **options)
    out = os.path.join(workdir, f"{name}.mp4")
    planned = outputs.plan(os.path.join(workdir, "input.mp4"), out, opts, lossless=True)
    return outputs.restore_video(model, detector, planned, opts, progress=False,
                                 log=lambda *a: None)


def parse_options(values: Sequence[str]) -> dict:
    fields = {f.name: f.type for f in restoration.VideoOptions.__dataclass_fields__.values()}
    out = {}
    for value in values:
        name, sep, raw = value.partition("=")
        if not sep or name not in fields or name in ("smooth", "upscale", "max_face"):
            raise UserError(f"--option={value}: expected NAME=VALUE with NAME a VideoOptions "
                            "field other than smooth, upscale, max_face")
        out[name] = float(raw) if "." in raw or "e" in raw.lower() else int(raw)
    return out


def score_clip(workdir: str, checkpoint: str, min_face: float, weights: str | None,
               options: dict, max_face: float = 22.0, log=print) -> dict:
    try:
        with open(os.path.join(workdir, "truth.json")) as f:
            truth = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"no readable truth.json in {workdir} ({e}); run --step=make first") from None
    detector = detection.Detector(weights, min_face=min_face)
    model = load_model(checkpoint)
    mask = face_mask()
    truth_crops = crops_of(read_frames(os.path.join(workdir, "truth.mp4")), truth)
    frame_size = tuple(truth["size"])
    out_size = (frame_size[0] * truth["upscale"], frame_size[1] * truth["upscale"])
    bicubic = (np.asarray(Image.fromarray(f).resize(out_size, Image.BICUBIC))
               for f in read_frames(os.path.join(workdir, "input.mp4")))
    results = {"bicubic": scores(crops_of(bicubic, truth), truth_crops, mask)}
    results["bicubic"].update(jitter=None, aligned=None)
    runs = {}
    for name, smooth in (("frame-by-frame", False), ("smoothed", True)):
        log(f"running {name} ...")
        t0 = time.perf_counter()
        run = run_video(model, detector, workdir, name, truth,
                        dict(options if smooth else {}, smooth=smooth), max_face)
        with open(run["tracks_json"]) as f:
            tracks = json.load(f)
        r = scores(crops_of(read_frames(run["output"]), truth), truth_crops, mask)
        j, aligned, pairs = jitter(tracks, truth)
        r.update(jitter=j, aligned=aligned, jitter_pairs=pairs, seconds=time.perf_counter() - t0,
                 restored_face_frames=run["restored"], tracks=run["tracks"])
        results[name] = r
        runs[name] = run["output"]
    fb, sm = results["frame-by-frame"], results["smoothed"]
    summary = {"flicker_reduction": 1 - sm["flicker"] / fb["flicker"] if fb["flicker"] > 0 else None,
               "jitter_reduction": 1 - sm["jitter"] / fb["jitter"] if fb["jitter"] else None,
               "psnr_change_db": sm["psnr"] - fb["psnr"]}
    return {"clip": {k: v for k, v in truth.items() if k != "transforms"}, "methods": results,
            "smoothed_vs_frame_by_frame": summary, "options": options, "max_face": max_face,
            "min_face": min_face, "checkpoint": checkpoint, "runs": runs}


# ---------------------------------------------------------------------------
# The figure


def figure(report: dict, workdir: str) -> Image.Image:
    """A strip of frames around the first face (truth and the three methods) over flicker over
    time (one line per method)."""
    with open(os.path.join(workdir, "truth.json")) as f:
        truth = json.load(f)
    n = truth["frames"]
    picks = np.linspace(2, n - 3, 6).round().astype(int)
    u = truth["upscale"]
    sources = {"truth": os.path.join(workdir, "truth.mp4"),
               "bicubic": os.path.join(workdir, "input.mp4"),
               "frame-by-frame": report["runs"]["frame-by-frame"],
               "smoothed": report["runs"]["smoothed"]}
    cell = 112
    rows = {}
    for name, path in sources.items():
        cells = []
        for t, image in enumerate(read_frames(path)):
            if t not in picks:
                continue
            if name == "bicubic":
                image = np.asarray(Image.fromarray(image).resize(
                    (image.shape[1] * u, image.shape[0] * u), Image.BICUBIC))
            cx, cy, span, _ = _path_of(truth, t, 0)
            side = 1.25 * span * u
            x0, y0 = (cx + 0.5) * u - side / 2, (cy + 0.5) * u - side / 2
            crop = Image.fromarray(image).crop((int(x0), int(y0), int(x0 + side), int(y0 + side)))
            cells.append(crop.resize((cell, cell), Image.NEAREST if side < cell else Image.LANCZOS))
        rows[name] = cells
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    label_w, pad = 118, 6
    strip_w = label_w + len(picks) * (cell + pad)
    plot_h = 230
    W = max(strip_w + pad, 760)
    H = 28 + len(rows) * (cell + pad) + 24 + plot_h + 40
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    m = report["methods"]
    s = report["smoothed_vs_frame_by_frame"]
    draw.text((pad, 6), f"{truth['generator']} clip, {n} frames, faces {truth['span'][0]:g}-"
              f"{truth['span'][1]:g} px, x{u}, --max_face={report['max_face']:g}: smoothed flicker "
              f"{100 * s['flicker_reduction']:.0f}% and jitter {100 * s['jitter_reduction']:.0f}% "
              f"lower than frame-by-frame, face PSNR {s['psnr_change_db']:+.2f} dB",
              fill="black", font=small)
    y = 28
    for name, cells in rows.items():
        draw.text((pad, y + cell // 2 - 8), name, fill="black", font=font)
        for k, c in enumerate(cells):
            img.paste(c, (label_w + k * (cell + pad), y))
        y += cell + pad
    for k, t in enumerate(picks):
        draw.text((label_w + k * (cell + pad), y), f"frame {t}", fill="black", font=small)
    y += 24
    colours = {"bicubic": (127, 127, 127), "frame-by-frame": (214, 39, 40), "smoothed": (31, 119, 180)}
    x0, x1, y0, y1 = 60, W - 20, y + 10, y + plot_h - 20
    series = {k: m[k]["flicker_over_time"] for k in METHODS}
    hi = max(max(v) for v in series.values())
    lo = min(0.0, min(min(v) for v in series.values()))

    ticks = nice_ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    for tk in ticks:
        yy = y1 - (tk - lo) / (hi - lo) * (y1 - y0)
        draw.line((x0, yy, x1, yy), fill=(225, 225, 225))
        draw.text((x0 - 8 - draw.textlength(f"{tk:g}", font=small), yy - 7), f"{tk:g}",
                  fill="black", font=small)
    for name, values in series.items():
        pts = [(x0 + i / max(len(values) - 1, 1) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0))
               for i, v in enumerate(values)]
        draw.line(pts, fill=colours[name], width=2)
    draw.text((x0, y0 - 14), "flicker per frame pair (mean |change| in the face minus the truth's, "
              "0-255)", fill="black", font=small)
    lx = x0
    for name in METHODS:
        label = f"{name}: {m[name]['flicker']:.2f}" + (
            f", jitter {m[name]['jitter']:.3f}" if m[name]["jitter"] is not None else "") + \
            f", PSNR {m[name]['psnr']:.2f} dB"
        draw.line((lx, y1 + 22, lx + 18, y1 + 22), fill=colours[name], width=3)
        draw.text((lx + 22, y1 + 14), label, fill="black", font=small)
        lx += 30 + draw.textlength(label, font=small)
    draw.text((x1 - 60, y1 + 2), "frame", fill="black", font=small)
    return img


def _path_of(truth: dict, t: int, k: int):
    m = np.array(truth["transforms"][t][k])
    cx, cy = align.apply(align.invert(m), align.FRAME_CENTRE[None])[0]
    p = align.similarity_params(m)
    return cx, cy, align.CROP_SIZE / p["scale"], -p["rotation"]


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    cli.require(fv, "workdir")
    workdir = os.path.abspath(fv.workdir)
    if fv.span_max < fv.span_min:
        raise UserError(f"--span_max ({fv.span_max:g}) is below --span_min ({fv.span_min:g})")
    options = parse_options(fv.option)
    if fv.step in ("all", "score"):
        cli.require(fv, "checkpoint", "output")
        if not fv.output.lower().endswith(".png"):
            raise UserError(f"--output must be a .png file, got {fv.output}")
    size = None
    if fv.size:
        try:
            size = tuple(int(v) for v in fv.size.lower().split("x"))
            assert len(size) == 2 and min(size) >= 32
        except (ValueError, AssertionError):
            raise UserError(f"--size must be WxH (at least 32x32), got {fv.size}") from None
    if fv.step in ("all", "make"):
        make_clip(fv.generator, workdir, shared_dir(fv.shared), fv.frames, fv.upscale,
                  fv.span_min, fv.span_max, fv.seed, size, fv.faces)
    if fv.step == "make":
        return 0
    report = score_clip(workdir, fv.checkpoint, fv.min_face, fv.detector_weights, options,
                        fv.max_face)
    output = os.path.abspath(fv.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    figure(report, workdir).save(output, format="PNG", optimize=True)
    with open(output[:-4] + ".json", "w") as f:
        json.dump(report, f, indent=1)
    for name in METHODS:
        r = report["methods"][name]
        jit = "-" if r["jitter"] is None else f"{r['jitter']:.4f}"
        print(f"{name:15s} flicker {r['flicker']:6.3f}  jitter {jit:>7s}  PSNR {r['psnr']:6.2f} dB"
              + (f"  aligned {100 * r['aligned']:.0f}% of face-frames" if r["aligned"] is not None else ""))
    s = report["smoothed_vs_frame_by_frame"]
    print(f"smoothed vs frame-by-frame: flicker -{100 * s['flicker_reduction']:.1f}%, jitter "
          f"-{100 * s['jitter_reduction']:.1f}%, PSNR {s['psnr_change_db']:+.3f} dB")
    print(f"wrote {output} and {output[:-4]}.json")
    return 0


if __name__ == "__main__":
    cli.run(main)
