"""``infer --mode=video``: streams (timestamps, audio, rotation), tracking, smoothing, the streaming
loop, the command end to end and its bad inputs.

Clips are written here with PyAV directly (tiny: 160x120 or smaller, a few dozen frames).
Tests that detect real faces need the MTCNN weights (``pip install --no-deps
facenet-pytorch==2.6.0``) and the CelebA faces of ``../shared``, and skip without them;
the models are random sixteenth-width generators or the fake 8x upsampler of ``conftest.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from progsr_jax import infer
from progsr_jax.errors import UserError, run_cli
from progsr_jax.photo import align, detection
from progsr_jax.photo.detection import Face

# PyAV is the optional extra `video` (pip install -e '.[video]'); CI installs it.
av = pytest.importorskip("av", reason="PyAV not installed (pip install -e '.[video]')")
import cv2

from progsr_jax import data, photo
from progsr_jax.video import restoration, smoothing, streams, tracking

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Clips


def write_clip(path, frames, pts=None, time_base=Fraction(1, 1000), rate=25, rotation=0,
               audio_seconds=0.0, codec="libx264rgb", lossless=True):
    """Frames (upright RGB arrays, turned to the stored orientation here) into a clip."""
    out = av.open(str(path), "w")
    h, w = frames[0].shape[:2]
    turns = rotation // 90
    stored = (h, w) if turns % 2 else (w, h)
    opts = {"qp": "0"} if lossless and codec.startswith("libx264") else {}
    vs = out.add_stream(codec, rate=rate, options=opts)
    vs.width, vs.height = stored
    vs.pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv444p" if codec == "libx264" else "yuv420p"
    vs.codec_context.time_base = time_base
    vs.time_base = time_base
    if rotation:
        vs.set_display_rotation(rotation)
    a = None
    if audio_seconds:
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
    pts = list(range(0, len(frames) * 40, 40)) if pts is None else pts
    for img, p in zip(frames, pts):
        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(img, -turns)), format="rgb24")
        f.pts, f.time_base = p, time_base
        out.mux(vs.encode(f))
    out.mux(vs.encode())
    if a is not None:
        rng = np.random.default_rng(0)
        for k in range(int(audio_seconds * 16000 / 1024)):
            af = av.AudioFrame.from_ndarray(rng.uniform(-0.1, 0.1, (1, 1024)).astype(np.float32),
                                            format="fltp", layout="mono")
            af.sample_rate, af.pts, af.time_base = 16000, k * 1024, Fraction(1, 16000)
            out.mux(a.encode(af))
        out.mux(a.encode())
    out.close()
    return path


def audio_packets(path):
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return []
        s = c.streams.audio[0]
        return [(bytes(p), p.pts * p.time_base) for p in c.demux(s) if p.size]


def decoded(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(s)]


def gradient_frames(n, w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for t in range(n):
        base = np.stack([(xx * 4 + t * 3) % 256, (yy * 5) % 256, (xx + yy + 7 * t) % 256], -1)
        out.append(np.clip(base + rng.integers(0, 3, base.shape), 0, 255).astype(np.uint8))
    return out


# ---------------------------------------------------------------------------
# Streams


def test_reader_and_writer_keep_timestamps_audio_rotation(tmp_path):
    """VFR timestamps, the audio packets, the rotation and the frames survive a lossless pass."""
    frames = gradient_frames(9, 64, 48)
    frames[0][:8, :16] = 255  # a mark at the top left of the upright picture
    pts = [0, 40, 80, 200, 240, 300, 310, 400, 470]  # variable frame rate, in ms
    src = write_clip(tmp_path / "in.mp4", frames, pts, rotation=90, audio_seconds=0.6)
    reader = streams.VideoReader(str(src))
    info = reader.info
    assert (info.width, info.height, info.rotation, info.size) == (48, 64, 90, (64, 48))
    assert info.frames == 9 and info.audio == ("aac",)
    dst = tmp_path / "out.mp4"
    enc = streams.encoder_settings(str(dst), lossless=True)
    assert enc["codec"] == "libx264rgb"
    with reader.audio_streams() as c:
        writer = streams.VideoWriter(str(dst), info, info.size, enc, c.streams.audio)
    got = []
    for frame in reader.frames(on_audio=writer.mux_audio):
        got.append(frame)
        assert not (tmp_path / "out.mp4").exists()  # only the temporary file while writing
        writer.write(frame.image, frame.pts)
    assert [round(f.time * 1000) for f in got] == pts
    for f, ref in zip(got, frames):
        np.testing.assert_array_equal(f.image, ref)  # upright, exactly (lossless input)
    writer.commit()
    assert sorted(os.listdir(tmp_path)) == ["in.mp4", "out.mp4"]
    again = streams.VideoReader(str(dst))
    assert again.info.rotation == 90 and again.info.size == (64, 48) and again.info.frames == 9
    back = list(again.frames())
    assert [round(f.time * 1000) for f in back] == pts
    for f, ref in zip(back, frames):
        np.testing.assert_array_equal(f.image, ref)
    a, b = audio_packets(src), audio_packets(dst)
    assert len(a) == len(b) > 5 and a == b  # the same packets at the same times


def test_default_encoder_and_odd_sizes(tmp_path):
    frames = gradient_frames(4, 33, 21)  # odd sides: 4:2:0 cannot hold them
    src = write_clip(tmp_path / "odd.mkv", frames, codec="libx264")
    reader = streams.VideoReader(str(src))
    enc = streams.encoder_settings(str(tmp_path / "o.mp4"))
    assert enc["codec"] == "libx264" and enc["options"]["crf"] == "18"
    writer = streams.VideoWriter(str(tmp_path / "o.mp4"), reader.info, (33, 21), enc)
    for f in reader.frames():
        writer.write(f.image, f.pts)
    writer.commit()
    out = decoded(tmp_path / "o.mp4")
    assert len(out) == 4 and out[0][1].shape == (21, 33, 3)
    assert np.abs(out[0][1].astype(int) - frames[0]).mean() < 3  # CRF 18: close
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv444p"
    # choices
    assert streams.encoder_settings("a.webm")["codec"] == "libvpx-vp9"
    assert streams.encoder_settings("a.mkv", crf=23)["options"]["crf"] == "23"
    assert streams.encoder_settings("a.mp4", codec="libx265")["options"]["crf"] == "22"
    for kwargs, match in [(dict(path="a.gif"), "writes .m4v, .mkv"),
                          (dict(path="a.mp4", codec="nonsense"), "not a video encoder"),
                          (dict(path="a.mp4", crf=70), "crf must be within"),
                          (dict(path="a.mp4", lossless=True, crf=3), "--lossless chooses"),
                          (dict(path="a.mp4", codec="ffv1", crf=3), "--crf applies")]:
        with pytest.raises(UserError, match=match):
            streams.encoder_settings(**kwargs)


# ---------------------------------------------------------------------------
# Smoothing, combination, schedule, tracking (no detector, no model)


def _transform(cx, cy, span, roll):
    s = span / align.CROP_SIZE
    r = np.radians(roll)
    rot = s * np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    return align.invert(np.concatenate([rot, (np.array([cx, cy]) - rot @ align.FRAME_CENTRE)[:, None]], 1))


def test_transform_params_and_the_fused_smoother():
    m = _transform(40.0, 30.0, 20.0, 7.0)
    p = smoothing.to_params(m)
    np.testing.assert_allclose(p[:2], [40.0, 30.0], atol=1e-9)
    np.testing.assert_allclose(np.exp(p[2]), 20.0 / 178, rtol=1e-9)
    np.testing.assert_allclose(smoothing.from_params(p), m, atol=1e-9)
    t = np.arange(25)
    line = np.stack([3 + 0.5 * t, -2 + 0.1 * t], 1)
    steps = {f: line[f] - line[f - 1] for f in range(1, 25)}
    observed = {f: line[f] for f in t}
    for at in (0, 7, 12, 24):  # a straight line is followed exactly, ends included
        np.testing.assert_allclose(smoothing.fuse(0, 24, at, observed, {}), line[at], atol=1e-6)
        np.testing.assert_allclose(smoothing.fuse(0, 24, at, {3: line[3]}, steps), line[at], atol=1e-6)
    rng = np.random.default_rng(0)
    noisy = {f: line[f] + rng.normal(0, 1, 2) for f in t}
    noisy[12] = noisy[12] + 40  # one wild detection
    alone = np.abs(np.array([smoothing.fuse(0, 24, f, noisy, {}) for f in range(6, 19)]) - line[6:19]).mean()
    fused = np.array([smoothing.fuse(0, 24, f, noisy, steps) for f in range(6, 19)])
    raw = np.abs(np.array([noisy[f] for f in range(6, 19) if f != 12]) - line[[f for f in range(6, 19) if f != 12]]).mean()
    assert alone < 0.6 * raw and np.abs(fused - line[6:19]).mean() < 0.4 * raw, (alone, raw)
    # frame to frame, the motions make the path as steady as they are
    assert np.abs(np.diff(fused, axis=0) - 0.1 * np.array([5, 1])).max() < 0.1 * raw
    # a gap with neither detections nor motions keeps the velocity
    gap = {f: line[f] for f in list(range(8)) + list(range(17, 25))}
    np.testing.assert_allclose(smoothing.fuse(0, 24, 12, gap, {}), line[12], atol=1e-6)


def test_combine_averages_noise_and_keeps_motion():
    rng = np.random.default_rng(1)
    clean = np.full((128, 128, 3), 120.0, np.float32)
    frames = [clean + rng.normal(0, 4, clean.shape).astype(np.float32) for _ in range(5)]
    own, others = frames[2], [(k - 2, frames[k]) for k in (0, 1, 3, 4)]
    out = smoothing.combine(own, others, 2, 12.0)
    assert np.abs(out - clean).mean() < 0.7 * np.abs(own - clean).mean()
    # a region that changes for real (a mouth opening) is not taken from the neighbours
    moved = [f.copy() for f in frames]
    for k in (0, 1, 3, 4):
        moved[k][80:100, 40:90] = 30.0
    out = smoothing.combine(moved[2], [(k - 2, moved[k]) for k in (0, 1, 3, 4)], 2, 12.0)
    np.testing.assert_allclose(out[85:95, 50:80], moved[2][85:95, 50:80], atol=1e-3)
    assert np.abs(out[10:60, 10:60] - 120).mean() < 0.7 * np.abs(moved[2][10:60, 10:60] - 120).mean()
    np.testing.assert_array_equal(smoothing.combine(own, [], 2, 12.0), own)


def test_schedule_hysteresis_and_crossfade():
    s = smoothing.Schedule(max_face=20.0, hysteresis=0.1, crossfade=4)
    spans = [19, 20.5, 21.9, 19.5, 21, 22.5, 21, 19, 18.5, 17.9, 18.5]
    states = [s.size_ok(d) for d in spans]
    # on until above 22, then off until below 18: no flipping while hovering around 20
    assert states == [True] * 5 + [False] * 4 + [True, True]
    w = smoothing.Schedule(20.0, 0.1, 4)
    weights = [w.step(on) for on in [True, True, False, False, False, False, False, True, True]]
    assert weights == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.25, 0.5]
    assert w.step(True, ramp_limit=0.2) == 0.2
    assert smoothing.Schedule(0.0, 0.1, 4).size_ok(500.0)  # max_face 0: every face


def _face(cx, cy, span, roll=0.0, jitter=0.0, rng=None, score=0.99):
    m = _transform(cx, cy, span, roll)
    pts = align.apply(align.invert(m), align.TEMPLATE)
    if jitter:
        pts = pts + rng.normal(0, jitter, pts.shape)
    box = np.array([*(pts.min(0) - span * 0.15), *(pts.max(0) + span * 0.15)], np.float32)
    return Face(box=box, landmarks=pts.astype(np.float32), score=score)


def test_tracker_links_bridges_and_cuts():
    tr = tracking.Tracker(max_gap=2, frame_size=(200, 100))
    for t in range(6):
        faces = [_face(30 + 3 * t, 40, 30), _face(150 - 4 * t, 50, 26)]
        if t in (2, 3):
            faces = faces[:1]  # the second face missed twice: bridged
        tr.update(t, faces)
    assert [t.id for t in tr.active] == [0, 1] and tr.active[1].count == 4
    for t in (6, 7, 8):
        tr.update(t, [_face(30 + 3 * t, 40, 30)])  # then missed three times: ended
    assert [t.id for t in tr.active] == [0]
    ended = tr.collect_finished()
    assert [t.id for t in ended] == [1] and ended[0].last == 5 and "3 detections" in ended[0].end_reason
    # a fast small face without overlap is still linked; a far one starts a track
    tr.update(9, [_face(30 + 3 * 9 + 5, 40, 30), _face(180, 90, 20)])
    assert sorted(t.id for t in tr.active) == [0, 2]
    tr.end_all("scene cut")
    assert tr.active == [] and {t.end_reason for t in tr.collect_finished()} == {"scene cut"}
    cuts = tracking.SceneCuts()
    rng = np.random.default_rng(0)
    a = np.asarray(Image.fromarray(gradient_frames(1, 160, 90)[0]), np.uint8)
    b = np.ascontiguousarray(a[::-1, ::-1])
    seq = [a, np.clip(a.astype(int) + rng.integers(-6, 6, a.shape), 0, 255).astype(np.uint8),
           np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8), b, b]
    assert [cuts(x) for x in seq] == [False, False, False, True, False]


class FakeDetector:
    """Faces on known smooth paths, their landmarks jittered, missed on some frames."""

    min_face = 10.0

    def __init__(self, path_of, missed=(), jitter=0.6, seed=0):
        self.path_of, self.missed, self.jitter = path_of, set(missed), jitter
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def __call__(self, image):
        t = int(image[0, 0, 0])  # the test clips carry their frame index in a pixel
        self.calls += 1
        if t in self.missed:
            return []
        return [_face(*p, jitter=self.jitter, rng=self.rng) for p in self.path_of(t)]


def _frames(n, size=(96, 64)):
    base = gradient_frames(1, *size)[0]
    for t in range(n):
        img = base.copy()
        img[0, 0] = t
        yield streams.Frame(t, t * 40, t * 0.04, img)


def _path(t):
    return [(30 + 0.8 * t, 30, 24, 2.0), (70 - 0.5 * t, 34, 20, -3.0)]


def test_restorer_streams_in_fixed_batches(fake_sr_type):
    """A long stream: outputs in order, every call of batch_size faces, a bounded buffer, misses
    bridged (smoothed) or not (frame-by-frame, like the photo mode)."""
    n = 60
    for smooth in (True, False):
        sr = fake_sr_type()
        det = FakeDetector(_path, missed={10, 11, 30})
        opts = restoration.VideoOptions(smooth=smooth, max_face=0.0, batch_size=8, upscale=2.0,
                                        follow=False)  # the fake faces are not in the pixels
        r = restoration.VideoRestorer(sr, det, opts, (96, 64))
        outs, buffered = [], []
        for frame in _frames(n):
            outs += r.push(frame)
            buffered.append(len(r.frames))
        outs += r.finish()
        assert [o.frame.index for o in outs] == list(range(n))
        assert all(o.image.shape == (128, 192, 3) for o in outs)
        assert set(sr.calls) == {8}  # one compiled shape
        assert max(buffered) <= opts.align_lag + opts.radius + opts.batch_size + 2
        per_frame = [len([j for j in o.jobs if j.restored]) for o in outs]
        if smooth:
            assert per_frame == [2] * n  # misses bridged
            assert sum(o.jobs[0].observation is None for o in outs) == 3
        else:
            assert per_frame[10] == per_frame[11] == per_frame[30] == 0 and per_frame[12] == 2
        ids = {j.track.id for o in outs for j in o.jobs}
        assert ids == {0, 1}
        done = [t for o in outs for t in o.completed] + r.collect_completed()
        assert sorted(t.id for t in done) == [0, 1]


def test_a_scene_cut_ends_the_tracks(fake_sr_type):
    """At a cut every track ends (no smoothing or combination across it) and new ones start."""
    a = gradient_frames(1, 96, 64)[0]
    b = np.ascontiguousarray(255 - a[::-1])
    r = restoration.VideoRestorer(fake_sr_type(), FakeDetector(_path, jitter=0.3), restoration.VideoOptions(
        max_face=0.0, batch_size=4, follow=False), (96, 64))
    outs = []
    for t in range(30):
        img = (a if t < 15 else b).copy()
        img[0, 0] = t
        outs += r.push(streams.Frame(t, t, t * 0.04, img))
    outs += r.finish()
    before = {j.track.id for o in outs[:15] for j in o.jobs}
    after = {j.track.id for o in outs[15:] for j in o.jobs}
    assert len(before) == len(after) == 2 and not before & after
    ended = {t.id: t.end_reason for o in outs for t in o.completed}
    assert all(ended[i] == "scene cut" for i in before)
    assert all(o.jobs[0].weight == 1.0 for o in outs)  # no fade at a cut: the faces are in view


def test_smoothing_steadies_the_alignment(fake_sr_type):
    """Jittered landmarks: the transforms used move like the true path, frame-by-frame ones jump."""
    errs = {}
    for smooth in (True, False):
        det = FakeDetector(_path, jitter=0.8, seed=3)
        r = restoration.VideoRestorer(fake_sr_type(), det, restoration.VideoOptions(
            smooth=smooth, max_face=0.0, batch_size=8, follow=False), (96, 64))
        outs = [o for f in _frames(40) for o in r.push(f)] + r.finish()
        moves = []
        for a, b in itertools.pairwise(outs[5:-5]):
            t = a.frame.index
            for k in range(2):
                p0 = align.apply(align.invert(a.jobs[k].transform), align.TEMPLATE)
                p1 = align.apply(align.invert(b.jobs[k].transform), align.TEMPLATE)
                q0 = align.apply(align.invert(_transform(*_path(t)[k])), align.TEMPLATE)
                q1 = align.apply(align.invert(_transform(*_path(t + 1)[k])), align.TEMPLATE)
                moves.append(np.linalg.norm((p1 - p0) - (q1 - q0), axis=1).mean())
        errs[smooth] = np.mean(moves)
    assert errs[True] < 0.35 * errs[False], errs


def test_switching_has_hysteresis_and_crossfades(fake_sr_type):
    """A face hovering at --max_face is not switched on and off; a switch fades over frames."""
    def path(t):
        return [(48, 32, 20.6 + 1.5 * np.sin(t / 2) + max(0, t - 30), 0.0)]  # then a zoom out

    def run(smooth):
        r = restoration.VideoRestorer(fake_sr_type(), FakeDetector(path, jitter=0.0),
                                      restoration.VideoOptions(smooth=smooth, max_face=22.0, batch_size=4,
                                                               crossfade=4, follow=False), (96, 64))
        return [o for f in _frames(45) for o in r.push(f)] + r.finish()

    outs = run(True)
    weights = [o.jobs[0].weight for o in outs]
    assert weights[:30] == [1.0] * 30  # hovering between 19 and 22 px: kept on throughout
    k = next(i for i, w in enumerate(weights) if w < 1)
    assert weights[k:] == [0.75, 0.5, 0.25] + [0.0] * (len(weights) - k - 3)  # then faded out
    assert outs[k].jobs[0].reason.startswith("aligned crop spans")
    flips = [o.jobs[0].weight for o in run(False)][:30]
    assert sum(a != b for a, b in itertools.pairwise(flips)) >= 4  # the photo rule flips on this face


def test_options_are_checked():
    for kwargs, match in [(dict(upscale=0.0), "--upscale"), (dict(max_face=-1.0), "--max_face"),
                          (dict(detect_every=0), "--detect_every"), (dict(batch_size=0), "--batch_size")]:
        with pytest.raises(UserError, match=match):
            restoration.VideoOptions(**kwargs).check()


# ---------------------------------------------------------------------------
# Real faces: the detector and the command




@pytest.fixture(scope="module")
def face_images(celeba_root):
    val = data.list_files("celeba", str(celeba_root), "val")
    return [data.open_image(val[i]) for i in (610, 620)]


def face_clip_frames(face_images, n, size=(160, 120), spans=(44, 40)):
    """Two CelebA faces gliding over a soft background (their aligned crops span ``spans`` px)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([100 + 40 * np.sin(xx / 37.0), 120 + 30 * np.cos(yy / 23.0), 110 + 0 * xx], -1)
    frames, alpha = [], np.zeros((218, 178), np.float32)
    alpha[25:210, 25:153] = 1.0
    for t in range(n):
        canvas = bg.astype(np.float32).copy()
        for k, face in enumerate(face_images):
            m = _transform(45 + 70 * k + 0.6 * t, 55 + 8 * k, spans[k], 3.0 - 6 * k)
            inv = np.vstack([m, [0, 0, 1]])[:2]

            f = cv2.warpAffine(np.asarray(face, np.float32), inv, (w, h), flags=cv2.INTER_AREA | cv2.WARP_INVERSE_MAP)
            a = cv2.warpAffine(alpha, inv, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)[..., None]
            canvas = canvas * (1 - a) + f * a
        frames.append(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    return frames


def test_nosmooth_is_the_photo_mode_frame_by_frame(mtcnn_weights, face_images, fake_sr_type):
    frames = face_clip_frames(face_images, 4)
    det = detection.Detector(mtcnn_weights, min_face=10)
    r = restoration.VideoRestorer(fake_sr_type(), det, restoration.VideoOptions(
        smooth=False, upscale=2.0, max_face=0.0, batch_size=4), (160, 120))
    outs = []
    for t, img in enumerate(frames):
        outs += r.push(streams.Frame(t, t, t * 0.04, img))
    outs += r.finish()
    for out, img in zip(outs, frames):
        ref = photo.restore_photo(fake_sr_type(), img, upscale=2.0, detector=det, max_face=0)
        assert len(ref.faces) == 2 and len(out.jobs) == 2
        np.testing.assert_array_equal(out.image, np.asarray(ref.image))


def test_faces_are_followed_where_the_detector_misses(mtcnn_weights, face_images, fake_sr_type):
    """The detector blinded on most frames: the tracks are followed through (registration), their
    transforms stay on the true path, and one track per face survives."""
    frames = face_clip_frames(face_images, 24)
    mtcnn_det = detection.Detector(mtcnn_weights, min_face=10)

    def blinkered(image):
        t = blinkered.t
        blinkered.t += 1
        return mtcnn_det(image) if t % 6 == 0 else []  # five misses out of six

    blinkered.t = 0
    r = restoration.VideoRestorer(fake_sr_type(), blinkered, restoration.VideoOptions(
        max_face=0.0, batch_size=8, max_gap=1), (160, 120))
    outs = []
    for t, img in enumerate(frames):
        outs += r.push(streams.Frame(t, t, t * 0.04, img))
    outs += r.finish()
    assert {j.track.id for o in outs for j in o.jobs} == {0, 1}
    followed = [j for o in outs for j in o.jobs if j.followed]
    assert len(followed) >= 30  # (five of six frames, two faces, some at the ends)
    for o in outs:
        assert len(o.jobs) == 2
        for job in o.jobs:
            p = align.apply(align.invert(job.transform), align.TEMPLATE)
            errors = []
            for k in range(2):
                true = _transform(45 + 70 * k + 0.6 * o.frame.index, 55 + 8 * k, (44, 40)[k], 3.0 - 6 * k)
                q = align.apply(align.invert(true), align.TEMPLATE)
                errors.append(np.linalg.norm(p - q, axis=1).mean() / np.linalg.norm(q[1] - q[0]))
            assert min(errors) < 0.35, errors


def test_infer_video_end_to_end(tmp_path, mtcnn_weights, face_images, tiny_checkpoint, capsys):
    """The command on a clip with audio: frames, rate, audio kept; tracks.json; track clips."""
    frames = face_clip_frames(face_images, 24)
    src = write_clip(tmp_path / "in.mp4", frames, audio_seconds=1.0)
    out = tmp_path / "res" / "out.mp4"
    argv = ["infer", "--mode=video", f"--checkpoint={tiny_checkpoint}", f"--input={src}",
            f"--output={out}", "--upscale=2", "--max_face=0", "--noprogress", "--track_clips",
            f"--detector_weights={mtcnn_weights}", "--batch_size=8"]
    assert infer.main(argv) == 0
    logged = capsys.readouterr().out
    assert "frames/s" in logged and "2 track(s)" in logged
    assert sorted(os.listdir(tmp_path / "res")) == ["out.mp4", "out.tracks.json", "out_tracks"]
    got = decoded(out)
    ref = decoded(src)
    assert len(got) == 24 and got[0][1].shape == (240, 320, 3)
    assert [t for t, _ in got] == [t for t, _ in ref]
    assert streams.VideoReader(str(out)).info.rate == streams.VideoReader(str(src)).info.rate
    assert audio_packets(out) == audio_packets(src) != []
    table = json.loads((tmp_path / "res" / "out.tracks.json").read_text())
    assert table["video"]["size"] == [160, 120] and table["output"]["size"] == [320, 240]
    assert table["summary"]["frames"] == 24 and len(table["tracks"]) == 2
    for track in table["tracks"]:
        assert track["frames"] == 24 and track["restored_frames"] == 24
        assert track["end"] == "end of the video"
        entry = track["per_frame"][3]
        assert entry["restored"] and len(entry["landmarks"]) == 5 and len(entry["transform"]) == 2
        clip = tmp_path / "res" / track["clip"]
        assert clip.exists() and len(decoded(clip)) == 24 and decoded(clip)[0][1].shape == (128, 128, 3)
    # frame-by-frame and every-other-frame detection run too
    for extra in (["--nosmooth"], ["--detect_every=2", "--codec=libx264", "--crf=30"]):
        o = tmp_path / f"o{len(extra)}.mkv"
        assert infer.main(argv[:4] + [f"--output={o}", "--upscale=1", "--max_face=0", "--noprogress",
                                      f"--detector_weights={mtcnn_weights}"] + extra) == 0
        assert len(decoded(o)) == 24


# ---------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: infer.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in pathlib.Path(folder).rglob("*") if ".tmp" in p.name or p.suffix in (".json",))


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, tiny_checkpoint, capsys):
    good = write_clip(tmp_path / "good.mp4", gradient_frames(6), audio_seconds=0.3)
    base = ["infer", "--mode=video", f"--checkpoint={tiny_checkpoint}", "--noprogress"]
    out = tmp_path / "out" / "o.mp4"

    (tmp_path / "text.mp4").write_text("this is not a video\n")
    msg = _fails(base + [f"--input={tmp_path / 'text.mp4'}", f"--output={out}"], capsys)
    assert "is not a video file" in msg
    data = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end: lost
    msg = _fails(base + [f"--input={tmp_path / 'truncated.mp4'}", f"--output={out}"], capsys)
    assert "truncated.mp4" in msg and ("not a video" in msg or "truncated" in msg)
    with av.open(str(tmp_path / "audio.m4a"), "w") as c:  # no video stream
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        c.mux(a.encode(af))
        c.mux(a.encode())
    msg = _fails(base + [f"--input={tmp_path / 'audio.m4a'}", f"--output={out}"], capsys)
    assert "has no video stream" in msg
    msg = _fails(base + [f"--input={tmp_path / 'missing.mp4'}", f"--output={out}"], capsys)
    assert "does not exist" in msg
    # unwritable outputs: a file where the folder should be, the input itself, a folder, a bad type
    (tmp_path / "afile").write_text("x")
    msg = _fails(base + [f"--input={good}", f"--output={tmp_path / 'afile' / 'o.mp4'}"], capsys)
    assert "cannot write" in msg and "not a folder" in msg
    msg = _fails(base + [f"--input={good}", f"--output={good}"], capsys)
    assert "is the --input" in msg
    msg = _fails(base + [f"--input={good}", f"--output={tmp_path}"], capsys)
    assert "writes .m4v" in msg or "is a folder" in msg
    msg = _fails(base + [f"--input={good}", f"--output={tmp_path / 'o.avi'}"], capsys)
    assert "writes .m4v, .mkv" in msg
    msg = _fails(base + [f"--input={good}", f"--output={out}", "--upscale=auto"], capsys)
    assert "a video keeps one size" in msg
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["good.mp4", "text.mp4", "truncated.mp4",
                                                  "audio.m4a", "afile"])


