"""Landmark accuracy (NME) of a converted FAN, against ground truth and a reference FAN.

The engine behind ``python -m progsr_jax.evaluate_landmarks`` (whose
docstring tells the crops, the point mapping and the NME definition).  Each
image is cropped (:func:`~progsr_jax.data.crops.crop_box`) and resized
like the training targets, its ``.pts`` points are mapped into that image
(:func:`~progsr_jax.data.crops.map_points`), and the network's decoded
heatmaps (:func:`fan_landmarks`) are compared with them.
"""

from __future__ import annotations

import collections
import csv
import io
import os
from typing import Any, Sequence

import numpy as np

from progsr_jax import data
from progsr_jax.data import crops, reading, writing
from progsr_jax.data.crops import DEFAULT_CROP_SCALE, DEFAULT_CROP_SHIFT
from progsr_jax.errors import UserError
from progsr_jax.evaluation import metrics
from progsr_jax.nets import fan as fan_lib

SIZES = (64, 128)
CROPS = crops.BOX_CROPS


class _Loader:
    """``(path) -> (size x size uint8 image, mapped ground-truth points or None)``."""

    def __init__(self, crop: str, crop_scale: float, crop_shift: float, size: int,
                 need_gt: bool):
        self.crop, self.crop_scale, self.crop_shift = crop, crop_scale, crop_shift
        self.size, self.need_gt = size, need_gt

    def __call__(self, path: str):
        img = data.open_image(path, min_size=16)
        try:
            pts = crops.read_landmarks(path)
        except ValueError:
            if self.need_gt or self.crop == "landmarks":
                raise
            pts = None
        w, h = img.size
        left, top, side = crops.crop_box(w, h, self.crop, pts, self.crop_scale,
                                         self.crop_shift)
        arrays = data.preprocess(crops.crop_square(img, left, top, side), crop="none")
        gt = None if pts is None else crops.map_points(pts, left, top, side, self.size)
        return arrays[self.size], gt


def fan_landmarks(fan, x: np.ndarray, size: int) -> np.ndarray:
    """(N, 68, 2) landmarks of ``fan`` on x (N, size, size, 3) in [0, 1], in input pixels."""
    hm = np.asarray(fan(x))
    pts = fan_lib.heatmaps_to_landmarks(hm).astype(np.float64)
    hm_size = hm.shape[1]
    if hm_size != size:  # the heatmap is a whole square "crop" of the input
        pts = crops.map_points(pts, 0, 0, hm_size, size)
    return pts


def _group(path: str, root: str) -> str:
    rel = crops.rel_path(path, root)
    parts = rel.split(os.sep)
    return parts[0] if len(parts) > 1 else "."


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray(values, np.float64)
    if not v.size:
        return {"count": 0}
    return {"count": int(v.size), "nme_percent": float(100 * v.mean()),
            "median_percent": float(100 * np.median(v)),
            "failure_rate_10_percent": float(np.mean(v > 0.10))}


