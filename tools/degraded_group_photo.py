"""A realistically degraded low-resolution group photo, restored by bicubic and by models.

    python tools/degraded_group_photo.py --output=/tmp/degraded_group_photo.png
        --checkpoint=cpu=/runs/cpu --checkpoint=cpu_real=/runs/cpu_real

1. **The photo.** Seven faces of the shared data (``$PROGSR_SHARED``, default
   ``../shared``): six CelebA validation images from the end of the val list
   (file indices >= 600 of the partition, never used to choose a recipe) and
   one Helen face of faces68, each on the aligned-CelebA frame (CelebA images
   already are; the Helen face is warped there by its five points from the 68
   with the photo pipeline's template, ``progsr_jax.photo.align``), cut out by
   a soft ellipse and placed in two rows, some slightly tilted, on a plain
   backdrop, at ``--hr_factor`` times the final size.  Each face's aligned crop
   spans :data:`LAYOUT`'s ``span`` pixels of the final photo (19 to 27; the
   detector measures 20 to 27 on the degraded photo).
2. **The camera.** Written here, independent of ``progsr_jax.data.degradation``:
   area downscale by ``--hr_factor`` (``Image.reduce``), Gaussian blur of
   ``--blur`` pixels (sigma, OpenCV), sensor noise (Gaussian, variance
   ``noise**2 * (0.2 + 0.8 * I / 128)`` per channel: shot noise plus read
   noise, ``--noise`` gray levels at mid-gray; ``--seed``), then a JPEG save at
   ``--jpeg_quality`` (PIL, 4:2:0).  The JPEG (``--input_jpeg``, default
   ``<output stem>_input.jpg``) is what a user would have; everything below
   starts from that file.
3. **The restorations.** ``photo.restore_photo`` (what ``infer --mode=photo``
   runs) with each ``--checkpoint=NAME=PATH``, ``--max_face=0`` (every face is
   restored) and ``--upscale``; and PIL bicubic of the whole photo.
4. **The picture** (``--output``, PNG): one column per method (bicubic, each
   model, then the composed photo before degradation for reference), and
   under each a crop of two faces (the smallest and the largest found),
   enlarged by the largest whole factor that fits the column (nearest).

At these sizes the detector is near its limit: with the defaults all seven
faces are found (``--min_face=10``); other ``--seed`` values or stronger
degradations can lose one or two, and the tool prints how many it found.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import cv2
import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from progsr_jax import cli, data
from progsr_jax.data import writing
from progsr_jax.data.crops import read_pts
from progsr_jax.errors import UserError
from progsr_jax.infer import load_model
from progsr_jax.photo import align, detection, paste
from progsr_jax.photo import restoration as pipeline
from progsr_jax.photo.folders import open_photo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The final (degraded) photo's size, width x height.
PHOTO_SIZE = (136, 72)
#: (source, centre x, centre y, span, degrees) in final-photo pixels; ``span``: pixels across
#: the face's aligned crop (178 of the 178x218 aligned frame); ``source``: a CelebA validation
#: file index (>= 600) or a faces68 path.  Back row first (pasted under the front row).
LAYOUT = (
    (741, 37, 21, 20.0, 3.0),
    (610, 68, 19, 22.0, -3.0),
    (704, 99, 22, 21.0, 0.0),
    (601, 19, 51, 25.0, -4.0),
    (602, 51, 52, 27.0, 0.0),
    ("helen_train/100591971_1.jpg", 84, 53, 25.0, 0.0),
    (620, 116, 51, 25.0, 0.0),
)
FRAME_SIZE = (178, 218)


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string("checkpoint", [], "NAME=PATH of a stage-3 model (repeatable; "
                              "PATH alone: NAME is its folder's name)", flag_values=fv)
    flags.DEFINE_string("output", None, "the comparison picture (.png)", flag_values=fv)
    flags.DEFINE_string("input_jpeg", None, "where the degraded photo is saved (default: "
                        "<output stem>_input.jpg)", flag_values=fv)
    flags.DEFINE_string("shared", None, "the shared data folder (default: $PROGSR_SHARED, "
                        "else ../shared beside the repository)", flag_values=fv)
    flags.DEFINE_integer("hr_factor", 6, "the photo is composed at this many times its final "
                         "size, then area-downscaled", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("blur", 0.5, "Gaussian blur after the downscale: sigma in final "
                       "pixels (0: none)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("noise", 2.0, "sensor noise: standard deviation at mid-gray, in gray "
                       "levels (0: none)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("jpeg_quality", 70, "JPEG quality of the saved photo", lower_bound=1,
                         upper_bound=95, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the noise", flag_values=fv)
    flags.DEFINE_float("upscale", 4.0, "output size / photo size (infer's --upscale)",
                       lower_bound=1.0, upper_bound=8.0, flag_values=fv)
    flags.DEFINE_float("min_face", 10.0, "smallest face searched for, in photo pixels "
                       "(infer's --min_face)", lower_bound=1.0, flag_values=fv)
    flags.DEFINE_boolean("original", True, "add a column with the photo before degradation",
                         flag_values=fv)


def shared_dir(flag: str | None) -> str:
    """The shared data folder; UserError naming where it was looked for."""
    path = flag or os.environ.get("PROGSR_SHARED") or os.path.join(os.path.dirname(REPO), "shared")
    if not os.path.isdir(os.path.join(path, "data", "celeba")) or \
            not os.path.isdir(os.path.join(path, "data", "faces68")):
        raise UserError(f"the shared data (data/celeba, data/faces68) is not in {path}; "
                        "set --shared or PROGSR_SHARED")
    return path


def aligned_faces(shared: str) -> list[Image.Image]:
    """:data:`LAYOUT`'s faces, each as its 178x218 aligned-CelebA frame."""
    val = data.list_files("celeba", os.path.join(shared, "data", "celeba"), "val")
    frames = []
    for source, *_ in LAYOUT:
        if isinstance(source, int):
            if source >= len(val):
                raise UserError(f"CelebA's val list in {shared} has {len(val)} files; "
                                f"file {source} is needed")
            frames.append(data.open_image(val[source]))
            continue
        path = os.path.join(shared, "data", "faces68", source)
        pts = read_pts(os.path.splitext(path)[0] + ".pts")
        five = np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])
        frames.append(align.warp_to_aligned(data.open_image(path),
                                            align.alignment_transform(five)))
    return frames


