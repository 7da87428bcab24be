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
   Every track not detected in a frame is followed into it from the
   previous frame (:func:`~progsr_jax.video.tracking.follow`).
2. **Align** (``align_lag`` frames later, once the measurements the smoother
   needs have arrived): per track covering the frame, its smoothed transform
   (:func:`~progsr_jax.video.smoothing.fuse` of the detections and the
   frame-to-frame motions), the span of its
   aligned crop, whether and how strongly it is restored
   (:class:`~progsr_jax.video.smoothing.Schedule`), and for a restored face
   the 16x16 input (warp onto the aligned frame, the training chain).
3. **Super-resolve**: the 16x16 faces of all frames waiting go through
   :func:`progsr_jax.inference.batching.super_resolve` (the one batched path) in calls
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
order, nothing taken from other frames, no following.  Tracks are still
formed, for ``tracks.json``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from progsr_jax.errors import UserError
from progsr_jax.inference import batching
from progsr_jax.photo import align, paste
from progsr_jax.photo.detection import Face
from progsr_jax.video import smoothing, tracking
from progsr_jax.video.streams import Frame
from progsr_jax.video.tracking import (
    MAX_FOLLOW,
    SCENE_CUT,
    Observation,
    SceneCuts,
    Track,
    Tracker,
)

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
    ``max_gap`` (``--max_gap``): detections a track bridges neither detected nor followed.
    ``follow``: follow faces between detections (smooth only);
    ``max_follow``: frames a track may be followed without a detection.
    ``min_track``: detections a track needs before it is restored (smooth only).
    ``smooth_window``: half-width, in frames, of the transform smoother;
    ``motion_weight``, ``continuity``: its weights of a frame-to-frame
    motion and of the constant-velocity prior, against 1 for a detection.
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
    follow: bool = True
    max_follow: int = MAX_FOLLOW
    min_track: int = 2
    smooth_window: int = 8
    motion_weight: float = 100.0
    continuity: float = 100.0
    combine_window: int = 2
    motion_threshold: float = 20.0
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
                          ("batch_size", 1), ("max_follow", 0)):
            if int(getattr(self, name)) < low:
                raise UserError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if min(self.motion_threshold, self.hysteresis, self.scene_cut, self.motion_weight,
               self.continuity) < 0:
            raise UserError("motion_threshold, hysteresis, scene_cut, motion_weight and "
                            "continuity must be >= 0")

    @property
    def align_lag(self) -> int:
        """Frames stage 2 waits behind detection: the smoother's reach, and long enough to know
        whether a missed face comes back."""
        if not self.smooth:
            return 0
        return max(self.smooth_window, (self.max_gap + 1) * self.detect_every + self.crossfade)

    @property
    def memory(self) -> int:
        """Frames back that the smoother may reach for a detection."""
        return self.smooth_window + max((self.max_gap + 1) * self.detect_every,
                                        self.max_follow if self.follow else 0) + 1

    @property
    def radius(self) -> int:
        return self.combine_window if self.smooth else 0