def evaluate_landmarks(fan_dir: str, data_root: str, reference_fan: str | None = None,
                       size: int = 64, crop: str = "landmarks",
                       crop_scale: float = DEFAULT_CROP_SCALE,
                       crop_shift: float = DEFAULT_CROP_SHIFT, batch_size: int = 32,
                       limit: int | None = None, output: str | None = None, workers: int = 2,
                       progress: bool = True, log=print) -> dict:
    """NME of ``fan_dir`` on the images under ``data_root``; returns (and writes) the report."""
    if not fan_dir:
        raise UserError("--fan=DIR (a converted FAN folder) is required")
    if not data_root:
        raise UserError("--data_root=DIR is required")
    if size not in SIZES:
        raise UserError(f"--size must be 64 or 128, got {size}")
    if crop_scale <= 0:
        raise UserError(f"--crop_scale must be > 0, got {crop_scale}")
    root = os.path.abspath(os.path.expanduser(data_root))
    if not os.path.isdir(root):
        raise UserError(f"--data_root is not a folder: {root}")
    out_dir = None
    if output:
        writing.check_not_input(output, [writing.Input("--data_root", root),
                                         writing.Input("--fan", fan_dir)]
                                + ([writing.Input("--reference_fan", reference_fan)]
                                   if reference_fan else []))
        out_dir = writing.check_output(output)
    files = data.list_files("folder", root, "all")
    if limit:
        files = files[:limit]
    fan = fan_lib.load(fan_dir)
    ref = fan_lib.load(reference_fan) if reference_fan else None
    loader = _Loader(crop, crop_scale, crop_shift, size, need_gt=ref is None)

    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for batch in reading.loaded_batches(files, loader, batch_size, skipped, workers,
                                      desc="landmarks", progress=progress):
        x = np.stack([img for _, (img, _) in batch]).astype(np.float32) / np.float32(255.0)
        pad = (-len(batch)) % batch_size
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)]) if pad else x
        pred = fan_landmarks(fan, xp, size)[:len(batch)]
        refp = fan_landmarks(ref, xp, size)[:len(batch)] if ref is not None else None
        for i, (path, (_, gt)) in enumerate(batch):
            row = {"file": crops.rel_path(path, root), "group": _group(path, root),
                   "nme_gt": None, "nme_ref": None}
            if gt is not None:
                row["nme_gt"] = float(metrics.nme(pred[i], gt, size))
            if refp is not None:
                row["nme_ref"] = float(metrics.nme(pred[i], refp[i], size))
            rows.append(row)
    if not rows:
        raise UserError(f"none of the {len(files)} images under {root} could be used"
                        + (f" (e.g. {crops.rel_path(skipped[0][0], root)}: {skipped[0][1]})"
                           if skipped else ""))
    result: dict[str, Any] = {
        "fan": os.path.abspath(fan_dir),
        "reference_fan": os.path.abspath(reference_fan) if reference_fan else None,
        "data_root": root, "size": size, "crop": crop,
        "crop_scale": crop_scale if crop == "landmarks" else None,
        "crop_shift": crop_shift if crop == "landmarks" else None,
        "num_images": len(rows),
        "skipped": {crops.rel_path(p, root): r for p, r in skipped},
    }
    for key, name in (("nme_gt", "vs_ground_truth"), ("nme_ref", "vs_reference")):
        vals = [r[key] for r in rows if r[key] is not None]
        if not vals:
            continue
        groups = collections.defaultdict(list)
        for r in rows:
            if r[key] is not None:
                groups[r["group"]].append(r[key])
        result[name] = dict(_stats(vals), groups={g: _stats(v) for g, v in sorted(groups.items())})
    if out_dir:
        _write(out_dir, result, rows)
    for p, r in skipped:
        log(f"skipped {crops.rel_path(p, root)}: {r}")
    for name in ("vs_ground_truth", "vs_reference"):
        if name in result:
            s = result[name]
            groups = ", ".join(f"{g} {v['nme_percent']:.2f}% ({v['count']})"
                               for g, v in s["groups"].items())
            log(f"NME {name.replace('_', ' ')} at {size}x{size}: {s['nme_percent']:.3f}% "
                f"(median {s['median_percent']:.3f}%, {s['count']} images; {groups})")
    return result


def _write(out_dir: str, result: dict, rows: list[dict]) -> None:
    """``landmarks_metrics.json`` and ``landmarks_per_image.csv`` in ``out_dir`` (atomically)."""
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(("file", "nme_gt", "nme_ref"))
    for r in rows:
        w.writerow((r["file"], "" if r["nme_gt"] is None else f"{r['nme_gt']:.6f}",
                    "" if r["nme_ref"] is None else f"{r['nme_ref']:.6f}"))
    writing.write_json(os.path.join(out_dir, "landmarks_metrics.json"), result)
    writing.write_text(os.path.join(out_dir, "landmarks_per_image.csv"), table.getvalue())
