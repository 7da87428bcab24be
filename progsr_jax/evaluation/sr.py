"""Super-resolution evaluation: the methods, the batch scorer, the loop and its outputs.

The engine behind ``python -m progsr_jax.evaluate`` (whose docstring tells the
data, the methods, the two protocols and the files written).  One pass over
the files in order: decode in threads (:func:`~progsr_jax.data.reading.loaded_batches`),
super-resolve a batch with a :class:`Method`, score it with one jit-compiled
:class:`BatchScorer` (per-image metrics, LPIPS, and the pfsr batch scores),
then write ``metrics.json``, ``per_image.csv`` and ``comparison.png``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from progsr_jax import data, inference
from progsr_jax.data import crops, degradation, reading, writing
from progsr_jax.data.crops import DEFAULT_CROP_SCALE, DEFAULT_CROP_SHIFT
from progsr_jax.errors import UserError
from progsr_jax.evaluation import inputs, metrics
from progsr_jax.inference import grid
from progsr_jax.nets import gan

METHODS = ("model", "bicubic", "bilinear")
PROTOCOLS = ("standard", "pfsr")
SOURCES = ("celeba", "folder", "faces68", "tfds", "paired")
CROPS = ("auto", "celeba", "square", "none", "landmarks")
METRIC_KEYS = ("psnr", "ssim", "ms_ssim", "lpips", "psnr_y", "ssim_y")


@dataclasses.dataclass
class EvalConfig:
    """One evaluation; the fields are the flags of ``python -m progsr_jax.evaluate``."""

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
    offset: int = 0  # skip the first N files (then --limit)
    clip: bool | None = None  # None: clip unless protocol == 'pfsr'
    lpips: bool = True
    workers: int = 2
    progress: bool = True
    lr_dir: str | None = None  # --source=paired
    hr_dir: str | None = None
    degradation: str = "none"  # a preset of progsr_jax.data.degradation
    degradation_seed: int = 0


# ---------------------------------------------------------------- methods
class Method:
    """Maps a batch of 16x16 uint8 inputs to float32 SR outputs in [0, 1] (or unclipped)."""

    name: str
    output_size: int
    stage: int
    checkpoint: str | None = None

    def __call__(self, lr_u8: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def images(self, lr_u8: np.ndarray) -> np.ndarray:
        """The SR outputs as uint8 images (for looking at, not for scoring)."""
        raise NotImplementedError


class PilMethod(Method):
    def __init__(self, name: str, output_size: int = 128):
        self.name, self.output_size = name, output_size
        self.stage = gan.stage_of_size(output_size)

    def images(self, lr_u8):
        return data.upscale(lr_u8, self.output_size, self.name)

    def __call__(self, lr_u8):
        return self.images(lr_u8).astype(np.float32) / 255.0


class ModelMethod(Method):
    """A loaded generator, run by :meth:`progsr_jax.inference.SuperResolver.super_resolve` with every
    call padded to ``batch_size`` (one compiled shape)."""

    def __init__(self, checkpoint: str | None, batch_size: int, clip: bool = True):
        if not checkpoint:
            raise UserError("--method=model needs --checkpoint=PATH (a training workdir, a "
                            "checkpoint directory or a converted official checkpoint); "
                            "use --method=bicubic or --method=bilinear for the baselines")
        if not os.path.exists(checkpoint):
            raise UserError(f"checkpoint not found: {checkpoint}")

        self.sr = inference.load(checkpoint)
        self.name = "model"
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.clip = clip
        self.output_size = int(self.sr.output_size)
        self.stage = gan.stage_of_size(self.output_size)

    def generate(self, lr_u8: np.ndarray) -> np.ndarray:
        """The generator's raw outputs (about [-1, 1], not clipped), float32."""
        return self.sr.super_resolve(data.to_float(lr_u8), self.batch_size,
                                     min_batch=self.batch_size)

    def images(self, lr_u8):
        return data.to_uint8(self.generate(lr_u8))

    def __call__(self, lr_u8):
        y = 0.5 * self.generate(lr_u8) + 0.5
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
def _json_float(v):
    v = float(v)
    return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def comparison_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                    sr_label: str = "SR") -> Image.Image:
    """Grid image: one row per ``(label, lr, bicubic, sr, hr)`` (uint8 HWC arrays).

    :func:`progsr_jax.inference.grid.sr_grid` with labels (the bicubic tile is recomputed
    from ``lr``): every tile at ``max(128, hr size)`` px, a header line of
    column names and a row label.
    """
    labels, lr, _, sr, hr = zip(*rows)
    return Image.fromarray(grid.sr_grid(np.stack(lr), np.stack(sr), np.stack(hr),
                                        labels=labels, sr_label=sr_label))


