"""Reading and writing video files with PyAV (FFmpeg's libraries in PyAV's wheels).

:class:`VideoReader` probes a file (one clear :class:`~progsr_jax.errors.UserError`
for anything that is not a readable video) and streams its frames one at a time,
upright (the display rotation applied) as (H, W, 3) uint8 RGB, with their
presentation timestamps; the packets of every audio stream are handed, undecoded,
to a callback as they are demuxed.

:class:`VideoWriter` encodes frames into a temporary file beside the output
(``.<stem>.tmp<pid><ext>``, hidden, same folder so that the final rename is
atomic), copies the audio packets into it unchanged (remuxed, never
re-encoded), and only :meth:`VideoWriter.commit` renames it to the output name;
:meth:`VideoWriter.abort` (and leaving the ``with`` block on an exception,
KeyboardInterrupt included) deletes it.  What is kept from the input:

* every frame's timestamp (the encoder works in the input stream's time base,
  so variable frame rates survive exactly), hence the frame rate and count;
* the display rotation (the frames are processed upright, turned back to the
  stored orientation and written with the same display matrix), so the output
  plays the same way round at the same size (times ``upscale``);
* the colour tags (matrix, range, primaries, transfer) and the sample aspect
  ratio;
* every audio stream, packet for packet.

Not kept: subtitle and data streams, mirroring in a display matrix (only its
rotation is read), bit depths above 8 (frames go through 8-bit RGB).

Codecs (:func:`encoder_settings`): by default H.264 (``libx264``, CRF 18,
preset ``fast``) for ``.mp4``, ``.m4v``, ``.mov`` and ``.mkv``, VP9
(``libvpx-vp9``, CRF 32) for ``.webm``; ``lossless`` switches to
``libx264rgb`` at QP 0 (RGB, bit-exact frames; VP9's lossless mode for
``.webm``); ``codec``, ``crf`` and ``preset`` override the defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from fractions import Fraction

import av
import numpy as np

from progsr_jax.errors import UserError

#: Output containers and their default codec.
CONTAINERS = {".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264", ".mkv": "libx264",
              ".webm": "libvpx-vp9"}
#: Quality defaults: (option name, value) per codec; CRF 18 is visually lossless for H.264.
DEFAULT_CRF = {"libx264": 18, "libx265": 22, "libvpx-vp9": 32}
DEFAULT_PRESET = {"libx264": "fast", "libx265": "fast"}
#: Frames larger than this (pixels, input or output) are refused: 8K UHD is 33.2 M.
MAX_FRAME_PIXELS = 36_000_000


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What :class:`VideoReader` learnt about a file before decoding it.

    ``width``/``height``: the stored (coded) frame size; ``rotation``: degrees
    counter-clockwise to display it (0, 90, 180 or 270); ``size``: the upright
    (display) size, which is what frames are handed out in; ``time_base``: of
    the video stream; ``rate``: its average frame rate (None when unknown);
    ``frames``: the frame count the container declares (0: not declared);
    ``duration``: seconds (0.0 when unknown), ``video_duration`` that of the
    video stream alone where the container says (0.0 otherwise); ``audio``:
    codec names of the audio streams, which are copied.
    """

    path: str
    width: int
    height: int
    rotation: int
    time_base: Fraction
    rate: Fraction | None
    frames: int
    duration: float
    codec: str
    audio: tuple[str, ...]
    colorspace: int = 0
    color_range: int = 0
    color_primaries: int = 2
    color_trc: int = 2
    sample_aspect_ratio: Fraction | None = None
    video_duration: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed."""
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)

    @property
    def fps(self) -> float:
        return float(self.rate) if self.rate else 0.0

    def to_json(self) -> dict:
        return {"path": self.path, "size": list(self.size), "stored_size": [self.width, self.height],
                "rotation": self.rotation, "time_base": str(self.time_base),
                "fps": round(self.fps, 6), "declared_frames": self.frames,
                "duration": round(self.duration, 6), "codec": self.codec, "audio": list(self.audio)}


@dataclasses.dataclass(frozen=True)
class Frame:
    """One decoded frame: ``index`` (0, 1, ... in presentation order), ``pts`` (in the stream's
    time base), ``time`` (seconds) and ``image`` ((H, W, 3) uint8 RGB, upright)."""

    index: int
    pts: int
    time: float
    image: np.ndarray


def _ffmpeg_message(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split())


def _open(path: str):
    try:
        return av.open(path, "r", metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"--input={path} is not a video file FFmpeg can read "
                        f"({_ffmpeg_message(e)})") from None


def _stream_duration(stream) -> float:
    """Seconds of a stream from its own duration, or Matroska's ``DURATION`` tag; 0.0 if neither."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION", "")
    try:
        h, m, sec = tag.split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return 0.0


