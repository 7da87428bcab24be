r"""Where the model stops helping as faces get bigger: model vs bicubic from faces of d px.

    python tools/face_size_sweep.py --data_root=/work/shared/data/celeba --split=val \
        --offset=240 --limit=540 --checkpoint=cpu=/runs/cpu --checkpoint=cpu_real=/runs/cpu_real \
        --sizes=12,14,16,20,24,28,32,40,48,64 --degradation=none,camera --output=DIR \
        [--seed=0] [--nolpips] [--batch_size=64] [--model_input=resize|pipeline]

``infer --mode=photo`` turns every detected face, whatever its size, into the
model's 16x16 input, super-resolves it and pastes the 128x128 result back; a
face that already spans more than 16 pixels loses detail on the way in.  This
tool measures, for held-out faces reduced to ``d`` pixels, what the model makes
of them against PIL bicubic from the same ``d``-pixel face; the largest ``d``
at which the model still wins is what the photo pipeline's default
``--max_face`` (``progsr_jax.photo.restoration.DEFAULT_MAX_FACE``) should be.

1. **Faces.** The files and preprocessing of ``evaluate``
   (``progsr_jax.evaluation.sr.list_eval_files``): ``--source=celeba``
   (``--data_root``, ``--split``, ``--offset``, ``--limit``), ``folder``
   (centre square) or ``faces68`` (landmark crop); the paper's crop and PIL
   bilinear resize to the 128x128 target (``progsr_jax.data.preprocess``).
   Unreadable files are skipped and named.
2. **The d-px face.** The 128x128 face area-downscaled to d x d with PIL
   ``Image.resize((d, d), Image.BOX)`` (each output pixel the exact mean of
   the input area it covers, fractional pixels weighted; ``d = 64`` is the
   2x2 mean).  For ``d = 16`` this is not the training chain's bilinear
   128 -> 64 -> 32 -> 16, so the model's score there differs a little from
   ``evaluate``'s.
3. **Degradations** (``--degradation``, comma-separated): ``none`` (the d-px
   face as it is) and ``camera``: a mild camera written here, independent of
   ``progsr_jax.data.degradation``, applied at the d-px size: Gaussian blur of
   ``--blur`` pixels (sigma; OpenCV, reflected border; 0: none), Gaussian
   noise of ``--noise`` gray levels (standard deviation, every pixel and
   channel alike, from ``numpy.random.default_rng([seed, position, d])``,
   ``position`` being the file's index in the split, ``--offset`` included;
   0: none), rounding to uint8, then a JPEG save and decode at
   ``--jpeg_quality`` (PIL, 4:2:0; 0: none).  So each face's degraded
   versions are fixed by ``(--seed, its position)``: the same on every run,
   whatever range is swept.
4. **Methods.** ``bicubic``: the d-px face to 128x128 with PIL bicubic
   (``progsr_jax.data.upscale``).  Each ``--checkpoint=NAME=PATH`` (a
   stage-3 model, ``progsr_jax.inference.load``): the d-px face made into
   the 16x16 input (``--model_input``), run through the batched
   ``super_resolve`` as ``evaluate`` runs it (float outputs clipped to
   [0, 1], not quantised).  ``--model_input=pipeline`` (default): exactly
   what ``infer --mode=photo`` does with a face whose aligned crop spans d
   pixels: the face warped onto the 178x218 aligned frame
   (``photo.align.warp_to_aligned``, PIL bicubic; the d pixels span the
   178x178 crop), then the training chain on it (``photo.align.model_inputs``:
   bilinear 178 -> 128 -> 64 -> 32 -> 16).  ``--model_input=resize``: PIL
   ``resize((16, 16), Image.BICUBIC)`` -- antialiased (PIL widens the kernel
   by d/16) for d > 16, bicubic interpolation for d < 16, the face itself for
   d = 16.  The two differ a lot for models trained on the paper's chain:
   its bilinear steps blur more than an area or bicubic reduction, and such
   a model does worse on the sharper ``resize`` inputs (measured on 32
   faces, degradation none, d = 16: -1.8 dB against bicubic with ``resize``,
   +0.6 dB with ``pipeline``), so ``pipeline`` is the one that tells what
   the photo pipeline gains.
5. **Metrics** against the 128x128 face: PSNR, SSIM and LPIPS (VGG16;
   ``--nolpips`` skips it) per face with ``evaluate``'s scorer
   (``progsr_jax.evaluation.sr.BatchScorer``), then the mean over faces.
   The gain of a model is ``model - bicubic`` in PSNR and ``bicubic - model``
   in LPIPS: above zero, the model is better in both.  ``psnr_gain_se`` is
   the standard error of the mean PSNR gain (per-face differences).

Writes into ``--output``: ``sweep.json`` (the flags, the faces, per
degradation, method and d: psnr, ssim, lpips, n and the gains; the
crossovers), ``sweep.csv`` (the same, one row per degradation, method and d)
and ``sweep.png`` (drawn with PIL: PSNR gain over bicubic against d, one
panel per degradation, and a second row for the LPIPS gain; the y axes stop
at ``--plot_psnr_floor`` and ``--plot_lpips_floor`` so that the crossover
stays readable, lower gains marked by triangles on the bottom edge).  Prints a table
per degradation and, per model and degradation, the crossover: the largest d
at which the model still beats bicubic in PSNR and the first d at which it
does not.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence

import cv2
import numpy as np
from absl import flags
from PIL import Image

from progsr_jax import cli, data
from progsr_jax import progress as progress_lib
from progsr_jax.data import crops, reading, writing
from progsr_jax.errors import UserError
from progsr_jax.evaluation import sr
from progsr_jax.evaluation.sweep_plot import render_plot
from progsr_jax.photo import align
from progsr_jax.photo.restoration import DEFAULT_MAX_FACE

DEGRADATIONS = ("none", "camera")
MODEL_INPUTS = ("resize", "pipeline")
SOURCES = ("celeba", "folder", "faces68")
HR_SIZE, LR_SIZE = 128, 16
MIN_SIZE, MAX_SIZE = 4, 128
#: The metrics kept per method and size (LPIPS only without --nolpips).
METRICS = ("psnr", "ssim", "lpips")


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("data_root", None, "data folder (CelebA root, or any image folder)",
                        flag_values=fv)
    flags.DEFINE_string("split", "val", "CelebA split: train, val, test or all", flag_values=fv)
    flags.DEFINE_enum("source", "celeba", SOURCES, "celeba: partition file; folder: all images "
                      "under --data_root (centre square); faces68: images with .pts landmarks",
                      flag_values=fv)
    flags.DEFINE_integer("offset", 0, "skip the first N files (in the split's order)",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("limit", None, "use only the first N files (after --offset)",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_multi_string("checkpoint", [], "NAME=PATH of a stage-3 model (repeatable; "
                              "PATH alone: NAME is its folder's name)", flag_values=fv)
    flags.DEFINE_string("sizes", "12,14,16,20,24,28,32,40,48,64", "face sizes d in pixels, "
                        f"comma-separated ({MIN_SIZE} to {MAX_SIZE})", flag_values=fv)
    flags.DEFINE_string("degradation", "none,camera", "comma-separated: none (the area-"
                        "downscaled face) and/or camera (blur, noise, JPEG at d px)",
                        flag_values=fv)
    flags.DEFINE_enum("model_input", "pipeline", MODEL_INPUTS, "how the d-px face becomes the "
                      "16x16 input: pipeline (infer --mode=photo's warp to the aligned frame and "
                      "bilinear chain) or resize (PIL bicubic, antialiased; identity at 16)",
                      flag_values=fv)
    flags.DEFINE_string("output", None, "output folder for sweep.json, sweep.csv, sweep.png",
                        flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the camera's noise", lower_bound=0, flag_values=fv)
    flags.DEFINE_float("blur", 0.6, "camera: Gaussian blur sigma in pixels of the d-px face "
                       "(0: none)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("noise", 3.0, "camera: Gaussian noise standard deviation in gray levels "
                       "(0: none)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("jpeg_quality", 75, "camera: JPEG quality (0: no JPEG)", lower_bound=0,
                         upper_bound=100, flag_values=fv)
    flags.DEFINE_boolean("lpips", True, "compute LPIPS (VGG16; the slowest part on CPU)",
                         flag_values=fv)
    flags.DEFINE_float("plot_psnr_floor", -3.0, "sweep.png: the lowest PSNR gain shown (dB); "
                       "lower points are marked on the bottom edge", flag_values=fv)
    flags.DEFINE_float("plot_lpips_floor", -0.1, "sweep.png: the lowest LPIPS gain shown",
                       flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "faces per model call and per scoring call",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("workers", 2, "image decoding threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show progress", flag_values=fv)


# ------------------------------------------------------------------ flags
def parse_sizes(value: str) -> list[int]:
    """``"12,16,32"`` -> ``[12, 16, 32]`` (sorted, without repeats); UserError otherwise."""
    parts = [p.strip() for p in str(value or "").split(",") if p.strip()]
    if not parts:
        raise UserError("--sizes: give at least one face size, e.g. --sizes=12,16,24,32")
    sizes = []
    for p in parts:
        try:
            d = int(p)
        except ValueError:
            raise UserError(f"--sizes={value}: {p!r} is not a whole number of pixels") from None
        if not MIN_SIZE <= d <= MAX_SIZE:
            raise UserError(f"--sizes={value}: {d} is outside {MIN_SIZE} to {MAX_SIZE} pixels")
        sizes.append(d)
    return sorted(set(sizes))


def parse_degradations(value: str) -> list[str]:
    """``"none,camera"`` -> ``["none", "camera"]`` (in order, no repeats); UserError otherwise."""
    out = []
    for p in (p.strip() for p in str(value or "").split(",")):
        if not p:
            continue
        if p not in DEGRADATIONS:
            raise UserError(f"--degradation: unknown {p!r}; expected a comma-separated list of "
                            f"{', '.join(DEGRADATIONS)}")
        if p not in out:
            out.append(p)
    if not out:
        raise UserError(f"--degradation: give at least one of {', '.join(DEGRADATIONS)}")
    return out


# ------------------------------------------------------------ the faces
def area_downscale(hr: np.ndarray, d: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (d, d, 3) uint8: PIL ``resize(..., Image.BOX)`` (the exact area mean)."""
    img = Image.fromarray(np.asarray(hr, np.uint8))
    return np.asarray(img.resize((d, d), Image.BOX), np.uint8)