# ---------------------------------------------------------------- listing
def list_eval_files(cfg: EvalConfig, log: Callable[[str], Any] = print
                    ) -> tuple[list[str], str, Callable[[str], dict]]:
    """(files, crop, loader) for the configured source; UserError when there are none.

    ``--source=tfds`` reads CelebA's ``--split`` through TensorFlow Datasets
    (``--data_root``, if given, is TFDS's data_dir), decoded once into the
    decode cache; its "files" are the cached examples' names.
    ``--source=paired`` and ``--degradation``: :mod:`~progsr_jax.evaluation.inputs`.
    """
    files, crop, loader = _list_clean(cfg, log)
    spec = degradation.from_config(cfg.degradation)
    if spec is not None:
        if cfg.source == "paired":
            raise UserError("--degradation does not apply to --source=paired (its inputs are "
                            "used as given)")
        loader = inputs.DegradedLoader(loader, files, spec, cfg.degradation_seed,
                                       start=cfg.offset)
    return files, crop, loader


def _list_clean(cfg: EvalConfig, log: Callable[[str], Any]
                ) -> tuple[list[str], str, Callable[[str], dict]]:
    if cfg.source == "paired":
        files, loader = inputs.paired_files(cfg.lr_dir, cfg.hr_dir, cfg.limit, cfg.offset)
        return files, "none", loader
    if cfg.source == "tfds":
        ds = data.build_dataset(dict(source="tfds", root=cfg.data_root or None, split=cfg.split,
                                     max_images=_end(cfg)), progress=cfg.progress, log=log)
        _check_offset(cfg, len(ds.files), f"CelebA's {cfg.split} split")
        return list(ds.files)[cfg.offset:], "celeba", crops.DatasetLoader(ds)
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
    _check_offset(cfg, len(files), root)
    files = files[cfg.offset:_end(cfg)]
    return files, crop, crops.Loader(crop, cfg.crop_scale, cfg.crop_shift)


def _check_offset(cfg: EvalConfig, n: int, where: str) -> None:
    """``--offset`` inside the ``n`` files of ``where``."""
    if cfg.offset >= n:
        raise UserError(f"--offset={cfg.offset} is past the end: {where} has {n} image(s) "
                        f"(offsets 0 .. {n - 1})")


def _end(cfg: EvalConfig) -> int | None:
    """End of the file range ``[offset, offset + limit)``; None: to the end."""
    return None if cfg.limit is None else cfg.offset + cfg.limit


# -------------------------------------------------------------- evaluate
def _check_config(cfg: EvalConfig) -> None:
    if cfg.method not in METHODS:
        raise UserError(f"unknown --method={cfg.method}; expected one of {', '.join(METHODS)}")
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"unknown --protocol={cfg.protocol}; expected one of "
                        f"{', '.join(PROTOCOLS)}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.crop_scale <= 0:
        raise UserError(f"--crop_scale must be > 0, got {cfg.crop_scale}")
    degradation.from_config(cfg.degradation)  # an unknown preset is a one-line error


