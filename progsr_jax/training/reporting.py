"""What a training run writes: console lines, ``metrics.jsonl``, TensorBoard, image grids.

The one reporter of both trainers:

* :meth:`Reporter.info`: a time-stamped line on the console (above the
  progress bar) and in ``<workdir>/log.txt``.
* :meth:`Reporter.scalars`: one JSON object per event in
  ``<workdir>/metrics.jsonl`` (``step``, the values, ``time``) and the same
  scalars as TensorBoard events (tensorboardX) in ``<workdir>/tensorboard``.
* :meth:`Reporter.progress`: the tqdm progress bar on a terminal; where
  stderr is not one (``> train.log``, ``nohup``, a scheduler's log file) a
  plain line every ``every`` iterations instead (:class:`progsr_jax.progress.PlainProgress`).
* :func:`save_grid`: super-resolution samples, rows of LR (nearest) |
  bicubic | SR | HR, written atomically as PNG; :func:`save_png` any image.

With several processes only process 0 writes (``writer``); the others keep
``last`` but write, print and draw nothing.  The files are opened by
:meth:`Reporter.start`, once the run has really begun (the lines logged before
are written then): a run that fails first leaves an earlier run's workdir as
it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from progsr_jax import progress
from progsr_jax.inference import grid


class Reporter:
    def __init__(self, workdir: str, writer: bool | None = None):
        """``writer``: whether this process writes (default: process 0 only)."""
        if writer is None:
            writer = jax.process_index() == 0
        self.workdir, self.writer = workdir, writer
        self.last: dict = {}
        self._metrics = self._log = self._tb = None
        self._early: list[str] = []  # lines logged before start()

    def start(self) -> None:
        """Opens ``log.txt`` (with the lines logged so far), ``metrics.jsonl`` and the
        TensorBoard writer: the run has begun."""
        if not self.writer or self._log is not None:
            return
        # tensorboardX imports torch where it is installed (a second per process): only
        # a run that starts pays for it, not every command that stops at a check.
        from tensorboardX import SummaryWriter

        os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
        self._metrics = open(os.path.join(self.workdir, "metrics.jsonl"), "a")
        self._log = open(os.path.join(self.workdir, "log.txt"), "a")
        self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
        self._log.writelines(line + "\n" for line in self._early)
        self._log.flush()
        self._early = []

    def info(self, msg: str) -> None:
        if not self.writer:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        tqdm.write(line, file=sys.stderr)
        if self._log is None:
            self._early.append(line)
            return
        self._log.write(line + "\n")
        self._log.flush()

    @contextlib.contextmanager
    def progress(self, total: int, initial: int, every: int = 1):
        """The progress bar; a :class:`~progsr_jax.progress.PlainProgress` line every ``every`` iterations
        where stderr is not a terminal."""
        bar = progress.bar(total, "train", "it", initial=initial, disable=not self.writer,
                           every=every)
        try:
            yield bar
        finally:
            bar.close()

    def scalars(self, step: int, values: dict) -> None:
        """One record of ``metrics.jsonl`` (with ``step`` and ``time``) and TensorBoard scalars."""
        rec = {"step": int(step)}
        rec.update({k: v if isinstance(v, int) and not isinstance(v, bool) else float(v)
                    for k, v in values.items()})
        rec["time"] = time.time()
        self.last = rec
        if not self.writer:
            return
        self.start()  # a record means the run has begun
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        for f in (self._metrics, self._log):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
        if self._tb is not None:
            with contextlib.suppress(Exception):
                self._tb.close()


def save_png(path: str, image_u8: np.ndarray) -> None:
    """Writes a uint8 image atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(np.asarray(image_u8)).save(tmp)
    os.replace(tmp, path)


def save_grid(path: str, lr_u8: np.ndarray, sr_u8: np.ndarray, hr_u8: np.ndarray) -> None:
    """One row per image: LR (nearest-upsampled) | bicubic | SR | HR (:func:`progsr_jax.inference.grid.sr_grid`)."""
    save_png(path, grid.sr_grid(lr_u8, sr_u8, hr_u8))