def _rotation(frame) -> int:
    """The display rotation of a decoded frame, rounded to a multiple of 90 degrees."""
    try:
        degrees = float(frame.rotation or 0)
    except (AttributeError, ValueError):
        degrees = 0.0
    return round(degrees / 90.0) * 90 % 360


class VideoReader:
    """A video file, probed at construction; :meth:`frames` streams it.

    Raises a one-line UserError when the path is missing or a folder, is not a
    container FFmpeg knows, has no video stream, or its first frame cannot be
    decoded; frames over ``max_pixels`` are refused before anything is decoded
    past the first.
    """

    def __init__(self, path: str, max_pixels: int | None = None):
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.exists(path):
            raise UserError(f"--input does not exist: {path}")
        if os.path.isdir(path):
            raise UserError(f"--mode=video reads one video file, but --input={path} is a folder")
        self.path = path
        limit = MAX_FRAME_PIXELS if max_pixels is None else max_pixels
        with _open(path) as container:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
                raise UserError(f"--input={path} has no video stream (streams: {kinds})")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            width, height = int(ctx.width or 0), int(ctx.height or 0)
            if width * height > limit:
                raise UserError(f"--input={path}: frames of {width}x{height} are larger than "
                                f"{limit} pixels, which video mode refuses")
            first = None
            try:
                for frame in container.decode(stream):
                    first = frame
                    break
            except av.error.FFmpegError as e:
                raise UserError(f"--input={path} is corrupt: its first video frame cannot be "
                                f"decoded ({_ffmpeg_message(e)})") from None
            if first is None:
                raise UserError(f"--input={path} has a video stream but no frame could be "
                                "decoded (empty, corrupt or truncated file)")
            width, height = first.width, first.height
            if width * height > limit:
                raise UserError(f"--input={path}: frames of {width}x{height} are larger than "
                                f"{limit} pixels, which video mode refuses")
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            duration = _stream_duration(stream)
            if not duration and container.duration:
                duration = container.duration / av.time_base
            self.info = VideoInfo(
                path=path, width=width, height=height, rotation=_rotation(first),
                time_base=stream.time_base or Fraction(1, 90000),
                rate=Fraction(rate) if rate else None, frames=int(stream.frames or 0),
                duration=duration, video_duration=_stream_duration(stream), codec=ctx.name,
                audio=tuple(s.codec_context.name for s in container.streams.audio),
                colorspace=int(first.colorspace or 0), color_range=int(first.color_range or 0),
                color_primaries=int(getattr(first, "color_primaries", 2) or 2),
                color_trc=int(getattr(first, "color_trc", 2) or 2),
                sample_aspect_ratio=stream.sample_aspect_ratio)

    def frames(self, on_audio: Callable | None = None) -> Iterator[Frame]:
        """The frames in presentation order; audio packets go to ``on_audio(packet, k)`` (``k``:
        the audio stream's position among the input's audio streams) as they are demuxed.

        A decoding error, or fewer frames than the container declares, is a
        UserError saying where the file broke off.
        """
        info = self.info
        turns = info.rotation // 90  # np.rot90 turns counter-clockwise, as the rotation counts
        index = 0
        first_pts = last_pts = None
        tb = info.time_base
        step = (1 / (info.rate * tb)) if info.rate else 1
        with _open(self.path) as container:
            video = container.streams.video[0]
            video.thread_type = "AUTO"
            audio = list(container.streams.audio) if on_audio is not None else []
            position = {s.index: i for i, s in enumerate(audio)}
            try:
                for packet in container.demux([video] + audio):
                    if packet.stream.type == "audio":
                        if packet.dts is not None and packet.size:
                            on_audio(packet, position[packet.stream.index])
                        continue
                    for frame in packet.decode():
                        pts = frame.pts
                        if pts is None:
                            pts = 0 if last_pts is None else last_pts + max(1, round(step))
                        elif last_pts is not None and pts <= last_pts:
                            pts = last_pts + 1  # broken timestamps: keep them increasing
                        last_pts = pts
                        first_pts = pts if first_pts is None else first_pts
                        image = frame.to_ndarray(format="rgb24",
                                                 src_color_range=frame.color_range or None)
                        if info.rotation:
                            image = np.ascontiguousarray(np.rot90(image, turns))
                        yield Frame(index, int(pts), float(pts * tb), image)
                        index += 1
            except av.error.FFmpegError as e:
                raise UserError(f"--input={self.path} is corrupt or truncated: decoding stopped "
                                f"after {index} frame(s) ({_ffmpeg_message(e)})") from None
        if info.frames and index < info.frames:
            raise UserError(f"--input={self.path} is truncated: {index} of the {info.frames} "
                            "frames its header declares could be decoded")
        if not info.frames and info.video_duration and last_pts is not None:
            covered = float((last_pts - first_pts) * tb) + (1 / info.fps if info.fps else 0.0)
            slack = max(0.5, 3 / info.fps if info.fps else 0.5)
            if covered < info.video_duration - slack:
                raise UserError(f"--input={self.path} is corrupt or truncated: its {index} "
                                f"decodable frames cover {covered:.2f} s of the "
                                f"{info.video_duration:.2f} s its header declares")

    def audio_streams(self):
        """A context-managed container whose audio streams serve as templates for the writer."""
        return _open(self.path)


