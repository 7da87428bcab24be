"""Procedural face-like images with 68-point landmarks.

Used to run and test training end to end without real data (``source =
'synthetic'``).  Each face is drawn with ``PIL.ImageDraw`` at twice the output
resolution and box-downsampled (antialiasing): a varied background, hair,
neck and clothes, a skin-toned face, ears, eyebrows, eyes with iris, pupil and
catch-light, a nose with nostrils, lips (open or closed, with teeth), random
pose (rotation, scale, translation, a little yaw), random colours and
expression, then soft lighting, freckles and sensor noise, so that super-
resolution has detail to learn.

Landmarks follow the standard 68-point (iBUG / 300-W) layout in image
coordinates as seen by the viewer: jaw 0-16 (from the image-left side down
round the chin), brows 17-21 (image-left) and 22-26, nose bridge 27-30, lower
nose 31-35, eyes 36-41 (image-left) and 42-47 (each: outer/left corner, two
upper-lid points, right corner, two lower-lid points), outer lips 48-59 and
inner lips 60-67.  Coordinates are ``(x, y)`` float32 pixel positions with
pixel centres at integers (0-based), as in the 300-W ``.pts`` files.

Faces are deterministic per ``(seed, index)``: :func:`face_rng` gives the
generator of one face, so the first k faces never depend on how many are made.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

# Oversampling factor of the drawing canvas (drawn at SS * size, then box-reduced).
SS = 2

# Base skin tones (RGB), from light to dark; each face jitters one of them.
_SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 142, 100],
                  [160, 110, 75], [120, 80, 55], [90, 60, 40]], np.float64)
# Hair colours: black, dark brown, brown, auburn, blond, grey.
_HAIR = np.array([[25, 20, 18], [60, 40, 28], [105, 70, 45], [140, 60, 30],
                  [200, 165, 100], [160, 160, 160]], np.float64)
# Iris colours: brown, dark brown, blue, green, grey.
_IRIS = np.array([[100, 60, 30], [60, 35, 20], [70, 110, 160], [80, 120, 70],
                  [110, 115, 120]], np.float64)


def face_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator that draws face ``index`` of the dataset ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


def _color(rgb) -> tuple[int, int, int]:
    """An RGB triple of floats -> PIL colour tuple (rounded, clipped to 0..255)."""
    r, g, b = (min(255, max(0, int(round(float(v))))) for v in rgb)
    return r, g, b


def _jitter(rng: np.random.Generator, base: np.ndarray, amount: float) -> np.ndarray:
    return base * rng.uniform(1 - amount, 1 + amount) + rng.normal(0, 255 * amount / 3, 3)


# --------------------------------------------------------------------------
# Landmarks in a canonical face frame: origin at the face centre, x to the
# image right, y down, unit = half the face width.
# --------------------------------------------------------------------------


def _eye_contour(cx, cy, half_w, open_h, n=10):
    """Almond eye outline: upper lid (left->right) then lower lid (right->left)."""
    t = np.linspace(0.0, 1.0, n)
    x = cx - half_w + 2 * half_w * t
    upper = np.stack([x, cy - open_h * np.sin(np.pi * t) ** 0.8], 1)
    lower = np.stack([x[::-1], cy + 0.75 * open_h * np.sin(np.pi * t[::-1]) ** 1.2], 1)
    return upper, lower


def _eye_landmarks(cx, cy, half_w, open_h):
    """6 eye points: left corner, 2 upper lid, right corner, 2 lower lid."""
    xs = np.array([-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3])
    t = (xs + 1) / 2
    up = cy - open_h * np.sin(np.pi * t) ** 0.8
    lo = cy + 0.75 * open_h * np.sin(np.pi * t) ** 1.2
    ys = np.where(np.arange(6) < 3, up, lo)
    ys[0] = ys[3] = cy
    return np.stack([cx + half_w * xs, ys], 1)


def _sample_shape(rng: np.random.Generator) -> dict:
    """Random face geometry and expression (canonical units)."""
    p = dict(
        jaw_b=rng.uniform(1.18, 1.35),       # chin distance below centre
        chin_narrow=rng.uniform(0.08, 0.25),  # how much the jaw narrows at the chin
        top_b=rng.uniform(1.3, 1.45),        # forehead height above centre
        eye_y=rng.uniform(-0.34, -0.22),
        eye_x=rng.uniform(0.36, 0.44),
        eye_w=rng.uniform(0.15, 0.2),
        eye_h=rng.uniform(0.045, 0.09) if rng.random() > 0.07 else rng.uniform(0.008, 0.02),
        brow_gap=rng.uniform(0.17, 0.27),
        brow_arch=rng.uniform(0.02, 0.08),
        brow_w=rng.uniform(0.22, 0.3),
        nose_y=rng.uniform(0.14, 0.27),
        nose_w=rng.uniform(0.14, 0.22),
        mouth_y=rng.uniform(0.55, 0.7),
        mouth_w=rng.uniform(0.26, 0.38),
        upper_lip=rng.uniform(0.035, 0.07),
        lower_lip=rng.uniform(0.045, 0.09),
        mouth_open=rng.uniform(0.0, 0.2) if rng.random() < 0.45 else 0.0,
        smile=rng.uniform(-0.03, 0.08),
        yaw=rng.uniform(-0.09, 0.09),  # horizontal shift of the inner features
        gaze=rng.uniform(-0.35, 0.35, 2),
    )
    return p


def _canonical_landmarks(p: dict) -> np.ndarray:
    """The 68 landmarks of shape ``p`` in the canonical frame."""
    pts = np.zeros((68, 2))
    # Jaw 0-16: lower half of an ellipse, narrowed towards the chin.
    phi = np.linspace(-0.13, np.pi + 0.13, 17)
    s = np.clip(np.sin(phi), 0, None)
    pts[0:17, 0] = -np.cos(phi) * (1 - p["chin_narrow"] * s ** 2) + 0.25 * p["yaw"] * s
    pts[0:17, 1] = p["jaw_b"] * np.sin(phi)
    # Brows 17-21 (image left, outer -> inner) and 22-26 (inner -> outer).
    t = np.linspace(0, 1, 5)
    bx = -p["eye_x"] - 0.55 * p["brow_w"] + 1.1 * p["brow_w"] * t
    by = p["eye_y"] - p["brow_gap"] - p["brow_arch"] * np.sin(np.pi * (0.25 + 0.75 * t))
    by = by + 0.03 * (1 - t)  # outer end slightly lower
    pts[17:22] = np.stack([bx, by], 1)
    pts[22:27] = np.stack([-bx[::-1], by[::-1]], 1)
    # Nose bridge 27-30 and lower nose 31-35.
    pts[27:31, 0] = 0.0
    pts[27:31, 1] = np.linspace(p["eye_y"] + 0.02, p["nose_y"], 4)
    nx = np.linspace(-p["nose_w"], p["nose_w"], 5)
    pts[31:36, 0] = nx
    pts[31:36, 1] = p["nose_y"] + 0.07 + 0.03 * (1 - (nx / p["nose_w"]) ** 2)
    # Eyes 36-41 and 42-47.
    pts[36:42] = _eye_landmarks(-p["eye_x"], p["eye_y"], p["eye_w"], p["eye_h"])
    pts[42:48] = _eye_landmarks(p["eye_x"], p["eye_y"], p["eye_w"], p["eye_h"])
    # Mouth: outer 48-59, inner 60-67.
    mw, my, o = p["mouth_w"], p["mouth_y"], p["mouth_open"]
    ul, ll = p["upper_lip"], p["lower_lip"]
    ox = mw * np.array([-1, -0.6, -0.25, 0, 0.25, 0.6, 1, 0.6, 0.3, 0, -0.3, -0.6])
    oy = np.array([my, my - o / 2 - 0.8 * ul, my - o / 2 - ul - 0.01, my - o / 2 - ul + 0.012,
                   my - o / 2 - ul - 0.01, my - o / 2 - 0.8 * ul, my,
                   my + o / 2 + 0.7 * ll, my + o / 2 + 0.95 * ll, my + o / 2 + ll,
                   my + o / 2 + 0.95 * ll, my + o / 2 + 0.7 * ll])
    ix = mw * np.array([-0.85, -0.4, 0, 0.4, 0.85, 0.4, 0, -0.4])
    iy = np.array([my, my - o / 2, my - o / 2, my - o / 2, my, my + o / 2, my + o / 2, my + o / 2])
    pts[48:60] = np.stack([ox, oy], 1)
    pts[60:68] = np.stack([ix, iy], 1)
    pts[48:68, 1] -= p["smile"] * (pts[48:68, 0] / mw) ** 2  # corners up when smiling
    # Small yaw: inner features shift sideways, the nose tip most.
    pts[17:48, 0] += 0.6 * p["yaw"]
    pts[31:36, 0] += 0.4 * p["yaw"]
    pts[30, 0] += 0.4 * p["yaw"]
    pts[48:68, 0] += 0.8 * p["yaw"]
    return pts


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------


def _background(rng: np.random.Generator, n: int) -> Image.Image:
    """A gradient between two random colours plus soft blobs of colour noise.

    Built on a tiny grid and upsampled (cheap), then a few flat objects on top.
    """
    g = 6
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.linspace(-1, 1, g)
    ramp = (np.cos(angle) * axis[None, :] + np.sin(angle) * axis[:, None]) * 0.5 + 0.5
    small = c0 + (c1 - c0) * ramp[..., None]
    small += rng.uniform(-128, 128, (g, g, 3)) * rng.uniform(0.1, 0.45)
    small = np.clip(small, 0, 255).astype(np.uint8)
    # Smooth at the output resolution, then pixel-doubled to the canvas: the
    # final box reduction gives the smooth output-resolution image back.
    bg = Image.fromarray(small).resize((n // SS, n // SS), Image.BICUBIC)
    bg = bg.resize((n, n), Image.NEAREST)
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(0, 4))):  # a few background objects
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * n
        w, h = rng.uniform(0.1, 0.5, 2) * n
        fill = _color(rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
    return bg


@functools.lru_cache(maxsize=64)
def _unit_circle(n: int) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(a), np.sin(a)], 1)


def _ellipse_pts(cx, cy, rx, ry, a0=None, a1=None, n=32):
    """``n`` points on an ellipse; the whole ellipse, or the arc from angle a0 to a1."""
    if a0 is None:
        return _unit_circle(n) * (rx, ry) + (cx, cy)
    a = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


def make_face(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Draws one random face.

    Args:
      rng: the generator (see :func:`face_rng`); the result is a function of its state.
      size: output side in pixels.

    Returns:
      ``(image, landmarks)``: uint8 ``(size, size, 3)`` and float32 ``(68, 2)``
      ``(x, y)`` pixel coordinates (pixel centres at integers), all inside the image.
    """
    n = size * SS
    p = _sample_shape(rng)
    canon = _canonical_landmarks(p)

    # Pose: canonical -> output pixels.  Shrink if anything would leave the image.
    scale = rng.uniform(0.26, 0.31) * size
    theta = math.radians(rng.uniform(-12, 12))
    centre = np.array([0.5, 0.5]) * size + rng.uniform(-0.035, 0.035, 2) * size
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    for _ in range(20):
        lm = canon @ rot.T * scale + centre
        if lm.min() >= 1.0 and lm.max() <= size - 2.0:
            break
        scale *= 0.93
    lm = np.clip(lm, 1.0, size - 2.0)

    # Canonical -> canvas: canvas = canonical @ m + offset (pixel centres at
    # integers on both grids: canvas = SS * output + (SS - 1) / 2).
    m = rot.T * scale * SS
    offset = centre * SS + 0.5 * (SS - 1)

    def tr(q) -> list[float]:
        """Canonical points -> flat canvas coordinate list, as ImageDraw takes it."""
        return (np.asarray(q, np.float64).reshape(-1, 2) @ m + offset).ravel().tolist()

    unit = scale * SS  # canvas pixels per canonical unit

    # Colours.
    skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 0.08)
    hair = _jitter(rng, _HAIR[rng.integers(len(_HAIR))], 0.15)
    shade = skin * 0.78
    lip = _jitter(rng, skin * np.array([0.85, 0.55, 0.55]) + np.array([30, 0, 5]), 0.08)
    iris = _jitter(rng, _IRIS[rng.integers(len(_IRIS))], 0.15)
    cloth = rng.uniform(0, 255, 3)

    img = _background(rng, n)
    draw = ImageDraw.Draw(img)

    # Hair mass behind the head (long or short), neck, clothes, ears.
    hair_len = rng.uniform(-0.2, 1.9)
    volume = rng.uniform(1.08, 1.3)
    back = np.concatenate([
        _ellipse_pts(0, -0.2, volume, p["top_b"] * 1.05, np.pi, 2 * np.pi, 24),
        [[volume * 1.02, hair_len], [-volume * 1.02, hair_len]]])
    if hair_len > 0:
        draw.polygon(tr(back), fill=_color(hair * 0.85))
    draw.polygon(tr([[-0.45, 0.6], [0.45, 0.6], [0.5, 2.5], [-0.5, 2.5]]), fill=_color(shade))
    draw.polygon(tr(_ellipse_pts(0, 2.3, 1.9, 0.9, np.pi, 2 * np.pi, 20)), fill=_color(cloth))
    for sx in (-1, 1):
        draw.polygon(tr(_ellipse_pts(sx * 0.98, -0.05, 0.14, 0.26, n=16)), fill=_color(shade))
    if hair_len <= 0:  # short hair: only a cap
        cap = _ellipse_pts(0, -0.35, volume * 0.98, p["top_b"] * 0.92, np.pi, 2 * np.pi, 24)
        draw.polygon(tr(cap), fill=_color(hair * 0.85))

    # Face: jaw (landmarks 0-16, densified) closed by the forehead arc.
    phi = np.linspace(-0.13, np.pi + 0.13, 40)
    s = np.clip(np.sin(phi), 0, None)
    jaw = np.stack([-np.cos(phi) * (1 - p["chin_narrow"] * s ** 2) + 0.25 * p["yaw"] * s,
                    p["jaw_b"] * np.sin(phi)], 1)
    top = _ellipse_pts(0, 0, 1.0, p["top_b"], 2 * np.pi - 0.13, np.pi + 0.13, 30)  # right -> left
    draw.polygon(tr(np.concatenate([jaw, top])), fill=_color(skin))

    # Cheek blush and a soft shadow under the nose.
    if rng.random() < 0.5:
        blush = _color(skin * np.array([1.0, 0.9, 0.9]))
        for sx in (-1, 1):
            draw.polygon(tr(_ellipse_pts(sx * 0.55, 0.25, 0.18, 0.12, n=16)), fill=blush)

    # Fringe over the forehead: a wavy lower edge.
    fringe_y = rng.uniform(-1.15, -0.72)
    k = int(rng.integers(3, 8))
    xs = np.linspace(-1.0, 1.0, 2 * k + 1)
    ys = fringe_y + np.where(np.arange(2 * k + 1) % 2 == 0, -0.08, 0.08) * rng.uniform(0.3, 1.2)
    ys = ys + 0.35 * xs ** 2  # follow the head's curve down at the sides
    fringe = np.concatenate([np.stack([xs, ys], 1),
                             _ellipse_pts(0, -0.25, 1.02, p["top_b"], 0, -np.pi, 24)])  # over the top
    draw.polygon(tr(fringe), fill=_color(hair))

    # Eyebrows.
    brow_c = _color(hair * 0.7)
    bw = max(1, int(round(unit * rng.uniform(0.035, 0.07))))
    for a, b in ((17, 22), (22, 27)):
        draw.line(tr(canon[a:b]), fill=brow_c, width=bw, joint="curve")

    # Eyes: sclera, then iris/pupil/catch-light clipped to the eye shape, then lids.
    layer = img.copy()
    ldraw = ImageDraw.Draw(layer)
    mask = Image.new("L", img.size, 0)
    mdraw = ImageDraw.Draw(mask)
    lid_c = _color(hair * 0.4 + skin * 0.2)
    lid_w = max(1, int(round(unit * 0.03)))
    sclera = _color(np.array([240, 236, 228]) * rng.uniform(0.85, 1.0))
    lids = []
    for cx in (-p["eye_x"], p["eye_x"]):
        cx_y = cx + 0.6 * p["yaw"]
        upper, lower = _eye_contour(cx_y, p["eye_y"], p["eye_w"], p["eye_h"])
        outline = tr(np.concatenate([upper, lower]))
        draw.polygon(outline, fill=sclera)
        mdraw.polygon(outline, fill=255)
        ir = p["eye_w"] * 0.5
        gx = cx_y + p["gaze"][0] * p["eye_w"] * 0.4
        gy = p["eye_y"] + p["gaze"][1] * p["eye_h"] * 0.3
        ldraw.polygon(tr(_ellipse_pts(gx, gy, ir, ir, n=20)), fill=_color(iris))
        ldraw.polygon(tr(_ellipse_pts(gx, gy, ir * 0.6, ir * 0.6, n=16)), fill=_color(iris * 0.6))
        ldraw.polygon(tr(_ellipse_pts(gx, gy, ir * 0.38, ir * 0.38, n=16)), fill=(10, 8, 8))
        ldraw.polygon(tr(_ellipse_pts(gx + ir * 0.3, gy - ir * 0.3, ir * 0.13, ir * 0.13, n=8)),
                      fill=(250, 250, 250))
        lids.append((upper, lower))
    box = mask.getbbox()
    if box is not None:  # the iris only where the eye is open
        img.paste(layer.crop(box), box, mask.crop(box))
    for upper, lower in lids:
        draw.line(tr(upper), fill=lid_c, width=lid_w + 1, joint="curve")
        draw.line(tr(lower), fill=_color(shade), width=max(1, lid_w - 1), joint="curve")
        crease = upper[2:-2] - np.array([0.0, 0.06])
        draw.line(tr(crease), fill=_color(shade), width=max(1, lid_w - 1))

    # Nose: side shadow of the bridge, lower line and nostrils.
    side = 1 if rng.random() < 0.5 else -1
    bridge = canon[27:31] + np.array([side * 0.06, 0])
    draw.line(tr(bridge), fill=_color(skin * 0.88), width=max(1, int(unit * 0.04)))
    draw.line(tr(canon[31:36]), fill=_color(shade), width=max(1, int(unit * 0.025)), joint="curve")
    for i in (32, 34):
        q = canon[i] + np.array([0, -0.025])
        draw.polygon(tr(_ellipse_pts(q[0], q[1], 0.045, 0.022, n=12)), fill=_color(skin * 0.45))

    # Mouth: dark interior and teeth when open, then lips.
    outer, inner = canon[48:60], canon[60:68]
    if p["mouth_open"] > 0.015:
        draw.polygon(tr(inner), fill=(60, 20, 25))
        teeth_h = min(p["mouth_open"] * 0.45, 0.05)
        teeth = np.concatenate([inner[1:4], inner[3:0:-1] + np.array([0, teeth_h])])
        draw.polygon(tr(teeth), fill=_color(np.array([235, 230, 215]) * rng.uniform(0.85, 1)))
    upper_lip = np.concatenate([outer[0:7], inner[4:5], inner[3:0:-1], inner[0:1]])
    lower_lip = np.concatenate([outer[6:12], outer[0:1], inner[0:1], inner[7:4:-1], inner[4:5]])
    draw.polygon(tr(upper_lip), fill=_color(lip * 0.9))
    draw.polygon(tr(lower_lip), fill=_color(lip))
    draw.line(tr(inner[0:5]), fill=_color(lip * 0.55), width=max(1, int(unit * 0.015)))

    # Freckles / moles: small dots on the face.
    freckle = _color(skin * 0.7)
    for _ in range(int(rng.integers(0, 12)) if rng.random() < 0.4 else 0):
        q = rng.uniform([-0.8, -0.1], [0.8, 0.5])
        r = rng.uniform(0.008, 0.02)
        draw.polygon(tr(_ellipse_pts(q[0], q[1], r, r, n=6)), fill=freckle)

    # Glasses now and then.
    if rng.random() < 0.12:
        frame = _color(rng.uniform(0, 90, 3))
        fw = max(1, int(unit * 0.03))
        for cx in (-p["eye_x"], p["eye_x"]):
            cx_y = cx + 0.6 * p["yaw"]
            draw.line(tr(_ellipse_pts(cx_y, p["eye_y"] + 0.02, 0.27, 0.19, n=28)), fill=frame,
                      width=fw)
        bridge_y = p["eye_y"] - 0.02
        draw.line(tr([[-p["eye_x"] + 0.27 + 0.6 * p["yaw"], bridge_y],
                      [p["eye_x"] - 0.27 + 0.6 * p["yaw"], bridge_y]]), fill=frame, width=fw)

    # Antialias: box-reduce the canvas, then light it and add sensor noise.
    small = np.asarray(img.reduce(SS))
    light = rng.uniform(-1, 1, 2)
    light *= rng.uniform(0.0, 0.25) / (np.linalg.norm(light) + 1e-6)
    grid = np.linspace(-1, 1, size, dtype=np.float32)
    gain = (1 + light[0] * grid[None, :] + light[1] * grid[:, None]) * rng.uniform(0.85, 1.1)
    out = small * gain.astype(np.float32)[..., None]  # soft directional light
    amp = int(rng.integers(2, 9))  # uniform sensor noise in [-amp, amp] (cheap)
    out += rng.integers(-amp, amp + 1, (size, size, 3), dtype=np.int8)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8), lm.astype(np.float32)


def synthetic_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` faces of dataset ``seed``: uint8 ``(n,128,128,3)`` and float32 ``(n,68,2)``.

    Face ``i`` depends only on ``(seed, i)``, so the first k faces are the same
    whatever ``n`` is.
    """
    images = np.empty((n, 128, 128, 3), np.uint8)
    landmarks = np.empty((n, 68, 2), np.float32)
    for i in range(n):
        images[i], landmarks[i] = make_face(face_rng(seed, i), 128)
    return images, landmarks
