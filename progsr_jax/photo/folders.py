"""Photo files: planning the outputs, opening photos upright, the photo loop, ``faces.json``.

The file side of ``python -m progsr_jax.infer`` (every mode plans its outputs
with :func:`plan_outputs` and reports with :func:`report`) and of
``--mode=photo`` (:func:`plan_photo_outputs`, :func:`open_photo` with the
EXIF orientation, :func:`restore_files`, the loop that runs
:func:`progsr_jax.photo.restore_photo` on every photo and writes the
restored photo, the per-face PNGs and :func:`faces_json_text`).  File layout
and naming: see ``progsr_jax/infer.py``'s docstring.
"""

from __future__ import annotations

import json
import os

from PIL import Image

from progsr_jax import data
from progsr_jax.data.reading import loaded_batches
from progsr_jax.errors import UserError
from progsr_jax.photo import restoration as pipeline


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


def restore_files(sr, detector, out_root: str, plan: list[tuple[str, str, str]], *,
                  upscale="auto", max_faces: int | None = None, max_face: float = 0.0,
                  only_center_face: bool = False,
                  batch_size: int = pipeline.DEFAULT_BATCH, workers: int = 2,
                  progress: bool = True, log=print) -> dict:
    """The photo loop: every photo of ``plan`` (:func:`plan_photo_outputs`) restored by ``sr``
    (a stage-3 model) and written into ``out_root`` with ``faces.json``; faces whose aligned
    crop spans more than ``max_face`` photo pixels (0: none) are left as they are.

    Returns ``{'written': [restored PNGs], 'skipped': [(path, reason)], 'faces': the faces.json
    dict, 'no_face': [paths], 'upscale': {key: factor}, 'output': folder, 'faces_json': path}``.
    """
    keys = {path: (key, target) for path, key, target in plan}
    written: list[str] = []
    skipped: list[tuple[str, str]] = []
    records: dict[str, list[dict]] = {}
    no_face: list[str] = []
    scales: dict[str, float] = {}
    n_faces = kept = 0
    for batch in loaded_batches([p for p, _, _ in plan], open_photo, 1, skipped, workers,
                                desc="photo", progress=progress):
        (path, img), = batch
        key, target = keys[path]
        try:
            r = pipeline.restore_photo(sr, img, upscale=upscale, detector=detector,
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


