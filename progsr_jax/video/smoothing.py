"""Steadiness over time: smoothed alignment, motion-gated combination, switching without pops.

Smoothed alignment (:func:`fuse`)
----------------------------------
A face's alignment is a similarity transform (:mod:`progsr_jax.photo.align`),
estimated in every detection from five landmarks that the detector places
with an error of about a third of the eye distance on a face a few pixels
wide (measured on the steadiness clips), independently in each frame.  Its
inverse (aligned frame -> video frame) is written as four numbers that move
smoothly when the face does (:func:`to_params`): where the aligned frame's
centre lands (x, y, in units of the face's size), the log of the scale and
the angle.  Two kinds of measurement constrain them: the detections (the
value, noisy) and the following of the face from frame to frame
(:func:`progsr_jax.video.tracking.follow`: the change, precise to a few
hundredths of the eye distance but drifting when chained).  :func:`fuse`
finds the path that fits both in the least-squares sense over the frames
within ``window`` of the frame wanted -- a two-sided smoother over a bounded
window: the output of frame t needs the measurements up to t + window, so
the stream is held back by that many frames.  Where the face could not be
followed the path keeps its velocity (a second-difference penalty), so with
detections alone it is a discrete smoothing spline; a steady pan or zoom is
followed without lag.  One round of robust reweighting keeps a wild
detection or a slipped registration from pulling the path.

Combination of restored faces (:func:`combine`)
-------------------------------------------------
With a steady alignment the restored faces of neighbouring frames show the
face in the same place of the 128x128 crop, and what still differs from
frame to frame is mostly the noise and compression of each input frame, made
into different details by the model.  Each output face is a weighted mean of
the track's restored faces within ``radius`` frames, the own frame weighted 1
and a neighbour ``dt`` frames away ``exp(-dt^2 / (2 (radius/1.5)^2))`` times a
per-pixel motion gate: the neighbour's difference from the own face, blurred
(Gaussian of :data:`GATE_BLUR` pixels) and averaged over the colours, gives
weight ``(1 - d / threshold)^2`` for ``d < threshold`` and 0 above it.  Where
the face really changes (a mouth opening, a turn, an alignment error) the
difference exceeds what noise makes and the neighbour is left out there; the
own frame always counts, so nothing from another frame can dominate it.

Switching (:class:`Schedule`)
-----------------------------
Whether a track is restored follows ``--max_face`` with hysteresis: a
restored face stops being restored only when its aligned crop spans more than
``max_face * (1 + hysteresis)`` pixels, and an unrestored one starts only
below ``max_face * (1 - hysteresis)``.  Every change, and a track that
appears or disappears within a shot, is a crossfade over ``crossfade``
frames: the result is blended in with a weight that steps by
``1 / crossfade`` per frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from progsr_jax.photo import align

#: Standard deviation (pixels of the 128x128 result) of the blur before the motion gate.
GATE_BLUR = 2.0
#: Smallest residual scales of the robust reweighting (detections, motions), in the smoother's
#: units (positions in face sizes, log scale, radians): below them nothing counts as an outlier.
ROBUST_FLOOR = (0.02, 0.005)


# ---------------------------------------------------------------------------
# Transforms as four smooth numbers


def to_params(transform) -> np.ndarray:
    """(2, 3) photo -> aligned transform -> ``[x, y, log scale, angle]`` of its inverse.

    ``(x, y)``: where the aligned frame's centre lies in the photo; scale:
    photo pixels per aligned pixel; angle: radians.
    """
    inv = align.invert(transform)
    centre = align.apply(inv, align.FRAME_CENTRE[None])[0]
    scale = np.hypot(inv[0, 0], inv[1, 0])
    angle = np.arctan2(inv[1, 0], inv[0, 0])
    return np.array([centre[0], centre[1], np.log(scale), angle], np.float64)


def from_params(params) -> np.ndarray:
    """Inverse of :func:`to_params`: the (2, 3) photo -> aligned transform."""
    x, y, log_scale, angle = np.asarray(params, np.float64)
    s = np.exp(log_scale)
    rot = s * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    t = np.array([x, y]) - rot @ align.FRAME_CENTRE
    return align.invert(np.concatenate([rot, t[:, None]], axis=1))


def wrap(angle):
    """Angles to (-pi, pi]."""
    return np.angle(np.exp(1j * np.asarray(angle, np.float64)))


def fuse(first: int, last: int, at: int, observed: dict, motions: dict,
         motion_weight: float = 100.0, continuity: float = 100.0, robust: bool = True) -> np.ndarray:
    """The least-squares path ``x_first .. x_last`` (D numbers per frame) at frame ``at``.

    Terms (each a row of a weighted linear least-squares problem):

    * ``observed[f]`` (D,): ``x_f = observed[f]``, weight 1 (the detections);
    * ``motions[f]`` (D,): ``x_f - x_{f-1} = motions[f]``, weight
      ``motion_weight`` (the following: precise from frame to frame);
    * where frame ``f`` has no motion: ``x_f - 2 x_{f-1} + x_{f-2} = 0``,
      weight ``continuity`` (the path keeps its velocity across the gap).

    ``robust``: one round of Tukey biweights on the residuals of the
    detection and the motion rows (each kind scaled by its median absolute
    residual), so that a wild detection or a slipped registration does not
    pull the path.  At least one frame must be observed.
    """
    n = last - first + 1
    obs = {f: np.asarray(v, np.float64) for f, v in observed.items() if first <= f <= last}
    if not obs:
        raise ValueError(f"no observation within frames {first}..{last}")
    dim = len(next(iter(obs.values())))
    rows, rhs, weight, kind = [], [], [], []

    def row(cols, coefs, b, w, k):
        r = np.zeros(n)
        r[np.asarray(cols) - first] = coefs
        rows.append(r)
        rhs.append(b)
        weight.append(w)
        kind.append(k)

    for f, v in obs.items():
        row([f], [1.0], v, 1.0, 0)
    zero = np.zeros(dim)
    for f in range(first + 1, last + 1):
        m = motions.get(f)
        if m is not None:
            row([f, f - 1], [1.0, -1.0], np.asarray(m, np.float64), motion_weight, 1)
        elif f - 2 >= first:
            row([f, f - 1, f - 2], [1.0, -2.0, 1.0], zero, continuity, 2)
        elif n == 2:
            row([f, f - 1], [1.0, -1.0], zero, 1e-6, 2)  # two frames, one observed
    a, b = np.array(rows), np.array(rhs)
    w = np.array(weight)
    kind = np.array(kind)

    def solve(wts):
        sw = np.sqrt(wts)[:, None]
        reg = 1e-9 * np.eye(n)  # frames no row reaches stay finite
        return np.linalg.solve((a * sw).T @ (a * sw) + reg, (a * sw).T @ (b * sw))

    x = solve(w)
    if robust:
        resid = np.abs(a @ x - b).max(axis=1)
        factor = np.ones(len(w))
        for k, floor in ((0, ROBUST_FLOOR[0]), (1, ROBUST_FLOOR[1])):
            sel = kind == k
            if sel.sum() >= 4:
                scale = max(float(np.median(resid[sel])), floor)
                u = resid[sel] / (6.0 * scale)
                f = np.clip(1 - u ** 2, 0, 1) ** 2
                if np.count_nonzero(f) >= 0.5 * sel.sum():  # outliers are the exception
                    factor[sel] = f
        x = solve(w * factor)
    return x[at - first]


# ---------------------------------------------------------------------------
# Combining restored faces


def combine(own: np.ndarray, neighbours, radius: int, threshold: float) -> np.ndarray:
    """A restored face combined with the same track's neighbours (module docstring).

    Args:
      own: (S, S, 3) the frame's own result (uint8 or float, 0-255).
      neighbours: ``[(dt, (S, S, 3) result)]`` for the other frames (dt != 0).
      radius: the combination's half-width in frames (sets the time weights).
      threshold: gray levels of blurred difference at which a neighbour stops counting.

    Returns:
      (S, S, 3) float32, 0-255.
    """
    own = np.asarray(own, np.float32)
    if not neighbours or threshold <= 0:
        return own
    sigma_t = max(radius, 1) / 1.5
    num = own.copy()
    den = np.ones(own.shape[:2], np.float32)
    for dt, other in neighbours:
        other = np.asarray(other, np.float32)
        diff = np.abs(other - own).mean(axis=2)
        diff = cv2.GaussianBlur(diff, (0, 0), GATE_BLUR, borderType=cv2.BORDER_REFLECT)
        gate = np.clip(1.0 - diff / threshold, 0.0, 1.0) ** 2
        w = np.float32(np.exp(-0.5 * (dt / sigma_t) ** 2)) * gate
        num += w[..., None] * other
        den += w
    return num / den[..., None]


# ---------------------------------------------------------------------------
# Restored or not, with hysteresis and crossfades


class Schedule:
    """Per track: whether its face is restored at each frame and with what weight.

    ``max_face``: the size rule (0: every face); ``hysteresis``: its relative
    band; ``crossfade``: frames over which the weight moves between 0 and 1.
    Call :meth:`step` once per frame in order.
    """

    def __init__(self, max_face: float, hysteresis: float, crossfade: int):
        self.max_face = float(max_face)
        self.hysteresis = float(hysteresis)
        self.crossfade = max(int(crossfade), 1)
        self.on: bool | None = None
        self.weight: float | None = None

    def size_ok(self, span: float) -> bool:
        """The ``--max_face`` rule with hysteresis (updates the state)."""
        if not self.max_face:
            self.on = True
        elif self.on is None:
            self.on = span <= self.max_face
        elif self.on and span > self.max_face * (1 + self.hysteresis):
            self.on = False
        elif not self.on and span < self.max_face * (1 - self.hysteresis):
            self.on = True
        return self.on

    def step(self, target: bool, ramp_limit: float = 1.0) -> float:
        """The weight for this frame: moves towards ``target`` by ``1 / crossfade``, and stays
        below ``ramp_limit`` (the fade-in/-out of a track appearing or leaving)."""
        goal = 1.0 if target else 0.0
        if self.weight is None:
            self.weight = goal
        else:
            delta = 1.0 / self.crossfade
            self.weight = min(goal, self.weight + delta) if goal > self.weight \
                else max(goal, self.weight - delta)
        return float(min(self.weight, max(0.0, ramp_limit)))