def face_mask(size: tuple[int, int]) -> Image.Image:
    """A soft ellipse over head, hair and neck of an aligned frame resized to ``size``."""
    w, h = size
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).ellipse((0.19 * w, 0.08 * h, 0.81 * w, 0.96 * h), fill=255)
    return m.filter(ImageFilter.GaussianBlur(0.03 * w))


def background(size: tuple[int, int]) -> Image.Image:
    """A plain studio backdrop: a soft vertical gradient with a faint wide sway of colour."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = xx / w, yy / h
    top, bottom = np.array([176, 172, 164], np.float32), np.array([96, 104, 118], np.float32)
    rgb = top + (bottom - top) * v[..., None] ** 1.3
    rgb += np.stack([10 * np.sin(5.0 * u + 1.0), 6 * np.sin(3.0 * u + 2.0 * v),
                     8 * np.cos(4.0 * u - 1.5 * v)], -1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def compose(frames: Sequence[Image.Image], back: Image.Image, factor: int) -> Image.Image:
    """The group photo at ``factor`` times :data:`PHOTO_SIZE` (``back`` has that size)."""
    photo = back.copy()
    for frame, (_, cx, cy, span, angle) in zip(frames, LAYOUT):
        s = span * factor / FRAME_SIZE[0]
        size = (round(FRAME_SIZE[0] * s), round(FRAME_SIZE[1] * s))
        face = frame.resize(size, Image.LANCZOS)
        mask = face_mask(size)
        if angle:
            face = face.rotate(angle, Image.BICUBIC, expand=True)
            mask = mask.rotate(angle, Image.BICUBIC, expand=True)
        # the aligned crop's centre is the frame's centre, and rotate() keeps it in the middle
        photo.paste(face, (round((cx + 0.5) * factor - face.width / 2),
                           round((cy + 0.5) * factor - face.height / 2)), mask)
    return photo


def degrade(hr: Image.Image, factor: int, blur: float, noise: float, seed: int) -> np.ndarray:
    """The camera before its JPEG encoder: area downscale, Gaussian blur, sensor noise (uint8)."""
    x = np.asarray(hr.reduce(factor) if factor > 1 else hr, np.float32)
    if blur > 0:
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=blur, borderType=cv2.BORDER_REFLECT)
    if noise > 0:
        std = noise * np.sqrt(0.2 + 0.8 * np.clip(x, 0, 255) / 128.0)
        x = x + std * np.random.default_rng(seed).standard_normal(x.shape, np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def save_jpeg(arr: np.ndarray, path: str, quality: int) -> Image.Image:
    """Saves the photo as a JPEG and returns it as decoded from that file."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    writing.write_bytes(path, buf.getvalue())
    return open_photo(path)


def load_models(checkpoints: Sequence[tuple[str, str]]) -> list:
    """Every model (:func:`progsr_jax.infer.load_model`); UserError for one that is not stage 3."""
    models = []
    for name, path in checkpoints:
        model = load_model(path)
        if model.output_size != 128:
            raise UserError(f"--checkpoint={name}: the photo pipeline needs a stage-3 model "
                            f"(128x128 outputs); {path} makes {model.output_size}x"
                            f"{model.output_size}")
        models.append(model)
    return models


