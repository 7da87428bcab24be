"""The degradation model of the 16x16 inputs (progsr_jax.data.degradation)."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
from PIL import Image

from progsr_jax import data
from progsr_jax.benchmarks import input_and_export
from progsr_jax.data import degradation as deg
from progsr_jax.errors import UserError
from progsr_jax.training import config as config_files

#: Nothing but the paper's chain: the base the single-operation specs below change.
CHAIN = deg.Spec()


@pytest.fixture(scope="module")
def faces():
    """24 synthetic faces held in memory."""
    return data.build_dataset(dict(source="synthetic", num_synthetic=24, cache_dir=""),
                              progress=False, log=lambda _: None)


def _only(**fields) -> deg.Spec:
    return dataclasses.replace(CHAIN, **fields)


def test_off_by_default_and_batches_are_todays_byte_for_byte(faces):
    assert deg.from_config(config_files.load("step3.py").data.degradation) is None
    assert deg.from_config(config_files.load("step3.py:cpu").data.degradation) is None
    for stage in (1, 2, 3):
        b = data.get_batch(faces, 5, 8, 3, stage)
        idx = data.batch_indices(len(faces), 8, 3, 5)
        r = 16 * 2 ** stage
        assert b["lr"].tobytes() == data.to_float(faces.images[16][idx]).tobytes()
        assert b["hr"].tobytes() == data.to_float(faces.images[r][idx]).tobytes()


def test_chain_from_the_128_image_equals_the_cached_16(faces):
    # An image left clean in a degraded run gets exactly the paper's input.
    hr = np.asarray(faces.images[128][:8])
    np.testing.assert_array_equal(deg.degrade(hr, CHAIN, 0, 0), faces.images[16][:8])
    clean = _only(clean_prob=1.0, blur_prob=1.0, noise_prob=1.0, jpeg_prob=1.0)
    np.testing.assert_array_equal(deg.degrade(hr, clean, 0, 0), faces.images[16][:8])


@pytest.mark.parametrize("preset", ["mild", "real"])
def test_deterministic_per_seed_step_and_position(faces, preset):
    spec = deg.from_config(preset)
    hr = np.asarray(faces.images[128][:12])
    a = deg.degrade(hr, spec, 7, 3)
    np.testing.assert_array_equal(a, deg.degrade(hr, spec, 7, 3))
    # An image's result depends on (seed, step, position) only, not on its batch
    # neighbours or on how the batch is split over devices or hosts.
    for i in (0, 5, 11):
        np.testing.assert_array_equal(a[i], deg.degrade(hr[i:i + 1], spec, 7, 3, [i])[0])
    assert not np.array_equal(a, deg.degrade(hr, spec, 7, 4))
    assert not np.array_equal(a, deg.degrade(hr, spec, 8, 3))
    assert not np.array_equal(a[1:], deg.degrade(hr[1:], spec, 7, 3))  # other positions
    assert a.dtype == np.uint8 and a.shape == (12, 16, 16, 3)
    assert not np.array_equal(a, faces.images[16][:12])


def test_get_batch_degrades_from_the_128_image_at_batch_time(faces):
    spec = deg.from_config("real")
    for stage in (1, 3):
        b = data.get_batch(faces, 2, 8, 1, stage, degradation=spec)
        idx = data.batch_indices(len(faces), 8, 1, 2)
        want = deg.degrade(np.asarray(faces.images[128][idx]), spec, 1, 2)
        assert b["lr"].tobytes() == data.to_float(want).tobytes()
        r = 16 * 2 ** stage
        assert b["hr"].tobytes() == data.to_float(faces.images[r][idx]).tobytes()


def test_gaussian_blur_attenuates_a_frequency_by_the_computed_factor():
    # cos(2 pi f x) through a Gaussian of std s keeps exp(-2 pi^2 s^2 f^2) of its amplitude.
    f, s = 1 / 8, 2.0
    x = np.arange(128)
    wave = 127.5 + 100 * np.cos(2 * np.pi * f * x)
    img = np.repeat(np.repeat(wave[None, :, None], 128, 0), 3, 2)[None].astype(np.float32)
    k = deg.kernel("iso", s, s, 0.0, 1.0, 8)
    out = deg.blur(img, k[None])[0]
    inner = slice(16, 112)
    amplitude = lambda a: np.abs(np.fft.rfft(a[64, inner, 0] - 127.5))[12]  # noqa: E731
    ratio = amplitude(out) / amplitude(img[0])
    assert ratio == pytest.approx(math.exp(-2 * math.pi ** 2 * s ** 2 * f ** 2), rel=0.01)

    def response(k):  # the kernel's exact transfer function at (f, 0)
        r = k.shape[0] // 2
        return float(np.sum(k * np.cos(2 * np.pi * f * np.arange(-r, r + 1))[None, :]))

    # Anisotropic: axis-aligned (theta = 0), sigma_x acts on a wave along x; rotated by
    # 90 degrees, sigma_y does.
    for theta, sx in ((0.0, 0.8), (math.pi / 2, 3.0)):
        k = deg.kernel("aniso", 0.8, 3.0, theta, 1.0, 10)
        ratio = amplitude(deg.blur(img, k[None])[0]) / amplitude(img[0])
        assert ratio == pytest.approx(response(k), rel=0.01, abs=0.002)
        assert ratio == pytest.approx(math.exp(-2 * math.pi ** 2 * sx ** 2 * f ** 2), rel=0.02,
                                      abs=0.002)


def test_blur_lowers_the_detail_of_faces(faces):
    hr = np.asarray(faces.images[128][:8])
    out = deg.degrade(hr, _only(blur_prob=1.0, blur_sigma=(6.0, 6.0)), 0, 0)
    clean = np.asarray(faces.images[16][:8])

    def detail(a):  # mean squared difference of horizontal neighbours
        return float(np.mean(np.diff(a.astype(np.float64), axis=2) ** 2))

    assert detail(out) < 0.7 * detail(clean)


def test_kernels_are_normalised_and_generalised_beta_one_is_gaussian():
    g = deg.kernel("aniso", 1.5, 2.5, 0.7, 1.0, 8)
    assert g.sum() == pytest.approx(1.0) and g.shape == (17, 17)
    np.testing.assert_allclose(g, g[::-1, ::-1])  # point-symmetric
    np.testing.assert_allclose(deg.kernel("generalized", 1.5, 2.5, 0.7, 1.0, 8), g)
    flat = deg.kernel("generalized", 2.0, 2.0, 0.0, 4.0, 8)  # plateau-like: flatter top
    gauss = deg.kernel("iso", 2.0, 2.0, 0.0, 1.0, 8)
    assert flat[8, 9] / flat[8, 8] > gauss[8, 9] / gauss[8, 8]


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_at_quality_q_equals_pils_round_trip(faces, quality):
    hr = np.asarray(faces.images[128][:6])
    out = deg.degrade(hr, _only(jpeg_prob=1.0, jpeg_quality=(quality, quality)), 4, 9)
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(faces.images[16][i])).save(buf, "JPEG", quality=quality)
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(out[i], want)


def _flat(level: int, n: int = 32) -> np.ndarray:
    return np.full((n, 128, 128, 3), level, np.uint8)


@pytest.mark.parametrize("gray", [False, True])
def test_gaussian_noise_statistics(gray):
    sigma = 8.0
    spec = _only(noise_prob=1.0, noise_sigma=(sigma, sigma), gray_noise_prob=float(gray))
    diff = deg.degrade(_flat(128), spec, 0, 0).astype(np.float64) - 128
    assert abs(diff.mean()) < 0.3
    # Rounding to integers adds 1/12 to the variance.
    assert diff.std() == pytest.approx(math.sqrt(sigma ** 2 + 1 / 12), rel=0.04)
    same_in_all_channels = np.all(diff == diff[..., :1])
    assert same_in_all_channels == gray


def test_poisson_noise_grows_with_brightness():
    scale = 2.0
    spec = _only(noise_prob=1.0, poisson_prob=1.0, poisson_scale=(scale, scale))
    for level in (40, 200):
        diff = deg.degrade(_flat(level), spec, 0, 0).astype(np.float64) - level
        want = 255 * scale * math.sqrt(level / 255 / 256)
        assert diff.std() == pytest.approx(want, rel=0.06), level
        assert abs(diff.mean()) < 0.5


def test_resize_modes_and_intermediate_size_change_the_input(faces):
    hr = np.asarray(faces.images[128][:4])
    outs = {m: deg.degrade(hr, _only(resize_modes=(m,)), 0, 0) for m in deg.RESIZE_MODES}
    for m in ("area", "bilinear", "bicubic"):
        assert not np.array_equal(outs[m], outs["chain"])
    area = np.stack([np.asarray(Image.fromarray(h).resize((16, 16), Image.BOX)) for h in hr])
    np.testing.assert_array_equal(outs["area"], area)
    mid = deg.degrade(hr, _only(resize_modes=("bicubic",), resize_mid_prob=1.0,
                                resize_mid=(40, 40)), 0, 0)
    via = np.stack([np.asarray(Image.fromarray(h).resize((40, 40), Image.BICUBIC)
                               .resize((16, 16), Image.BICUBIC)) for h in hr])
    np.testing.assert_array_equal(mid, via)


def test_second_pass_runs_and_stays_deterministic(faces):
    hr = np.asarray(faces.images[128][:6])
    spec = _only(second_prob=1.0, resize_modes=("area",), resize_mid=(32, 48),
                 jpeg_prob=1.0, jpeg_quality=(50, 90))
    plans = [deg.draw(spec, 0, 0, i) for i in range(6)]
    assert all(p.second is not None and 32 <= p.mid <= 48 for p in plans)
    a = deg.degrade(hr, spec, 0, 0)
    np.testing.assert_array_equal(a, deg.degrade(hr, spec, 0, 0))
    np.testing.assert_array_equal(a[3:], deg.degrade(hr[3:], spec, 0, 0, [3, 4, 5]))
    assert a.shape == (6, 16, 16, 3)


@pytest.mark.parametrize("cfg, needle", [
    ({"preset": "studio"}, "unknown degradation preset 'studio'"),
    ({"preset": "none", "jpeg_prob": 0.5}, "degradation.preset is 'none'"),
    ({"preset": "real", "jpeg_prob": 1.5}, "jpeg_prob must be a probability"),
    ({"preset": "real", "jpeg_quality": (90, 40)}, "jpeg_quality must be (low, high)"),
    ({"preset": "mild", "resize_modes": ("lanczos",)}, "resize_modes must be"),
    ({"preset": "mild", "blur_kinds": (0, 0, 0)}, "blur_kinds must be"),
    ({"preset": "mild", "blur_sigma": (1, 20)}, "blur_sigma must be at most 8"),
])
def test_bad_values_are_one_line_errors(cfg, needle):
    with pytest.raises(UserError) as e:
        deg.from_config(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_presets_and_overrides_from_the_command_line_config():
    c = config_files.load("step3.py:cpu_real")
    spec = deg.from_config(c.data.degradation)
    assert spec == dataclasses.replace(deg.PRESETS["mild"], clean_prob=0.5)
    cpu = config_files.load("step3.py:cpu")
    for key in ("model", "batch_size", "loss"):  # the same model budget as :cpu
        assert c[key] == cpu[key], key
    assert tuple(c.stage_steps) == (500, 500, 4500) and c.optim.decay == "cosine"
    c.data.degradation.jpeg_quality = (40, 90)
    assert deg.from_config(c.data.degradation).jpeg_quality == (40, 90)
    assert "jpeg_quality=(40, 90)" in deg.describe(c.data.degradation)


def test_bench_data_mode_reports_degraded_images_per_second():

    out = input_and_export.bench_data(batch_size=4, steps=2, warmup=1, preset="mild", workers=[1, 0])
    assert [r["workers"] for r in out["results"]] == [0, 1]
    assert out["clean_stage3_images_per_sec_in_process"] > 0
    for row in out["results"]:
        for key in ("stage1_images_per_sec", "stage3_images_per_sec", "startup_s"):
            assert row[key] > 0, (row, key)
    speedup = out["speedup_over_in_process"]
    assert speedup["0"] == {"stage1": 1.0, "stage3": 1.0} and speedup["1"]["stage3"] > 0
    rounds = input_and_export.bench_data(batch_size=4, steps=2, warmup=1, preset="mild", workers=[0],
                              repeats=3)["results"][0]
    assert len(rounds["stage3_all_images_per_sec"]) == 3
    assert rounds["stage3_images_per_sec"] == sorted(rounds["stage3_all_images_per_sec"])[1]
    with pytest.raises(UserError, match="other than 'none'"):
        input_and_export.bench_data(batch_size=4, steps=1, warmup=0, preset="none")