def test_corrupt_and_truncated_clips(tmp_path):
    """Garbage in the second half of a Matroska file, and a fast-start MP4 cut short: the frames
    that decode are not passed off as the whole clip."""
    frames = gradient_frames(60, 64, 48)
    good = write_clip(tmp_path / "good.mkv", frames, codec="libx264", lossless=False)
    data = bytearray(good.read_bytes())
    start = len(data) * 2 // 3
    data[start:] = np.random.default_rng(0).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    (tmp_path / "corrupt.mkv").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"corrupt or truncated: its \d+ decodable frames cover"):
        list(streams.VideoReader(str(tmp_path / "corrupt.mkv")).frames())
    assert len(list(streams.VideoReader(str(good)).frames())) == 60
    with av.open(str(tmp_path / "fast.mp4"), "w", options={"movflags": "faststart"}) as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        for img in frames:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode())
    whole = (tmp_path / "fast.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(UserError, match=r"is truncated: \d+ of the 60 frames"):
        list(streams.VideoReader(str(tmp_path / "cut.mp4")).frames())


def test_huge_frames_are_refused(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    good = write_clip(tmp_path / "good.mkv", gradient_frames(3, 64, 48))
    base = ["infer", "--mode=video", f"--checkpoint={tiny_checkpoint}", "--noprogress"]
    out = tmp_path / "o.mp4"
    monkeypatch.setattr(streams, "MAX_FRAME_PIXELS", 64 * 48 - 1)
    msg = _fails(base + [f"--input={good}", f"--output={out}"], capsys)
    assert "frames of 64x48 are larger than" in msg
    monkeypatch.setattr(streams, "MAX_FRAME_PIXELS", 64 * 48 * 4)
    msg = _fails(base + [f"--input={good}", f"--output={out}", "--upscale=3"], capsys)
    assert "--upscale=3 makes 192x144 frames" in msg
    assert not out.exists() and not _leftovers(tmp_path)


def test_no_face_and_interrupt_leave_nothing(tmp_path, mtcnn_weights, tiny_checkpoint, capsys, monkeypatch):
    empty = write_clip(tmp_path / "empty.mp4", gradient_frames(8, 96, 64), audio_seconds=0.3)
    out = tmp_path / "o.mp4"
    base = ["infer", "--mode=video", f"--checkpoint={tiny_checkpoint}", "--noprogress",
            f"--detector_weights={mtcnn_weights}", f"--output={out}"]
    msg = _fails(base + [f"--input={empty}"], capsys)
    assert "no face found in any of the 8 frame(s)" in msg and "nothing written" in msg
    assert sorted(os.listdir(tmp_path)) == ["empty.mp4"]
    # a clip that breaks off in the middle: found out after the output was started, removed
    whole = write_clip(tmp_path / "whole.mkv", gradient_frames(60, 64, 48), codec="libx264",
                       lossless=False)
    data = bytearray(whole.read_bytes())
    start = len(data) * 2 // 3
    data[start:] = np.random.default_rng(0).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    (tmp_path / "broken.mkv").write_bytes(bytes(data))
    whole.unlink()
    msg = _fails(base + [f"--input={tmp_path / 'broken.mkv'}", "--track_clips"], capsys)
    assert "is corrupt or truncated" in msg
    assert sorted(os.listdir(tmp_path)) == ["broken.mkv", "empty.mp4"]
    # Ctrl-C in the middle of the clip: the half-written files go
    calls = {"n": 0}
    real = restoration.VideoRestorer.push

    def push(self, frame):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, frame)

    monkeypatch.setattr(restoration.VideoRestorer, "push", push)
    with pytest.raises(KeyboardInterrupt):
        infer.main(base + [f"--input={empty}", "--track_clips"])
    assert sorted(os.listdir(tmp_path)) == ["broken.mkv", "empty.mp4"]


@pytest.mark.slow
def test_memory_is_flat_in_the_clip_length(tmp_path):
    """Peak RSS of the whole loop (decode, restore with the fake model, encode): a clip 8 times
    longer needs about the same memory (run in fresh processes)."""
    code = r"""
import resource, sys, numpy as np
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from conftest import _FakeSR
from test_video import FakeDetector, _path
from progsr_jax.video import outputs, restoration
opts = restoration.VideoOptions(max_face=0.0, batch_size=8, upscale=2.0, follow=False)
class Det(FakeDetector):
    def __call__(self, image):
        return FakeDetector.__call__(self, np.zeros((1, 1, 1), np.uint8))
planned = outputs.plan(sys.argv[1], sys.argv[2], opts)
outputs.restore_video(_FakeSR(), Det(_path), planned, opts, progress=False, log=lambda *a: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    peaks = {}
    for n in (30, 240):
        frames = gradient_frames(1, 320, 240)[0]
        clip = tmp_path / f"c{n}.mp4"
        out = av.open(str(clip), "w")
        vs = out.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        vs.width, vs.height, vs.pix_fmt = 320, 240, "yuv420p"
        for t in range(n):
            img = np.roll(frames, t, axis=1)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode())
        out.close()
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        res = subprocess.run([sys.executable, "-c", code.format(repo=str(REPO), tests=str(REPO / "tests")),
                              str(clip), str(tmp_path / f"o{n}.mp4")], capture_output=True, text=True,
                             env=env, timeout=300, check=False)
        assert res.returncode == 0, res.stderr[-2000:]
        peaks[n] = int(res.stdout.split()[-1])
    assert peaks[240] < 1.1 * peaks[30], peaks
