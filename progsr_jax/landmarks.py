"""Facial landmark points: heatmap decoding, NME, ``.pts`` files.

Point geometry only; the landmark network and its folder format (``load``,
``save``, ``load_variables``, ``LandmarkNet``) are in :mod:`progsr_jax.fan`
(the old names ``landmarks.load`` etc. still resolve to them).

Coordinate convention of :func:`heatmaps_to_landmarks`
-------------------------------------------------------
Points are ``(x, y)`` = (column, row) in *pixel-index* coordinates of the
heatmap: the centre of heatmap pixel ``[row i, column j]`` is ``(j, i)``.  For
a heatmap of the same size as the input image (the distilled FAN) these are
directly 0-based pixel coordinates of the image, the convention of the 300-W
``.pts`` files in ``shared/data/faces68``.

face-alignment's ``get_preds_fromhm`` computes ``argmax + 1`` (1-based), adds
``+-0.25`` towards the larger neighbour, then subtracts 0.5; its net result is
``argmax_index + 0.5 +- 0.25``, i.e. coordinates whose pixel centres sit at
half-integers.  Pass ``convention="face_alignment"`` to get exactly those
numbers; the default ``"index"`` is 0.5 smaller.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from progsr_jax.errors import UserError

NUM_LANDMARKS = 68
#: The FAN folder format moved to :mod:`progsr_jax.fan`; these names still resolve here.
_MOVED_TO_FAN = ("META_FILE", "VARIABLES_DIR", "KIND", "save", "load_variables", "LandmarkNet",
                 "load")


def __getattr__(name: str):
    """``landmarks.load`` / ``save`` / ``load_variables`` / ``LandmarkNet`` (deprecated names):
    the FAN folder format of :mod:`progsr_jax.fan`, resolved on first use (``fan`` imports
    this module, so it is not imported here)."""
    if name in _MOVED_TO_FAN:
        return getattr(importlib.import_module("progsr_jax.fan"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------
# Heatmaps -> points


def heatmaps_to_landmarks(hm, convention: str = "index") -> np.ndarray:
    """Decodes (N, H, W, C) heatmaps (or one (H, W, C)) into (N, C, 2) ``(x, y)`` points.

    Per channel: the argmax pixel (first one on ties, row-major), then, if it is
    not on the border (``0 < x < W-1`` and ``0 < y < H-1``), a shift of
    ``0.25 * sign(neighbour difference)`` along x and along y towards the larger
    neighbour -- face-alignment's ``get_preds_fromhm`` without its final
    transform.  ``convention="index"``: pixel centres at integers (0-based);
    ``"face_alignment"``: the same points + 0.5, which is what
    ``get_preds_fromhm`` returns.
    """
    hm = np.asarray(hm, dtype=np.float32)
    single = hm.ndim == 3
    if single:
        hm = hm[None]
    if hm.ndim != 4:
        raise UserError(f"heatmaps must be (N, H, W, C) or (H, W, C), got shape {hm.shape}")
    if convention not in ("index", "face_alignment"):
        raise UserError(f"unknown convention {convention!r} (index or face_alignment)")
    n, h, w, c = hm.shape
    flat = np.transpose(hm, (0, 3, 1, 2)).reshape(n, c, h * w)
    idx = np.argmax(flat, axis=-1)  # (n, c)
    ys, xs = np.divmod(idx, w)
    inner = (xs > 0) & (xs < w - 1) & (ys > 0) & (ys < h - 1)
    b = np.arange(n)[:, None]
    ch = np.arange(c)[None, :]
    xr, xl = np.clip(xs + 1, 0, w - 1), np.clip(xs - 1, 0, w - 1)
    yd, yu = np.clip(ys + 1, 0, h - 1), np.clip(ys - 1, 0, h - 1)
    dx = hm[b, ys, xr, ch] - hm[b, ys, xl, ch]
    dy = hm[b, yd, xs, ch] - hm[b, yu, xs, ch]
    px = xs.astype(np.float32) + np.where(inner, 0.25 * np.sign(dx), 0.0)
    py = ys.astype(np.float32) + np.where(inner, 0.25 * np.sign(dy), 0.0)
    pts = np.stack([px, py], axis=-1).astype(np.float32)
    if convention == "face_alignment":
        pts = pts + np.float32(0.5)
    return pts[0] if single else pts


def nme(pred, gt, size) -> np.ndarray | float:
    """Normalised mean error: mean over landmarks of ``||gt - pred||_2 / size``.

    ``pred``/``gt``: (..., L, 2); ``size``: the normalising length (the image
    side, as in the paper's Table 1), scalar or broadcastable to ``(...)``.
    Returns an array of shape ``(...)`` (a float for a single (L, 2) pair).
    """
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.shape[-1] != 2:
        raise UserError(f"nme: predicted {pred.shape} and ground-truth {gt.shape} points must "
                        "have the same shape (..., L, 2)")
    err = np.linalg.norm(gt - pred, axis=-1).mean(axis=-1) / np.asarray(size, np.float64)
    return float(err) if np.ndim(err) == 0 else err


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """Reads a 300-W ``.pts`` file (``version: 1``, ``n_points: N``, ``{ x y ... }``) -> (N, 2)."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    n = None
    pts: list[list[float]] = []
    inside = False
    for ln in lines:
        if ln.startswith("n_points"):
            try:
                n = int(ln.split(":", 1)[1])
            except (IndexError, ValueError):
                raise UserError(f"{path}: bad n_points line {ln!r}") from None
        elif ln == "{":
            inside = True
        elif ln == "}":
            inside = False
        elif inside:
            parts = ln.split()
            try:
                pts.append([float(parts[0]), float(parts[1])])
            except (IndexError, ValueError):
                raise UserError(f"{path}: bad point line {ln!r}") from None
    if n is None or len(pts) != n:
        raise UserError(f"{path} is not a valid .pts file (n_points={n}, {len(pts)} points read)")
    return np.asarray(pts, np.float32)

