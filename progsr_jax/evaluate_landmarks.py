r"""Landmark accuracy (NME) of a converted face-alignment network.

Usage::

    python -m progsr_jax.evaluate_landmarks --fan=DIR --data_root=ROOT \
        [--reference_fan=DIR] [--size=64|128] [--crop=landmarks|square|celeba] \
        [--crop_scale=1.9] [--crop_shift=0.17] [--limit=N] [--output=DIR]

``--fan``/``--reference_fan`` are converted FAN folders
(:func:`progsr_jax.landmarks.load`).  ``--data_root`` is a folder of images
(searched recursively) with 300-W ``.pts`` files beside them (0-based pixel
coordinates), e.g. ``shared/data/faces68`` or one of its ``afw``,
``helen_train``, ``ffhq`` subfolders.

Each image is cropped to a square (``--crop=landmarks``, the default: side =
``--crop_scale`` x the larger side of the ground-truth landmarks' bounding
box, centred ``--crop_shift`` x side above the box centre - the framing of
the CelebA crops, see :data:`progsr_jax.evaluate.DEFAULT_CROP_SCALE` -, black
outside the photo; ``square``: the image's center
square; ``celeba``: the 178x178 center crop), resized to 128 with PIL
bilinear and, for ``--size=64``, on to 64 (the same chain as the training
targets, so the FAN sees what it sees in training).  Ground-truth points are
mapped into that image with the same geometry as the resize (pixel centres
at integers: ``p' = (p - corner + 0.5) * size / side - 0.5``).

The network's heatmaps are decoded with
:func:`progsr_jax.landmarks.heatmaps_to_landmarks` (argmax +- 0.25 px,
0-based pixel-index coordinates) and rescaled to ``size`` if the heatmaps
have another resolution.  NME (paper Table 1) = mean over the 68 points of
``||p - g||_2 / size``.  Reported: NME against the ground truth (images with
a ``.pts`` file) and, with ``--reference_fan``, against the reference
network's landmarks on the same input (all images), overall and per
top-level subfolder, in percent.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import flags

from progsr_jax.errors import UserError, run_cli
from progsr_jax.evaluate import (DEFAULT_CROP_SCALE, DEFAULT_CROP_SHIFT, _check_output, _rel,
                                 crop_square, iter_loaded, landmark_box, parse_flags,
                                 read_landmarks)

SIZES = (64, 128)
CROPS = ("landmarks", "square", "celeba")


def _define_flags(fv: flags.FlagValues):
    flags.DEFINE_string("fan", None, "converted FAN folder to evaluate", flag_values=fv)
    flags.DEFINE_string("data_root", None, "folder of images with .pts files", flag_values=fv)
    flags.DEFINE_string("reference_fan", None, "optional second converted FAN: also report "
                        "the NME against its landmarks", flag_values=fv)
    flags.DEFINE_enum("size", "64", [str(s) for s in SIZES], "input resolution of the FAN",
                      flag_values=fv)
    flags.DEFINE_enum("crop", "landmarks", CROPS, "how each face is cropped", flag_values=fv)
    flags.DEFINE_float("crop_scale", DEFAULT_CROP_SCALE, "landmark crop side / larger side "
                       "of the landmarks' bounding box", flag_values=fv)
    flags.DEFINE_float("crop_shift", DEFAULT_CROP_SHIFT, "landmark crop: the crop centre is "
                       "crop_shift * side above the landmarks' box centre", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per network call", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("limit", None, "use only the first N images", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("output", None, "optional folder for landmarks_metrics.json and "
                        "landmarks_per_image.csv", flag_values=fv)
    flags.DEFINE_integer("workers", 2, "image decoding threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show a progress bar", flag_values=fv)


def crop_box(w: int, h: int, crop: str, pts: np.ndarray | None,
             crop_scale: float = DEFAULT_CROP_SCALE,
             crop_shift: float = DEFAULT_CROP_SHIFT) -> tuple[int, int, int]:
    """(left, top, side) of the square crop of a w x h image."""
    if crop == "landmarks":
        if pts is None:
            raise ValueError("--crop=landmarks needs a .pts file")
        return landmark_box(pts, crop_scale, crop_shift)
    if crop == "square":
        side = min(w, h)
    elif crop == "celeba":
        side = 178
    else:
        raise UserError(f"unknown --crop={crop}; expected one of {', '.join(CROPS)}")
    if side <= w and side <= h:  # torchvision CenterCrop placement (Python round)
        return int(round((w - side) / 2.0)), int(round((h - side) / 2.0)), side
    # smaller than the crop: torchvision pads (side - w) // 2 on the left/top
    left = -((side - w) // 2) if side > w else int(round((w - side) / 2.0))
    top = -((side - h) // 2) if side > h else int(round((h - side) / 2.0))
    return left, top, side


def map_points(pts: np.ndarray, left: int, top: int, side: int, size: int) -> np.ndarray:
    """Points of the photo -> the ``size`` x ``size`` resized crop (pixel centres at integers)."""
    pts = np.asarray(pts, np.float64)
    return (pts - np.array([left, top], np.float64) + 0.5) * (size / side) - 0.5


class _Loader:
    def __init__(self, crop: str, crop_scale: float, crop_shift: float, size: int,
                 need_gt: bool):
        self.crop, self.crop_scale, self.crop_shift = crop, crop_scale, crop_shift
        self.size, self.need_gt = size, need_gt

    def __call__(self, path: str):
        from progsr_jax import data

        img = data.open_image(path, min_size=16)
        try:
            pts = read_landmarks(path)
        except ValueError:
            if self.need_gt or self.crop == "landmarks":
                raise
            pts = None
        w, h = img.size
        left, top, side = crop_box(w, h, self.crop, pts, self.crop_scale, self.crop_shift)
        arrays = data.preprocess(crop_square(img, left, top, side), crop="none")
        gt = None if pts is None else map_points(pts, left, top, side, self.size)
        return arrays[self.size], gt


def fan_landmarks(fan, x: np.ndarray, size: int) -> np.ndarray:
    """(N, 68, 2) landmarks of ``fan`` on x (N, size, size, 3) in [0, 1], in input pixels."""
    from progsr_jax import landmarks

    hm = np.asarray(fan(x))
    pts = landmarks.heatmaps_to_landmarks(hm).astype(np.float64)
    hm_size = hm.shape[1]
    if hm_size != size:
        pts = (pts + 0.5) * (size / hm_size) - 0.5
    return pts


def _group(path: str, root: str) -> str:
    rel = _rel(path, root)
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
    from tqdm import tqdm

    from progsr_jax import data, landmarks

    if not fan_dir:
        raise UserError("--fan=DIR (a converted FAN folder) is required")
    if not data_root:
        raise UserError("--data_root=DIR is required")
    if size not in SIZES:
        raise UserError(f"--size must be 64 or 128, got {size}")
    if crop_scale <= 0:
        raise UserError(f"--crop_scale must be > 0, got {crop_scale}")
    out_dir = _check_output(output) if output else None
    root = os.path.abspath(os.path.expanduser(data_root))
    if not os.path.isdir(root):
        raise UserError(f"--data_root is not a folder: {root}")
    files = data.list_files("folder", root, "all")
    if limit:
        files = files[:limit]
    fan = landmarks.load(fan_dir)
    ref = landmarks.load(reference_fan) if reference_fan else None
    loader = _Loader(crop, crop_scale, crop_shift, size, need_gt=ref is None)

    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    batch: list = []

    def flush(batch):
        x = np.stack([b[1] for b in batch]).astype(np.float32) / np.float32(255.0)
        pad = (-len(batch)) % batch_size
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)]) if pad else x
        pred = fan_landmarks(fan, xp, size)[:len(batch)]
        refp = fan_landmarks(ref, xp, size)[:len(batch)] if ref is not None else None
        for i, (path, _, gt) in enumerate(batch):
            row = {"file": _rel(path, root), "group": _group(path, root),
                   "nme_gt": None, "nme_ref": None}
            if gt is not None:
                row["nme_gt"] = float(landmarks.nme(pred[i], gt, size))
            if refp is not None:
                row["nme_ref"] = float(landmarks.nme(pred[i], refp[i], size))
            rows.append(row)

    with tqdm(total=len(files), desc="landmarks", unit="img", disable=not progress,
              file=sys.stderr) as bar:
        for path, value, reason in iter_loaded(files, loader, workers):
            bar.update(1)
            if reason is not None:
                skipped.append((path, reason))
                continue
            batch.append((path, value[0], value[1]))
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    if not rows:
        raise UserError(f"none of the {len(files)} images under {root} could be used"
                        + (f" (e.g. {_rel(skipped[0][0], root)}: {skipped[0][1]})"
                           if skipped else ""))
    result: dict[str, Any] = {
        "fan": os.path.abspath(fan_dir),
        "reference_fan": os.path.abspath(reference_fan) if reference_fan else None,
        "data_root": root, "size": size, "crop": crop,
        "crop_scale": crop_scale if crop == "landmarks" else None,
        "crop_shift": crop_shift if crop == "landmarks" else None,
        "num_images": len(rows),
        "skipped": {_rel(p, root): r for p, r in skipped},
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
        with open(os.path.join(out_dir, "landmarks_metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        with open(os.path.join(out_dir, "landmarks_per_image.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("file", "nme_gt", "nme_ref"))
            for r in rows:
                w.writerow((r["file"], "" if r["nme_gt"] is None else f"{r['nme_gt']:.6f}",
                            "" if r["nme_ref"] is None else f"{r['nme_ref']:.6f}"))
    for p, r in skipped:
        log(f"skipped {_rel(p, root)}: {r}")
    for name in ("vs_ground_truth", "vs_reference"):
        if name in result:
            s = result[name]
            groups = ", ".join(f"{g} {v['nme_percent']:.2f}% ({v['count']})"
                               for g, v in s["groups"].items())
            log(f"NME {name.replace('_', ' ')} at {size}x{size}: {s['nme_percent']:.3f}% "
                f"(median {s['median_percent']:.3f}%, {s['count']} images; {groups})")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    fv = parse_flags(_define_flags, sys.argv if argv is None else argv, __doc__)
    evaluate_landmarks(fv.fan, fv.data_root, fv.reference_fan, size=int(fv.size), crop=fv.crop,
                       crop_scale=fv.crop_scale, crop_shift=fv.crop_shift,
                       batch_size=fv.batch_size, limit=fv.limit,
                       output=fv.output, workers=fv.workers, progress=fv.progress)
    return 0


if __name__ == "__main__":
    run_cli(main)
