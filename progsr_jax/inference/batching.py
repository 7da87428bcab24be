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

The chunks are pipelined: JAX dispatches work asynchronously, so chunk
``k + 1`` (and up to :data:`IN_FLIGHT` chunks in all) is sent to the
device before the outputs of chunk ``k`` are fetched, and the copies to and
from the device overlap the model's work.  With a model that runs on JAX
arrays (``sr.accepts_device_arrays``, as a ``SuperResolver``) uint8 faces
cross to the device as uint8 and become floats there; any model whose
outputs are JAX arrays has them made uint8 on the device, so only bytes come
back.  Both conversions compute exactly what the host's
:func:`~progsr_jax.data.to_float` and :func:`~progsr_jax.data.to_uint8` do
(the first is a 256-entry table of ``to_float``'s values, the second the same
IEEE float32 operations), so the bytes are those of the host path.  Each
chunk's outputs are written straight into the one result array.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from progsr_jax.data.images import to_float, to_uint8
from progsr_jax.errors import UserError
from progsr_jax.nets.gan import INPUT_SIZE

#: Most faces per model call unless the caller says otherwise.
DEFAULT_BATCH = 16
#: Chunks dispatched to the device before the oldest one's outputs are fetched.
IN_FLIGHT = 3

#: ``to_float`` of every uint8 value: the device-side conversion is a lookup in it.
_FLOAT_OF_UINT8 = to_float(np.arange(256, dtype=np.uint8))


@jax.jit
def _uint8_to_float(x):
    """uint8 faces -> float32 in [-1, 1], on the device; bit for bit ``to_float``."""
    return jnp.asarray(_FLOAT_OF_UINT8)[x]


@jax.jit
def _float_to_uint8(y):
    """Model outputs -> uint8, on the device: ``to_uint8``'s float32 operations."""
    y = (jnp.asarray(y, jnp.float32) + np.float32(1.0)) * np.float32(127.5)
    return jnp.clip(jnp.rint(y), 0, 255).astype(jnp.uint8)


def batch_rows(n: int, largest: int = DEFAULT_BATCH, smallest: int = 1) -> int:
    """Rows a call with ``n`` faces is padded to: the next power of two, within
    ``[smallest, largest]``."""
    rows = 1
    while rows < n:
        rows *= 2
    return min(max(rows, smallest), largest)


def _dispatch(sr, part: np.ndarray, as_uint8: bool, on_device: bool):
    """Starts one padded chunk through ``sr``; returns its (possibly still running) outputs."""
    if as_uint8 and on_device:
        x = _uint8_to_float(jax.device_put(part))
    else:
        x = to_float(part) if as_uint8 else part
    y = sr(x)
    if isinstance(y, jax.Array):
        if as_uint8:
            y = _float_to_uint8(y)
        y.copy_to_host_async()  # the copy back starts as soon as the chunk is done
    return y


def _collect(out: np.ndarray, start: int, k: int, y, as_uint8: bool) -> None:
    """Writes the first ``k`` rows of a chunk's outputs into ``out[start:start + k]``."""
    y = np.asarray(y)[:k]
    if as_uint8 and y.dtype != np.uint8:  # a model with host (numpy) outputs
        y = to_uint8(y)
    out[start:start + k] = y


def super_resolve(sr, faces, batch_size: int = DEFAULT_BATCH, min_batch: int = 1) -> np.ndarray:
    """``faces`` (N, 16, 16, 3) through ``sr`` in padded chunks; see the module docstring.

    ``sr`` is a :class:`~progsr_jax.inference.SuperResolver` or any callable ``float32 (B, 16, 16, 3)
    in [-1, 1] -> (B, S, S, 3)`` with an ``output_size`` attribute (and, if it
    takes JAX arrays, ``accepts_device_arrays = True``).
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
    out = np.empty((n, size, size, 3), np.uint8 if as_uint8 else np.float32)
    if n == 0:
        return out
    if not as_uint8:
        faces = faces.astype(np.float32, copy=False)
    on_device = bool(getattr(sr, "accepts_device_arrays", False))
    pending: collections.deque = collections.deque()
    for start in range(0, n, batch_size):
        part = faces[start:start + batch_size]
        k = len(part)
        rows = batch_rows(k, batch_size, min(min_batch, batch_size))
        if rows > k:
            part = np.concatenate([part, np.zeros((rows - k,) + part.shape[1:], part.dtype)])
        pending.append((start, k, _dispatch(sr, part, as_uint8, on_device)))
        if len(pending) > IN_FLIGHT:
            _collect(out, *pending.popleft(), as_uint8)
    while pending:
        _collect(out, *pending.popleft(), as_uint8)
    return out
