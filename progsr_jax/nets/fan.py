"""The distilled face-alignment network ("fan_squeeze") of the paper, in Flax.

Layout of the released ``compressed_model_011000.pth`` (a whole-module pickle
of ``fan_model.fan_squeeze``; see ``shared/README.md``)::

    conv      Conv2d(3 -> 32, k5, p2)
    layers.0  Conv2d(32 -> 64, k3, p1)   layers.1 BatchNorm2d(64)   layers.2 LeakyReLU(0.01)
    layers.3  Conv2d(64 -> 128, k3, p1)  layers.4 BatchNorm2d(128)  layers.5 LeakyReLU(0.01)
    layers.6  Conv2d(128 -> 128, k3, p1) layers.7 BatchNorm2d(128)  layers.8 LeakyReLU(0.01)
    layers.9  Conv2d(128 -> 68, k3, p1)  layers.10 LeakyReLU(0.01)

All convolutions have stride 1, so the output has the input's resolution.
321,412 learnable parameters at width 1.0.  Flax names follow
:mod:`progsr_jax.interop.state_dict` (``layers.1.running_mean`` <->
``batch_stats/layers_1/running_mean``).  Note: the released module was
pickled in training mode (``training=True``); the heatmap loss here uses it in
evaluation mode (running statistics) unless ``train=True`` is passed.

The FAN folder format
---------------------
A FAN folder holds ``fan_meta.json`` (``{"kind": "student_fan", "width": 1.0,
...}``) and ``variables/``, an Orbax checkpoint of ``{"params",
"batch_stats"}``.  Two commands write one, both through :func:`save`:
``tools/convert_fan_weights.py distilled`` (the authors' released student)
and ``python -m progsr_jax.distill`` (a student distilled here, in its
workdir); :func:`load` (a jit-compiled :class:`LandmarkNet`),
:func:`load_variables` and ``--config.fan.checkpoint`` read either.

Decoding heatmaps into points (:func:`heatmaps_to_landmarks`)
-------------------------------------------------------------
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

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from progsr_jax.errors import UserError
from progsr_jax.nets.layers import BatchNorm2d, Conv2d

NUM_LANDMARKS = 68
STUDENT_FAN_PARAMS = 321_412
_CHANNELS = (32, 64, 128, 128)
LEAKY_SLOPE = 0.01  # negative slope of every LeakyReLU, the output's included
OUTPUT_LAYER = "layers_9"  # the last convolution (68 heatmaps)
META_FILE = "fan_meta.json"
VARIABLES_DIR = "variables"
KIND = "student_fan"  # fan_meta.json's "kind" of a FAN folder


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


def _leaky_relu(x):
    return jax.nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


class StudentFAN(nn.Module):
    """Distilled FAN: NHWC RGB in [0, 1], any size -> (N, H, W, 68) heatmaps.

    ``width`` scales the hidden channel counts (1.0 = the released network).
    """

    width: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c0, c1, c2, c3 = (max(1, int(round(c * self.width))) for c in _CHANNELS)
        x = x.astype(self.dtype)
        x = Conv2d(c0, 5, 2, dtype=self.dtype, name="conv")(x)
        for conv_idx, feats in ((0, c1), (3, c2), (6, c3)):
            x = Conv2d(feats, 3, 1, dtype=self.dtype, name=f"layers_{conv_idx}")(x)
            x = BatchNorm2d(dtype=self.dtype, name=f"layers_{conv_idx + 1}")(x, train=train)
            x = _leaky_relu(x)
        x = Conv2d(NUM_LANDMARKS, 3, 1, dtype=self.dtype, name=OUTPUT_LAYER)(x)
        return _leaky_relu(x)


def init_variables(module: StudentFAN, size: int = 64, seed: int = 0) -> dict:
    """Randomly initialised variables (``params`` and ``batch_stats``)."""
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return module.init(jax.random.PRNGKey(seed), x)


def abstract_variables(module: StudentFAN) -> dict:
    """Shapes/dtypes of the variables, without computing anything."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))


# ---------------------------------------------------------------------------
# The FAN folder format


def check_folder(directory: str | os.PathLike) -> None:
    """UserError when ``directory`` is not a converted FAN folder (no weights are read)."""
    _read_meta(os.fspath(directory))


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
        self.module = module
        self.variables = variables
        self.meta = dict(meta or {})
        self._apply = jax.jit(lambda v, x: module.apply(v, x, train=False))

    def __call__(self, x):
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
