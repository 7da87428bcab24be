r"""Super-resolve image files with a trained model.

Usage::

    python -m progsr_jax.infer --checkpoint=PATH --input=FILE_OR_DIR \
        --output=FILE_OR_DIR [--mode=downsample|lowres|photo] [--batch_size=16]
    python -m progsr_jax.infer --checkpoint=PATH --source=tfds --split=test \
        --output=DIR [--limit=N] [--data_root=TFDS_DATA_DIR]

``--source=tfds`` super-resolves CelebA's ``--split`` read through TensorFlow
Datasets (the paper's test set: ``--split=test``) with the training
preprocessing, writing ``DIR/celeb_a_<split>_<index>.png`` (downsample mode).

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
``photo``
    Faces in your own photos (:mod:`progsr_jax.photo`; needs the MTCNN
    weights: ``pip install --no-deps facenet-pytorch==2.6.0``): every face
    is detected with five landmarks, warped onto the aligned-CelebA template,
    reduced to 16x16 by the training chain, super-resolved (all faces of a
    photo in one model call) and blended back into the photo upscaled
    ``--upscale`` times (PIL bicubic outside the faces).  ``--output`` is a
    folder; see "Photo mode" below.

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

Photo mode
----------
``--output`` is always a folder.  For each photo ``<stem>`` (the same
relative names as above) it holds the restored photo ``<stem>.png`` and, per
face ``k`` (0, 1, ... in the detector's order, best score first),
``<stem>_face<k>_aligned.png`` (the 128x128 aligned crop of the input that
the model's input was made from), ``<stem>_face<k>_lr.png`` (the 16x16
input) and ``<stem>_face<k>_sr.png`` (the 128x128 result); and one
``faces.json``::

    {"<input file name>": [{"box": [x0, y0, x1, y1], "landmarks": [[x, y] x 5],
                            "score": s, "transform": [[a, b, c], [d, e, f]],
                            "aligned": "<stem>_face0_aligned.png", "lr": ..., "sr": ...}, ...]}

keyed by the input's path relative to ``--input`` (its name for a file
input), file paths relative to ``--output``.  ``transform`` maps input-photo
pixels (pixel centres at integers) to the 178x218 aligned-CelebA frame;
``landmarks`` are left eye, right eye, nose tip, left and right mouth corner
(as seen in the image); ``box`` is the detector's box, enlarged where needed
so that it contains the landmarks.  A photo without a face gets an empty
list, is still written (upscaled) and is named in a log line.  The EXIF
orientation of a photo is applied first (the photo as viewers show it; boxes
and points refer to that upright image).

``--upscale``: ``auto`` (default) scales each photo so that its smallest face
gets the model's own 8x -- its 128x128 result drawn at 128 px -- clamped to
1..8 (never smaller than the input, never above the model's factor) and
kept under 40 megapixels; 1 for a photo without a face.  A number (e.g.
``--upscale=4``) scales every photo by it.  ``--min_face`` (photo pixels,
default 20) is the smallest face searched for; ``--max_faces=N`` keeps the
N largest faces; ``--only_center_face`` keeps the face nearest the photo's
centre; ``--detector_weights=DIR`` reads ``pnet.pt``/``rnet.pt``/``onet.pt``
from a folder instead of the installed facenet-pytorch wheel.

``--max_face`` (default 22, :data:`progsr_jax.photo.pipeline.DEFAULT_MAX_FACE`):
a face whose aligned crop spans more photo pixels is left exactly as it is
(not restored, not pasted; ``auto`` ignores it when choosing the scale), and
faces.json lists it with ``"restored": false``, its ``span`` and the
``reason``; ``--max_face=0`` restores every face.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image

from progsr_jax import cli, data
from progsr_jax.errors import UserError
from progsr_jax.evaluation import crops
from progsr_jax.evaluation.sr import ModelMethod

MODES = ("downsample", "lowres", "photo")


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "training workdir, checkpoint directory or "
                        "converted official checkpoint", flag_values=fv)
    flags.DEFINE_string("input", None, "an image file or a folder of images", flag_values=fv)
    flags.DEFINE_string("output", None, "output PNG file (file input) or folder", flag_values=fv)
    flags.DEFINE_enum("mode", "downsample", MODES, "downsample: training preprocessing to "
                      "16x16 first; lowres: the input is the low-resolution face; photo: "
                      "every face of a photo, aligned, restored and pasted back",
                      flag_values=fv)
    flags.DEFINE_enum("crop", "square", ("square", "celeba", "none"),
                      "downsample mode: how the image is cropped before the 128 resize",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "images per model call (photo mode: the most "
                         "faces per call)", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("upscale", "auto", "photo mode: output size / input size, a number or "
                        "'auto' (the smallest face at the model's 8x, clamped to 1..8)",
                        flag_values=fv)
    flags.DEFINE_float("min_face", 20.0, "photo mode: smallest face side searched for, in "
                       "photo pixels", lower_bound=1.0, flag_values=fv)
    flags.DEFINE_integer("max_faces", None, "photo mode: keep only the N largest faces",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("only_center_face", False, "photo mode: keep only the face nearest "
                         "the photo's centre", flag_values=fv)
    flags.DEFINE_float("max_face", None, "photo mode: faces whose aligned crop spans more "
                       "photo pixels are left exactly as they are (default 22, see README; "
                       "0: restore every face)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_string("detector_weights", None, "photo mode: folder with MTCNN's pnet.pt, "
                        "rnet.pt, onet.pt (default: the installed facenet-pytorch wheel)",
                        flag_values=fv)
    flags.DEFINE_enum("source", "files", ("files", "tfds"), "files: --input; tfds: CelebA's "
                      "--split through TensorFlow Datasets", flag_values=fv)
    flags.DEFINE_string("split", "test", "--source=tfds: train, val or test", flag_values=fv)
    flags.DEFINE_integer("limit", None, "--source=tfds: only the first N faces", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("data_root", None, "--source=tfds: TFDS's data_dir (default: "
                        "~/tensorflow_datasets)", flag_values=fv)
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


def _resolve(input_path: str, output: str, output_kind: str) -> tuple[str, str]:
    """Absolute ``(input, output)`` paths; UserError when either is missing."""
    if not input_path:
        raise UserError("--input=FILE_OR_DIR is required")
    if not output:
        raise UserError(f"--output={output_kind} is required")
    return (os.path.abspath(os.path.expanduser(input_path)),
            os.path.abspath(os.path.expanduser(output)))


def plan_outputs(input_path: str, output: str) -> list[tuple[str, str]]:
    """``[(input file, output file)]`` for a file or folder input; UserError if none."""
    src, dst = _resolve(input_path, output, "FILE_OR_DIR")
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


def plan_tfds(split: str, output: str, limit: int | None, data_dir: str | None, log=print):
    """``([(name, output file)], loader)`` for CelebA's ``split`` through TFDS."""
    if not output:
        raise UserError("--output=DIR is required")
    dst = os.path.abspath(os.path.expanduser(output))
    if os.path.isfile(dst):
        raise UserError(f"--source=tfds writes a folder, but --output={dst} is a file")
    ds = data.build_dataset(dict(source="tfds", root=data_dir, split=split, max_images=limit),
                            log=log)
    plan = [(name, os.path.join(dst, name.replace("/", "_") + ".png")) for name in ds.files]
    loader = crops.DatasetLoader(ds)
    return plan, lambda name: loader(name)[16]


