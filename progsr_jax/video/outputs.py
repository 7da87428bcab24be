"""The files of a video run: the restored video, ``tracks.json`` and per-track clips.

:func:`restore_video` is ``infer --mode=video``: it checks everything it can
before creating anything (the input is a readable video, the output's
container, codec and frame size, the model, the detector's weights), then
streams the input through :class:`~progsr_jax.video.restoration.VideoRestorer`
into temporary files beside the outputs, and renames them only when the
whole clip is done.  An error or an interrupt (Ctrl-C included) deletes the
temporary files: nothing ever appears half-written under an output name.

``tracks.json`` (default ``<output stem>.tracks.json``)::

    {"video": {"path", "size", "stored_size", "rotation", "fps", ...},
     "output": {"path", "size", "upscale", "codec", "options"},
     "settings": {"smooth": true, "max_face": 22, ...},
     "tracks": [
      {"id": 0, "first_frame": 0, "last_frame": 95, "first_time": 0.0, "last_time": 3.8,
       "frames": 96, "detections": 91, "restored_frames": 96, "end": "end of the video",
       "clip": "out_tracks/track0000.mp4",
       "per_frame": [
        {"frame": 0, "time": 0.0, "detected": true, "followed": false, "box": [x0, y0, x1, y1],
         "landmarks": [[x, y] x 5], "score": 0.99, "transform": [[a, b, c], [d, e, f]],
         "crop_box": [x0, y0, x1, y1], "span": 17.9, "restored": true, "weight": 1.0}, ...]},
      ...],
     "summary": {"frames": 96, "tracks": 2, "faces_detected": 181, "restored_face_frames": 190,
                 "seconds": 41.2, "frames_per_second": 2.33}}

Per frame of a track: ``detected`` (a detection in this frame; ``box``,
``landmarks`` and ``score`` are the detector's then, null otherwise),
``followed`` (not detected, but followed into this frame from the previous
one; neither: a bridged miss), ``transform`` (video pixels ->
178x218 aligned-CelebA frame, the one used: smoothed unless ``--nosmooth``),
``crop_box`` (the bounding box of the aligned crop's square in video pixels),
``span`` (video pixels across that square), ``restored`` and ``weight`` (the
crossfade weight the result was blended with) and, when the weight is below
1, ``reason``.  Coordinates are in pixels of the upright input frame (pixel
centres at integers).  A track's entry is written when it ends, so the file
grows as the clip is processed and memory does not.

``--track_clips`` adds ``<output stem>_tracks/track<id>.<ext>``: per track,
the 128x128 restored faces (what was pasted, before the crossfade) at the
timestamps of the frames where it was restored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from progsr_jax import progress as progress_lib
from progsr_jax.data import writing
from progsr_jax.errors import UserError
from progsr_jax.photo import align, paste
from progsr_jax.video import streams
from progsr_jax.video.restoration import Job, OutputFrame, VideoOptions, VideoRestorer
from progsr_jax.video.tracking import Track


def _round(values, digits: int = 3) -> list:
    return [round(float(v), digits) for v in np.asarray(values, np.float64).ravel()]


def crop_box(transform) -> list[float]:
    """Bounding box, in video pixels, of the aligned crop's 178x178 square under ``transform``."""
    top, left, side = align.CROP_TOP, align.CROP_LEFT, align.CROP_SIZE
    corners = [[left - 0.5, top - 0.5], [left + side - 0.5, top - 0.5],
               [left - 0.5, top + side - 0.5], [left + side - 0.5, top + side - 0.5]]
    pts = align.apply(align.invert(transform), corners)
    return _round([*pts.min(axis=0), *pts.max(axis=0)], 2)


def job_entry(job: Job, time_s: float) -> dict:
    """One frame of a track in ``tracks.json``."""
    obs = job.observation
    entry = {"frame": job.frame, "time": round(time_s, 6), "detected": obs is not None,
             "followed": job.followed,
             "box": _round(obs.box, 2) if obs is not None else None,
             "landmarks": [_round(p, 2) for p in obs.face.landmarks] if obs is not None else None,
             "score": round(float(obs.face.score), 5) if obs is not None else None,
             "transform": [[float(v) for v in row] for row in job.transform],
             "crop_box": crop_box(job.transform), "span": round(float(job.span), 2),
             "restored": job.restored, "weight": round(float(job.weight), 4)}
    if job.reason:
        entry["reason"] = job.reason
    return entry