def zoom_boxes(faces, size: tuple[int, int], upscale: float, count: int = 2) -> list:
    """``[(box in output pixels, span)]``: squares 1.1 spans wide around ``count`` faces spread
    over the sizes found (the smallest and the largest for 2), kept inside an output of ``size``."""
    order = sorted(faces, key=lambda f: f.span)
    pick = sorted({round(i) for i in np.linspace(0, len(order) - 1, min(count, len(order)))})
    boxes = []
    for f in (order[i] for i in pick):
        cx, cy = align.apply(align.invert(f.transform), align.FRAME_CENTRE[None])[0]
        side = min(round(1.1 * f.span * upscale), *size)
        x0 = min(max(round((cx + 0.5) * upscale - side / 2), 0), size[0] - side)
        y0 = min(max(round((cy + 0.5) * upscale - side / 2), 0), size[1] - side)
        boxes.append(((x0, y0, x0 + side, y0 + side), f.span))
    return boxes


def render(columns: Sequence[tuple[str, Image.Image]], boxes, header: str) -> Image.Image:
    """Labelled columns of whole photos, then under each the crops of ``boxes`` enlarged by the
    largest whole factor that fits the column (nearest neighbours)."""
    font = ImageFont.load_default(size=15)
    pad, text_h = 8, 22
    w, h = columns[0][1].size
    sides = [b[2] - b[0] for b, _ in boxes]
    zoom = max(1, (w - pad * (len(sides) - 1)) // max(sum(sides), 1))
    crop_h = zoom * max(sides, default=0)
    zoom_h = crop_h + text_h + pad if boxes else 0
    canvas = Image.new("RGB", (len(columns) * (w + pad) + pad, 2 * text_h + h + pad + zoom_h),
                       "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), header, fill="black", font=font)
    for k, (label, img) in enumerate(columns):
        x = pad + k * (w + pad)
        draw.text((x, text_h + 3), label, fill="black", font=font)
        canvas.paste(img, (x, 2 * text_h))
        for b, _ in boxes:
            canvas.paste(img.crop(b).resize(((b[2] - b[0]) * zoom,) * 2, Image.NEAREST),
                         (x, 2 * text_h + h + pad))
            x += (b[2] - b[0]) * zoom + pad
    if boxes:
        spans = " and ".join(f"{s:.0f} px" for _, s in boxes)
        draw.text((pad, 2 * text_h + h + pad + crop_h + 3),
                  f"below: the faces whose aligned crops span {spans} in the input, "
                  f"enlarged {zoom}x more (nearest)", fill="black", font=font)
    return canvas


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    cli.require(fv, "output")
    output = os.path.abspath(fv.output)
    if not output.lower().endswith(".png"):
        raise UserError(f"--output must be a .png file, got {fv.output}")
    jpeg = os.path.abspath(fv.input_jpeg or output[:-4] + "_input.jpg")
    checkpoints = cli.named_checkpoints(fv.checkpoint)
    shared = shared_dir(fv.shared)

    for folder in {os.path.dirname(output), os.path.dirname(jpeg)}:
        writing.check_output(folder, folder)
    detector = detection.Detector(min_face=fv.min_face)  # weights missing: one line, before work
    models = load_models(checkpoints)

    factor = fv.hr_factor
    hr_size = (PHOTO_SIZE[0] * factor, PHOTO_SIZE[1] * factor)
    hr = compose(aligned_faces(shared), background(hr_size), factor)
    photo = save_jpeg(degrade(hr, factor, fv.blur, fv.noise, fv.seed), jpeg, fv.jpeg_quality)
    print(f"wrote {jpeg} ({photo.width}x{photo.height}, {os.path.getsize(jpeg)} bytes): "
          f"composed at {factor}x, area downscale, blur {fv.blur:g} px, noise {fv.noise:g}, "
          f"JPEG quality {fv.jpeg_quality}", flush=True)

    upscale = fv.upscale
    bicubic = photo.resize(paste.output_size(photo.size, upscale), Image.BICUBIC)
    columns = [(f"PIL bicubic x{upscale:g}", bicubic)]
    faces = None
    for (name, _), model in zip(checkpoints, models):
        print(f"restoring with {name} ...", flush=True)
        r = pipeline.restore_photo(model, photo, upscale=upscale, detector=detector, max_face=0)
        columns.append((f"{name} (--mode=photo)", r.image))
        faces = r.faces if faces is None else faces
    print(f"{len(faces)} of {len(LAYOUT)} faces found (aligned crops "
          + ", ".join(f"{f.span:.0f}" for f in sorted(faces, key=lambda f: f.span)) + " px)")
    if fv.original:
        columns.append(("before degradation", hr.resize(bicubic.size, Image.LANCZOS)))
    header = (f"input: {photo.width}x{photo.height} JPEG q{fv.jpeg_quality} (area /{factor}, "
              f"blur {fv.blur:g} px, noise {fv.noise:g}), {len(faces)} faces found; "
              f"--mode=photo --upscale={upscale:g} --max_face=0 --min_face={fv.min_face:g}")
    picture = render(columns, zoom_boxes(faces, bicubic.size, upscale), header)
    with writing.atomic_write(output) as f:
        picture.save(f, format="PNG", optimize=True)
    print(f"wrote {output} ({picture.width}x{picture.height}, {os.path.getsize(output)} bytes)")
    return 0


if __name__ == "__main__":
    cli.run(main)