def report(written: list[str], skipped: list[tuple[str, str]], summary: str, log) -> None:
    """Logs the skipped files and the summary line; a UserError when nothing was written."""
    for path, reason in skipped:
        log(f"skipped {path}: {reason}")
    if skipped:
        summary += f"; skipped {len(skipped)}: " + ", ".join(
            os.path.basename(p) for p, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
    if not written:
        raise UserError(f"nothing could be processed: {summary}"
                        + (f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    log(summary)


def run(checkpoint: str | None, input_path: str, output: str, mode: str = "downsample",
        batch_size: int = 16, crop: str = "square", workers: int = 2,
        progress: bool = True, log=print, source: str = "files", split: str = "test",
        limit: int | None = None, data_root: str | None = None, **photo_options) -> dict:
    """Super-resolves the inputs; returns ``{'written': [...], 'skipped': [(path, reason)]}``.

    ``mode='photo'`` hands over to :func:`run_photo` with ``photo_options``
    (``upscale``, ``min_face``, ``max_faces``, ``only_center_face``,
    ``detector_weights``).
    """
    if mode not in MODES:
        raise UserError(f"unknown --mode={mode}; expected one of {', '.join(MODES)}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    if not checkpoint:
        raise UserError("--checkpoint=PATH is required (a training workdir, a checkpoint "
                        "directory or a converted official checkpoint)")
    if mode == "photo":
        return run_photo(checkpoint, input_path, output, batch_size=batch_size, workers=workers,
                         progress=progress, log=log, **photo_options)
    if photo_options:
        raise UserError(f"{', '.join('--' + k for k in sorted(photo_options))} only apply to "
                        "--mode=photo")
    if source == "tfds":
        if mode != "downsample" or input_path:
            raise UserError("--source=tfds reads CelebA itself: no --input, and only "
                            "--mode=downsample")
        plan, loader = plan_tfds(split, output, limit, data_root, log)
    else:
        plan, loader = plan_outputs(input_path, output), _InputLoader(mode, crop)
    folder = os.path.dirname(plan[0][1])
    crops.make_writable_dir(folder, folder)
    model = ModelMethod(checkpoint, batch_size, clip=True)
    targets = dict(plan)
    written: list[str] = []
    skipped: list[tuple[str, str]] = []
    for batch in crops.loaded_batches([p for p, _ in plan], loader, batch_size,
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
    report(written, skipped, f"wrote {len(written)} of {len(plan)} image(s) "
           f"({model.output_size}x{model.output_size} PNG)", log)
    dest = os.path.dirname(plan[0][1]) if len(plan) == 1 else os.path.abspath(output)
    log(f"output: {written[0] if len(plan) == 1 else dest}")
    return {"written": written, "skipped": skipped, "output_size": model.output_size}


# ---------------------------------------------------------------- photo mode
#: EXIF orientation -> the PIL transpose that shows the photo upright (ImageOps.exif_transpose's).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def open_photo(path: str) -> Image.Image:
    """A photo as RGB (:func:`progsr_jax.data.open_image`, any size), turned upright by its EXIF
    orientation."""
    img = data.open_image(path, min_size=1)
    try:
        with Image.open(path) as im:
            orientation = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: use the pixels as stored
        orientation = 1
    return img.transpose(_ORIENTATION[orientation]) if orientation in _ORIENTATION else img


def plan_photo_outputs(input_path: str, output: str) -> tuple[str, list[tuple[str, str, str]]]:
    """``(output folder, [(input file, faces.json key, restored PNG path)])``."""
    src, dst = _resolve(input_path, output, "DIR")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"--mode=photo writes a folder, but --output={dst} is a file")
    if os.path.isfile(src):
        stem = os.path.splitext(os.path.basename(src))[0]
        return dst, [(src, os.path.basename(src), os.path.join(dst, stem + ".png"))]
    return dst, [(f, os.path.relpath(f, src).replace(os.sep, "/"), target)
                 for f, target in plan_outputs(input_path, output)]


def _face_files(target: str, k: int) -> dict[str, str]:
    base = target.removesuffix(".png")
    return {kind: f"{base}_face{k}_{kind}.png" for kind in ("aligned", "lr", "sr")}


def faces_json_text(records: dict[str, list[dict]]) -> str:
    """``faces.json``: one photo per key, one face per line."""
    if not records:
        return "{}\n"
    parts = []
    for key, faces in records.items():
        body = ",\n".join("  " + json.dumps(face) for face in faces)
        parts.append(f" {json.dumps(key)}: [\n{body}\n ]" if faces else f" {json.dumps(key)}: []")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def run_photo(checkpoint: str | None, input_path: str, output: str, *, upscale="auto",
              min_face: float = 20.0, max_faces: int | None = None,
              max_face: float | None = None,
              only_center_face: bool = False, detector_weights: str | None = None,
              batch_size: int = 16, workers: int = 2, progress: bool = True, log=print) -> dict:
    """``--mode=photo``: :func:`progsr_jax.photo.restore_photo` on every photo, files written.

    Returns ``{'written': [restored PNGs], 'skipped': [(path, reason)], 'faces': the faces.json
    dict, 'no_face': [paths], 'upscale': {key: factor}, 'output': folder, 'faces_json': path}``.
    """
    from progsr_jax.photo import detection, pipeline

    upscale = pipeline.parse_upscale(upscale)
    max_face = pipeline.DEFAULT_MAX_FACE if max_face is None else max_face
    if max_face < 0:
        raise UserError(f"--max_face must be >= 0 (0: restore every face), got {max_face:g}")
    out_root, plan = plan_photo_outputs(input_path, output)
    if max_faces is not None and max_faces < 1:
        raise UserError(f"--max_faces must be at least 1, got {max_faces}")
    detector = detection.Detector(detector_weights, min_face=min_face)  # weights missing: stop here
    model = ModelMethod(checkpoint, batch_size, clip=True)
    if model.output_size != 128:
        raise UserError(f"--mode=photo needs a step-3 model (128x128 outputs); {checkpoint} "
                        f"makes {model.output_size}x{model.output_size}")
    crops.make_writable_dir(out_root, f"--output={out_root}")
    keys = {path: (key, target) for path, key, target in plan}
    written: list[str] = []
    skipped: list[tuple[str, str]] = []
    records: dict[str, list[dict]] = {}
    no_face: list[str] = []
    scales: dict[str, float] = {}
    n_faces = kept = 0
    for batch in crops.loaded_batches([p for p, _, _ in plan], open_photo, 1, skipped, workers,
                                      desc="photo", progress=progress):
        (path, img), = batch
        key, target = keys[path]
        try:
            r = pipeline.restore_photo(model.sr, img, upscale=upscale, detector=detector,
                                      max_faces=max_faces, only_center_face=only_center_face,
                                      batch_size=batch_size, max_face=max_face)
        except UserError as e:
            skipped.append((path, str(e)))
            continue
        entries = []
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            r.image.save(target, format="PNG")
            for k, face in enumerate(r.faces):
                files = _face_files(target, k)
                if not face.restored:
                    del files["sr"]
                    kept += 1
                for kind, f in files.items():
                    Image.fromarray(getattr(face, kind)).save(f, format="PNG")
                entries.append(face.to_json(**{kind: os.path.relpath(f, out_root).replace(os.sep, "/")
                                               for kind, f in files.items()}))
        except OSError as e:
            skipped.append((path, f"cannot write {target}: {e.strerror or e}"))
            continue
        written.append(target)
        records[key] = entries
        scales[key] = r.upscale
        n_faces += sum(e["restored"] for e in entries)
        if not entries:
            no_face.append(path)
    faces_json = os.path.join(out_root, "faces.json")
    if written:
        try:
            tmp = faces_json + f".tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(faces_json_text(records))
            os.replace(tmp, faces_json)
        except OSError as e:
            raise UserError(f"cannot write {faces_json}: {e.strerror or e}") from None
    for path in no_face:
        u = scales[keys[path][0]]
        log(f"no face found in {path}; written " + ("unchanged" if u == 1 else
                                                     f"upscaled {u:g}x (bicubic)"))
    if kept:
        log(f"{kept} face(s) left as they are: their aligned crop spans more than --max_face="
            f"{max_face:g} photo pixels (faces.json: \"restored\": false; --max_face=0 "
            "restores every face)")
    report(written, skipped, f"wrote {len(written)} of {len(plan)} photo(s) with {n_faces} "
           "face(s) restored" + (f" ({len(no_face)} without a face)" if no_face else ""), log)
    log(f"output: {out_root} (faces.json lists the faces)")
    return {"written": written, "skipped": skipped, "faces": records, "no_face": no_face,
            "upscale": scales, "output": out_root, "faces_json": faces_json}


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    photo_options = {}
    if fv.mode == "photo":
        photo_options = {"upscale": fv.upscale, "min_face": fv.min_face,
                         "max_faces": fv.max_faces, "only_center_face": fv.only_center_face,
                         "max_face": fv.max_face,
                         "detector_weights": fv.detector_weights}
    run(fv.checkpoint, fv.input, fv.output, mode=fv.mode, batch_size=fv.batch_size,
        crop=fv.crop, workers=fv.workers, progress=fv.progress, source=fv.source,
        split=fv.split, limit=fv.limit, data_root=fv.data_root, **photo_options)
    return 0


if __name__ == "__main__":
    cli.run(main)
