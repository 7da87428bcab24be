"""Flax inference: a trained generator as a callable, and the library around it.

    from progsr_jax import inference
    sr = inference.load("/tmp/progsr_demo")          # latest checkpoint of a run
    out = sr(x)   # x: float32 (N, 16, 16, 3) in [-1, 1] -> (N, 128, 128, 3) at stage 3
    faces = sr.super_resolve(lr_u8)                  # any N; uint8 in -> uint8 out
    sr.stage, sr.alpha, sr.output_size

The package:

* this module: :class:`SuperResolver` (a generator at a fixed stage and
  fade-in alpha) and :func:`load` (from a workdir, a checkpoint folder or a
  converted official checkpoint);
* :mod:`~progsr_jax.inference.batching`: the one batched path every command
  runs (evaluate, infer, the photo pipeline, validation and sample grids
  during training, bench, the export parity check): any number of faces,
  uint8 (0..255) or float ([-1, 1]), through the model in a few fixed batch
  shapes; uint8 in gives uint8 out (:func:`progsr_jax.data.to_uint8`), float
  in the raw float32 outputs (about [-1, 1], not clipped).  The chunks are
  pipelined (several in flight, the host-device copies overlapping the work)
  and uint8 faces are converted on the device, with the host path's bytes;
* :mod:`~progsr_jax.inference.checkpoints`: the checkpoint format (reading
  G/D trees and their meta, writing converted checkpoints);
* :mod:`~progsr_jax.inference.serialized`: a model written by
  ``python -m progsr_jax.export`` (ONNX or StableHLO) with the same call
  interface;
* :mod:`~progsr_jax.inference.grid`: the one LR | bicubic | SR | HR picture.

Faces in whole photos: :func:`progsr_jax.photo.restore` ``(sr, img)``.
BatchNorm uses the running statistics (the authors' evaluation runs the
generator in eval mode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from progsr_jax.errors import UserError
from progsr_jax.inference import checkpoints
from progsr_jax.inference.batching import DEFAULT_BATCH, super_resolve
from progsr_jax.nets import gan


@functools.lru_cache(maxsize=32)
def _compiled(model: gan.Generator, stage: int):
    """One jitted forward pass per (generator, stage), shared by every SuperResolver."""
    return jax.jit(functools.partial(model.apply, stage=stage, train=False))


class SuperResolver:
    """A callable generator at a fixed stage and fade-in alpha.

    ``model``: the Flax generator to run (default: ``Generator(width, dtype)``;
    the trainers pass theirs).
    """

    #: Calls take JAX arrays as they are (the batched path converts uint8 on the device).
    accepts_device_arrays = True

    def __init__(self, variables: dict, stage: int, alpha: float, width: float = 1.0,
                 dtype: str = "float32", path: str | None = None, iteration: int | None = None,
                 model: gan.Generator | None = None, batch_size: int = DEFAULT_BATCH):
        if stage not in gan.STAGES:
            raise UserError(f"checkpoint stage must be 1, 2 or 3, got {stage}")
        self.stage = int(stage)
        self.alpha = float(alpha)
        self.width = float(width)
        self.path = path
        self.iteration = iteration
        self.batch_size = int(batch_size)
        self.output_size = gan.output_size(self.stage)
        self.model = model if model is not None else gan.Generator(
            width=self.width, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        # Host arrays go to the default device; arrays already on devices stay where they are
        # (validation during training passes G replicated over every process's devices).
        self.variables = jax.tree_util.tree_map(
            lambda a: a if isinstance(a, jax.Array) else jax.device_put(a), variables)
        self._apply = _compiled(self.model, self.stage)

    def __call__(self, x):
        """float32 (N, 16, 16, 3) in [-1, 1] -> (N, S, S, 3), one call of shape N (a jax array)."""
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[1:] != (16, 16, 3):
            raise UserError(f"expected inputs of shape (N, 16, 16, 3), got {tuple(x.shape)}")
        return self._apply(self.variables, x, alpha=jnp.float32(self.alpha))

    def super_resolve(self, faces, batch_size: int | None = None, min_batch: int = 1) -> np.ndarray:
        """Any number of faces, uint8 or float, in padded batches (:func:`super_resolve`)."""
        return super_resolve(self, faces, batch_size or self.batch_size, min_batch)

    def __repr__(self):
        return (f"SuperResolver(stage={self.stage}, alpha={self.alpha}, width={self.width}, "
                f"path={self.path!r})")


def load(path: str, batch_size: int = DEFAULT_BATCH) -> SuperResolver:
    """The generator at ``path`` (workdir, checkpoints/ folder, one iteration's folder or
    converted checkpoint); UserError with a one-line reason when there is none."""
    if not path:
        raise UserError("a checkpoint path is needed (a training workdir, a checkpoint "
                        "directory or a converted official checkpoint)")
    variables, meta = checkpoints.load_generator(path)
    width = float(meta.get("width", 1.0))
    ref = gan.generator_shapes(width)
    ref_shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), ref)
    got_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), variables)
    if ref_shapes != got_shapes:
        raise UserError(f"{path}: the generator's parameters do not match a width-{width} model")
    return SuperResolver(variables, int(meta["stage"]), float(meta["alpha"]), width,
                         meta.get("dtype", "float32"), path, meta.get("iteration"),
                         batch_size=batch_size)
