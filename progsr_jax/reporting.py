"""What a training run writes: console lines, ``metrics.jsonl``, TensorBoard, sample grids.

* ``metrics.jsonl``: one JSON object per log event with ``step``, ``stage``,
  ``alpha``, every loss term by name (the mean over the steps since the last
  event), ``g_loss``, ``d_loss``, ``gradient_penalty``, gradient norms and
  ``images_per_sec``.
* TensorBoard event files (tensorboardX) in ``<workdir>/tensorboard``.
* ``samples/stage<k>_<step>.png``: rows of LR (nearest) | bicubic | SR | HR.
* ``log.txt``: the informational lines also printed on the console.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import numpy as np
from PIL import Image
from tqdm import tqdm


class Reporter:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.last: dict = {}
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        self._metrics = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._log = open(os.path.join(workdir, "log.txt"), "a")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.info("tensorboardX is not installed: no TensorBoard events")

    def info(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        tqdm.write(line, file=sys.stderr)
        self._log.write(line + "\n")
        self._log.flush()

    @contextlib.contextmanager
    def progress(self, total: int, initial: int):
        bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
        try:
            yield bar
        finally:
            bar.close()

    def log(self, step: int, stage: int, alpha: float, host_metrics: list[dict], rate: float):
        rec = {"step": int(step), "stage": int(stage), "alpha": float(alpha)}
        keys = [k for k in host_metrics[0] if k != "alpha"] if host_metrics else []
        for k in keys:
            rec[k] = float(np.mean([m[k] for m in host_metrics]))
        rec["images_per_sec"] = float(rate)
        rec["time"] = time.time()
        self.last = rec
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def samples(self, g, state, ds, idx, stage: int, alpha: float, step: int) -> str:
        import jax
        res = 16 * 2 ** stage
        lr_u8 = np.asarray(ds.images[16][idx])
        hr_u8 = np.asarray(ds.images[res][idx])
        variables = {"params": state.g_params, "batch_stats": state.g_stats}
        sr = g.apply(variables, lr_u8.astype(np.float32) / 127.5 - 1.0, step=stage, alpha=alpha,
                     train=False)
        sr_u8 = np.clip(np.rint((np.asarray(jax.device_get(sr)) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        path = os.path.join(self.workdir, "samples", f"stage{stage}_{step:07d}.png")
        save_grid(path, lr_u8, sr_u8, hr_u8)
        return path

    def close(self) -> None:
        for f in (self._metrics, self._log):
            with contextlib.suppress(Exception):
                f.close()
        if self._tb is not None:
            with contextlib.suppress(Exception):
                self._tb.close()


def save_grid(path: str, lr_u8: np.ndarray, sr_u8: np.ndarray, hr_u8: np.ndarray) -> None:
    """One row per image: LR (nearest-upsampled) | bicubic | SR | HR."""
    res = hr_u8.shape[1]
    rows = []
    for lr, sr, hr in zip(lr_u8, sr_u8, hr_u8):
        lr_img = Image.fromarray(lr)
        near = np.asarray(lr_img.resize((res, res), Image.NEAREST))
        bic = np.asarray(lr_img.resize((res, res), Image.BICUBIC))
        rows.append(np.concatenate([near, bic, sr, hr], axis=1))
    grid = np.concatenate(rows, axis=0)
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