def camera(small: np.ndarray, seed: int, position: int, blur: float = 0.6, noise: float = 3.0,
           jpeg_quality: int = 75) -> np.ndarray:
    """The mild camera at the face's own size: blur, noise, uint8, JPEG (module docstring).

    The noise is drawn from ``default_rng([seed, position, d])``; the result
    depends on nothing else.
    """
    x = np.asarray(small, np.float32)
    if blur > 0:
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=blur, borderType=cv2.BORDER_REFLECT)
    if noise > 0:
        rng = np.random.default_rng([seed, position, x.shape[0]])
        x = x + np.float32(noise) * rng.standard_normal(x.shape, np.float32)
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(jpeg_quality))
        buf.seek(0)
        with Image.open(buf) as im:
            out = np.asarray(im.convert("RGB"), np.uint8)
    return out


def small_face(hr: np.ndarray, d: int, degradation: str, seed: int, position: int,
               blur: float = 0.6, noise: float = 3.0, jpeg_quality: int = 75) -> np.ndarray:
    """The d-px face of a 128x128 one: area downscale, then ``degradation`` (none | camera)."""
    small = area_downscale(hr, d)
    if degradation == "none":
        return small
    if degradation == "camera":
        return camera(small, seed, position, blur, noise, jpeg_quality)
    raise UserError(f"unknown degradation {degradation!r}; expected one of "
                    f"{', '.join(DEGRADATIONS)}")


