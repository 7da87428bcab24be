"""The one batched path from 16x16 faces to a model's outputs.

:func:`super_resolve` runs any number of faces, uint8 (0..255) or float
([-1, 1]), through a super-resolver ``sr`` -- a
:class:`progsr_jax.inference.SuperResolver` or any callable ``float32 (B,
16, 16, 3) -> (B, S, S, 3)`` with an ``output_size`` -- in a few fixed batch
shapes: each chunk of at most ``batch_size`` faces is padded with zeros to
the next power of two (at least ``min_batch``), so a process compiles a
handful of shapes however many faces it sees.  uint8 inputs give uint8
outputs (:func:`progsr_jax.data.to_uint8`), float inputs the raw float32
outputs (about [-1, 1], not clipped).  Evaluation, ``infer``, the photo
pipeline, validation and samples during training and ``bench`` all use it.
"""

from __future__ import annotations

import jax
import numpy as np

from progsr_jax.data.images import to_float, to_uint8
from progsr_jax.errors import UserError
from progsr_jax.nets.gan import INPUT_SIZE

#: Most faces per model call unless the caller says otherwise.
DEFAULT_BATCH = 16


def batch_rows(n: int, largest: int = DEFAULT_BATCH, smallest: int = 1) -> int:
    """Rows a call with ``n`` faces is padded to: the next power of two, within
    ``[smallest, largest]``."""
    rows = 1
    while rows < n:
        rows *= 2
    return min(max(rows, smallest), largest)


def super_resolve(sr, faces, batch_size: int = DEFAULT_BATCH, min_batch: int = 1) -> np.ndarray:
    """``faces`` (N, 16, 16, 3) through ``sr`` in padded chunks; see the module docstring.

    ``sr`` is a :class:`~progsr_jax.inference.SuperResolver` or any callable ``float32 (B, 16, 16, 3)
    in [-1, 1] -> (B, S, S, 3)`` with an ``output_size`` attribute.
    ``min_batch``: pad every call to at least this many rows (``batch_size``
    gives a single compiled shape, for streams of full batches).
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    faces = np.asarray(faces)
    as_uint8 = faces.dtype == np.uint8
    if faces.ndim != 4 or faces.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        if not (faces.size == 0 and faces.ndim >= 1):
            raise UserError(f"expected faces of shape (N, 16, 16, 3), got {faces.shape}")
    size = int(sr.output_size)
    n = len(faces)
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8 if as_uint8 else np.float32)
    x = to_float(faces) if as_uint8 else faces.astype(np.float32)
    out = []
    for start in range(0, n, batch_size):
        part = x[start:start + batch_size]
        k = len(part)
        rows = batch_rows(k, batch_size, min(min_batch, batch_size))
        if rows > k:
            part = np.concatenate([part, np.zeros((rows - k,) + part.shape[1:], np.float32)])
        y = np.asarray(jax.device_get(sr(part)), np.float32)[:k]
        out.append(to_uint8(y) if as_uint8 else y)
    return np.concatenate(out)