class TracksJson:
    """``tracks.json`` written as tracks end, into a temporary file renamed by :meth:`commit`."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.tmp = streams.temp_path(path)
        try:
            self.file = open(self.tmp, "w")  # noqa: SIM115 - open while the tracks stream in
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        self.count = 0
        self.file.write("{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v)},\n"
                                        for k, v in header.items()) + ' "tracks": [')

    def add(self, record: dict, frames: list[dict]) -> None:
        head = json.dumps(record)[:-1]
        body = ",\n".join("   " + json.dumps(f) for f in frames)
        self.file.write(("," if self.count else "") + f"\n  {head}, \"per_frame\": [\n{body}\n  ]}}")
        self.count += 1

    def commit(self, summary: dict) -> None:
        self.file.write(("\n " if self.count else "") + f'],\n "summary": {json.dumps(summary)}\n}}\n')
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass


class TrackClips:
    """Per-track clips of the restored 128x128 faces (temporary names until :meth:`commit`)."""

    def __init__(self, folder: str, ext: str, info: streams.VideoInfo, encoder: dict):
        self.folder, self.ext, self.encoder = folder, ext, encoder
        self.info = dataclasses.replace(info, rotation=0, sample_aspect_ratio=None)
        self.created_folder = False
        self.open: dict[int, streams.VideoWriter] = {}
        self.done: list[streams.VideoWriter] = []
        self.names: dict[int, str] = {}

    def path(self, track_id: int) -> str:
        return os.path.join(self.folder, f"track{track_id:04d}{self.ext}")

    def write(self, track_id: int, face: np.ndarray, pts: int) -> None:
        if track_id not in self.open:
            if not os.path.isdir(self.folder):
                os.makedirs(self.folder, exist_ok=True)
                self.created_folder = True
            self.open[track_id] = streams.VideoWriter(self.path(track_id), self.info,
                                                      (paste.SR_SIZE, paste.SR_SIZE), self.encoder)
            self.names[track_id] = self.path(track_id)
        self.open[track_id].write(np.clip(np.rint(face), 0, 255).astype(np.uint8), pts)

    def close(self, track_id: int) -> None:
        writer = self.open.pop(track_id, None)
        if writer is not None:
            writer.close()
            self.done.append(writer)

    def commit(self) -> None:
        for tid in list(self.open):
            self.close(tid)
        for writer in self.done:
            writer.commit()

    def abort(self) -> None:
        for writer in list(self.open.values()) + self.done:
            writer.abort()
        if self.created_folder:
            try:
                os.rmdir(self.folder)
            except OSError:
                pass


def plan(input_path: str, output: str, options: VideoOptions, *, tracks_json: str | None = None,
         track_clips: bool = False, codec: str | None = None, crf: int | None = None,
         preset: str | None = None, lossless: bool = False,
         inputs: Sequence[writing.Input] = ()) -> dict:
    """Every check that needs no model: ``{'reader', 'output', 'size', 'encoder', 'tracks_json',
    'clips'}``; one-line UserErrors, nothing created."""
    options.check()
    input_path, output = writing.input_and_output(
        input_path, output, output_kind="FILE (a video: .mp4, .mkv, .mov, .m4v or .webm)",
        input_kind="FILE (a video)")
    encoder = streams.encoder_settings(output, codec, crf, preset, lossless)
    reader = streams.VideoReader(input_path)
    if os.path.isdir(output):
        raise UserError(f"--output={output} is a folder; --mode=video writes a video file")
    protected = [writing.Input("--input", reader.path, tree=False), *inputs]
    writing.check_not_input(output, protected, is_file=True)
    size = paste.output_size(reader.info.size, options.upscale)
    if size[0] * size[1] > streams.MAX_FRAME_PIXELS:
        raise UserError(f"--upscale={options.upscale:g} makes {size[0]}x{size[1]} frames, more "
                        f"than {streams.MAX_FRAME_PIXELS} pixels; choose a smaller --upscale")
    stem = os.path.splitext(output)[0]
    json_path = os.path.abspath(os.path.expanduser(tracks_json)) if tracks_json else \
        stem + ".tracks.json"
    if os.path.isdir(json_path):
        raise UserError(f"--tracks_json={json_path} is a folder")
    if json_path == output:
        raise UserError(f"--tracks_json={json_path} would overwrite the video")
    writing.check_not_input(json_path, protected, flag="--tracks_json", is_file=True)
    clips = stem + "_tracks" if track_clips else None
    if clips and os.path.exists(clips) and not os.path.isdir(clips):
        raise UserError(f"--track_clips writes into {clips}, which is a file")
    if clips:
        writing.check_not_input(clips, protected, flag="--track_clips")
    writing.check_output_file(output)  # the folder can be made and written; nothing is left
    return {"reader": reader, "output": output, "size": size, "encoder": encoder,
            "tracks_json": json_path, "clips": clips}


def restore_video(sr, detector, planned: dict, options: VideoOptions, *, progress: bool = True,
                  log=print) -> dict:
    """Runs a :func:`plan` with a stage-3 model ``sr`` and a face ``detector``; writes the outputs.

    Returns ``{'output', 'tracks_json', 'clips': [paths], 'frames', 'tracks', 'restored',
    'seconds', 'fps'}``; a UserError (nothing written) when no frame had a face.
    """
    reader: streams.VideoReader = planned["reader"]
    info = reader.info
    output, encoder = planned["output"], planned["encoder"]
    restorer = VideoRestorer(sr, detector, options, info.size)
    writing.ensure_parent(output)
    with reader.audio_streams() as templates:
        writer = streams.VideoWriter(output, info, planned["size"], encoder, templates.streams.audio)
    header = {"video": info.to_json(),
              "output": {"path": output, "size": list(planned["size"]), "upscale": options.upscale,
                         "codec": encoder["codec"], "options": encoder["options"]},
              "settings": dataclasses.asdict(options)}
    records = clips = None
    entries: dict[int, list[dict]] = {}
    stats = {"restored": 0, "frames": 0, "tracks": 0, "clips": []}
    clip_names: dict[int, str] = {}

    def emit(out: OutputFrame) -> None:
        writer.write(out.image, out.frame.pts)
        stats["frames"] += 1
        for job in out.jobs:
            entries.setdefault(job.track.id, []).append(job_entry(job, out.frame.time))
            if job.restored:
                stats["restored"] += 1
                if clips is not None:
                    clips.write(job.track.id, job.result, out.frame.pts)
                    clip_names[job.track.id] = clips.path(job.track.id)
        for track in out.completed:
            finish_track(track)

    def finish_track(track: Track) -> None:
        frames = entries.pop(track.id, [])
        if not frames:
            return
        stats["tracks"] += 1
        record = {"id": track.id, "first_frame": frames[0]["frame"], "last_frame": frames[-1]["frame"],
                  "first_time": frames[0]["time"], "last_time": frames[-1]["time"],
                  "frames": len(frames), "detections": track.count,
                  "restored_frames": sum(f["restored"] for f in frames), "end": track.end_reason}
        if clips is not None:
            clips.close(track.id)
            if track.id in clip_names:
                record["clip"] = os.path.relpath(clip_names[track.id],
                                                 os.path.dirname(planned["tracks_json"]))
        records.add(record, frames)

    total = info.frames or round(info.duration * info.fps)
    start = time.perf_counter()
    try:
        records = TracksJson(planned["tracks_json"], header)
        if planned["clips"]:
            clips = TrackClips(planned["clips"], os.path.splitext(output)[1], info, encoder)
        with progress_lib.bar(max(total, 1), "video", unit="frame", disable=not progress) as bar:
            for frame in reader.frames(on_audio=writer.mux_audio):
                for out in restorer.push(frame):
                    emit(out)
                    bar.update(1)
            for out in restorer.finish():
                emit(out)
                bar.update(1)
        for track in restorer.collect_completed():
            finish_track(track)
        if restorer.faces_found == 0:
            raise UserError(f"no face found in any of the {stats['frames']} frame(s) of "
                            f"{reader.path} (--min_face={getattr(detector, 'min_face', '?')}; "
                            "smaller faces are not searched for); nothing written")
        seconds = time.perf_counter() - start
        summary = {"frames": stats["frames"], "tracks": stats["tracks"],
                   "detection_frames": restorer.detected_frames,
                   "faces_detected": restorer.faces_found,
                   "restored_face_frames": stats["restored"], "model_calls": restorer.model_calls,
                   "seconds": round(seconds, 3),
                   "frames_per_second": round(stats["frames"] / max(seconds, 1e-9), 3)}
        writer.commit()
        if clips is not None:
            clips.commit()
        records.commit(summary)
    except BaseException:
        writer.abort()
        if clips is not None:
            clips.abort()
        if records is not None:
            records.abort()
        raise
    log(f"{stats['frames']} frames in {seconds:.1f} s ({summary['frames_per_second']:.2f} "
        f"frames/s): {stats['tracks']} track(s), {restorer.faces_found} detections, "
        f"{stats['restored']} face-frames restored")
    log(f"output: {output} (tracks: {planned['tracks_json']}"
        + (f"; clips in {planned['clips']}" if clips is not None and clip_names else "") + ")")
    return {"output": output, "tracks_json": planned["tracks_json"],
            "clips": sorted(clip_names.values()), "frames": stats["frames"],
            "tracks": stats["tracks"], "restored": stats["restored"], "seconds": seconds,
            "fps": summary["frames_per_second"], "summary": summary}