def aligned_frame(small: np.ndarray) -> Image.Image:
    """The 178x218 aligned frame of a square face whose d pixels span the 178x178 crop, warped
    as the photo pipeline warps a face (``photo.align.warp_to_aligned``)."""
    d = small.shape[0]
    s = align.CROP_SIZE / d
    # face pixel p (centre at p, covering p - 1/2 .. p + 1/2) -> crop pixels s*p .. s*(p+1)
    m = np.array([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5 + align.CROP_TOP]])
    return align.warp_to_aligned(Image.fromarray(np.asarray(small, np.uint8)), m)


def model_input(small: np.ndarray, mode: str = "pipeline") -> np.ndarray:
    """The model's 16x16 uint8 input made from a d-px face (``--model_input``).

    ``pipeline``: the photo pipeline's warp onto the aligned frame, then its
    bilinear chain (``photo.align.model_inputs``).  ``resize``: PIL bicubic
    to 16x16 (antialiased when shrinking); the face itself when it already is
    16x16.
    """
    small = np.asarray(small, np.uint8)
    if mode == "resize":
        if small.shape[:2] == (LR_SIZE, LR_SIZE):
            return small.copy()
        return np.asarray(Image.fromarray(small).resize((LR_SIZE, LR_SIZE), Image.BICUBIC),
                          np.uint8)
    if mode == "pipeline":
        return align.model_inputs(aligned_frame(small))[LR_SIZE]
    raise UserError(f"unknown --model_input={mode}; expected one of {', '.join(MODEL_INPUTS)}")