def evaluate(cfg: EvalConfig, log: Callable[[str], Any] = print) -> dict:
    """Runs the evaluation described by ``cfg``; writes the outputs; returns metrics.json."""
    if cfg.clip is None:
        cfg = dataclasses.replace(cfg, clip=cfg.protocol != "pfsr")
    _check_config(cfg)
    if not cfg.output:
        raise UserError("--output=DIR is required")
    protected = [writing.Input(flag, path) for flag, path in (
        ("--data_root", cfg.data_root), ("--lr_dir", cfg.lr_dir), ("--hr_dir", cfg.hr_dir))
        if path and (flag == "--data_root") != (cfg.source == "paired")]
    if cfg.method == "model" and cfg.checkpoint:
        protected += writing.checkpoint_inputs(cfg.checkpoint)
    writing.check_not_input(cfg.output, protected)
    out_dir = writing.check_output(cfg.output)
    files, crop, loader = list_eval_files(cfg, log)
    root = os.path.abspath(os.path.expanduser(
        (cfg.hr_dir if cfg.source == "paired" else cfg.data_root) or "."))
    method = make_method(cfg)
    size = method.output_size
    notes = []
    if size not in (32, 64, 128):
        raise UserError(f"the model's output size is {size}; expected 32, 64 or 128")
    if size != 128:
        notes.append(f"the model is at stage {method.stage}: its {size}x{size} outputs are "
                     f"scored against the {size}x{size} targets, not 128x128")
        log(f"note: {notes[-1]}")
    if cfg.method == "model" and not cfg.clip:
        notes.append("outputs not clipped to [0, 1] (--noclip)")

    scorer = _scorer(bool(cfg.lpips), cfg.protocol == "pfsr")
    pfsr_acc = metrics.PfsrAccumulator()
    names: list[str] = []
    values: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    t_first = None
    first_count = 0
    for batch in reading.loaded_batches(files, loader, cfg.batch_size, skipped, cfg.workers,
                                      desc=f"evaluate {cfg.method}", progress=cfg.progress):
        lr = np.stack([b[1][16] for b in batch])
        hr = np.stack([b[1][size] for b in batch]).astype(np.float32) / np.float32(255.0)
        vals, pf = scorer(method(lr), hr, cfg.batch_size)
        for k, v in vals.items():
            values[k].append(v)
        if pf is not None:
            pfsr_acc.add(*pf)
        names.extend(b[0] for b in batch)
        if t_first is None:
            t_first = time.perf_counter()
            first_count = len(batch)
    t_end = time.perf_counter()
    if not names:
        raise UserError(f"none of the {len(files)} files could be used "
                        f"(e.g. {crops.rel_path(skipped[0][0], root)}: {skipped[0][1]})")
    for p, r in skipped:
        log(f"skipped {crops.rel_path(p, root)}: {r}")
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
        skipped=[crops.rel_path(p, root) for p, _ in skipped],
        skipped_reasons={crops.rel_path(p, root): r for p, r in skipped},
        per_image_mean={k: _json_float(v) if v is not None else None for k, v in means.items()},
        pfsr=({k: _json_float(v) for k, v in pfsr.items()} if pfsr else None),
        num_batches=math.ceil(n / cfg.batch_size),
        batch_size=cfg.batch_size,
        clip=bool(cfg.clip) if cfg.method == "model" else None,
        source=cfg.source,
        split=cfg.split if cfg.source in ("celeba", "tfds") else None,
        crop=crop,
        crop_scale=cfg.crop_scale if crop == "landmarks" else None,
        crop_shift=cfg.crop_shift if crop == "landmarks" else None,
        data_root=root,
        lr_dir=os.path.abspath(cfg.lr_dir) if cfg.source == "paired" else None,
        degradation=cfg.degradation,
        degradation_seed=cfg.degradation_seed if cfg.degradation != "none" else None,
        seconds=round(seconds, 3),
        images_per_second=round(n / seconds, 2) if seconds > 0 else None,
        images_per_second_after_first_batch=round(steady, 2) if steady else None,
        notes=notes,
    )
    _write_outputs(out_dir, result, names, per_image, root)
    _write_comparison(out_dir, names, per_image["psnr"], loader, method, size,
                      cfg.method, root)
    return result


def _write_outputs(out_dir, result, names, per_image, root):
    """metrics.json and per_image.csv, each written atomically (the folder made now)."""
    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(("file",) + METRIC_KEYS)
    for i, name in enumerate(names):
        row = [crops.rel_path(name, root)]
        for k in METRIC_KEYS:
            row.append(f"{float(per_image[k][i]):.6f}" if k in per_image else "")
        w.writerow(row)
    writing.write_json(os.path.join(out_dir, "metrics.json"), result)
    writing.write_text(os.path.join(out_dir, "per_image.csv"), rows.getvalue())


def _write_comparison(out_dir, names, psnrs, loader, method, size, method_name, root):
    order = np.argsort(-np.asarray(psnrs, np.float64), kind="stable")
    picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
    arrays = [loader(names[i]) for _, i in picks]
    lr = np.stack([a[16] for a in arrays])
    labels = [f"{label}\n{psnrs[i]:.2f} dB\n{os.path.basename(names[i])[:18]}"
              for label, i in picks]
    image = grid.sr_grid(lr, method.images(lr), np.stack([a[size] for a in arrays]),
                         labels=labels, sr_label=f"SR ({method_name})")
    writing.save_image(image, os.path.join(out_dir, "comparison.png"))


def summary(result: dict) -> str:
    """One console line: the method, the protocol and every metric of ``result``."""
    def f(k, fmt):
        v = result.get(k)
        return "n/a" if v is None or isinstance(v, str) else format(v, fmt)

    return (f"{result['method']} ({result['protocol']}, {result['num_images']} images, "
            f"{result['output_size']}px): PSNR {f('psnr', '.4f')}  SSIM {f('ssim', '.4f')}  "
            f"MS-SSIM {f('ms_ssim', '.4f')}  LPIPS {f('lpips', '.4f')}  "
            f"PSNR-Y {f('psnr_y', '.4f')}  SSIM-Y {f('ssim_y', '.4f')}  "
            f"[{result['images_per_second']} img/s]")
