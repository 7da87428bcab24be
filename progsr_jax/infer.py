r"""Super-resolve image files with a trained model.

Usage::

    python -m progsr_jax.infer --checkpoint=PATH --input=FILE_OR_DIR \
        --output=FILE_OR_DIR [--mode=downsample|lowres|photo] [--batch_size=16]
    python -m progsr_jax.infer --checkpoint=PATH --source=tfds --split=test \
        --output=DIR [--limit=N] [--data_root=TFDS_DATA_DIR]
    python -m progsr_jax.infer --exported=DIR --input=FILE_OR_DIR --output=FILE_OR_DIR \
        [--mode=downsample|lowres]
    python -m progsr_jax.infer --mode=video --checkpoint=PATH --input=CLIP --output=OUT.mp4 \
        [--upscale=2] [--nosmooth] [--detect_every=3] [--track_clips] [--lossless]

``--exported=DIR`` runs a model written by ``python -m progsr_jax.export``
instead of a checkpoint (``DIR/model.onnx`` in onnxruntime when it is
installed, else ``DIR/model.stablehlo``; a line says which one runs when the
folder holds both, ``--exported_format=onnx|stablehlo`` picks one;
:mod:`progsr_jax.inference.serialized`), with the same file handling.

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
``video``
    The faces of a video file (:mod:`progsr_jax.video`; needs PyAV,
    ``pip install 'progsr_jax[video]'``, and the MTCNN weights): streamed
    frame by frame, faces tracked, their alignment smoothed over time, each
    restored face combined with its neighbouring frames, pasted back; audio,
    timestamps and rotation kept.  See "Video mode" below and docs/video.md.

Any image mode is accepted (gray, RGBA - composited on black -, CMYK,
16-bit, palette, ...; see :func:`progsr_jax.data.open_image`).  The output is
the model's output size (128x128 for a step-3 model), mapped to 8 bits as
``round((x + 1) * 127.5)`` clipped to 0..255 (:func:`progsr_jax.data.to_uint8`,
i.e. ``clip(0.5 * x + 0.5, 0, 1)`` times 255) and saved as PNG (a single
output file: in the format its extension names).

A folder input gives a folder output with the same relative names and the
extension ``.png`` (``a/b.jpg`` -> ``OUT/a/b.png``; if two inputs would share
a name, e.g. ``b.jpg`` and ``b.png``, the first keeps ``b.png`` and the next
become ``b.jpg.png``...).  A file input writes the given output file in the
format its extension names (``.png``; ``.jpg``/``.jpeg`` and ``.webp`` at
quality 95; ``.bmp``; ``.tif``/``.tiff``; any other extension, or none, is
refused), or ``OUT/<stem>.png`` when ``--output`` is an existing folder or
ends with a slash.  Unreadable files are named and skipped; the exit status
is non-zero only when nothing could be processed.

Inputs are never overwritten: an ``--output`` that is the ``--input`` (the
same file or folder, also through links), lies inside the input folder, or
would put an output inside it, is refused (as is one that is the checkpoint
or exported model) unless ``--overwrite`` is given; then each input is
replaced by its own output and never by another's (names that would collide
get the ``b.jpg.png`` form).  Everything is checked before the output folder
is created (it appears with the first file written); each file is written
under a temporary name and renamed (:mod:`progsr_jax.data.writing`,
``docs/errors.md``).

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
list, is still written (upscaled) and is named in a log line; in place
(``--output`` = ``--input`` with ``--overwrite``) a photo the run leaves
unchanged (no face restored, scale 1) is not rewritten.  The EXIF
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

``--max_face`` (default 22, :data:`progsr_jax.photo.restoration.DEFAULT_MAX_FACE`):
a face whose aligned crop spans more photo pixels is left exactly as it is
(not restored, not pasted; ``auto`` ignores it when choosing the scale), and
faces.json lists it with ``"restored": false``, its ``span`` and the
``reason``; ``--max_face=0`` restores every face.

Video mode
----------
``--input`` is one video file, ``--output`` the restored video (``.mp4``,
``.m4v``, ``.mov``, ``.mkv`` or ``.webm``), written under a temporary name
and renamed when complete, with ``<output stem>.tracks.json`` beside it
(:mod:`progsr_jax.video.outputs`).  ``--upscale`` is a number (default 1:
the input's size; ``auto`` is refused, a video has one size), ``--min_face``
defaults to 10 (tiny faces), ``--max_face`` works as in photo mode with
hysteresis and crossfades.  ``--nosmooth``: every frame as ``--mode=photo``
would do it (the baseline); ``--detect_every=k``: the detector on every k-th
frame only (faces followed in between; about 4x faster at k=3);
``--max_gap``: missed detections a track bridges; ``--scene_cut``: the cut
detector's threshold; ``--codec``, ``--crf``, ``--codec_preset``,
``--lossless``: the encoder (default H.264 CRF 18, preset fast; VP9 for
``.webm``); ``--tracks_json``: elsewhere; ``--track_clips``: each track's
restored faces as a clip in ``<output stem>_tracks/``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image

from progsr_jax import cli, data, inference
from progsr_jax.data import crops, writing
from progsr_jax.data.reading import loaded_batches
from progsr_jax.errors import UserError
from progsr_jax.inference import batching, serialized
from progsr_jax.photo import detection, restoration
from progsr_jax.photo.folders import plan_photo_outputs, restore_files

MODES = ("downsample", "lowres", "photo", "video")
#: The flags of --mode=photo (run_photo's options); --mode=video takes them too, but for
#: --max_faces and --only_center_face.
PHOTO_FLAGS = ("upscale", "min_face", "max_faces", "only_center_face", "max_face",
               "detector_weights")
#: The flags of --mode=video alone (run_video's options).
VIDEO_FLAGS = ("smooth", "detect_every", "max_gap", "scene_cut", "codec", "crf",
               "codec_preset", "lossless", "tracks_json", "track_clips")
#: --mode=video's defaults where they differ from the photo mode's.
VIDEO_MIN_FACE = 10.0
VIDEO_UPSCALE = 1.0


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "training workdir, checkpoint directory or "
                        "converted official checkpoint", flag_values=fv)
    flags.DEFINE_string("exported", None, "instead of --checkpoint: a folder written by "
                        "progsr_jax.export (not for --mode=photo)", flag_values=fv)
    flags.DEFINE_enum("exported_format", "auto", ("auto",) + serialized.BACKENDS,
                      "with --exported: which model of the folder runs (auto: model.onnx when "
                      "onnxruntime is installed, else model.stablehlo)", flag_values=fv)
    flags.DEFINE_string("input", None, "an image file or a folder of images", flag_values=fv)
    flags.DEFINE_string("output", None, "output image file (file input; .png, .jpg, ... its "
                        "extension names the format) or folder", flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "allow --output to be --input (or inside it): "
                         "outputs replace the inputs they are made from", flag_values=fv)
    flags.DEFINE_enum("mode", "downsample", MODES, "downsample: training preprocessing to "
                      "16x16 first; lowres: the input is the low-resolution face; photo: "
                      "every face of a photo, aligned, restored and pasted back; video: the "
                      "faces of a video file, tracked and steadied (docs/video.md)",
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
    flags.DEFINE_boolean("smooth", True, "video mode: smoothed alignment, combination of "
                         "each face over neighbouring frames, hysteresis and crossfades; "
                         "--nosmooth: every frame as --mode=photo would do it", flag_values=fv)
    flags.DEFINE_integer("detect_every", None, "video mode: run the face detector on every "
                         "k-th frame, faces followed in between (default 1)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("max_gap", None, "video mode: detections a track bridges neither "
                         "detected nor followed before it ends (default 4)", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_float("scene_cut", None, "video mode: scene-cut threshold, the mean grey-level "
                       "change of a frame thumbnail (default 28; 0: never cut)", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_string("codec", None, "video mode: the video encoder (default libx264 for "
                        ".mp4/.m4v/.mov/.mkv, libvpx-vp9 for .webm)", flag_values=fv)
    flags.DEFINE_integer("crf", None, "video mode: constant-quality level (default 18 for "
                         "libx264, 22 libx265, 32 libvpx-vp9; lower is better)", flag_values=fv)
    flags.DEFINE_string("codec_preset", None, "video mode: x264/x265 speed preset (default fast)",
                        flag_values=fv)
    flags.DEFINE_boolean("lossless", False, "video mode: lossless output (libx264rgb at QP 0: "
                         "the frames bit for bit; VP9 lossless for .webm)", flag_values=fv)
    flags.DEFINE_string("tracks_json", None, "video mode: where tracks.json goes (default "
                        "<output stem>.tracks.json)", flag_values=fv)
    flags.DEFINE_boolean("track_clips", False, "video mode: also write each track's restored "
                         "128x128 faces as a clip in <output stem>_tracks/", flag_values=fv)
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


def load_model(checkpoint: str | None):
    """The model of ``--checkpoint`` (:func:`progsr_jax.inference.load`); one-line errors."""
    if not checkpoint:
        raise UserError("--checkpoint=PATH is required (a training workdir, a checkpoint "
                        "directory or a converted official checkpoint)")
    if not os.path.exists(checkpoint):
        raise UserError(f"--checkpoint not found: {checkpoint}")

    return inference.load(checkpoint)


def model_inputs(checkpoint: str | None, exported: str | None) -> list[writing.Input]:
    """What the model flags read, for :func:`progsr_jax.data.writing.check_not_input`."""
    if exported:
        return [writing.Input("--exported", exported, tree=False)]
    return writing.checkpoint_inputs(checkpoint) if checkpoint else []


def run_photo(checkpoint: str | None, input_path: str, output: str, *, upscale="auto",
              min_face: float = 20.0, max_faces: int | None = None,
              max_face: float | None = None,
              only_center_face: bool = False, detector_weights: str | None = None,
              batch_size: int = 16, workers: int = 2, progress: bool = True,
              overwrite: bool = False, log=print) -> dict:
    """``--mode=photo``: :func:`progsr_jax.photo.restore_photo` on every photo, files written
    (:func:`progsr_jax.photo.folders.restore_files`, which tells what it returns)."""
    upscale = restoration.parse_upscale(upscale)
    max_face = restoration.DEFAULT_MAX_FACE if max_face is None else max_face
    if max_face < 0:
        raise UserError(f"--max_face must be >= 0 (0: restore every face), got {max_face:g}")
    if max_faces is not None and max_faces < 1:
        raise UserError(f"--max_faces must be at least 1, got {max_faces}")
    out_root, plan = plan_photo_outputs(input_path, output, overwrite=overwrite,
                                        inputs=model_inputs(checkpoint, None))
    writing.check_output(out_root)
    detector = detection.Detector(detector_weights, min_face=min_face)  # weights missing: stop here
    model = load_model(checkpoint)
    if model.output_size != 128:
        raise UserError(f"--mode=photo needs a stage-3 model (128x128 outputs); {checkpoint} "
                        f"makes {model.output_size}x{model.output_size}")
    return restore_files(model, detector, out_root, plan, upscale=upscale, max_faces=max_faces,
                         max_face=max_face, only_center_face=only_center_face,
                         batch_size=batch_size,
                         workers=workers, progress=progress, log=log)


def run_video(checkpoint: str | None, input_path: str, output: str, *, upscale=None,
              min_face: float | None = None, max_face: float | None = None, smooth: bool = True,
              detect_every: int | None = None, max_gap: int | None = None,
              scene_cut: float | None = None,
              codec: str | None = None, crf: int | None = None, codec_preset: str | None = None,
              lossless: bool = False, tracks_json: str | None = None, track_clips: bool = False,
              detector_weights: str | None = None, batch_size: int = 16, progress: bool = True,
              log=print, **tuning) -> dict:
    """``--mode=video``: one video file in, one out (:func:`progsr_jax.video.outputs.restore_video`,
    which tells what it returns).  ``upscale`` defaults to 1 and ``min_face`` to 10 (tiny faces);
    None: the :class:`progsr_jax.video.restoration.VideoOptions` default; ``tuning``: further
    fields of it."""
    try:  # optional: progsr_jax.video needs PyAV, the `video` extra
        from progsr_jax.video import outputs as video_outputs
        from progsr_jax.video import restoration as video_restoration
    except ImportError as e:
        raise UserError(f"--mode=video needs PyAV ({e}): pip install 'progsr_jax[video]' "
                        "(or pip install av)") from None

    if upscale is None:
        upscale = VIDEO_UPSCALE
    elif isinstance(upscale, str) and upscale.strip().lower() == "auto":
        raise UserError("--upscale=auto chooses a size per photo; a video keeps one size: give "
                        f"a number (default {VIDEO_UPSCALE:g} in video mode)")
    upscale = restoration.parse_upscale(upscale)
    given = {k: v for k, v in (("detect_every", detect_every), ("max_gap", max_gap),
                               ("scene_cut", scene_cut)) if v is not None}
    try:
        options = video_restoration.VideoOptions(
            smooth=bool(smooth), upscale=float(upscale),
            max_face=restoration.DEFAULT_MAX_FACE if max_face is None else float(max_face),
            batch_size=int(batch_size), **given, **tuning)
    except TypeError as e:
        raise UserError(f"unknown video option: {e}") from None
    planned = video_outputs.plan(input_path, output, options, tracks_json=tracks_json,
                                 track_clips=track_clips, codec=codec, crf=crf,
                                 preset=codec_preset, lossless=lossless,
                                 inputs=model_inputs(checkpoint, None))
    detector = detection.Detector(detector_weights,
                                  min_face=VIDEO_MIN_FACE if min_face is None else min_face)
    model = load_model(checkpoint)
    if model.output_size != 128:
        raise UserError(f"--mode=video needs a stage-3 model (128x128 outputs); {checkpoint} "
                        f"makes {model.output_size}x{model.output_size}")
    return video_outputs.restore_video(model, detector, planned, options, progress=progress,
                                       log=log)


def plan_tfds(split: str, output: str, limit: int | None, data_dir: str | None,
              inputs: list[writing.Input], log=print):
    """``([(name, output file)], loader)`` for CelebA's ``split`` through TFDS."""
    if not output:
        raise UserError("--output=DIR is required")
    writing.check_not_input(output, inputs + ([writing.Input("--data_root", data_dir)]
                                              if data_dir else []))
    dst = writing.check_output(output)
    ds = data.build_dataset(dict(source="tfds", root=data_dir, split=split, max_images=limit),
                            log=log)
    plan = [(name, os.path.join(dst, name.replace("/", "_") + ".png")) for name in ds.files]
    loader = crops.DatasetLoader(ds)
    return plan, lambda name: loader(name)[16]