def read_faces(fv) -> tuple[list[str], list[int], np.ndarray, list[tuple[str, str]], str]:
    """(files, positions, (N, 128, 128, 3) uint8, skipped, root): ``evaluate``'s listing."""
    cfg = sr.EvalConfig(data_root=fv.data_root, output=fv.output, split=fv.split,
                        source=fv.source, offset=fv.offset, limit=fv.limit, lpips=False,
                        workers=fv.workers, progress=fv.progress)
    files, _, loader = sr.list_eval_files(cfg)
    root = os.path.abspath(os.path.expanduser(fv.data_root))
    position = {f: fv.offset + i for i, f in enumerate(files)}
    names, faces, skipped = [], [], []
    for batch in reading.loaded_batches(files, loader, 64, skipped, fv.workers,
                                      desc="reading faces", progress=fv.progress):
        for path, arrays in batch:
            names.append(path)
            faces.append(arrays[HR_SIZE])
    for path, reason in skipped:
        print(f"skipped {crops.rel_path(path, root)}: {reason}")
    if not names:
        raise UserError(f"none of the {len(files)} files could be used (e.g. "
                        f"{crops.rel_path(skipped[0][0], root)}: {skipped[0][1]})")
    skipped = [(crops.rel_path(p, root), r) for p, r in skipped]
    return names, [position[f] for f in names], np.stack(faces), skipped, root


# --------------------------------------------------------------- the sweep
def load_models(checkpoints: Sequence[tuple[str, str]], batch_size: int) -> list:
    """``evaluate``'s model method per checkpoint; UserError for one that is not stage 3."""
    methods = []
    for name, path in checkpoints:
        method = sr.ModelMethod(path, batch_size, clip=True)
        if method.output_size != HR_SIZE:
            raise UserError(f"--checkpoint={name}={path}: a stage-3 model (128x128 outputs) "
                            f"is needed; this one makes {method.output_size}x"
                            f"{method.output_size}")
        methods.append(method)
    return methods


def sweep(hr: np.ndarray, positions: Sequence[int], models: dict, sizes: Sequence[int],
          degradations: Sequence[str], scorer, batch_size: int, seed: int = 0,
          blur: float = 0.6, noise: float = 3.0, jpeg_quality: int = 75,
          mode: str = "pipeline", progress: bool = True) -> dict:
    """Per-face scores: ``{degradation: {method: {d: {metric: (N,) float64}}}}``.

    ``models``: ``{name: callable (N, 16, 16, 3) uint8 -> (N, 128, 128, 3) float in [0, 1]}``;
    ``scorer``: ``BatchScorer``-like, ``(sr, hr, batch_size) -> ({metric: (n,)}, _)``.
    """
    n = len(hr)
    batch_size = min(batch_size, n)  # fewer faces than a batch: no padding to score
    target = np.asarray(hr, np.float32) / np.float32(255.0)
    out: dict = {g: {m: {} for m in ["bicubic", *models]} for g in degradations}
    with progress_lib.bar(len(degradations) * len(sizes) * n, "sweep", "face",
                          disable=not progress) as bar:
        for g in degradations:
            for d in sizes:
                bar.set_postfix(degradation=g, d=d)
                small = np.stack([small_face(hr[i], d, g, seed, positions[i], blur, noise,
                                             jpeg_quality) for i in range(n)])
                lr = np.stack([model_input(s, mode) for s in small])
                values = {m: {} for m in out[g]}
                for start in range(0, n, batch_size):
                    part = slice(start, start + batch_size)
                    outputs = {"bicubic": data.upscale(small[part], HR_SIZE, "bicubic")
                               .astype(np.float32) / np.float32(255.0)}
                    for name, model in models.items():
                        outputs[name] = np.asarray(model(lr[part]), np.float32)
                    for name, y in outputs.items():
                        scores, _ = scorer(y, target[part], batch_size)
                        for k in METRICS:
                            if k in scores:
                                values[name].setdefault(k, []).append(
                                    np.asarray(scores[k], np.float64))
                    bar.update(len(lr[part]))
                for name, v in values.items():
                    out[g][name][d] = {k: np.concatenate(a) for k, a in v.items()}
    return out


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def summarise(per_face: dict) -> dict:
    """Means per degradation, method and d, with the gains of each model over bicubic."""
    results: dict = {}
    for g, methods in per_face.items():
        base = methods["bicubic"]
        results[g] = {}
        for name, by_size in methods.items():
            results[g][name] = {}
            for d, v in by_size.items():
                row: dict = {"n": int(len(v["psnr"]))}
                for k in METRICS:
                    row[k] = _finite(np.mean(v[k])) if k in v else None
                if name != "bicubic":
                    diff = v["psnr"] - base[d]["psnr"]
                    row["psnr_gain"] = _finite(np.mean(diff))
                    row["psnr_gain_se"] = (_finite(np.std(diff, ddof=1) / math.sqrt(len(diff)))
                                           if len(diff) > 1 else None)
                    row["lpips_gain"] = (_finite(np.mean(base[d]["lpips"] - v["lpips"]))
                                         if "lpips" in v else None)
                results[g][name][d] = row
    return results