@dataclasses.dataclass
class Job:
    """One track in one frame: how it is aligned and restored.

    ``observation``: the detection in this frame (None: followed, bridged or
    not a detection frame); ``followed``: the face was followed into this
    frame; ``transform``: the (2, 3) photo -> aligned transform
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
    followed: bool = False
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
        self.tracker = Tracker(options.max_gap, self.frame_size, options.max_follow)
        self.cuts = SceneCuts(options.scene_cut)
        self.tracks: dict[int, Track] = {}
        self.schedules: dict[int, smoothing.Schedule] = {}
        self.shot_start: dict[int, int] = {}
        self.transforms: dict[tuple[int, int], np.ndarray] = {}  # (track, frame) -> observed
        self.motions: dict[tuple[int, int], np.ndarray] = {}  # (track, frame) -> params change
        self.front: dict[int, tuple[int, np.ndarray]] = {}  # track -> (frame, latest transform)
        self.looks: dict[int, tuple[np.ndarray, int]] = {}  # track -> (sum of crops, count)
        self._prev_grey: np.ndarray | None = None
        self.frames: dict[int, Frame] = {}
        self.jobs: dict[int, list[Job]] = {}
        self.pending: list[Job] = []
        self.completed: list[Track] = []
        self.detections: dict[int, list[tuple[Track, Observation]]] = {}
        self.last_detection: list[tuple[Track, Observation]] = []
        self.detected_frames = 0
        self.faces_found = 0
        self.model_calls = 0
        self.frame_front = -1
        self.align_next = 0
        self.out_next = 0
        self._shot = 0
        self._finished = False

    # -- stage 1 ----------------------------------------------------------------

    def push(self, frame: Frame) -> list[OutputFrame]:
        """Takes the next frame; returns the frames that are now finished (possibly none)."""
        i = frame.index
        if i != self.frame_front + 1:
            raise ValueError(f"frames must come in order: got {i} after {self.frame_front}")
        self.frames[i] = frame
        cut = self.cuts(frame.image) and i > 0
        if cut:
            self.tracker.end_all("scene cut")
            self._shot = i
        opts = self.options
        grey = tracking.grey(frame.image) if opts.smooth and opts.follow else None
        moved = self._follow(i, grey) if grey is not None and not cut else {}
        detected = set()
        if cut or i % opts.detect_every == 0 or i == 0:
            detected = self._detect(i, frame.image, grey)
        for tid, m in moved.items():
            if tid not in detected:
                self.front[tid] = (i, m)
        self._prev_grey = grey
        self.front = {tid: v for tid, v in self.front.items() if v[0] == i}
        self.frame_front = i
        return self._advance(final=False)

    def _follow(self, i: int, grey: np.ndarray) -> dict[int, np.ndarray]:
        """Follows every active track from frame i - 1 into frame i; returns the new transforms
        (and records the motions and the tracks' boxes)."""
        moved, boxes = {}, {}
        if self._prev_grey is None:
            return moved
        for track in self.tracker.active:
            last = self.front.get(track.id)
            if last is None or last[0] != i - 1:
                continue
            look = self.looks.get(track.id)
            guess = last[1]
            step = self.motions.get((track.id, i - 1))
            if step is not None:  # moving on at the last step's pace
                guess = smoothing.from_params(smoothing.to_params(last[1]) + step)
            m = tracking.follow(self._prev_grey, grey, last[1],
                                None if look is None else look[0] / look[1], guess)
            if m is None:
                continue
            d = smoothing.to_params(m) - smoothing.to_params(last[1])
            d[3] = smoothing.wrap(d[3])
            self.motions[(track.id, i)] = d
            moved[track.id] = m
            # the face box carried along: previous frame -> aligned frame -> this frame
            x0, y0, x1, y1 = track.box
            corners = align.apply(align.compose(align.invert(m), last[1]),
                                  [[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
            boxes[track.id] = np.concatenate([corners.min(0), corners.max(0)])
        self.tracker.follow(i, boxes)
        return moved

    def _detect(self, i: int, image: np.ndarray, grey: np.ndarray | None) -> set[int]:
        """Runs the detector on frame i and links its faces; returns the tracks detected."""
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
            self.front[track.id] = (i, m)
            if grey is not None:
                crop = tracking.face_crop(grey, m)
                total, n = self.looks.get(track.id, (0.0, 0))
                self.looks[track.id] = (total + crop, n + 1)
            if track.id not in self.tracks:
                self.tracks[track.id] = track
                self.schedules[track.id] = smoothing.Schedule(
                    self.options.max_face, self.options.hysteresis, self.options.crossfade)
                self.shot_start[track.id] = self._shot
            kept.append((track, obs))
        order = {id(f): k for k, f in enumerate(faces)}
        kept.sort(key=lambda p: order[id(p[1].face)])  # the detector's order, as photo mode
        self.detections[i] = kept
        return {track.id for track, _ in kept}

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
        while self.align_next <= self.frame_front and \
                (final or self.frame_front >= self.align_next + opts.align_lag):
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

    def _smoothed(self, track: Track, a: int) -> tuple[np.ndarray, bool]:
        """(the fused transform of ``track`` at frame ``a``, whether the face was followed into
        ``a``) -- see :func:`progsr_jax.video.smoothing.fuse`."""
        opts, tid = self.options, track.id
        detections = sorted(f for f in track.observations if (tid, f) in self.transforms)
        lo = max(track.first, a - opts.smooth_window)
        hi = min(track.last, a + opts.smooth_window)
        if not any(lo <= f <= hi for f in detections):
            before = [f for f in detections if f <= a]
            after = [f for f in detections if f >= a]
            lo = min(lo, before[-1]) if before else lo
            hi = max(hi, after[0]) if after else hi
        params = {f: smoothing.to_params(self.transforms[(tid, f)]) for f in detections
                  if lo <= f <= hi}
        size = float(np.exp(np.median([p[2] for p in params.values()]))) * align.CROP_SIZE
        unit = np.array([size, size, 1.0, 1.0])
        ref = next(iter(params.values()))[3]
        observed = {}
        for f, p in params.items():
            p = p.copy()
            p[3] = ref + smoothing.wrap(p[3] - ref)
            observed[f] = p / unit
        motions = {f: self.motions[(tid, f)] / unit for f in range(lo + 1, hi + 1)
                   if (tid, f) in self.motions}
        x = smoothing.fuse(lo, hi, a, observed, motions, opts.motion_weight, opts.continuity)
        followed = a not in track.observations and (tid, a) in self.motions
        return smoothing.from_params(x * unit), followed

    def _align(self, a: int) -> None:
        opts = self.options
        frame = self.frames[a]
        jobs: list[Job] = []
        if opts.smooth:
            for tid in sorted(self.tracks):
                track = self.tracks[tid]
                if not track.covers(a) or not any((tid, f) in self.transforms for f in track.observations):
                    continue
                m, followed = self._smoothed(track, a)
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
                jobs.append(Job(track, a, m, span, obs, weight, reason, followed))
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
        keep_from = o + 1 - opts.memory
        completed = []
        for tid in list(self.tracks):
            track = self.tracks[tid]
            if track.ended and track.last <= o:
                completed.append(track)
                del self.tracks[tid], self.schedules[tid], self.shot_start[tid]
                self.looks.pop(tid, None)
                for f in list(track.observations):
                    self.transforms.pop((tid, f), None)
                for f in range(track.first, track.last + 1):
                    self.motions.pop((tid, f), None)
                continue
            before = set(track.observations)
            track.forget(keep_from)
            for f in before - set(track.observations):
                self.transforms.pop((tid, f), None)
            self.motions.pop((tid, keep_from - 1), None)
        return completed

    def collect_completed(self) -> list[Track]:
        """Tracks that ended without a frame left to carry them (each returned once)."""
        done, self.completed = self.completed, []
        return done