def run(checkpoint: str | None, input_path: str, output: str, mode: str = "downsample",
        batch_size: int = 16, crop: str = "square", workers: int = 2,
        progress: bool = True, log=print, source: str = "files", split: str = "test",
        limit: int | None = None, data_root: str | None = None, exported: str | None = None,
        overwrite: bool = False, exported_format: str = "auto", **photo_options) -> dict:
    """Super-resolves the inputs; returns ``{'written': [...], 'skipped': [(path, reason)]}``.

    ``mode='photo'`` hands over to :func:`run_photo` with ``photo_options``
    (``upscale``, ``min_face``, ``max_faces``, ``only_center_face``,
    ``detector_weights``).  ``exported``: a folder of :mod:`progsr_jax.export` to run
    instead of ``checkpoint`` (not in photo mode), ``exported_format`` which of its models.
    ``overwrite``: outputs may replace inputs (:func:`progsr_jax.data.writing.plan_outputs`).
    Everything is checked before the output is created; each file is written atomically.
    """
    if mode not in MODES:
        raise UserError(f"unknown --mode={mode}; expected one of {', '.join(MODES)}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    if checkpoint and exported:
        raise UserError("give --checkpoint or --exported, not both")
    if exported and mode in ("photo", "video"):
        raise UserError(f"--exported runs --mode=downsample or --mode=lowres, not --mode={mode}")
    if not checkpoint and not exported:
        raise UserError("--checkpoint=PATH is required (a training workdir, a checkpoint "
                        "directory or a converted official checkpoint), or --exported=DIR")
    if exported_format != "auto" and not exported:
        raise UserError("--exported_format only applies with --exported")
    if mode == "photo":
        return run_photo(checkpoint, input_path, output, batch_size=batch_size, workers=workers,
                         progress=progress, overwrite=overwrite, log=log, **photo_options)
    if mode == "video":
        return run_video(checkpoint, input_path, output, batch_size=batch_size,
                         progress=progress, log=log, **photo_options)
    if photo_options:
        names = sorted(photo_options)
        raise UserError(f"{', '.join('--' + k for k in names)} only appl"
                        f"{'ies' if len(names) == 1 else 'y'} to --mode=photo or --mode=video")
    inputs = model_inputs(checkpoint, exported)
    if source == "tfds":
        if mode != "downsample" or input_path:
            raise UserError("--source=tfds reads CelebA itself: no --input, and only "
                            "--mode=downsample")
        plan, loader = plan_tfds(split, output, limit, data_root, inputs, log)
        folder = os.path.abspath(os.path.expanduser(output))
    else:
        plan = writing.plan_outputs(input_path, output, overwrite=overwrite, inputs=inputs)
        loader = _InputLoader(mode, crop)
        if os.path.isfile(os.path.expanduser(input_path)):
            folder = os.path.dirname(writing.check_output_file(plan[0][1]))
        else:
            folder = writing.check_output(output)
    if exported:
        model = serialized.load(exported, None if exported_format == "auto"
                                    else exported_format, log=log)
    else:
        model = load_model(checkpoint)
    targets = dict(plan)
    written: list[str] = []
    skipped: list[tuple[str, str]] = []
    for batch in loaded_batches([p for p, _ in plan], loader, batch_size,
                                skipped, workers, desc="infer", progress=progress):
        sr = batching.super_resolve(model, np.stack([x for _, x in batch]), batch_size,
                                    min_batch=batch_size)
        for (path, _), img in zip(batch, sr):
            out = targets[path]
            try:
                writing.save_image(img, out)
                written.append(out)
            except UserError as e:
                skipped.append((path, str(e)))
    formats = sorted({writing.output_format(p) for p in written}) or ["PNG"]
    writing.report(written, skipped, f"wrote {len(written)} of {len(plan)} image(s) "
                   f"({model.output_size}x{model.output_size} {'/'.join(formats)})", log)
    log(f"output: {written[0] if len(plan) == 1 else folder}")
    return {"written": written, "skipped": skipped, "output_size": model.output_size}


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    photo_options = {}
    if fv.mode == "photo":
        photo_options = {name: fv[name].value for name in PHOTO_FLAGS}
    elif fv.mode == "video":
        for name in ("max_faces", "only_center_face"):
            if fv[name].present:
                raise UserError(f"--{name} applies to --mode=photo only")
        photo_options = {name: fv[name].value for name in PHOTO_FLAGS + VIDEO_FLAGS
                         if name not in ("max_faces", "only_center_face")}
        for name in ("upscale", "min_face"):  # the video defaults differ from the photo ones
            if not fv[name].present:
                photo_options[name] = None
    else:  # a photo or video flag given in another mode is a mistake, not something to ignore
        photo_options = {name: fv[name].value for name in PHOTO_FLAGS + VIDEO_FLAGS
                         if fv[name].present}
    run(fv.checkpoint, fv.input, fv.output, mode=fv.mode, batch_size=fv.batch_size,
        crop=fv.crop, workers=fv.workers, progress=fv.progress, source=fv.source,
        split=fv.split, limit=fv.limit, data_root=fv.data_root, exported=fv.exported,
        overwrite=fv.overwrite, exported_format=fv.exported_format, **photo_options)
    return 0


if __name__ == "__main__":
    cli.run(main)
