"""Steadiness over time: smoothed alignment, motion-gated combination, switching without pops.

Smoothed alignment (:func:`smooth_transform`)
----------------------------------------------
A face's alignment is a similarity transform (:mod:`progsr_jax.photo.align`),
estimated in every detection from five landmarks that the detector places
with an error of a good fraction of the eye distance on a face a few pixels
wide, independently in each frame.  Its inverse (aligned frame -> video frame)
is written as four numbers that move smoothly when the face does
(:func:`to_params`): where the aligned frame's centre lands (x, y), the log of
the scale and the angle.  Each is fitted over the track's observations within
``window`` frames on either side by a straight line in time, weighted by a
Gaussian of standard deviation ``window / 2`` (local linear regression, a
two-sided smoother over a bounded window: the output of frame t needs the
detections up to t + window, so the stream is held back by that many frames).
A straight line follows a steady pan or zoom without lag; at the ends of a
track it extrapolates.  One round of robust reweighting (Tukey's biweight on
the residuals, scale from their median) keeps a single wrong detection from
pulling the fit.  Frames without a detection (bridged misses, detection every
k-th frame) get the fit at their time like any other.

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


def _unwrap(angles: np.ndarray) -> np.ndarray:
    return np.unwrap(angles)


def local_linear(times, values, t: float, window: float, robust: bool = True) -> np.ndarray:
    """The value at ``t`` of a Gaussian-weighted straight-line fit over ``|time - t| <= window``.

    ``values``: (N, D).  One observation: its value.  ``robust``: one round
    of Tukey biweights on the residuals (per observation, the largest over
    the columns in units of each column's median absolute residual).
    """
    times = np.asarray(times, np.float64)
    values = np.asarray(values, np.float64).reshape(len(times), -1)
    keep = np.abs(times - t) <= window
    times, values = times[keep], values[keep]
    if len(times) == 0:
        raise ValueError(f"no observation within {window} of {t}")
    if len(times) == 1 or np.ptp(times) == 0:
        return values.mean(axis=0)
    sigma = max(window / 2.0, 0.5)
    w = np.exp(-0.5 * ((times - t) / sigma) ** 2)
    design = np.stack([np.ones_like(times), times - t], axis=1)

    def fit(weights):
        a = design.T @ (weights[:, None] * design)
        b = design.T @ (weights[:, None] * values)
        if abs(np.linalg.det(a)) < 1e-12:
            return None
        return np.linalg.solve(a, b)

    coef = fit(w)
    if coef is None:
        return (w[:, None] * values).sum(0) / w.sum()
    if robust and len(times) >= 4:
        resid = np.abs(values - design @ coef)
        scale = np.median(resid, axis=0)
        scale = np.where(scale > 1e-9, scale, np.maximum(resid.max(axis=0), 1e-9))
        u = (resid / (6.0 * scale)).max(axis=1)
        robust_w = np.clip(1 - u ** 2, 0, 1) ** 2
        if robust_w.sum() > 0 and np.count_nonzero(robust_w) >= 2:
            refit = fit(w * robust_w)
            if refit is not None:
                coef = refit
    return coef[0]


def smooth_transform(times, transforms, t: float, window: float) -> np.ndarray:
    """The (2, 3) transform at frame ``t`` from a track's observed transforms (module docstring)."""
    params = np.array([to_params(m) for m in transforms])
    order = np.argsort(times)
    times = np.asarray(times, np.float64)[order]
    params = params[order]
    params[:, 3] = _unwrap(params[:, 3])
    # positions and scale in comparable units: the position in units of the face's size
    size = np.exp(np.median(params[:, 2]))
    scaled = params / np.array([size, size, 1.0, 1.0])
    fit = local_linear(times, scaled, t, window) * np.array([size, size, 1.0, 1.0])
    return from_params(fit)


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
