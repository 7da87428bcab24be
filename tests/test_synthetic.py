"""Tests of the procedural synthetic faces (progsr_jax.data.synthetic)."""

from __future__ import annotations

import time

import numpy as np

from progsr_jax.data import synthetic


def test_shapes_and_ranges():
    faces, lms = synthetic.synthetic_dataset(12, seed=0)
    assert faces.shape == (12, 128, 128, 3) and faces.dtype == np.uint8
    assert lms.shape == (12, 68, 2) and lms.dtype == np.float32
    assert (lms >= 0).all() and (lms <= 127).all()  # inside the image
    img, lm = synthetic.make_face(synthetic.face_rng(1, 2), size=64)
    assert img.shape == (64, 64, 3) and lm.shape == (68, 2)
    assert (lm >= 0).all() and (lm <= 63).all()


def test_deterministic_and_prefix_stable():
    a_faces, a_lms = synthetic.synthetic_dataset(5, seed=4)
    b_faces, b_lms = synthetic.synthetic_dataset(9, seed=4)
    np.testing.assert_array_equal(a_faces, b_faces[:5])
    np.testing.assert_array_equal(a_lms, b_lms[:5])
    c_faces, _ = synthetic.synthetic_dataset(5, seed=5)
    assert not np.array_equal(a_faces, c_faces)


def test_faces_differ_and_have_detail():
    faces, _ = synthetic.synthetic_dataset(8, seed=0)
    flat = faces.reshape(8, -1).astype(np.float32)
    for i in range(8):
        for j in range(i + 1, 8):
            assert np.abs(flat[i] - flat[j]).mean() > 10
    # Some high-frequency content: neighbouring pixels differ noticeably.
    assert np.abs(np.diff(faces.astype(np.float32), axis=2)).mean() > 2


def test_landmark_layout_is_plausible():
    _, lms = synthetic.synthetic_dataset(16, seed=1)
    for lm in lms:
        eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
        assert eye_l[0] < eye_r[0]                       # image-left eye first
        assert lm[0, 0] < lm[8, 0] < lm[16, 0]           # jaw runs left -> chin -> right
        assert lm[19, 1] < eye_l[1] < lm[30, 1]          # brow above eye above nose tip
        assert lm[30, 1] < lm[62, 1] < lm[8, 1]          # nose tip, mouth, chin downwards
        assert lm[48, 0] < lm[54, 0] and lm[60, 0] < lm[64, 0]


def test_fast_enough():
    rng = synthetic.face_rng(0, 0)
    synthetic.make_face(rng)
    t0 = time.process_time()
    for i in range(20):
        synthetic.make_face(synthetic.face_rng(0, i))
    per_face = (time.process_time() - t0) / 20
    assert per_face < 0.05  # a loose bound for slow CI; about 2-4 ms on a desktop