def crossover(rows: dict, key: str = "psnr_gain") -> dict:
    """``{"last_better": largest d with a gain > 0, "first_not_better": smallest d without}``
    (None where there is none); ``rows``: ``{d: {key: gain}}``."""
    gains = [(d, rows[d][key]) for d in sorted(rows) if rows[d].get(key) is not None]
    better = [d for d, g in gains if g > 0]
    worse = [d for d, g in gains if g <= 0]
    return {"last_better": max(better) if better else None,
            "first_not_better": min(worse) if worse else None}


def crossover_line(name: str, degradation: str, rows: dict, with_lpips: bool) -> str:
    """One console line: where ``name`` stops beating bicubic under ``degradation``."""
    c = crossover(rows)
    sizes = sorted(rows)

    def gain(d):
        return f"{rows[d]['psnr_gain']:+.2f} dB"

    if c["last_better"] is None:
        text = f"never beats bicubic in PSNR (d = {sizes[0]} px: {gain(sizes[0])})"
    elif c["first_not_better"] is None:
        text = (f"beats bicubic in PSNR at every size, up to d = {sizes[-1]} px "
                f"({gain(sizes[-1])})")
    else:
        text = (f"beats bicubic in PSNR up to d = {c['last_better']} px "
                f"({gain(c['last_better'])}); first stops at d = {c['first_not_better']} px "
                f"({gain(c['first_not_better'])})")
    if with_lpips:
        lp = crossover(rows, "lpips_gain")
        text += ("; LPIPS: " + (f"better up to d = {lp['last_better']} px"
                                if lp["last_better"] is not None else "never better"))
    return f"crossover {name} / {degradation}: {text}"


def table(degradation: str, results: dict, models: Sequence[str], num_faces: int) -> str:
    """The console table of one degradation: PSNR (gain) and LPIPS per method and d."""
    methods = ["bicubic", *models]
    with_lpips = results["bicubic"][min(results["bicubic"])]["lpips"] is not None
    cells: dict = {}
    for d in sorted(results["bicubic"]):
        for m in methods:
            r = results[m][d]
            cell = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
            if m != "bicubic" and r["psnr_gain"] is not None:
                cell += f" ({r['psnr_gain']:+.2f})"
            if with_lpips:
                cell += f" / {r['lpips']:.3f}"
            cells[d, m] = cell
    width = 2 + max(len(c) for c in list(cells.values()) + methods)
    lines = [f"degradation {degradation} ({num_faces} faces): PSNR dB (gain over bicubic)"
             + (" / LPIPS (lower is better)" if with_lpips else ""),
             "   d" + "".join(f"{m:>{width}}" for m in methods)]
    for d in sorted(results["bicubic"]):
        lines.append(f"{d:>4}" + "".join(f"{cells[d, m]:>{width}}" for m in methods))
    return "\n".join(lines)


