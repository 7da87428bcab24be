"""Flax inference from a training workdir, a checkpoint directory or a converted checkpoint.

    from progsr_jax import inference
    sr = inference.load("/tmp/progsr_demo")          # latest checkpoint of a run
    out = sr(x)   # x: float32 (N, 16, 16, 3) in [-1, 1] -> (N, 128, 128, 3) at step 3
    sr.step, sr.alpha, sr.output_size
    restored, faces = sr.restore(photo)   # every face of a photo (progsr_jax.photo.pipeline)

BatchNorm uses the running statistics (the authors' evaluation runs the
generator in eval mode).  Outputs are not clipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from progsr_jax import checkpoints, models
from progsr_jax.errors import UserError


class SuperResolver:
    """A callable generator at a fixed stage and fade-in alpha."""

    def __init__(self, variables: dict, step: int, alpha: float, width: float,
                 dtype: str = "float32", path: str | None = None, iteration: int | None = None):
        if step not in (1, 2, 3):
            raise UserError(f"checkpoint step must be 1, 2 or 3, got {step}")
        self.step = int(step)
        self.alpha = float(alpha)
        self.width = float(width)
        self.path = path
        self.iteration = iteration
        self.output_size = 16 * 2 ** self.step
        self.model = models.Generator(width=self.width,
                                      dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        self.variables = jax.device_put(variables)
        self._apply = jax.jit(functools.partial(self.model.apply, step=self.step, train=False))

    def __call__(self, x) -> np.ndarray:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[1:] != (16, 16, 3):
            raise UserError(f"expected inputs of shape (N, 16, 16, 3), got {tuple(x.shape)}")
        return self._apply(self.variables, x, alpha=jnp.float32(self.alpha))

    def restore(self, img, **kwargs):
        """``(restored PIL image, faces)``: :func:`progsr_jax.photo.restore` with this model.

        Detects every face of ``img``, aligns it to the CelebA template,
        super-resolves it and blends it back into the photo upscaled
        ``upscale`` times (keyword arguments as :func:`progsr_jax.photo.restore_photo`).
        Needs a step-3 model and the MTCNN weights
        (``pip install --no-deps facenet-pytorch==2.6.0``).
        """
        from progsr_jax.photo import pipeline

        return pipeline.restore(self, img, **kwargs)

    def __repr__(self):
        return (f"SuperResolver(step={self.step}, alpha={self.alpha}, width={self.width}, "
                f"path={self.path!r})")


def load(path: str) -> SuperResolver:
    """The generator at ``path`` (workdir, checkpoints/ folder, one step's folder or converted)."""
    variables, meta = checkpoints.load_generator(path)
    width = float(meta.get("width", 1.0))
    ref = models.generator_shapes(width)
    ref_shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), ref)
    got_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), variables)
    if ref_shapes != got_shapes:
        raise UserError(f"{path}: the generator's parameters do not match a width-{width} model")
    return SuperResolver(variables, int(meta["stage"]), float(meta["alpha"]), width,
                         meta.get("dtype", "float32"), path, meta.get("iteration"))
