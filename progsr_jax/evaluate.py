r"""Evaluate a super-resolution model (or a bilinear/bicubic baseline) on a data set.

Usage::

    python -m progsr_jax.evaluate --checkpoint=WORKDIR --data_root=/data/celeba \
        --split=test --output=/tmp/eval [--method=model|bicubic|bilinear] \
        [--protocol=standard|pfsr] [--batch_size=16] [--source=celeba|folder|faces68] \
        [--crop=auto|celeba|square|landmarks] [--limit=N] [--noclip] [--nolpips]

Data: the paper's preprocessing (:func:`progsr_jax.data.preprocess`): center
crop 178 (CelebA; ``--source=folder`` uses the center square), PIL bilinear
resize to 128, then 64, 32, 16.  The 16x16 image is the input, the 128x128
image the target.  ``--source=faces68`` (or ``--crop=landmarks``) is the
unaligned-face setting: a square of side ``--crop_scale`` (default 1.9) times
the larger side of the 68 landmarks' bounding box, centred ``--crop_shift``
(0.17) x side above the box centre - the framing of the CelebA crops - is cut
out of each image (black outside the photo), then the same 128/64/32/16 chain
is applied.  Images need a ``.pts`` file beside them (300-W format).

Methods: ``bicubic``/``bilinear`` resize the 16x16 uint8 input to the output
size with PIL (``Image.BICUBIC``/``Image.BILINEAR``); ``model`` runs
:func:`progsr_jax.inference.load` on ``--checkpoint``.  A model still at step
1 or 2 is scored at its output size (32 or 64) against the matching target.

Outputs are mapped to [0, 1] as ``0.5 * x + 0.5`` and, under the standard
protocol, clipped to [0, 1]; under ``--protocol=pfsr`` they stay unclipped,
as in the authors' released ``eval.py``, which neither clips nor quantises
(``--clip``/``--noclip`` override).  They are not
quantised to uint8 here either.  Targets are the uint8 images / 255.

Protocols (see :mod:`progsr_jax.metrics`): ``standard`` = mean of per-image
metrics; ``pfsr`` = the released eval: batches of ``--batch_size`` (16) in
file order, batch-MSE PSNR, batch-mean SSIM, the released MS-SSIM formula,
mean over batches.  ``psnr``/``ssim``/``ms_ssim`` in metrics.json follow the
protocol; ``lpips``, ``psnr_y`` and ``ssim_y`` are always per-image means (the
released eval has none of them), and ``per_image_mean`` holds every metric
under the standard protocol.

Writes ``OUTPUT/metrics.json``, ``OUTPUT/per_image.csv`` (per-image values,
under either protocol) and ``OUTPUT/comparison.png`` (rows: best, median and
worst image by PSNR; columns: LR nearest-upsampled | bicubic | SR | HR).
Unreadable files are skipped and listed in metrics.json (``skipped``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from progsr_jax.errors import UserError, run_cli

METHODS = ("model", "bicubic", "bilinear")
PROTOCOLS = ("standard", "pfsr")
SOURCES = ("celeba", "folder", "faces68")
CROPS = ("auto", "celeba", "square", "none", "landmarks")
#: Landmark crops imitate the framing of the paper's CelebA crops (178x178 of
#: the aligned images).  Measured with the released distilled FAN on 128
#: CelebA validation images at 64x64: the larger side of the 68 landmarks'
#: bounding box is 0.52 of the crop side (median) and the box centre sits at
#: (0.50, 0.67) of the crop.  So: side = 1.9 x that larger side, and the crop
#: is centred 0.17 x side above the box centre.
DEFAULT_CROP_SCALE = 1.9
DEFAULT_CROP_SHIFT = 0.17
METRIC_KEYS = ("psnr", "ssim", "ms_ssim", "lpips", "psnr_y", "ssim_y")


# ----------------------------------------------------------------- flags
def parse_flags(define: Callable[[flags.FlagValues], None], argv: Sequence[str],
                doc: str) -> flags.FlagValues:
    """Parses ``argv`` with absl flags on a private FlagValues (no global state).

    ``--help`` prints ``doc`` and the flags and exits 0; a bad flag or a
    positional argument is a :class:`UserError`.
    """
    fv = flags.FlagValues()
    define(fv)
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(doc.strip())
        print()
        print(fv.get_help(include_special_flags=False))
        sys.exit(0)
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        raise UserError(str(e)) from None
    if len(rest) > 1:
        raise UserError(f"unexpected argument(s): {' '.join(rest[1:])} (flags are --name=value)")
    return fv


def _define_flags(fv: flags.FlagValues):
    flags.DEFINE_string("checkpoint", None, "training workdir, checkpoint directory or "
                        "converted official checkpoint (needed for --method=model)",
                        flag_values=fv)
    flags.DEFINE_string("data_root", None, "data folder (CelebA root, or any image folder)",
                        flag_values=fv)
    flags.DEFINE_string("split", "test", "CelebA split: train, val, test or all", flag_values=fv)
    flags.DEFINE_string("output", None, "output folder for metrics.json, per_image.csv, "
                        "comparison.png", flag_values=fv)
    flags.DEFINE_enum("method", "model", METHODS, "what produces the SR images", flag_values=fv)
    flags.DEFINE_enum("protocol", "standard", PROTOCOLS, "standard: mean per-image metrics; "
                      "pfsr: the authors' released batch-wise evaluation", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "batch size (the pfsr protocol's batch)",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("source", "celeba", SOURCES, "celeba: partition file; folder: all images "
                      "under data_root; faces68: images with .pts landmarks", flag_values=fv)
    flags.DEFINE_enum("crop", "auto", CROPS, "auto: celeba for celeba, square for folder, "
                      "landmarks for faces68", flag_values=fv)
    flags.DEFINE_float("crop_scale", DEFAULT_CROP_SCALE, "landmark crop: side = crop_scale * "
                       "larger side of the landmarks' bounding box", flag_values=fv)
    flags.DEFINE_float("crop_shift", DEFAULT_CROP_SHIFT, "landmark crop: the crop centre is "
                       "crop_shift * side above the landmarks' box centre", flag_values=fv)
    flags.DEFINE_integer("limit", None, "evaluate only the first N files", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_boolean("clip", None, "clip SR outputs to [0, 1] before scoring (default: "
                         "yes, except under --protocol=pfsr, whose released eval does not clip)",
                         flag_values=fv)
    flags.DEFINE_boolean("lpips", True, "compute LPIPS (VGG16; the slowest metric on CPU)",
                         flag_values=fv)
    flags.DEFINE_integer("workers", 2, "image decoding threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show a progress bar", flag_values=fv)


@dataclasses.dataclass
class EvalConfig:
    data_root: str
    output: str
    checkpoint: str | None = None
    split: str = "test"
    method: str = "model"
    protocol: str = "standard"
    batch_size: int = 16
    source: str = "celeba"
    crop: str = "auto"
    crop_scale: float = DEFAULT_CROP_SCALE
    crop_shift: float = DEFAULT_CROP_SHIFT
    limit: int | None = None
    clip: bool | None = None  # None: clip unless protocol == 'pfsr'
    lpips: bool = True
    workers: int = 2
    progress: bool = True


# --------------------------------------------------------- landmark crops
def read_landmarks(image_path: str) -> np.ndarray:
    """The 68 (x, y) points of ``<image>.pts`` beside an image; UserError-free.

    Raises ``ValueError`` (caught by the callers as "skip this file") when
    there is no readable ``.pts`` file.
    """
    pts_path = os.path.splitext(image_path)[0] + ".pts"
    if not os.path.isfile(pts_path):
        raise ValueError("no .pts landmark file beside the image")
    try:
        try:
            from progsr_jax.landmarks import read_pts
        except ImportError:  # pragma: no cover - landmarks module not available
            read_pts = _parse_pts
        pts = np.asarray(read_pts(pts_path), np.float64)
    except Exception as e:  # noqa: BLE001 - any parse problem skips the file
        raise ValueError(f"unreadable .pts file ({e})") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.all(np.isfinite(pts)):
        raise ValueError(f"bad .pts file (points of shape {pts.shape})")
    return pts


def _parse_pts(path: str) -> np.ndarray:
    """Minimal 300-W ``.pts`` reader: the numbers between ``{`` and ``}``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    body = text[text.index("{") + 1:text.index("}")]
    return np.asarray([float(v) for v in body.split()], np.float64).reshape(-1, 2)


