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
* between detections, and where the detector misses a face (MTCNN finds
  faces whose aligned crop spans under ~18 pixels in well under half of the
  frames), a track is *followed* from frame to frame (:func:`follow`): the
  face's crop in the previous frame is registered onto the next frame (ECC,
  OpenCV's ``findTransformECC``) and accepted while it still looks like the
  face the track was detected as;
* a track neither detected nor followed in more than ``max_gap``
  consecutive detections ends (up to then it is *bridged*: its transform is
  interpolated there), and so does one followed for more than
  ``max_follow`` frames without a detection, or whose box leaves the frame;
* a scene cut (:class:`SceneCuts`) ends every track; faces after it start new
  ones.

Tracks keep every observation in memory only until the caller drops the old
ones (:meth:`Track.forget`), so a long clip does not grow the tracker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from progsr_jax.photo import align
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
#: Following (:func:`follow`): the working crop's side (pixels across the aligned 178-px square),
#: the least ECC correlation of a step, the least similarity to the track's detected look.
FOLLOW_SIZE = 48
FOLLOW_MIN_ECC = 0.8
FOLLOW_MIN_LOOK = 0.6
LOOK_BLUR = 2.5
MAX_FOLLOW = 50


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
    """One face over frames.

    ``id``: 0, 1, ... in order of appearance; ``observations``: frame -> the
    :class:`Observation` (the detections not yet forgotten); ``first``/``last``:
    its first and last frame detected or followed (``last_detection``: detected);
    ``box``: its box at ``last``; ``ended``: no more frames will come (the last
    frame it covers is ``last``); ``end_reason``: why.
    """

    id: int
    first: int
    last: int
    observations: dict[int, Observation] = dataclasses.field(default_factory=dict)
    count: int = 0
    ended: bool = False
    end_reason: str | None = None
    missed: int = 0
    last_detection: int = -1
    box: np.ndarray | None = None
    velocity: np.ndarray | None = None

    def _moved_to(self, frame: int, box: np.ndarray) -> None:
        if self.box is not None and frame > self.last:
            self.velocity = (box - self.box) / (frame - self.last)
        self.box = np.asarray(box, np.float64)
        self.last = frame

    def add(self, obs: Observation) -> None:
        self.observations[obs.frame] = obs
        self._moved_to(obs.frame, obs.box)
        self.last_detection = obs.frame
        self.count += 1
        self.missed = 0

    def followed(self, frame: int, box: np.ndarray) -> None:
        """The face was followed into ``frame`` (not detected there), with this box."""
        self._moved_to(frame, box)
        self.missed = 0

    def predicted_box(self, frame: int) -> np.ndarray:
        """The last box moved on by the last velocity."""
        if self.velocity is None:
            return self.box
        return self.box + self.velocity * (frame - self.last)

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

    ``max_gap``: consecutive detections a track survives neither detected nor
    followed (bridged); ``max_follow``: frames it may be followed without a
    detection; ``frame_size``: (width, height), to end tracks whose box has
    left the frame.  :meth:`follow` records where the caller followed faces
    to in a frame, :meth:`update` links that frame's detections.
    """

    def __init__(self, max_gap: int = 4, frame_size: tuple[int, int] | None = None,
                 max_follow: int = MAX_FOLLOW):
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        self.max_gap = int(max_gap)
        self.max_follow = int(max_follow)
        self.frame_size = frame_size
        self.active: list[Track] = []
        self.finished: list[Track] = []  # ended, not yet collected by the caller
        self._next_id = 0

    def end_all(self, reason: str) -> None:
        for t in self.active:
            t.ended, t.end_reason = True, reason
        self.finished += self.active
        self.active = []

    def follow(self, frame: int, boxes: dict[int, np.ndarray]) -> None:
        """Tracks (by id) followed into ``frame`` and their boxes there; the ones followed too long
        without a detection, or out of the frame, end."""
        still = []
        for t in self.active:
            if t.id in boxes:
                t.followed(frame, boxes[t.id])
                if frame - t.last_detection > self.max_follow:
                    t.ended, t.end_reason = True, (f"followed {frame - t.last_detection} frames "
                                                   "without a detection")
                elif self.frame_size is not None and _outside(t.box, self.frame_size):
                    t.ended, t.end_reason = True, "left the frame"
            (self.finished if t.ended else still).append(t)
        self.active = still

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
            if i < len(predicted) and i not in taken_t and t.last != frame:
                t.missed += 1
                if t.missed > self.max_gap:
                    t.ended, t.end_reason = True, (f"neither detected nor followed in {t.missed} "
                                                   "detections in a row")
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


# ---------------------------------------------------------------------------
# Following a face from one frame to the next


def _work_from_aligned() -> np.ndarray:
    """Aligned-frame pixels -> pixels of the FOLLOW_SIZE-square working crop of the 178 square."""
    k = FOLLOW_SIZE / align.CROP_SIZE
    return np.array([[k, 0.0, k * (0.5 - align.CROP_LEFT) - 0.5],
                     [0.0, k, k * (0.5 - align.CROP_TOP) - 0.5]])


def _face_mask() -> np.ndarray:
    """uint8 ellipse over the face (brows to chin) in the working crop."""
    n = FOLLOW_SIZE
    yy, xx = np.mgrid[0:n, 0:n]
    return ((((xx - (n - 1) / 2) / (0.36 * n)) ** 2 + ((yy - 0.57 * n) / (0.45 * n)) ** 2) <= 1
            ).astype(np.uint8)


WORK = _work_from_aligned()
FACE_MASK = _face_mask()


def grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) float32 grey, what :func:`follow` reads."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def face_crop(grey_image: np.ndarray, transform) -> np.ndarray:
    """The working crop (FOLLOW_SIZE square, float32) of a face under ``transform``."""
    a = align.compose(WORK, transform)
    return cv2.warpAffine(grey_image, a, (FOLLOW_SIZE, FOLLOW_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def likeness(a: np.ndarray, b: np.ndarray, blur: float = 0.0) -> float:
    """Normalised cross-correlation of two working crops inside the face mask (1: same look),
    after a Gaussian blur of ``blur`` pixels (to forgive a small misalignment)."""
    if blur > 0:
        a = cv2.GaussianBlur(a, (0, 0), blur)
        b = cv2.GaussianBlur(b, (0, 0), blur)
    m = FACE_MASK.astype(bool)
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum() + 1e-9))


def follow(prev: np.ndarray, cur: np.ndarray, transform, reference: np.ndarray | None = None,
           guess=None):
    """Where a face of ``prev`` (grey frame, its ``transform``) is in ``cur``; None if lost.

    ``prev`` is warped onto the working crop with ``transform``, ``cur`` with
    ``guess`` (where the face is expected, e.g. moved on at its last velocity;
    default ``transform``); ECC finds the affine motion of the face region
    between the two crops, of which the nearest similarity is kept (none when
    ECC cannot improve on none).  Returns the face's (2, 3) transform in
    ``cur``, or None when the crops correlate below
    :data:`FOLLOW_MIN_ECC`, when the step is implausible (more than a third
    of the crop, or a scale change over 15 %), or when the face at the new
    place correlates below :data:`FOLLOW_MIN_LOOK` with ``reference`` (the
    track's mean working crop at its detections).
    """
    guess = transform if guess is None else guess
    a, b = face_crop(prev, transform), face_crop(cur, guess)
    if a.std() < 1e-3 or b.std() < 1e-3:
        return None
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
    try:
        cc, warp = cv2.findTransformECC(a, b, warp, cv2.MOTION_AFFINE, criteria, FACE_MASK, 3)
    except cv2.error:
        # ECC stops when its first step lowers the correlation: the face has not moved
        # measurably; keep it in place if the two crops agree.
        cc, warp = likeness(a, b), np.eye(2, 3, dtype=np.float32)
    if not cc >= FOLLOW_MIN_ECC:
        return None
    n = float(FOLLOW_SIZE)
    corners = np.array([[0, 0], [n, 0], [0, n], [n, n]])
    step = align.estimate_similarity(corners, align.apply(warp, corners))
    centre = np.array([n / 2, n / 2])
    shift = align.apply(step, centre[None])[0] - centre
    if abs(np.log(align.similarity_params(step)["scale"])) > 0.15 or np.hypot(*shift) > n / 3:
        return None
    moved = align.compose(align.invert(WORK), align.invert(step), WORK, guess)
    if reference is not None and likeness(face_crop(cur, moved), reference, LOOK_BLUR) < FOLLOW_MIN_LOOK:
        return None
    return moved