def _flag_values(fv) -> dict:
    names = ("data_root", "split", "source", "offset", "limit", "checkpoint", "sizes",
             "degradation", "model_input", "output", "seed", "blur", "noise", "jpeg_quality",
             "lpips", "batch_size", "plot_psnr_floor", "plot_lpips_floor")
    return {k: fv[k].value for k in names}


def write_outputs(out_dir: str, summary: dict, results: dict, image: Image.Image) -> None:
    """``sweep.json``, ``sweep.csv`` and ``sweep.png`` in ``out_dir``; UserError when unwritable."""
    keys = ("psnr", "ssim", "lpips", "psnr_gain", "psnr_gain_se", "lpips_gain")
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(("degradation", "method", "size", "n") + keys)
    for g, methods in results.items():
        for name, by_size in methods.items():
            for d, r in by_size.items():
                w.writerow([g, name, d, r["n"]] + [
                    "" if r.get(k) is None else f"{r[k]:.6f}" for k in keys])
    writing.write_json(os.path.join(out_dir, "sweep.json"), summary)
    writing.write_text(os.path.join(out_dir, "sweep.csv"), table.getvalue())
    with writing.atomic_write(os.path.join(out_dir, "sweep.png")) as f:
        image.save(f, format="PNG", optimize=True)


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    cli.require(fv, "data_root", "output")
    sizes = parse_sizes(fv.sizes)
    degradations = parse_degradations(fv.degradation)
    checkpoints = cli.named_checkpoints(fv.checkpoint, reserved=("bicubic",))

    out_dir = writing.check_output(fv.output)
    models = load_models(checkpoints, fv.batch_size)  # a bad checkpoint fails before the work
    names, positions, hr, skipped, root = read_faces(fv)
    scorer = sr.BatchScorer(bool(fv.lpips), pfsr=False)
    per_face = sweep(hr, positions, {n: m for (n, _), m in zip(checkpoints, models)}, sizes,
                     degradations, scorer, fv.batch_size, fv.seed, fv.blur, fv.noise,
                     fv.jpeg_quality, fv.model_input, fv.progress)
    results = summarise(per_face)
    model_names = [n for n, _ in checkpoints]
    lines = []
    for g in degradations:
        print(table(g, results[g], model_names, len(names)))
        print()
    for name in model_names:
        for g in degradations:
            lines.append(crossover_line(name, g, results[g][name], bool(fv.lpips)))
    print("\n".join(lines))

    camera_text = (f"camera: blur {fv.blur:g} px, noise {fv.noise:g}, JPEG "
                   f"{fv.jpeg_quality or 'off'}" if "camera" in degradations else "")
    where = f"{fv.source} {fv.split}" if fv.source == "celeba" else fv.source
    header = (f"{len(names)} faces ({where} from file {fv.offset}), model input: "
              f"{fv.model_input}" + (f"; {camera_text}" if camera_text else ""))
    image = render_plot(results, model_names, sizes, header, max_face=DEFAULT_MAX_FACE,
                        floors={"psnr_gain": fv.plot_psnr_floor,
                                "lpips_gain": fv.plot_lpips_floor})
    summary = {
        "flags": _flag_values(fv),
        "num_faces": len(names),
        "data_root": root,
        "files": [crops.rel_path(p, root) for p in names],
        "skipped": dict(skipped),
        "models": {n: {"path": os.path.abspath(p), "iteration": m.sr.iteration,
                       "stage": m.stage} for (n, p), m in zip(checkpoints, models)},
        "sizes": sizes,
        "degradations": degradations,
        "max_face_now": DEFAULT_MAX_FACE,
        "results": {g: {m: {str(d): r for d, r in by.items()} for m, by in ms.items()}
                    for g, ms in results.items()},
        "crossover": {g: {m: {"psnr": crossover(results[g][m]),
                              "lpips": crossover(results[g][m], "lpips_gain")
                              if fv.lpips else None}
                          for m in model_names} for g in degradations},
        "crossover_lines": lines,
    }
    write_outputs(out_dir, summary, results, image)
    print(f"wrote {out_dir}/{{sweep.json,sweep.csv,sweep.png}}")
    return 0


if __name__ == "__main__":
    cli.run(main)