def landmark_box(pts: np.ndarray, scale: float = DEFAULT_CROP_SCALE,
                 shift: float = DEFAULT_CROP_SHIFT) -> tuple[int, int, int]:
    """(left, top, side) of the square crop around 2-D points, in integer pixels.

    Side = ``round(scale * max(w, h))`` of the points' bounding box (at least
    1); the crop centre is the box centre moved up by ``shift * side`` (the
    face sits below the centre of a CelebA crop).
    """
    pts = np.asarray(pts, np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    side = max(1, int(round(scale * float(max(hi - lo)))))
    cx, cy = (lo + hi) / 2.0
    cy = cy - shift * side
    left = int(math.floor(cx - side / 2.0 + 0.5))
    top = int(math.floor(cy - side / 2.0 + 0.5))
    return left, top, side


def crop_square(img: Image.Image, left: int, top: int, side: int) -> Image.Image:
    """``img`` cropped to the square; parts outside the photo are black."""
    return img.crop((left, top, left + side, top + side))


# ------------------------------------------------------------- examples
class Loader:
    """Decodes and preprocesses one file: ``(path) -> {128, 64, 32, 16: uint8}``."""

    def __init__(self, crop: str, crop_scale: float = DEFAULT_CROP_SCALE,
                 crop_shift: float = DEFAULT_CROP_SHIFT, min_size: int = 32):
        self.crop, self.crop_scale, self.crop_shift = crop, crop_scale, crop_shift
        self.min_size = min_size

    def __call__(self, path: str) -> dict[int, np.ndarray]:
        from progsr_jax import data

        img = data.open_image(path, min_size=self.min_size)
        if self.crop == "landmarks":
            left, top, side = landmark_box(read_landmarks(path), self.crop_scale,
                                           self.crop_shift)
            return data.preprocess(crop_square(img, left, top, side), crop="none")
        return data.preprocess(img, crop=self.crop)


def iter_loaded(files: Sequence[str], load: Callable[[str], Any], workers: int = 2,
                window: int = 64) -> Iterator[tuple[str, Any, str | None]]:
    """Yields ``(path, value, None)`` or ``(path, None, reason)`` in file order.

    Decoding runs in ``workers`` threads, at most ``window`` files ahead.
    ``data.BadImage`` (and ValueError/OSError from the landmark files) become
    a skip reason; anything else propagates.
    """
    from progsr_jax import data

    def guarded(path):
        try:
            return load(path), None
        except (data.BadImage, ValueError, OSError) as e:
            return None, str(e) or type(e).__name__

    if workers <= 1:
        for p in files:
            yield (p,) + guarded(p)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        it = iter(files)
        pending = collections.deque((p, ex.submit(guarded, p))
                                    for p in itertools.islice(it, window))
        while pending:
            p, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(guarded, nxt)))
            yield (p,) + fut.result()