def encoder_settings(path: str, codec: str | None = None, crf: int | None = None,
                     preset: str | None = None, lossless: bool = False) -> dict:
    """``{'codec', 'options', 'formats'}`` for an output file; UserError for a bad choice.

    ``formats``: pixel formats to use in order of preference (the first the
    frame size allows is taken: 4:2:0 needs even sides).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in CONTAINERS:
        raise UserError(f"--output={path}: the video mode writes "
                        f"{', '.join(sorted(CONTAINERS))} files, not {ext or 'no extension'!r}")
    if lossless and (codec or crf is not None):
        raise UserError("--lossless chooses the codec and quality itself; drop --codec / --crf")
    if lossless:
        codec = "libvpx-vp9" if ext == ".webm" else "libx264rgb"
    codec = codec or CONTAINERS[ext]
    try:
        found = av.Codec(codec, "w")
    except (av.error.FFmpegError, ValueError, KeyError):
        found = None
    if found is None or found.type != "video":
        raise UserError(f"--codec={codec} is not a video encoder of this PyAV build "
                        "(e.g. libx264, libx265, libvpx-vp9, ffv1)")
    options: dict[str, str] = {}
    if lossless:
        options = {"lossless": "1"} if codec == "libvpx-vp9" else {"qp": "0"}
    elif crf is not None or codec in DEFAULT_CRF:
        if codec not in DEFAULT_CRF:
            raise UserError(f"--crf applies to {', '.join(DEFAULT_CRF)}, not --codec={codec}")
        value = DEFAULT_CRF[codec] if crf is None else crf
        high = 63 if codec == "libvpx-vp9" else 51
        if not 0 <= value <= high:
            raise UserError(f"--crf must be within 0..{high} for {codec}, got {value}")
        options["crf"] = str(value)
        if codec == "libvpx-vp9":
            options["b"] = "0"  # constant quality
    if codec == "libvpx-vp9":
        options.setdefault("deadline", "good")
        options.setdefault("cpu-used", "4")
        options.setdefault("row-mt", "1")
    if preset is not None and codec not in DEFAULT_PRESET and codec != "libx264rgb":
        raise UserError(f"--codec_preset applies to libx264 and libx265, not {codec}")
    if codec in DEFAULT_PRESET or codec == "libx264rgb":
        options["preset"] = preset or DEFAULT_PRESET.get(codec, "fast")
    supported = [f.name for f in (found.video_formats or [])]
    wanted = ["rgb24"] if codec == "libx264rgb" else ["yuv420p", "yuv444p", "gbrp", "bgr0"]
    formats = [f for f in wanted if not supported or f in supported]
    if not formats:
        formats = supported[:1]
    return {"codec": codec, "options": options, "formats": formats}


def _pick_format(formats: list[str], width: int, height: int) -> str:
    for f in formats:
        if f in ("yuv420p",) and (width % 2 or height % 2):
            continue
        return f
    return formats[-1]


def temp_path(path: str, tag: str = "") -> str:
    """A hidden temporary name beside ``path`` with the same extension (so FFmpeg picks the same
    container): ``dir/.<stem><tag>.tmp<pid><ext>``."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}{tag}.tmp{os.getpid()}{ext}")


