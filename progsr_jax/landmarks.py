"""Facial landmarks: the converted distilled FAN, heatmap decoding, NME, ``.pts`` files.

A FAN folder holds ``fan_meta.json`` (``{"kind": "student_fan", "width": 1.0,
...}``) and ``variables/``, an Orbax checkpoint of ``{"params",
"batch_stats"}``.  Two commands write one, both through :func:`save`:
``tools/convert_fan_weights.py distilled`` (the authors' released student)
and ``python -m progsr_jax.distill`` (a student distilled here, in its
workdir); :func:`load` and ``--config.fan.checkpoint`` read either.

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

import json
import os
from typing import Any

import numpy as np

from progsr_jax.errors import UserError

META_FILE = "fan_meta.json"
VARIABLES_DIR = "variables"
NUM_LANDMARKS = 68
KIND = "student_fan"  # fan_meta.json's "kind" of a FAN folder


# ---------------------------------------------------------------------------
# Loading the converted network


def _read_meta(directory: str) -> dict:
    meta_path = os.path.join(directory, META_FILE)
    if os.path.isfile(directory):
        raise UserError(f"{directory} is a file, not a converted FAN folder; convert it first: "
                        "python tools/convert_fan_weights.py distilled --input FILE --output DIR")
    if not os.path.isdir(directory):
        raise UserError(f"no converted FAN at {directory}: the folder does not exist "
                        "(create it with: python tools/convert_fan_weights.py distilled "
                        "--input compressed_model_011000.pth --output DIR)")
    if not os.path.isfile(meta_path) or not os.path.isdir(os.path.join(directory, VARIABLES_DIR)):
        raise UserError(f"{directory} holds no converted FAN (no {META_FILE} and {VARIABLES_DIR}/); "
                        "create it with: python tools/convert_fan_weights.py distilled "
                        "--input compressed_model_011000.pth --output DIR")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise UserError(f"{meta_path} does not describe a converted student FAN "
                        f"(kind={meta.get('kind') if isinstance(meta, dict) else None!r})")
    return meta


def save(directory: str | os.PathLike, variables: dict, meta: dict) -> dict:
    """Writes a FAN folder: ``variables/`` (Orbax) and ``fan_meta.json`` (``meta`` + kind, I/O).

    ``meta`` should say at least the ``width``; the meta file is written last
    and atomically, so a folder with a readable ``fan_meta.json`` is complete.
    """
    import jax
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, VARIABLES_DIR), variables, force=True)
        ckptr.wait_until_finished()
    meta = {"kind": KIND, "input": "NHWC RGB in [0, 1], any size",
            "output": f"(N, H, W, {NUM_LANDMARKS}) heatmaps", **meta}
    if jax.process_index() != 0:  # several processes: all join Orbax's save, process 0 writes
        return meta
    path = os.path.join(directory, META_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return meta


def load_variables(directory: str | os.PathLike, dtype: Any = None):
    """``(StudentFAN module, variables)`` from a converted FAN folder.

    ``variables`` is ``{"params": ..., "batch_stats": ...}`` of float32 jax
    arrays, for use inside losses: ``module.apply(variables, x)``.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from progsr_jax.fan import StudentFAN, abstract_variables

    directory = os.path.abspath(os.fspath(directory))
    meta = _read_meta(directory)
    width = float(meta.get("width", 1.0))
    module = StudentFAN(width=width, dtype=dtype or jnp.float32)
    abstract = abstract_variables(module)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(directory, VARIABLES_DIR), abstract)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report one line
        raise UserError(f"cannot restore the FAN variables in {directory}/{VARIABLES_DIR} "
                        f"(width {width}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ) from None
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), restored)
    return module, variables


class LandmarkNet:
    """``fan(x)``: NHWC float RGB in [0, 1] (any size) -> (N, H, W, 68) heatmaps (jit-compiled)."""

    def __init__(self, module, variables, meta: dict | None = None):
        import jax

        self.module = module
        self.variables = variables
        self.meta = dict(meta or {})
        self._apply = jax.jit(lambda v, x: module.apply(v, x, train=False))

    def __call__(self, x):
        import jax.numpy as jnp

        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise UserError(f"the FAN expects NHWC RGB images, got shape {tuple(x.shape)}")
        return self._apply(self.variables, x)

    def landmarks(self, x, convention: str = "index") -> np.ndarray:
        """(N, 68, 2) landmark coordinates (see :func:`heatmaps_to_landmarks`)."""
        return heatmaps_to_landmarks(np.asarray(self(x)), convention=convention)


def load(directory: str | os.PathLike, dtype: Any = None) -> LandmarkNet:
    """Loads a converted distilled FAN folder as a jit-compiled callable."""
    directory = os.path.abspath(os.fspath(directory))
    meta = _read_meta(directory)
    module, variables = load_variables(directory, dtype=dtype)
    return LandmarkNet(module, variables, meta)


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

