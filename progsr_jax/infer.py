r"""Super-resolve image files with a trained model.

Usage::

    python -m progsr_jax.infer --checkpoint=PATH --input=FILE_OR_DIR \
        --output=FILE_OR_DIR [--mode=downsample|lowres] [--batch_size=16]

Modes:

``downsample`` (default)
    The training preprocessing: center square crop (``--crop=square``; or
    ``celeba`` for the 178x178 CelebA crop, ``none`` for square inputs),
    resize to 128 (PIL bilinear), then 64, 32, 16; the 16x16 image is
    super-resolved.  Use it to see what the model makes of a known face.
``lowres``
    The input *is* the low-resolution face: used as is when it is 16x16,
    otherwise its center square is resized to 16x16 with PIL bilinear
    (non-square inputs are center-cropped rather than squashed).

Any image mode is accepted (gray, RGBA - composited on black -, CMYK,
16-bit, palette, ...; see :func:`progsr_jax.data.open_image`).  The output is
the model's output size (128x128 for a step-3 model), mapped to 8 bits as
``round((x + 1) * 127.5)`` clipped to 0..255 (:func:`progsr_jax.data.to_uint8`,
i.e. ``clip(0.5 * x + 0.5, 0, 1)`` times 255) and saved as PNG.

A folder input gives a folder output with the same relative names and the
extension ``.png`` (``a/b.jpg`` -> ``OUT/a/b.png``; if two inputs would share
a name, e.g. ``b.jpg`` and ``b.png``, the first keeps ``b.png`` and the next
become ``b.jpg.png``...).  A file input writes the given output file (PNG
data whatever the extension), or ``OUT/<stem>.png`` when ``--output`` is an
existing folder or ends with a slash.  Unreadable files are named and
skipped; the exit status is non-zero only when nothing could be processed.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image

from progsr_jax import cli, data
from progsr_jax.errors import UserError
from progsr_jax.evaluation import crops
from progsr_jax.evaluation.sr import ModelMethod

MODES = ("downsample", "lowres")


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "training workdir, checkpoint directory or "
                        "converted official checkpoint", flag_values=fv)
    flags.DEFINE_string("input", None, "an image file or a folder of images", flag_values=fv)
    flags.DEFINE_string("output", None, "output PNG file (file input) or folder", flag_values=fv)
    flags.DEFINE_enum("mode", "downsample", MODES, "downsample: training preprocessing to "
                      "16x16 first; lowres: the input is the low-resolution face",
                      flag_values=fv)
    flags.DEFINE_enum("crop", "square", ("square", "celeba", "none"),
                      "downsample mode: how the image is cropped before the 128 resize",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "images per model call", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("workers", 2, "image decoding threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show a progress bar", flag_values=fv)


def lowres_input(img: Image.Image) -> np.ndarray:
    """An RGB PIL image -> the (16, 16, 3) uint8 LR face (center square, bilinear)."""
    w, h = img.size
    if (w, h) != (16, 16):
        if w != h:
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
        img = img.resize((16, 16), Image.BILINEAR)
    return np.asarray(img, np.uint8)


class _InputLoader:
    def __init__(self, mode: str, crop: str):
        self.mode, self.crop = mode, crop

    def __call__(self, path: str) -> np.ndarray:
        if self.mode == "lowres":
            return lowres_input(data.open_image(path, min_size=1))
        img = data.open_image(path, min_size=16)
        return data.preprocess(img, crop=self.crop)[16]


def plan_outputs(input_path: str, output: str) -> list[tuple[str, str]]:
    """``[(input file, output file)]`` for a file or folder input; UserError if none."""
    if not input_path:
        raise UserError("--input=FILE_OR_DIR is required")
    if not output:
        raise UserError("--output=FILE_OR_DIR is required")
    src = os.path.abspath(os.path.expanduser(input_path))
    dst = os.path.abspath(os.path.expanduser(output))
    if os.path.isfile(src):
        if os.path.isdir(dst) or output.endswith(("/", os.sep)):
            dst = os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + ".png")
        return [(src, dst)]
    if not os.path.isdir(src):
        raise UserError(f"--input does not exist: {src}")
    if os.path.isfile(dst):
        raise UserError(f"--input is a folder, so --output must be a folder, but {dst} is a file")
    files = data.list_files("folder", src, "all")
    plan, used = [], set()
    for f in files:
        rel = os.path.relpath(f, src)
        target = os.path.splitext(rel)[0] + ".png"
        if target.lower() in used:
            target = rel + ".png"
            k = 1
            while target.lower() in used:
                target = f"{rel}.{k}.png"
                k += 1
        used.add(target.lower())
        plan.append((f, os.path.join(dst, target)))
    return plan


def run(checkpoint: str | None, input_path: str, output: str, mode: str = "downsample",
        batch_size: int = 16, crop: str = "square", workers: int = 2,
        progress: bool = True, log=print) -> dict:
    """Super-resolves the inputs; returns ``{'written': [...], 'skipped': [(path, reason)]}``."""
    if mode not in MODES:
        raise UserError(f"unknown --mode={mode}; expected one of {', '.join(MODES)}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    plan = plan_outputs(input_path, output)
    folder = os.path.dirname(plan[0][1])
    crops.make_writable_dir(folder, folder)
    model = ModelMethod(checkpoint, batch_size, clip=True)
    targets = dict(plan)
    written: list[str] = []
    skipped: list[tuple[str, str]] = []
    for batch in crops.loaded_batches([p for p, _ in plan], _InputLoader(mode, crop), batch_size,
                                      skipped, workers, desc="infer", progress=progress):
        sr = data.to_uint8(model.generate(np.stack([x for _, x in batch])))
        for (path, _), img in zip(batch, sr):
            out = targets[path]
            try:
                os.makedirs(os.path.dirname(out), exist_ok=True)
                Image.fromarray(img).save(out, format="PNG")
                written.append(out)
            except OSError as e:
                skipped.append((path, f"cannot write {out}: {e.strerror or e}"))
    for path, reason in skipped:
        log(f"skipped {path}: {reason}")
    summary = (f"wrote {len(written)} of {len(plan)} image(s) "
               f"({model.output_size}x{model.output_size} PNG)")
    if skipped:
        summary += f"; skipped {len(skipped)}: " + ", ".join(
            os.path.basename(p) for p, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
    if not written:
        raise UserError(f"nothing could be processed: {summary}"
                        + (f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    log(summary)
    dest = os.path.dirname(plan[0][1]) if len(plan) == 1 else os.path.abspath(output)
    log(f"output: {written[0] if len(plan) == 1 else dest}")
    return {"written": written, "skipped": skipped, "output_size": model.output_size}


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    run(fv.checkpoint, fv.input, fv.output, mode=fv.mode, batch_size=fv.batch_size,
        crop=fv.crop, workers=fv.workers, progress=fv.progress)
    return 0


if __name__ == "__main__":
    cli.run(main)
