"""Faces linked into tracks across frames, and scene cuts.

:class:`Tracker` takes each detection frame's faces
(:class:`progsr_jax.photo.detection.Face`) and links them to the tracks alive
at that frame:

* the cost of a (track, face) pair is ``1 - IoU`` between the face's box and
  the track's last box moved by its recent velocity; pairs are linked
  greedily, best IoU first, while the IoU is at least :data:`MIN_IOU`.  Small
  faces that move fast overlap little from one detection to the next, so a
  pair whose box centres are within :data:`MAX_CENTRE_SHIFT` box sides (more
  after missed detections) and whose sizes differ by less than a factor
  :data:`MAX_SIZE_RATIO` is also linked (after the IoU pairs, nearest first);
* a face nobody claims starts a new track;
* a track missed by more than ``max_gap`` consecutive detections ends (its
  misses up to then are *bridged*: its transform is interpolated there); one
  whose box leaves the frame ends the same way;
* a scene cut (:class:`SceneCuts`) ends every track; faces after it start new
  ones.

Tracks keep every observation in memory only until the caller drops the old
ones (:meth:`Track.forget`), so a long clip does not grow the tracker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from progsr_jax.photo.detection import Face

MIN_IOU = 0.2
#: Centre shift (in box sides) allowed for a link without overlap: this much after one frame,
#: growing by :data:`SHIFT_PER_FRAME` per frame since the track's last detection, up to 1.5.
MAX_CENTRE_SHIFT = 0.5
SHIFT_PER_FRAME = 0.2
MAX_SIZE_RATIO = 2.0
#: Scene-cut threshold: mean absolute difference (0-255) of consecutive 32x18 grey thumbnails,
#: each shifted to a zero mean, and never below 3 times the recent (median) difference.
SCENE_CUT = 28.0
THUMB_SIZE = (32, 18)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclasses.dataclass
class Observation:
    """A detection linked to a track: the frame, the detector's face and the box containing its
    landmarks."""

    frame: int
    face: Face
    box: np.ndarray


@dataclasses.dataclass
class Track:
    """One face followed over frames.

    ``id``: 0, 1, ... in order of appearance; ``observations``: frame -> the
    :class:`Observation` (the ones not yet forgotten); ``first``/``last``: its
    first and last observed frame; ``ended``: no more observations will come
    (the last frame it covers is ``last``); ``end_reason``: why.
    """

    id: int
    first: int
    last: int
    observations: dict[int, Observation] = dataclasses.field(default_factory=dict)
    count: int = 0
    ended: bool = False
    end_reason: str | None = None
    missed: int = 0

    def add(self, obs: Observation) -> None:
        self.observations[obs.frame] = obs
        self.last = obs.frame
        self.count += 1
        self.missed = 0

    def predicted_box(self, frame: int) -> np.ndarray:
        """The last box moved by the velocity between the last two observations."""
        frames = sorted(self.observations)
        last = self.observations[frames[-1]].box
        if len(frames) < 2:
            return last
        prev = self.observations[frames[-2]].box
        dt = frames[-1] - frames[-2]
        v = (last - prev) / max(dt, 1)
        return last + v * (frame - frames[-1])

    def covers(self, frame: int) -> bool:
        """Whether the track spans ``frame`` (observed or bridged)."""
        return self.first <= frame <= self.last

    def forget(self, before: int) -> None:
        """Drops observations before frame ``before``, keeping the last two for prediction."""
        keep = sorted(self.observations)[-2:]
        for f in [f for f in self.observations if f < before and f not in keep]:
            del self.observations[f]


class SceneCuts:
    """Says whether a frame starts a new shot, from small grey thumbnails of consecutive frames.

    A cut is a mean absolute difference (after removing each thumbnail's mean,
    so a change of exposure is not one) above ``threshold`` and above 3 times
    the median of the last 25 differences (so that a shaky handheld shot does
    not cut on every frame).  ``threshold <= 0`` turns detection off.
    """

    def __init__(self, threshold: float = SCENE_CUT):
        self.threshold = float(threshold)
        self._last: np.ndarray | None = None
        self._recent: list[float] = []

    @staticmethod
    def thumbnail(image: np.ndarray) -> np.ndarray:
        from PIL import Image

        grey = Image.fromarray(image).convert("L").resize(THUMB_SIZE, Image.BOX)
        t = np.asarray(grey, np.float32)
        return t - t.mean()

    def __call__(self, image: np.ndarray) -> bool:
        thumb = self.thumbnail(image)
        last, self._last = self._last, thumb
        if last is None or self.threshold <= 0:
            return False
        d = float(np.abs(thumb - last).mean())
        typical = float(np.median(self._recent)) if self._recent else 0.0
        self._recent = (self._recent + [d])[-25:]
        return d > self.threshold and d > 3.0 * typical


class Tracker:
    """Links each detection frame's faces into :class:`Track` s (see the module docstring).

    ``max_gap``: consecutive missed detections a track survives (bridged);
    ``frame_size``: (width, height), to end tracks whose box has left the frame.
    """

    def __init__(self, max_gap: int = 4, frame_size: tuple[int, int] | None = None):
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        self.max_gap = int(max_gap)
        self.frame_size = frame_size
        self.active: list[Track] = []
        self.finished: list[Track] = []  # ended, not yet collected by the caller
        self._next_id = 0

    def end_all(self, reason: str) -> None:
        for t in self.active:
            t.ended, t.end_reason = True, reason
        self.finished += self.active
        self.active = []

    def update(self, frame: int, faces: Sequence[Face]) -> list[tuple[Track, Observation]]:
        """Links ``faces`` detected in ``frame``; returns the (track, observation) pairs made."""
        boxes = [f.box_with_landmarks() for f in faces]
        predicted = [t.predicted_box(frame) for t in self.active]
        pairs = []
        for i, p in enumerate(predicted):
            for j, b in enumerate(boxes):
                o = iou(p, b)
                if o >= MIN_IOU:
                    pairs.append((o, i, j))
        pairs.sort(key=lambda x: -x[0])
        taken_t, taken_f, links = set(), set(), []
        for _, i, j in pairs:
            if i not in taken_t and j not in taken_f:
                taken_t.add(i)
                taken_f.add(j)
                links.append((i, j))
        near = []
        for i, p in enumerate(predicted):
            if i in taken_t:
                continue
            side_p = max(p[2] - p[0], p[3] - p[1], 1e-6)
            for j, b in enumerate(boxes):
                if j in taken_f:
                    continue
                side_b = max(b[2] - b[0], b[3] - b[1], 1e-6)
                shift = np.hypot(*((p[:2] + p[2:]) / 2 - (b[:2] + b[2:]) / 2)) / max(side_p, side_b)
                ratio = max(side_p, side_b) / min(side_p, side_b)
                gap = frame - self.active[i].last - 1
                allowed = min(1.5, MAX_CENTRE_SHIFT + SHIFT_PER_FRAME * gap)
                if shift <= allowed and ratio <= MAX_SIZE_RATIO:
                    near.append((shift, i, j))
        for _, i, j in sorted(near):
            if i not in taken_t and j not in taken_f:
                taken_t.add(i)
                taken_f.add(j)
                links.append((i, j))
        made = []
        for i, j in links:
            obs = Observation(frame, faces[j], boxes[j])
            self.active[i].add(obs)
            made.append((self.active[i], obs))
        for j, face in enumerate(faces):
            if j not in taken_f:
                track = Track(id=self._next_id, first=frame, last=frame)
                self._next_id += 1
                obs = Observation(frame, face, boxes[j])
                track.add(obs)
                self.active.append(track)
                made.append((track, obs))
        still = []
        for i, t in enumerate(self.active):
            if i < len(predicted) and i not in taken_t:
                t.missed += 1
                if t.missed > self.max_gap:
                    t.ended, t.end_reason = True, f"not detected in {t.missed} detections in a row"
                elif self.frame_size is not None and _outside(predicted[i], self.frame_size):
                    t.ended, t.end_reason = True, "left the frame"
            (self.finished if t.ended else still).append(t)
        self.active = still
        return made

    def collect_finished(self) -> list[Track]:
        done, self.finished = self.finished, []
        return done


def _outside(box: np.ndarray, size: tuple[int, int]) -> bool:
    return box[2] < 0 or box[3] < 0 or box[0] > size[0] - 1 or box[1] > size[1] - 1
