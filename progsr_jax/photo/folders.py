"""Photo files: planning the outputs, opening photos upright, the photo loop, ``faces.json``.

The file side of ``python -m progsr_jax.infer --mode=photo`` (every mode plans
its outputs with :func:`progsr_jax.data.writing.plan_outputs` and reports
with :func:`~progsr_jax.data.writing.report`): :func:`plan_photo_outputs`,
:func:`open_photo` with the
EXIF orientation, :func:`restore_files`, the loop that runs
:func:`progsr_jax.photo.restore_photo` on every photo and writes the
restored photo, the per-face PNGs and :func:`faces_json_text`).  File layout
and naming: see ``progsr_jax/infer.py``'s docstring.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from PIL import Image

from progsr_jax import data
from progsr_jax.data import writing
from progsr_jax.data.reading import loaded_batches
from progsr_jax.errors import UserError
from progsr_jax.photo import restoration as pipeline

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


def plan_photo_outputs(input_path: str | None, output: str | None, *, overwrite: bool = False,
                       inputs: Sequence[writing.Input] = ()
                       ) -> tuple[str, list[tuple[str, str, str]]]:
    """``(output folder, [(input file, faces.json key, restored PNG path)])``, checked
    against the inputs (:func:`progsr_jax.data.writing.plan_outputs`)."""
    src, dst = writing.input_and_output(input_path, output, "DIR")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise UserError(f"--mode=photo writes a folder, but --output={dst} is a file")
    if os.path.isfile(src):
        writing.check_not_input(dst, inputs, overwrite=overwrite, overwrite_flag="--overwrite")
        target = os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + ".png")
        writing.check_not_input(target, [writing.Input("--input", src, tree=False)], is_file=True,
                                overwrite=overwrite, overwrite_flag="--overwrite")
        return dst, [(src, os.path.basename(src), target)]
    plan = writing.plan_outputs(input_path, dst + os.sep, overwrite=overwrite, inputs=inputs)
    return dst, [(f, os.path.relpath(f, src).replace(os.sep, "/"), target) for f, target in plan]


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
    sources = {writing.real(path) for path, _, _ in plan}
    left_as_is: list[str] = []
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
        files = [_face_files(target, k) for k in range(len(r.faces))]
        for face, names in zip(r.faces, files):
            if not face.restored:
                del names["sr"]
        clash = [f for names in files for f in names.values()
                 if writing.real_target(f) in sources]
        if clash:  # in place (--overwrite): a face file may not replace another input
            skipped.append((path, f"its face file {clash[0]} would replace an input"))
            continue
        unchanged = r.upscale == 1 and not any(face.restored for face in r.faces)
        try:
            if unchanged and writing.real_target(target) == writing.real(path):
                left_as_is.append(path)  # in place: the photo is not rewritten
            else:
                writing.save_image(r.image, target, "PNG")
            for face, names in zip(r.faces, files):
                for kind, f in names.items():
                    writing.save_image(getattr(face, kind), f, "PNG")
        except UserError as e:
            skipped.append((path, str(e)))
            continue
        entries = [face.to_json(**{kind: os.path.relpath(f, out_root).replace(os.sep, "/")
                                   for kind, f in names.items()})
                   for face, names in zip(r.faces, files)]
        kept += sum(not face.restored for face in r.faces)
        written.append(target)
        records[key] = entries
        scales[key] = r.upscale
        n_faces += sum(e["restored"] for e in entries)
        if not entries:
            no_face.append(path)
    faces_json = os.path.join(out_root, "faces.json")
    if written:
        writing.write_text(faces_json, faces_json_text(records))
    for path in no_face:
        u = scales[keys[path][0]]
        log(f"no face found in {path}; " + (
            "left as it is (not rewritten)" if path in left_as_is else
            "written at its own size" if u == 1 else f"written upscaled {u:g}x (bicubic)"))
    if kept:
        log(f"{kept} face(s) left as they are: their aligned crop spans more than --max_face="
            f"{max_face:g} photo pixels (faces.json: \"restored\": false; --max_face=0 "
            "restores every face)")
    writing.report(written, skipped, f"wrote {len(written)} of {len(plan)} photo(s) with "
                   f"{n_faces} face(s) restored"
                   + (f" ({len(no_face)} without a face)" if no_face else ""), log)
    log(f"output: {out_root} (faces.json lists the faces)")
    return {"written": written, "skipped": skipped, "faces": records, "no_face": no_face,
            "upscale": scales, "output": out_root, "faces_json": faces_json}


