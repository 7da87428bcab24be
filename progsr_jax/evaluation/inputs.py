"""Evaluation inputs other than the clean chain: paired LR/HR folders, degraded on the fly.

* :func:`paired_files` / :class:`PairedLoader` (``evaluate --source=paired
  --lr_dir=DIR --hr_dir=DIR``): 16x16 inputs made elsewhere, used exactly as
  given, matched to 128x128 targets by file stem (the path under the folder
  without its extension).  Files without a partner, two files with one stem,
  and wrong sizes are skipped, each with its reason.
* :class:`DegradedLoader` (``evaluate --degradation=<preset>
  [--degradation_seed=N]``): any source's 16x16 input replaced by one made
  from its 128x128 image by :mod:`progsr_jax.data.degradation`, file ``i`` of
  the list by ``(seed, 0, i)``: a fixed degraded test set, the same on every
  run.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from progsr_jax import data
from progsr_jax.data import degradation
from progsr_jax.errors import UserError

LR_SIZE, HR_SIZE = 16, 128


def _by_stem(root: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``{stem: path}`` of the images under ``root``, and the ones sharing a stem."""
    stems: dict[str, list[str]] = {}
    for path in data.list_files("folder", root, "all"):
        stem = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")
        stems.setdefault(stem, []).append(path)
    unique = {s: p[0] for s, p in stems.items() if len(p) == 1}
    clashes = [(q, f"{len(p)} files with the stem {s!r} in {root}")
               for s, p in stems.items() if len(p) > 1 for q in p]
    return unique, clashes


def _folder(path: str | None, flag: str) -> str:
    if not path:
        raise UserError(f"--source=paired needs {flag}=DIR")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise UserError(f"{flag} is not a folder: {root}")
    return root


def paired_files(lr_dir: str | None, hr_dir: str | None,
                 limit: int | None = None, offset: int = 0
                 ) -> tuple[list[str], "PairedLoader"]:
    """(files, loader) for ``--source=paired``.

    ``files`` holds the HR file of every stem, plus every file that cannot be
    used (no partner, stem clash); the loader raises ``ValueError`` with the
    reason for those, so the evaluation skips them by name.  ``offset`` and
    ``limit`` keep matched pairs ``offset .. offset + limit - 1`` (stem order).
    """
    lr_root, hr_root = _folder(lr_dir, "--lr_dir"), _folder(hr_dir, "--hr_dir")
    lr, lr_clash = _by_stem(lr_root)
    hr, hr_clash = _by_stem(hr_root)
    pairs = {hr[s]: lr[s] for s in sorted(hr) if s in lr}
    if pairs and offset >= len(pairs):
        raise UserError(f"--offset={offset} is past the end: --lr_dir and --hr_dir have "
                        f"{len(pairs)} pair(s) (offsets 0 .. {len(pairs) - 1})")
    if offset or limit is not None:
        end = None if limit is None else offset + limit
        pairs = dict(list(pairs.items())[offset:end])
    reasons = dict(lr_clash + hr_clash)
    reasons.update({hr[s]: f"no low-resolution file with the stem {s!r} in {lr_root}"
                    for s in hr if s not in lr})
    reasons.update({lr[s]: f"no high-resolution file with the stem {s!r} in {hr_root}"
                    for s in lr if s not in hr})
    if not pairs:
        raise UserError(f"no file stem is in both --lr_dir={lr_root} and --hr_dir={hr_root}"
                        + (f" (e.g. {os.path.basename(next(iter(reasons)))}: "
                           f"{next(iter(reasons.values()))})" if reasons else ""))
    return list(pairs) + sorted(reasons), PairedLoader(pairs, reasons)


def _exact(path: str, size: int, what: str) -> np.ndarray:
    img = data.open_image(path, min_size=1)
    if img.size != (size, size):
        raise ValueError(f"{what} image is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
    return np.asarray(img, np.uint8)


class PairedLoader:
    """``(HR path) -> {128, 64, 32: the HR and its paper chain, 16: the given LR}``."""

    def __init__(self, pairs: dict[str, str], reasons: dict[str, str]):
        self.pairs, self.reasons = pairs, reasons

    def __call__(self, path: str) -> dict[int, np.ndarray]:
        if path in self.reasons:
            raise ValueError(self.reasons[path])
        hr = _exact(path, HR_SIZE, "high-resolution")
        lr = _exact(self.pairs[path], LR_SIZE, "low-resolution")
        arrays = data.preprocess(Image.fromarray(hr), crop="none")  # 64 and 32 for early steps
        arrays[LR_SIZE] = lr
        return arrays


class DegradedLoader:
    """Wraps a loader: its 16x16 input degraded from its 128x128 image, by file position.

    ``files[0]`` is at position ``start`` of the full list (``--offset``), so a
    file's input does not depend on the range evaluated.
    """

    def __init__(self, load: Callable[[str], dict], files: Sequence[str],
                 spec: degradation.Spec, seed: int, start: int = 0):
        self.load, self.spec, self.seed = load, spec, int(seed)
        self.position = {f: start + i for i, f in enumerate(files)}

    def __call__(self, path: str) -> dict[int, np.ndarray]:
        arrays = dict(self.load(path))
        hr = np.asarray(arrays[HR_SIZE], np.uint8)[None]
        arrays[LR_SIZE] = degradation.degrade(hr, self.spec, self.seed, 0,
                                              [self.position[path]])[0]
        return arrays