# ---------------------------------------------------------------- methods
def pil_upscale(lr_u8: np.ndarray, size: int, resample: int) -> np.ndarray:
    """(B, h, w, 3) uint8 -> (B, size, size, 3) uint8 with a PIL filter."""
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), resample), np.uint8)
                     for x in lr_u8])


class Method:
    """Maps a batch of 16x16 uint8 inputs to float32 SR outputs in [0, 1] (or unclipped)."""

    name: str
    output_size: int
    stage: int
    checkpoint: str | None = None

    def __call__(self, lr_u8: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class PilMethod(Method):
    def __init__(self, name: str, output_size: int = 128):
        self.name, self.output_size = name, output_size
        self.stage = int(round(math.log2(output_size // 16)))
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[name]

    def __call__(self, lr_u8):
        return pil_upscale(lr_u8, self.output_size, self.resample).astype(np.float32) / 255.0


class ModelMethod(Method):
    """A loaded generator; batches are padded to ``batch_size`` (one compiled shape)."""

    def __init__(self, checkpoint: str | None, batch_size: int, clip: bool = True):
        if not checkpoint:
            raise UserError("--method=model needs --checkpoint=PATH (a training workdir, a "
                            "checkpoint directory or a converted official checkpoint); "
                            "use --method=bicubic or --method=bilinear for the baselines")
        if not os.path.exists(checkpoint):
            raise UserError(f"checkpoint not found: {checkpoint}")
        from progsr_jax import inference

        self.sr = inference.load(checkpoint)
        self.name = "model"
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.clip = clip
        self.stage = int(getattr(self.sr, "step", 3))
        self.output_size = int(getattr(self.sr, "output_size", 16 * 2 ** self.stage))

    def __call__(self, lr_u8):
        x = lr_u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        k = x.shape[0]
        out = []
        for i in range(0, k, self.batch_size):
            xb = x[i:i + self.batch_size]
            n = xb.shape[0]
            if n < self.batch_size:
                xb = np.concatenate([xb, np.zeros((self.batch_size - n,) + xb.shape[1:],
                                                  np.float32)])
            y = np.asarray(self.sr(xb), np.float32)[:n]
            out.append(y)
        y = 0.5 * np.concatenate(out) + 0.5
        return np.clip(y, 0.0, 1.0) if self.clip else y


def make_method(cfg: EvalConfig) -> Method:
    if cfg.method == "model":
        return ModelMethod(cfg.checkpoint, cfg.batch_size, cfg.clip)
    if cfg.method in ("bicubic", "bilinear"):
        return PilMethod(cfg.method, 128)
    raise UserError(f"unknown --method={cfg.method}; expected one of {', '.join(METHODS)}")


# ---------------------------------------------------------------- metrics
class BatchScorer:
    """Jit-compiled per-image metrics (+ the pfsr batch scores) for one padded batch shape."""

    def __init__(self, use_lpips: bool, pfsr: bool):
        import jax

        from progsr_jax import metrics

        self.lpips = metrics.LPIPS() if use_lpips else None
        self.pfsr = pfsr

        def score(lp_params, sr, hr, mask):
            out = metrics.per_image_metrics(sr, hr)
            if self.lpips is not None:
                out["lpips"] = self.lpips.apply(lp_params, sr, hr)
            if pfsr:
                out["pfsr"] = metrics.pfsr_batch(sr, hr, mask)
            return out

        self._score = jax.jit(score)

    def __call__(self, sr: np.ndarray, hr: np.ndarray, batch_size: int) -> tuple[dict, Any]:
        import jax

        n = sr.shape[0]
        mask = np.arange(batch_size) < n
        if n < batch_size:
            pad = ((0, batch_size - n), (0, 0), (0, 0), (0, 0))
            sr, hr = np.pad(sr, pad), np.pad(hr, pad)
        params = self.lpips.params if self.lpips is not None else None
        out = jax.device_get(self._score(params, sr, hr, mask))
        pfsr = out.pop("pfsr", None)
        return {k: np.asarray(v)[:n] for k, v in out.items()}, pfsr


@functools.lru_cache(maxsize=4)
def _scorer(use_lpips: bool, pfsr: bool) -> BatchScorer:
    """One compiled scorer per configuration and process (evaluate() may run many times)."""
    return BatchScorer(use_lpips, pfsr)


# ------------------------------------------------------------------ output
def _check_output(path: str | None) -> str:
    if not path:
        raise UserError("--output=DIR is required")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output exists and is not a folder: {path}")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output={path}: {e.strerror or e}") from None
    return path


def _json_float(v):
    v = float(v)
    return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def _tile(img_u8: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(img_u8)
    return im if im.size == (size, size) else im.resize((size, size), Image.NEAREST)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [0, 1] (clipped here) -> uint8, rounding half up."""
    return np.clip(np.floor(np.asarray(x, np.float32) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def comparison_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                    sr_label: str = "SR") -> Image.Image:
    """Grid image: one row per ``(label, lr, bicubic, sr, hr)`` (uint8 HWC arrays).

    Every tile is shown at ``max(128, hr size)`` px (nearest-neighbour
    enlargement), with a header line of column names and a row label.
    """
    size = max(128, max(r[4].shape[0] for r in rows))
    label_w, head_h, gap = 120, 16, 2
    cols = ("LR (nearest)", "bicubic", sr_label, "HR")
    w = label_w + len(cols) * (size + gap)
    h = head_h + len(rows) * (size + gap)
    grid = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(cols):
        draw.text((label_w + j * (size + gap) + 2, 2), name, fill=(0, 0, 0))
    for i, (label, *tiles) in enumerate(rows):
        y = head_h + i * (size + gap)
        for k, line in enumerate(label.split("\n")):
            draw.text((2, y + 2 + 12 * k), line, fill=(0, 0, 0))
        for j, t in enumerate(tiles):
            grid.paste(_tile(t, size), (label_w + j * (size + gap), y))
    return grid


# ---------------------------------------------------------------- listing
def list_eval_files(cfg: EvalConfig) -> tuple[list[str], str]:
    """(files, crop) for the configured source; UserError when there are none."""
    from progsr_jax import data

    if not cfg.data_root:
        raise UserError("--data_root=DIR is required")
    root = os.path.abspath(os.path.expanduser(cfg.data_root))
    if not os.path.isdir(root):
        raise UserError(f"--data_root is not a folder: {root}")
    if cfg.source == "celeba":
        files = data.list_files("celeba", root, cfg.split)
    elif cfg.source in ("folder", "faces68"):
        files = data.list_files("folder", root, "all")
    else:
        raise UserError(f"unknown --source={cfg.source}; expected one of {', '.join(SOURCES)}")
    crop = cfg.crop
    if crop == "auto":
        crop = {"celeba": "celeba", "folder": "square", "faces68": "landmarks"}[cfg.source]
    if crop not in CROPS[1:]:
        raise UserError(f"unknown --crop={crop}; expected one of {', '.join(CROPS)}")
    if cfg.limit is not None:
        files = files[:cfg.limit]
    if not files:
        raise UserError(f"no images to evaluate under {root}")
    return files, crop


# -------------------------------------------------------------- evaluate
def evaluate(cfg: EvalConfig, log: Callable[[str], Any] = print) -> dict:
    """Runs the evaluation described by ``cfg``; writes the outputs; returns metrics.json."""
    from tqdm import tqdm

    from progsr_jax import metrics

    if cfg.clip is None:
        cfg = dataclasses.replace(cfg, clip=cfg.protocol != "pfsr")
    if cfg.method not in METHODS:
        raise UserError(f"unknown --method={cfg.method}; expected one of {', '.join(METHODS)}")
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"unknown --protocol={cfg.protocol}; expected one of "
                        f"{', '.join(PROTOCOLS)}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.crop_scale <= 0:
        raise UserError(f"--crop_scale must be > 0, got {cfg.crop_scale}")
    out_dir = _check_output(cfg.output)
    files, crop = list_eval_files(cfg)
    root = os.path.abspath(os.path.expanduser(cfg.data_root))
    method = make_method(cfg)
    size = method.output_size
    notes = []
    if size not in (32, 64, 128):
        raise UserError(f"the model's output size is {size}; expected 32, 64 or 128")
    if size != 128:
        notes.append(f"the model is at step {method.stage}: its {size}x{size} outputs are "
                     f"scored against the {size}x{size} targets, not 128x128")
        log(f"note: {notes[-1]}")
    if cfg.method == "model" and not cfg.clip:
        notes.append("outputs not clipped to [0, 1] (--noclip)")

    loader = Loader(crop, cfg.crop_scale, cfg.crop_shift)
    scorer = _scorer(bool(cfg.lpips), cfg.protocol == "pfsr")
    pfsr_acc = metrics.PfsrAccumulator()
    names: list[str] = []
    values: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    t_first = None
    first_count = 0

    def flush(batch):
        nonlocal t_first, first_count
        lr = np.stack([b[1][16] for b in batch])
        hr = np.stack([b[1][size] for b in batch]).astype(np.float32) / np.float32(255.0)
        sr = method(lr)
        vals, pf = scorer(sr, hr, cfg.batch_size)
        for k, v in vals.items():
            values[k].append(v)
        if pf is not None:
            pfsr_acc.add(*pf)
        names.extend(b[0] for b in batch)
        if t_first is None:
            t_first = time.perf_counter()
            first_count = len(batch)

    batch: list = []
    bar = tqdm(total=len(files), desc=f"evaluate {cfg.method}", unit="img",
               disable=not cfg.progress, file=sys.stderr)
    try:
        for path, arrays, reason in iter_loaded(files, loader, cfg.workers):
            bar.update(1)
            if reason is not None:
                skipped.append((path, reason))
                continue
            batch.append((path, arrays))
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        bar.close()
    t_end = time.perf_counter()
    if not names:
        raise UserError(f"none of the {len(files)} files could be used "
                        f"(e.g. {_rel(skipped[0][0], root)}: {skipped[0][1]})")
    for p, r in skipped:
        log(f"skipped {_rel(p, root)}: {r}")
    per_image = {k: np.concatenate(v) for k, v in values.items()}
    n = len(names)
    means = {k: float(np.mean(per_image[k].astype(np.float64))) if k in per_image else None
             for k in METRIC_KEYS}
    result: dict[str, Any] = dict(means)
    pfsr = None
    if cfg.protocol == "pfsr":
        pfsr = pfsr_acc.result()
        result.update(pfsr)
        if not all(math.isfinite(v) for v in pfsr.values()):
            notes.append("a pfsr batch score is not finite (e.g. a negative mean cs at some "
                         "scale makes the released MS-SSIM formula NaN)")
    seconds = t_end - t0
    steady = (n - first_count) / (t_end - t_first) if t_first and n > first_count else None
    result = {k: _json_float(v) if v is not None else None for k, v in result.items()}
    result.update(
        num_images=n,
        protocol=cfg.protocol,
        method=cfg.method,
        checkpoint=os.path.abspath(cfg.checkpoint) if cfg.method == "model" else None,
        stage=method.stage,
        output_size=size,
        skipped=[_rel(p, root) for p, _ in skipped],
        skipped_reasons={_rel(p, root): r for p, r in skipped},
        per_image_mean={k: _json_float(v) if v is not None else None for k, v in means.items()},
        pfsr=({k: _json_float(v) for k, v in pfsr.items()} if pfsr else None),
        num_batches=math.ceil(n / cfg.batch_size),
        batch_size=cfg.batch_size,
        clip=bool(cfg.clip) if cfg.method == "model" else None,
        source=cfg.source,
        split=cfg.split if cfg.source == "celeba" else None,
        crop=crop,
        crop_scale=cfg.crop_scale if crop == "landmarks" else None,
        crop_shift=cfg.crop_shift if crop == "landmarks" else None,
        data_root=root,
        seconds=round(seconds, 3),
        images_per_second=round(n / seconds, 2) if seconds > 0 else None,
        images_per_second_after_first_batch=round(steady, 2) if steady else None,
        notes=notes,
    )
    _write_outputs(out_dir, result, names, per_image, root)
    _write_comparison(out_dir, names, per_image["psnr"], loader, method, size,
                      cfg.method, root)
    return result


def _rel(path: str, root: str) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _write_outputs(out_dir, result, names, per_image, root):
    try:
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        with open(os.path.join(out_dir, "per_image.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("file",) + METRIC_KEYS)
            for i, name in enumerate(names):
                row = [_rel(name, root)]
                for k in METRIC_KEYS:
                    row.append(f"{float(per_image[k][i]):.6f}" if k in per_image else "")
                w.writerow(row)
    except OSError as e:
        raise UserError(f"cannot write results to {out_dir}: {e.strerror or e}") from None


def _write_comparison(out_dir, names, psnrs, loader, method, size, method_name, root):
    order = np.argsort(-np.asarray(psnrs, np.float64), kind="stable")
    picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
    arrays = [loader(names[i]) for _, i in picks]
    lr = np.stack([a[16] for a in arrays])
    sr = to_uint8(method(lr))
    bic = pil_upscale(lr, size, Image.BICUBIC)
    rows = []
    for (label, i), a, s, b in zip(picks, arrays, sr, bic):
        name = os.path.basename(names[i])
        rows.append((f"{label}\n{psnrs[i]:.2f} dB\n{name[:18]}", a[16], b, s, a[size]))
    try:
        comparison_grid(rows, sr_label=f"SR ({method_name})").save(
            os.path.join(out_dir, "comparison.png"))
    except OSError as e:
        raise UserError(f"cannot write {out_dir}/comparison.png: {e.strerror or e}") from None


def _summary(result: dict) -> str:
    def f(k, fmt):
        v = result.get(k)
        return "n/a" if v is None or isinstance(v, str) else format(v, fmt)

    return (f"{result['method']} ({result['protocol']}, {result['num_images']} images, "
            f"{result['output_size']}px): PSNR {f('psnr', '.4f')}  SSIM {f('ssim', '.4f')}  "
            f"MS-SSIM {f('ms_ssim', '.4f')}  LPIPS {f('lpips', '.4f')}  "
            f"PSNR-Y {f('psnr_y', '.4f')}  SSIM-Y {f('ssim_y', '.4f')}  "
            f"[{result['images_per_second']} img/s]")


def main(argv: Sequence[str] | None = None) -> int:
    fv = parse_flags(_define_flags, sys.argv if argv is None else argv, __doc__)
    cfg = EvalConfig(**{f.name: fv[f.name].value for f in dataclasses.fields(EvalConfig)})
    if cfg.clip is None:
        cfg.clip = cfg.protocol != "pfsr"
    result = evaluate(cfg)
    print(_summary(result))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable file(s); see metrics.json")
    print(f"wrote {os.path.abspath(cfg.output)}/{{metrics.json,per_image.csv,comparison.png}}")
    return 0


if __name__ == "__main__":
    run_cli(main)
