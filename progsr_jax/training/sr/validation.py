"""Validation during super-resolution training: the model and bicubic on held-out faces.

Every ``eval_every`` iterations and at the end of each stage the trainer
scores the generator (evaluation-mode BatchNorm, the current fade-in alpha)
on a fixed held-out set of the training source and writes ``val_psnr``,
``val_ssim``, ``val_psnr_bicubic`` and ``val_ssim_bicubic`` to metrics.jsonl
and TensorBoard.  The numbers follow the standard protocol of
``python -m progsr_jax.evaluate``: per-image PSNR and SSIM (Gaussian 11x11)
in [0, 1], averaged, model outputs clipped to [0, 1], at the stage's output
size (32, 64 or 128) against the target of that size; bicubic is PIL's
bicubic upscaling of the same 16x16 input.

The held-out set, :func:`data_config`:

* ``celeba`` (folder layout or TFDS) and ``tfds``: the first ``val.num_images``
  faces of CelebA's validation partition (identities disjoint from training);
* ``synthetic``: ``val.num_images`` faces drawn from another seed;
* ``folder``: the images under ``val.root`` (no held-out set without it).

The validation batches are split over the devices like the training batch:
each process reads, upscales and scores only its rows, and the per-image
scores come back replicated to every process (:class:`Validator`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from progsr_jax import data as data_lib
from progsr_jax.evaluation import metrics
from progsr_jax.inference import SuperResolver
from progsr_jax.nets import gan
from progsr_jax.training import config as config_files
from progsr_jax.training import core

#: Synthetic validation faces come from seed ``seed + SYNTHETIC_SEED_OFFSET``,
#: far from the training seeds a user would try.
SYNTHETIC_SEED_OFFSET = 1_000_003
KEYS = ("val_psnr", "val_ssim", "val_psnr_bicubic", "val_ssim_bicubic")


def data_config(config):
    """The data config of the held-out set, or None when the source has none."""
    n = int(config.val.num_images)
    if n <= 0:
        return None
    c = config_files.data_config(config)
    c.max_images = n
    if c.source == "synthetic":
        c.seed = int(config.seed) + SYNTHETIC_SEED_OFFSET
        c.num_synthetic = n
    elif c.source in ("celeba", "tfds"):
        c.split = "val"
    elif config.val.root:  # folder
        c.root, c.split = config.val.root, "all"
    else:
        return None
    return c


class Validator:
    """PSNR/SSIM of the generator and of bicubic on the first ``num_images`` of ``ds``.

    ``batch_sharding`` (default: all devices, :func:`~progsr_jax.training.core.data_parallel`)
    splits each validation batch (``batch_size`` rounded up to a multiple of
    the number of devices); every process calls it at the same point.
    """

    def __init__(self, ds, num_images: int, batch_size: int, g, batch_sharding=None):
        self.sharding = batch_sharding or core.data_parallel().batch
        n = min(int(num_images), len(ds))
        devices = len(self.sharding.device_set)
        self.num_images = n
        self.batch_size = -(-max(1, min(int(batch_size), n)) // devices) * devices
        self.rows = data_lib.local_rows(self.sharding, self.batch_size)  # this process's
        self.lr = np.asarray(ds.images[16][:n])
        self.hr = {r: np.asarray(ds.images[r][:n]) for r in (32, 64, 128)}
        self.g = g
        self._bicubic: dict[int, dict] = {}

        def score(sr01, hr01):
            return metrics.psnr(sr01, hr01), metrics.ssim(sr01, hr01)

        replicated = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
        self._score = jax.jit(score, out_shardings=replicated)
        # The generator's raw outputs (about [-1, 1]) to [0, 1], clipped, as evaluate does.
        self._to01 = jax.jit(lambda out: jnp.clip(0.5 * out.astype(jnp.float32) + 0.5, 0.0, 1.0))

    def _batches(self):
        for i in range(0, self.num_images, self.batch_size):
            idx = np.arange(i, min(self.num_images, i + self.batch_size))
            pad = self.batch_size - len(idx)  # one compiled shape per stage
            yield idx, np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx

    def _mean_scores(self, make_sr, size: int) -> tuple[float, float]:
        """Means over the images; ``make_sr(rows)``: the [0, 1] output of this process's
        ``rows`` of a batch as a global array."""
        psnrs, ssims = [], []
        for idx, padded in self._batches():
            mine = padded[self.rows]
            sr = make_sr(mine)
            hr = self.hr[size][mine].astype(np.float32) / np.float32(255.0)
            p, s = jax.device_get(self._score(sr, data_lib.assemble(hr, self.sharding)))
            psnrs.append(np.asarray(p)[:len(idx)])
            ssims.append(np.asarray(s)[:len(idx)])
        return (float(np.mean(np.concatenate(psnrs).astype(np.float64))),
                float(np.mean(np.concatenate(ssims).astype(np.float64))))

    def bicubic(self, stage: int) -> dict:
        """Bicubic's scores at the stage's output size (computed once per stage)."""
        if stage not in self._bicubic:
            size = gan.output_size(stage)

            def upscale(rows):
                up = data_lib.upscale(self.lr[rows], size).astype(np.float32) / np.float32(255.0)
                return data_lib.assemble(up, self.sharding)

            p, s = self._mean_scores(upscale, size)
            self._bicubic[stage] = {"val_psnr_bicubic": p, "val_ssim_bicubic": s}
        return self._bicubic[stage]

    def __call__(self, variables, stage: int, alpha: float) -> dict:
        sr = SuperResolver(variables, stage, alpha, model=self.g)
        lr = data_lib.to_float(self.lr)

        def make_sr(rows):  # the SuperResolver's forward pass on this batch, sharded like training's
            return self._to01(sr(data_lib.assemble(lr[rows], self.sharding)))

        p, s = self._mean_scores(make_sr, gan.output_size(stage))
        return {"val_psnr": p, "val_ssim": s, **self.bicubic(stage),
                "val_count": self.num_images}
