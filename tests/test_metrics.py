"""Metrics against independent plain-numpy computations on fixed arrays."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from progsr_jax.evaluation import metrics

W = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# jit everything once: eager op-by-op dispatch is slow and every new shape
# compiles again, so the tests share the shape of the `pair` fixture.
ssim_cs = jax.jit(metrics.ssim_cs)
ms_ssim = jax.jit(metrics.ms_ssim)
per_image_metrics = jax.jit(metrics.per_image_metrics)
pfsr_batch = jax.jit(metrics.pfsr_batch)


# ------------------------------------------------------- numpy references
def ref_window(k, sigma=1.5):
    g = np.array([math.exp(-((x - k // 2) ** 2) / (2 * sigma ** 2)) for x in range(k)])
    g /= g.sum()
    return np.outer(g, g)


def ref_ssim_cs(x, y, data_range=1.0):
    """Direct windowed SSIM of two (H, W) float64 arrays: loops over valid positions."""
    h, w = x.shape
    k = min(11, h, w)
    win = ref_window(k)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ss, cs = [], []
    for i in range(h - k + 1):
        for j in range(w - k + 1):
            px, py = x[i:i + k, j:j + k], y[i:i + k, j:j + k]
            mx, my = (win * px).sum(), (win * py).sum()
            vx = (win * (px - mx) ** 2).sum()
            vy = (win * (py - my) ** 2).sum()
            cxy = (win * (px - mx) * (py - my)).sum()
            c = (2 * cxy + c2) / (vx + vy + c2)
            ss.append((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * c)
            cs.append(c)
    return float(np.mean(ss)), float(np.mean(cs))


def ref_image_ssim_cs(a, b, data_range=1.0):
    """(H, W, C) images: channel-averaged (ssim, cs)."""
    vals = [ref_ssim_cs(a[..., c].astype(np.float64), b[..., c].astype(np.float64), data_range)
            for c in range(a.shape[-1])]
    return float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals]))


def ref_pool(a):
    h, w = a.shape[0] // 2, a.shape[1] // 2
    out = np.zeros((h, w) + a.shape[2:])
    for i in range(h):
        for j in range(w):
            out[i, j] = a[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(0, 1))
    return out


def ref_scales(a, b):
    ss, cs = [], []
    a, b = a.astype(np.float64), b.astype(np.float64)
    for j in range(5):
        if j:
            a, b = ref_pool(a), ref_pool(b)
        s, c = ref_image_ssim_cs(a, b)
        ss.append(s)
        cs.append(c)
    return np.array(ss), np.array(cs)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(1234)
    a = rng.random((2, 48, 40, 3)).astype(np.float32)
    b = np.clip(a + 0.15 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    return a, b


@pytest.fixture(scope="module")
def pair_scales(pair):
    """numpy (ssim, cs) at the 5 scales, per image: shapes (2, 5)."""
    a, b = pair
    out = [ref_scales(a[i], b[i]) for i in range(a.shape[0])]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


# --------------------------------------------------------------- PSNR / Y
def test_psnr_hand_checked():
    a = np.full((2, 8, 8, 3), 0.5, np.float32)
    b = a + np.float32(0.1)
    np.testing.assert_allclose(np.asarray(metrics.psnr(a, b)), [20.0, 20.0], atol=1e-4)
    c = a.copy()
    c[1] += np.float32(0.01)
    np.testing.assert_allclose(np.asarray(metrics.psnr(a, c))[1], 40.0, atol=1e-3)
    assert np.isinf(np.asarray(metrics.psnr(a, a))).all()


def test_rgb_to_y_hand_checked():
    x = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.4, 0.6]],
                 np.float32)
    y = np.asarray(metrics.rgb_to_y(x))[:, 0] * 255
    expected = [235.0, 16.0, 16 + 65.481, 16 + 128.553, 16 + 24.966,
                16 + 0.2 * 65.481 + 0.4 * 128.553 + 0.6 * 24.966]
    np.testing.assert_allclose(y, expected, atol=1e-3)
    assert metrics.rgb_to_y(np.zeros((2, 5, 5, 3), np.float32)).shape == (2, 5, 5, 1)


def test_psnr_y_gray_offset():
    a = np.full((1, 16, 16, 3), 0.3, np.float32)
    b = a + np.float32(0.1)
    expected = -20 * math.log10(0.1 * 219.0 / 255.0)
    np.testing.assert_allclose(float(metrics.psnr_y(a, b)[0]), expected, atol=1e-3)


# -------------------------------------------------------------------- SSIM
def test_ssim_identical_is_one(pair):
    a, _ = pair
    np.testing.assert_allclose(np.asarray(ssim_cs(a, a)[0]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ms_ssim(a, a)), 1.0, atol=1e-5)


def test_ssim_and_cs_match_direct_numpy(pair):
    a, b = pair
    s, cs = ssim_cs(a, b)
    for i in range(a.shape[0]):
        rs, rc = ref_image_ssim_cs(a[i], b[i])
        assert abs(float(s[i]) - rs) < 2e-5
        assert abs(float(cs[i]) - rc) < 2e-5


def test_ssim_window_shrinks_for_small_images():
    rng = np.random.default_rng(5)
    a = rng.random((1, 7, 9, 3)).astype(np.float32)  # window 7, off-centre rule irrelevant
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    rs, rc = ref_image_ssim_cs(a[0], b[0])
    s, cs = ssim_cs(a, b)
    assert abs(float(s[0]) - rs) < 2e-5 and abs(float(cs[0]) - rc) < 2e-5
    a8, b8 = a[:, :, :8], b[:, :, :8]  # 7x8 -> window 7; 8x8 -> even window 8 (centre 4)
    a8 = np.concatenate([a8, a8[:, :1]], axis=1)
    b8 = np.concatenate([b8, b8[:, :1]], axis=1)
    rs, _ = ref_image_ssim_cs(a8[0], b8[0])
    assert abs(float(ssim_cs(a8, b8)[0][0]) - rs) < 2e-5


def test_ssim_y_matches_numpy(pair):
    a, b = pair
    ya = np.asarray(metrics.rgb_to_y(a))
    yb = np.asarray(metrics.rgb_to_y(b))
    rs, _ = ref_image_ssim_cs(ya[0], yb[0])
    assert abs(float(jax.jit(metrics.ssim_y)(a, b)[0]) - rs) < 2e-5


def test_ms_ssim_matches_wang_definition(pair, pair_scales):
    a, b = pair
    got = np.asarray(ms_ssim(a, b))
    for i in range(a.shape[0]):
        ss, cs = pair_scales[0][i], pair_scales[1][i]
        expected = np.prod(cs[:4] ** np.array(W[:4])) * ss[4] ** W[4]
        assert abs(got[i] - expected) < 5e-5
    per = per_image_metrics(a, b)  # the fused version agrees
    np.testing.assert_allclose(np.asarray(per["ms_ssim"]), got, atol=1e-6)
    np.testing.assert_allclose(np.asarray(per["ssim"]), np.asarray(ssim_cs(a, b)[0]), atol=1e-6)


def test_metrics_are_jittable(pair):
    a, b = pair
    out = per_image_metrics(a, b)
    keys = ("psnr", "ssim", "ms_ssim", "psnr_y", "ssim_y")
    assert {k: v.shape for k, v in out.items()} == {k: (2,) for k in keys}
    assert all(v.dtype == np.float32 for v in out.values())


# ----------------------------------------------------------- pfsr protocol
def test_pfsr_psnr_is_batch_mse_and_depends_on_batch_size():
    hr = np.full((4, 48, 40, 3), 0.5, np.float32)
    d = np.array([0.01, 0.1, 0.2, 0.05], np.float32)
    sr = hr + d[:, None, None, None]
    per_image = -20 * np.log10(d.astype(np.float64))
    np.testing.assert_allclose(np.asarray(metrics.psnr(sr, hr)), per_image, atol=1e-3)

    def batch_psnr(ds):
        return -10 * math.log10(np.mean(np.square(ds.astype(np.float64))))

    expect = {
        4: batch_psnr(d),
        2: (batch_psnr(d[:2]) + batch_psnr(d[2:])) / 2,
        3: (batch_psnr(d[:3]) + batch_psnr(d[3:])) / 2,  # the last batch of 1 counts fully
        1: per_image.mean(),
    }
    got = {bs: metrics.pfsr_evaluate(sr, hr, bs)["psnr"] for bs in expect}
    for bs in expect:
        assert abs(got[bs] - expect[bs]) < 1e-3, (bs, got[bs], expect[bs])
    assert abs(got[4] - per_image.mean()) > 1.0  # batch MSE != mean per-image PSNR
    assert len({round(v, 3) for v in got.values()}) == 4


def test_pfsr_ssim_is_batch_mean_and_ms_ssim_quirk(pair, pair_scales):
    a, b = pair
    mss, mcs = pair_scales[0].mean(0), pair_scales[1].mean(0)
    w = np.array(W)
    quirk = np.prod(mcs[:4] ** w[:4] * mss[4] ** w[4])  # ssim_5 enters four times
    wang = np.prod(mcs[:4] ** w[:4]) * mss[4] ** w[4]
    psnr_b, ssim_b, ms_b = pfsr_batch(a, b)
    assert abs(float(ssim_b) - mss[0]) < 2e-5
    assert abs(float(ms_b) - quirk) < 5e-5
    assert abs(quirk - wang) > 1e-3  # the quirk matters
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert abs(float(psnr_b) + 10 * math.log10(mse)) < 1e-3
    # padded images are ignored through the mask; pfsr_evaluate pads the same way
    pad = np.concatenate([a, np.zeros_like(a[:1])]), np.concatenate([b, np.ones_like(b[:1])])
    masked = pfsr_batch(*pad, np.array([True, True, False]))
    np.testing.assert_allclose([float(v) for v in masked],
                               [float(psnr_b), float(ssim_b), float(ms_b)], rtol=1e-5)
    whole = metrics.pfsr_evaluate(a, b, batch_size=2)
    np.testing.assert_allclose([whole["psnr"], whole["ssim"], whole["ms_ssim"]],
                               [float(psnr_b), float(ssim_b), float(ms_b)], rtol=1e-5)


def test_pfsr_dynamic_range_guess(pair):
    a, b = pair
    # the released ssim.py takes L = 255 when the first image's max exceeds 128
    _, ssim255, _ = pfsr_batch(255 * a, 255 * b)
    ref = np.mean([ref_image_ssim_cs(255.0 * a[i], 255.0 * b[i], 255)[0] for i in range(2)])
    assert abs(float(ssim255) - ref) < 1e-4
    # and L = 2 when its min is below -0.5 (inputs in [-1, 1])
    _, ssim2, _ = pfsr_batch(2 * a - 1, 2 * b - 1)
    ref = np.mean([ref_image_ssim_cs(2.0 * a[i] - 1, 2.0 * b[i] - 1, 2)[0] for i in range(2)])
    assert abs(float(ssim2) - ref) < 1e-4


def test_negative_cs_clipped_in_standard_nan_in_pfsr(pair):
    a, _ = pair
    b = 1.0 - a  # anti-correlated: cs < 0 at the fine scales
    _, cs = ssim_cs(a, b)
    assert (np.asarray(cs) < 0).all()
    ms = np.asarray(ms_ssim(a, b))
    assert np.isfinite(ms).all() and (ms >= 0).all() and (ms <= 1).all()
    assert math.isnan(float(pfsr_batch(a, b)[2]))


# ------------------------------------------------------------------- LPIPS
def test_lpips_zero_for_identical_positive_for_different():
    rng = np.random.default_rng(0)
    a = rng.random((2, 32, 32, 3)).astype(np.float32)
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    lp = metrics.LPIPS()
    same = np.asarray(lp(a, a))
    diff = np.asarray(lp(a, b))
    assert same.shape == (2,) and diff.shape == (2,)
    assert np.abs(same).max() < 1e-6
    assert (diff > 1e-3).all()
    # inputs are [0, 1]: a global brightness change is a (small) positive distance
    assert float(np.asarray(lp(a[:1], np.clip(a[:1] * 0.5, 0, 1)))[0]) > 0
