"""The one picture of super-resolution results: rows of LR | bicubic | SR | HR.

Training samples (``samples/stage<k>_<iteration>.png``) and evaluation's
``comparison.png`` are both :func:`sr_grid`: one row per face, the 16x16
input enlarged with nearest neighbour, the bicubic baseline
(:func:`progsr_jax.data.images.upscale`), the model's output and the target,
all at the target's size.  With ``labels`` the grid also gets a header line
of column names and a label column, and tiles of at least ``min_tile`` px.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from progsr_jax.data.images import upscale

LABEL_WIDTH, HEADER_HEIGHT, GAP = 120, 16, 2


def sr_grid(lr_u8: np.ndarray, sr_u8: np.ndarray, hr_u8: np.ndarray,
            labels: Sequence[str] | None = None, sr_label: str = "SR",
            min_tile: int = 128) -> np.ndarray:
    """(H, W, 3) uint8 grid of ``(B, h, w, 3)`` uint8 inputs, outputs and targets.

    Without ``labels``: the rows LR (nearest) | bicubic | SR | HR side by
    side at the target's size, nothing else.  With ``labels`` (one per row,
    lines split at ``\\n``): white background, a header of column names
    (``sr_label`` for the SR column), a 120 px label column, 2 px gaps, and
    every tile at ``max(min_tile, target size)`` px (nearest enlargement).
    """
    lr_u8, sr_u8, hr_u8 = (np.asarray(a, np.uint8) for a in (lr_u8, sr_u8, hr_u8))
    res = hr_u8.shape[1]
    rows = [(upscale(lr_u8, res, "nearest")[i], upscale(lr_u8, res, "bicubic")[i], sr_u8[i],
             hr_u8[i]) for i in range(len(hr_u8))]
    if labels is None:
        return np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    size = max(min_tile, res)
    cols = ("LR (nearest)", "bicubic", sr_label, "HR")
    grid = Image.new("RGB", (LABEL_WIDTH + len(cols) * (size + GAP),
                             HEADER_HEIGHT + len(rows) * (size + GAP)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(cols):
        draw.text((LABEL_WIDTH + j * (size + GAP) + 2, 2), name, fill=(0, 0, 0))
    for i, (label, tiles) in enumerate(zip(labels, rows)):
        y = HEADER_HEIGHT + i * (size + GAP)
        for k, line in enumerate(label.split("\n")):
            draw.text((2, y + 2 + 12 * k), line, fill=(0, 0, 0))
        for j, t in enumerate(tiles):
            im = Image.fromarray(t)
            if im.size != (size, size):
                im = im.resize((size, size), Image.NEAREST)
            grid.paste(im, (LABEL_WIDTH + j * (size + GAP), y))
    return np.asarray(grid)
