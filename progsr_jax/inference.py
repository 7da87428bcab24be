"""Flax inference: the one batched path from 16x16 faces to the model's output.

    from progsr_jax import inference
    sr = inference.load("/tmp/progsr_demo")          # latest checkpoint of a run
    out = sr(x)   # x: float32 (N, 16, 16, 3) in [-1, 1] -> (N, 128, 128, 3) at stage 3
    faces = sr.super_resolve(lr_u8)                  # any N; uint8 in -> uint8 out
    sr.stage, sr.alpha, sr.output_size
    restored, faces = sr.restore(photo)   # every face of a photo (progsr_jax.photo.pipeline)

:func:`~progsr_jax.batching.super_resolve` (also ``inference.super_resolve``
and the :meth:`SuperResolver.super_resolve` method) is what every command runs (evaluate, infer, the photo
pipeline, validation and sample grids during training, bench): any number
of faces, uint8 (0..255) or float ([-1, 1]), go through the model in a few
fixed batch shapes -- each chunk of at most ``batch_size`` faces padded with
zeros to the next power of two (at least ``min_batch``) -- so a process
compiles a handful of shapes however many faces it sees.  uint8 inputs give
uint8 outputs (:func:`progsr_jax.data.to_uint8`), float inputs the raw
float32 outputs (about [-1, 1], not clipped).  The chunks are pipelined
(several in flight, the host-device copies overlapping the work) and uint8
faces are converted on the device, with the host path's bytes.

BatchNorm uses the running statistics (the authors' evaluation runs the
generator in eval mode).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from progsr_jax import checkpoints, models
from progsr_jax.batching import DEFAULT_BATCH, batch_rows, super_resolve  # noqa: F401
from progsr_jax.errors import UserError

@functools.lru_cache(maxsize=32)
def _compiled(model: models.Generator, stage: int):
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
                 model: models.Generator | None = None, batch_size: int = DEFAULT_BATCH):
        if stage not in models.STAGES:
            raise UserError(f"checkpoint stage must be 1, 2 or 3, got {stage}")
        self.stage = int(stage)
        self.alpha = float(alpha)
        self.width = float(width)
        self.path = path
        self.iteration = iteration
        self.batch_size = int(batch_size)
        self.output_size = models.output_size(self.stage)
        self.model = model if model is not None else models.Generator(
            width=self.width, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        # Host arrays go to the default device; arrays already on devices stay where they are
        # (validation during training passes G replicated over every process's devices).
        self.variables = jax.tree_util.tree_map(
            lambda a: a if isinstance(a, jax.Array) else jax.device_put(a), variables)
        self._apply = _compiled(self.model, self.stage)

    @property
    def step(self) -> int:
        """Deprecated name of :attr:`stage` (the resolution stage 1, 2, 3)."""
        warnings.warn("SuperResolver.step is deprecated; use .stage", DeprecationWarning,
                      stacklevel=2)
        return self.stage

    def __call__(self, x):
        """float32 (N, 16, 16, 3) in [-1, 1] -> (N, S, S, 3), one call of shape N (a jax array)."""
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[1:] != (16, 16, 3):
            raise UserError(f"expected inputs of shape (N, 16, 16, 3), got {tuple(x.shape)}")
        return self._apply(self.variables, x, alpha=jnp.float32(self.alpha))

    def super_resolve(self, faces, batch_size: int | None = None, min_batch: int = 1) -> np.ndarray:
        """Any number of faces, uint8 or float, in padded batches (:func:`super_resolve`)."""
        return super_resolve(self, faces, batch_size or self.batch_size, min_batch)

    def restore(self, img, **kwargs):
        """``(restored PIL image, faces)``: :func:`progsr_jax.photo.restore` with this model.

        Detects every face of ``img``, aligns it to the CelebA template,
        super-resolves it and blends it back into the photo upscaled
        ``upscale`` times (keyword arguments as :func:`progsr_jax.photo.restore_photo`).
        Needs a stage-3 model and the MTCNN weights
        (``pip install --no-deps facenet-pytorch==2.6.0``).
        """
        from progsr_jax.photo import pipeline

        return pipeline.restore(self, img, **kwargs)

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
    ref = models.generator_shapes(width)
    ref_shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), ref)
    got_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), variables)
    if ref_shapes != got_shapes:
        raise UserError(f"{path}: the generator's parameters do not match a width-{width} model")
    return SuperResolver(variables, int(meta["stage"]), float(meta["alpha"]), width,
                         meta.get("dtype", "float32"), path, meta.get("iteration"),
                         batch_size=batch_size)
