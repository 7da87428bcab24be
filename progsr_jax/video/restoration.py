"""The streaming restoration loop of ``infer --mode=video``: frames in, restored frames out.

    restorer = VideoRestorer(sr, detector, VideoOptions(upscale=2), frame_size=(640, 360))
    for frame in reader.frames():                # progsr_jax.video.streams.Frame
        for out in restorer.push(frame):         # OutputFrame: .image, .jobs (faces)
            writer.write(out.image, out.frame.pts)
    for out in restorer.finish(): ...

Each frame goes through four stages, each a fixed number of frames behind
the previous one, so a clip of any length is processed with a bounded buffer:

1. **Detect and track** (on arrival): scene-cut test
   (:class:`~progsr_jax.video.tracking.SceneCuts`), MTCNN on every
   ``detect_every``-th frame and on the first frame of each shot, faces
   linked into tracks (:class:`~progsr_jax.video.tracking.Tracker`).
2. **Align** (``align_lag`` frames later, once the detections the smoother
   needs have arrived): per track covering the frame, its smoothed transform
   (:func:`~progsr_jax.video.smoothing.smooth_transform`), the span of its
   aligned crop, whether and how strongly it is restored
   (:class:`~progsr_jax.video.smoothing.Schedule`), and for a restored face
   the 16x16 input (warp onto the aligned frame, the training chain).
3. **Super-resolve**: the 16x16 faces of all frames waiting go through
   :func:`progsr_jax.batching.super_resolve` (the one batched path) in calls
   of exactly ``batch_size`` faces, padded only when the stream ends or a
   frame cannot wait; one compiled shape for the whole clip.
4. **Combine and paste** (``combine_window + batch_size`` frames behind
   stage 2): each restored face combined with its track's neighbours
   (:func:`~progsr_jax.video.smoothing.combine`) and blended into the frame
   upscaled ``upscale`` times (PIL bicubic) by
   :func:`progsr_jax.photo.paste.paste_back` with the feathered mask times the
   crossfade weight.

With ``smooth=False`` (``--nosmooth``) every frame is what ``--mode=photo``
makes of it: the faces detected in that frame (with ``detect_every`` > 1:
in the last frame detected), aligned by their own landmarks, restored when
their crop spans at most ``max_face`` pixels, pasted in the detector's
order, nothing taken from other frames.  Tracks are still formed, for
``tracks.json``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from progsr_jax import batching
from progsr_jax.errors import UserError
from progsr_jax.photo import align, paste
from progsr_jax.photo.detection import Face
from progsr_jax.video import smoothing
from progsr_jax.video.streams import Frame
from progsr_jax.video.tracking import SCENE_CUT, Observation, SceneCuts, Track, Tracker

#: Track end reasons after which the face is still in view: no fade-out there.
END_OF_SHOT = ("scene cut", "end of the video")


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """Settings of :class:`VideoRestorer` (``infer --mode=video`` flags in brackets).

    ``smooth`` (``--nosmooth``): smoothed alignment, combination over frames,
    hysteresis and crossfades; off: frame-by-frame photo behaviour.
    ``upscale`` (``--upscale``): output size / input size.
    ``max_face`` (``--max_face``): faces whose aligned crop spans more
    pixels are left as they are (0: every face is restored).
    ``detect_every`` (``--detect_every``): run the detector on every k-th frame.
    ``max_gap`` (``--max_gap``): missed detections a track bridges.
    ``min_track``: detections a track needs before it is restored (smooth only).
    ``smooth_window``: half-width, in frames, of the transform smoother.
    ``combine_window``: half-width, in frames, of the combination of results.
    ``motion_threshold``: gray levels of blurred difference that stop a
    neighbour from counting (the motion gate).
    ``hysteresis``: relative band of the ``max_face`` rule.
    ``crossfade``: frames over which a face fades in or out.
    ``scene_cut`` (``--scene_cut``): threshold of the cut detector (0: off).
    ``batch_size`` (``--batch_size``): faces per model call.
    """

    smooth: bool = True
    upscale: float = 1.0
    max_face: float = 22.0
    detect_every: int = 1
    max_gap: int = 4
    min_track: int = 2
    smooth_window: int = 6
    combine_window: int = 2
    motion_threshold: float = 12.0
    hysteresis: float = 0.1
    crossfade: int = 6
    scene_cut: float = SCENE_CUT
    batch_size: int = batching.DEFAULT_BATCH

    def check(self) -> None:
        """A one-line UserError for a value out of range."""
        if not (math.isfinite(self.upscale) and self.upscale > 0):
            raise UserError(f"--upscale must be a positive number, got {self.upscale}")
        if not self.max_face >= 0:
            raise UserError(f"--max_face must be >= 0 (0: restore every face), got {self.max_face}")
        for name, low in (("detect_every", 1), ("max_gap", 0), ("min_track", 1),
                          ("smooth_window", 0), ("combine_window", 0), ("crossfade", 1),
                          ("batch_size", 1)):
            if int(getattr(self, name)) < low:
                raise UserError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.motion_threshold < 0 or self.hysteresis < 0 or self.scene_cut < 0:
            raise UserError("motion_threshold, hysteresis and scene_cut must be >= 0")

    @property
    def align_lag(self) -> int:
        """Frames stage 2 waits behind detection: the smoother's reach, and long enough to know
        whether a missed face comes back."""
        if not self.smooth:
            return 0
        return max(self.smooth_window, (self.max_gap + 1) * self.detect_every)

    @property
    def radius(self) -> int:
        return self.combine_window if self.smooth else 0


@dataclasses.dataclass
class Job:
    """One track in one frame: how it is aligned and restored.

    ``observation``: the detection in this frame (None: bridged or not a
    detection frame); ``transform``: the (2, 3) photo -> aligned transform
    used; ``span``: photo pixels across its aligned crop; ``weight``: the
    crossfade weight it is pasted with (0: not restored), ``reason`` why it
    is below 1; ``lr``: the 16x16 input; ``sr``: the model's 128x128 output;
    ``result``: what was pasted (``sr`` combined with the neighbours').
    """

    track: Track
    frame: int
    transform: np.ndarray
    span: float
    observation: Observation | None
    weight: float
    reason: str | None = None
    lr: np.ndarray | None = None
    sr: np.ndarray | None = None
    result: np.ndarray | None = None

    @property
    def restored(self) -> bool:
        return self.weight > 0


@dataclasses.dataclass
class OutputFrame:
    """A finished frame: the input :class:`~progsr_jax.video.streams.Frame`, the restored
    ``image`` (uint8 RGB, upright, ``upscale`` times the input), its :class:`Job` s and the
    tracks whose last frame this is (``completed``)."""

    frame: Frame
    image: np.ndarray
    jobs: list[Job]
    completed: list[Track] = dataclasses.field(default_factory=list)


def observation_transform(obs: Observation) -> np.ndarray | None:
    """The photo -> aligned transform of a detection (None for degenerate landmarks)."""
    try:
        return align.alignment_transform(obs.face.landmarks)
    except UserError:
        return None


class VideoRestorer:
    """Frames in (:meth:`push`), restored frames out, in order; see the module docstring.

    Args:
      sr: a stage-3 super-resolver (:func:`progsr_jax.inference.load`).
      detector: a :class:`progsr_jax.photo.detection.Detector` (or any
        callable image -> list of Face).
      options: :class:`VideoOptions`.
      frame_size: (width, height) of the upright frames.
    """

    def __init__(self, sr, detector, options: VideoOptions, frame_size: tuple[int, int]):
        options.check()
        size = int(getattr(sr, "output_size", paste.SR_SIZE))
        if size != paste.SR_SIZE:
            raise UserError(f"--mode=video needs a stage-3 model ({paste.SR_SIZE}x{paste.SR_SIZE} "
                            f"outputs); this one makes {size}x{size}")
        self.sr, self.detector, self.options = sr, detector, options
        self.frame_size = tuple(frame_size)
        self.tracker = Tracker(options.max_gap, self.frame_size)
        self.cuts = SceneCuts(options.scene_cut)
        self.tracks: dict[int, Track] = {}
        self.schedules: dict[int, smoothing.Schedule] = {}
        self.shot_start: dict[int, int] = {}
        self.transforms: dict[tuple[int, int], np.ndarray] = {}  # (track, frame) -> observed
        self.frames: dict[int, Frame] = {}
        self.jobs: dict[int, list[Job]] = {}
        self.pending: list[Job] = []
        self.completed: list[Track] = []
        self.detections: dict[int, list[tuple[Track, Observation]]] = {}
        self.last_detection: list[tuple[Track, Observation]] = []
        self.detected_frames = 0
        self.faces_found = 0
        self.model_calls = 0
        self.front = -1
        self.align_next = 0
        self.out_next = 0
        self._shot = 0
        self._finished = False

    # -- stage 1 ----------------------------------------------------------------

    def push(self, frame: Frame) -> list[OutputFrame]:
        """Takes the next frame; returns the frames that are now finished (possibly none)."""
        i = frame.index
        if i != self.front + 1:
            raise ValueError(f"frames must come in order: got {i} after {self.front}")
        self.frames[i] = frame
        cut = self.cuts(frame.image) and i > 0
        if cut:
            self.tracker.end_all("scene cut")
            self._shot = i
        if cut or i % self.options.detect_every == 0 or i == 0:
            self._detect(i, frame.image)
        self.front = i
        return self._advance(final=False)

    def _detect(self, i: int, image: np.ndarray) -> None:
        faces: list[Face] = list(self.detector(image))
        self.detected_frames += 1
        self.faces_found += len(faces)
        made = self.tracker.update(i, faces)
        self.tracker.collect_finished()
        kept = []
        for track, obs in made:
            m = observation_transform(obs)
            if m is None:
                continue
            self.transforms[(track.id, i)] = m
            if track.id not in self.tracks:
                self.tracks[track.id] = track
                self.schedules[track.id] = smoothing.Schedule(
                    self.options.max_face, self.options.hysteresis, self.options.crossfade)
                self.shot_start[track.id] = self._shot
            kept.append((track, obs))
        order = {id(f): k for k, f in enumerate(faces)}
        kept.sort(key=lambda p: order[id(p[1].face)])  # the detector's order, as photo mode
        self.detections[i] = kept

    def finish(self) -> list[OutputFrame]:
        """Ends the stream: the remaining frames, finished."""
        if not self._finished:
            self.tracker.end_all("end of the video")
            self._finished = True
        out = self._advance(final=True)
        rest = [self.tracks[tid] for tid in sorted(self.tracks)]
        self.tracks.clear()
        if out:
            out[-1].completed.extend(rest)
        else:
            self.completed.extend(rest)
        return out

    # -- stage 2 ----------------------------------------------------------------

    def _advance(self, final: bool) -> list[OutputFrame]:
        opts = self.options
        while self.align_next <= self.front and (final or self.front >= self.align_next + opts.align_lag):
            self._align(self.align_next)
            self.align_next += 1
        self._super_resolve(full_only=not final)
        out = []
        hold = opts.radius + opts.batch_size
        while self.out_next < self.align_next and (final or self.align_next > self.out_next + hold):
            last_needed = min(self.out_next + opts.radius, self.align_next - 1)
            if any(job.frame <= last_needed for job in self.pending):
                self._super_resolve(full_only=False)
            out.append(self._output(self.out_next))
            self.out_next += 1
        return out

    def _observed(self, track: Track) -> tuple[list[int], list[np.ndarray]]:
        frames = sorted(f for f in track.observations if (track.id, f) in self.transforms)
        return frames, [self.transforms[(track.id, f)] for f in frames]

    def _smoothed(self, track: Track, a: int) -> np.ndarray:
        frames, transforms = self._observed(track)
        window = float(self.options.smooth_window)
        before = [f for f in frames if f <= a]
        after = [f for f in frames if f >= a]
        reach = max(a - before[-1] if before else 0, after[0] - a if after else 0)
        window = max(window, float(reach))
        near = [(f, m) for f, m in zip(frames, transforms) if abs(f - a) <= window]
        if window == 0 or len(near) == 1:
            return near[0][1]
        return smoothing.smooth_transform([f for f, _ in near], [m for _, m in near], a, window)

    def _align(self, a: int) -> None:
        opts = self.options
        frame = self.frames[a]
        jobs: list[Job] = []
        if opts.smooth:
            for tid in sorted(self.tracks):
                track = self.tracks[tid]
                if not track.covers(a) or not any((tid, f) in self.transforms for f in track.observations):
                    continue
                m = self._smoothed(track, a)
                obs = track.observations.get(a)
                span = align.CROP_SIZE / align.similarity_params(m)["scale"]
                sched = self.schedules[tid]
                size_ok = sched.size_ok(span)
                long_enough = track.count >= opts.min_track
                ramp = 1.0
                fading_in = track.first > self.shot_start[tid]
                if fading_in:
                    ramp = min(ramp, (a - track.first + 1) / opts.crossfade)
                fading_out = track.ended and track.end_reason not in END_OF_SHOT
                if fading_out:
                    ramp = min(ramp, (track.last - a + 1) / opts.crossfade)
                weight = sched.step(size_ok and long_enough, ramp)
                reason = None
                if not size_ok:
                    reason = (f"aligned crop spans {span:.1f} px, above max_face {opts.max_face:g} px"
                              f" (hysteresis {opts.hysteresis:g})")
                elif not long_enough:
                    reason = f"track has {track.count} detection(s), fewer than {opts.min_track}"
                elif weight < 1:
                    reason = ("fading in" if fading_in and a - track.first + 1 < opts.crossfade
                              else "fading out" if fading_out and track.last - a + 1 < opts.crossfade
                              else "crossfade after a max_face switch")
                jobs.append(Job(track, a, m, span, obs, weight, reason))
        else:
            held = self.detections.get(a)
            if held is None:
                held = self.last_detection
            else:
                self.last_detection = held
            for track, obs in held:
                m = self.transforms[(track.id, obs.frame)]
                span = align.CROP_SIZE / align.similarity_params(m)["scale"]
                ok = not opts.max_face or span <= opts.max_face
                reason = None if ok else (f"aligned crop spans {span:.1f} px > max_face "
                                          f"{opts.max_face:g} px")
                jobs.append(Job(track, a, m, span, obs if obs.frame == a else None,
                                1.0 if ok else 0.0, reason))
        if any(job.restored for job in jobs):
            img = Image.fromarray(frame.image)
            for job in jobs:
                if job.restored:
                    job.lr = align.model_inputs(align.warp_to_aligned(img, job.transform))[16]
                    self.pending.append(job)
        self.jobs[a] = jobs
        self.detections.pop(a - opts.detect_every - opts.align_lag - 1, None)

    # -- stage 3 ----------------------------------------------------------------

    def _super_resolve(self, full_only: bool) -> None:
        bs = self.options.batch_size
        n = len(self.pending) // bs * bs if full_only else len(self.pending)
        if n == 0:
            return
        todo, self.pending = self.pending[:n], self.pending[n:]
        out = batching.super_resolve(self.sr, np.stack([job.lr for job in todo]), bs, min_batch=bs)
        self.model_calls += -(-n // bs)
        for job, face in zip(todo, out):
            job.sr = face

    # -- stage 4 ----------------------------------------------------------------

    def _output(self, o: int) -> OutputFrame:
        opts = self.options
        frame = self.frames.pop(o)
        jobs = self.jobs[o]
        results, transforms, weights = [], [], []
        for job in jobs:
            if not job.restored:
                continue
            neighbours = []
            for f in range(o - opts.radius, o + opts.radius + 1):
                if f == o:
                    continue
                for other in self.jobs.get(f, ()):
                    if other.track is job.track and other.sr is not None:
                        neighbours.append((f - o, other.sr))
            job.result = smoothing.combine(job.sr, neighbours, opts.radius, opts.motion_threshold)
            results.append(job.result)
            transforms.append(job.transform)
            weights.append(job.weight)
        canvas, _ = paste.paste_back(Image.fromarray(frame.image), results, transforms,
                                     upscale=opts.upscale, weights=weights)
        completed = self._forget(o)
        return OutputFrame(frame, np.asarray(canvas), jobs, completed)

    def _forget(self, o: int) -> list[Track]:
        """Drops what no later frame needs once frame ``o`` is out; returns the tracks that ended
        at or before ``o``."""
        opts = self.options
        self.jobs.pop(o - opts.radius, None)
        keep_from = o + 1 - opts.smooth_window - (opts.max_gap + 1) * opts.detect_every - 1
        completed = []
        for tid in list(self.tracks):
            track = self.tracks[tid]
            if track.ended and track.last <= o:
                completed.append(track)
                del self.tracks[tid], self.schedules[tid], self.shot_start[tid]
                for f in list(track.observations):
                    self.transforms.pop((tid, f), None)
                continue
            before = set(track.observations)
            track.forget(keep_from)
            for f in before - set(track.observations):
                self.transforms.pop((tid, f), None)
        return completed

    def collect_completed(self) -> list[Track]:
        """Tracks that ended without a frame left to carry them (each returned once)."""
        done, self.completed = self.completed, []
        return done