class VideoWriter:
    """Encodes upright RGB frames of ``size`` into a temporary file; :meth:`commit` renames it.

    Args:
      path: the output file (its extension picks the container).
      info: the input's :class:`VideoInfo` (time base, rate, rotation, colour tags).
      size: (width, height) of the upright frames that will be written.
      encoder: :func:`encoder_settings`.
      audio_templates: input audio streams to copy (their packets are passed
        to :meth:`mux_audio` in demux order).
    """

    def __init__(self, path: str, info: VideoInfo, size: tuple[int, int], encoder: dict,
                 audio_templates=()):
        self.path = path
        self.tmp = temp_path(path)
        self.info = info
        self.size = size
        self.frames = 0
        self._closed = False
        w, h = size
        self._turns = info.rotation // 90
        stored = (h, w) if self._turns % 2 else (w, h)
        try:
            self.container = av.open(self.tmp, "w")
        except (av.error.FFmpegError, OSError) as e:
            raise UserError(f"cannot write --output={path}: {_ffmpeg_message(e)}") from None
        try:
            stream = self.container.add_stream(encoder["codec"], rate=info.rate or Fraction(25),
                                               options=dict(encoder["options"]))
            stream.width, stream.height = stored
            stream.pix_fmt = _pick_format(encoder["formats"], *stored)
            stream.codec_context.time_base = info.time_base
            stream.time_base = info.time_base
            stream.thread_type = "AUTO"
            ctx = stream.codec_context
            if stream.pix_fmt.startswith("yuv"):
                for name in ("colorspace", "color_range", "color_primaries", "color_trc"):
                    value = getattr(info, name)
                    if value:
                        setattr(ctx, name, value)
            if info.sample_aspect_ratio:
                ctx.sample_aspect_ratio = info.sample_aspect_ratio
            if info.rotation:
                stream.set_display_rotation(info.rotation)
            self.stream = stream
            self.audio = [self.container.add_stream_from_template(t) for t in audio_templates]
        except (av.error.FFmpegError, ValueError, TypeError) as e:
            self.abort()
            raise UserError(f"cannot write --output={path} with codec {encoder['codec']}: "
                            f"{_ffmpeg_message(e)}") from None

    def _mux(self, packets) -> None:
        try:
            self.container.mux(packets)
        except (av.error.FFmpegError, OSError) as e:
            raise UserError(f"cannot write --output={self.path}: {_ffmpeg_message(e)} "
                            "(an audio codec the container cannot hold? try a .mkv output)"
                            ) from None

    def write(self, image: np.ndarray, pts: int) -> None:
        """One upright RGB frame of :attr:`size` at ``pts`` (input time base)."""
        if image.shape[:2] != (self.size[1], self.size[0]):
            raise UserError(f"frame of {image.shape[1]}x{image.shape[0]} written to a "
                            f"{self.size[0]}x{self.size[1]} video")
        if self._turns:
            image = np.ascontiguousarray(np.rot90(image, -self._turns))
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        if self.stream.pix_fmt != "rgb24":
            info = self.info
            yuv = self.stream.pix_fmt.startswith("yuv")
            frame = frame.reformat(format=self.stream.pix_fmt,
                                   dst_colorspace=(info.colorspace or None) if yuv else None,
                                   dst_color_range=(info.color_range or None) if yuv else None)
        frame.pts = int(pts)
        frame.time_base = self.info.time_base
        self._mux(self.stream.encode(frame))
        self.frames += 1

    def mux_audio(self, packet, k: int) -> None:
        """Copies one demuxed packet of the input's ``k``-th audio stream."""
        packet.stream = self.audio[k]
        self._mux(packet)

    def close(self) -> None:
        """Flushes the encoder and finishes the temporary file."""
        if self._closed:
            return
        self._mux(self.stream.encode(None))
        try:
            self.container.close()
        except (av.error.FFmpegError, OSError) as e:
            raise UserError(f"cannot write --output={self.path}: {_ffmpeg_message(e)}") from None
        self._closed = True

    def commit(self) -> str:
        """Closes and renames the temporary file to the output name; returns the output path."""
        self.close()
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise UserError(f"cannot write --output={self.path}: {e.strerror or e}") from None
        return self.path

    def abort(self) -> None:
        """Drops the temporary file (nothing appears under the output name)."""
        if not self._closed:
            try:
                self.container.close()
            except Exception:  # noqa: BLE001, S110 - closing a half-written file: removing it is what matters
                pass
            self._closed = True
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
