"""``tools/face_size_sweep.py``: the d-px faces, the camera, the model input, the outputs, errors.

The end-to-end test reads a few CelebA validation faces of the shared data
(``../shared``, ``PROGSR_SHARED``; skipped with the reason when absent) and
runs ``conftest.py``'s tiny random generator: it checks the files and the
bicubic baseline, not what a trained model gains.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from progsr_jax.errors import UserError, run_cli
from progsr_jax.evaluation import sweep_plot


@pytest.fixture(scope="module")
def tool(tool_module):
    return tool_module("face_size_sweep")


def _face(seed: int = 0, size: int = 128) -> np.ndarray:
    """A smooth, textured test image (uint8): gradients and a few sinusoids per channel."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    rng = np.random.default_rng(seed)
    chans = []
    for _ in range(3):
        a, b, c = rng.uniform(2, 6, 3)
        chans.append(128 + 50 * np.sin(a * xx * 3 + b * yy * 2) + 40 * np.cos(c * yy * 3)
                     + 20 * (xx - yy))
    return np.clip(np.rint(np.stack(chans, -1)), 0, 255).astype(np.uint8)


def test_sweep_writes_json_csv_and_plot(tool, celeba_root, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert tool.main(["tool", f"--data_root={celeba_root}", "--split=val", "--offset=240",
                      "--limit=6", f"--checkpoint=tiny={tiny_checkpoint}", "--sizes=32,12,16",
                      "--degradation=none,camera", f"--output={out}", "--nolpips",
                      "--batch_size=8", "--noprogress"]) == 0
    printed = capsys.readouterr().out
    for name in ("sweep.json", "sweep.csv", "sweep.png"):
        assert (out / name).is_file()
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["num_faces"] == 6 and summary["sizes"] == [12, 16, 32]
    assert summary["flags"]["offset"] == 240 and summary["flags"]["lpips"] is False
    for g in ("none", "camera"):
        for m in ("bicubic", "tiny"):
            for d in ("12", "16", "32"):
                r = summary["results"][g][m][d]
                assert r["n"] == 6 and math.isfinite(r["psnr"]) and math.isfinite(r["ssim"])
                assert r["lpips"] is None
                if m == "tiny":
                    assert math.isfinite(r["psnr_gain"]) and r["psnr_gain_se"] > 0
                    assert r["psnr_gain"] == pytest.approx(
                        r["psnr"] - summary["results"][g]["bicubic"][d]["psnr"], abs=1e-9)
        # the bigger the face, the better bicubic does: more pixels to start from
        bicubic = [summary["results"][g]["bicubic"][d]["psnr"] for d in ("12", "16", "32")]
        assert bicubic[0] < bicubic[1] < bicubic[2]
    # the camera costs bicubic at every size
    for d in ("12", "16", "32"):
        assert (summary["results"]["camera"]["bicubic"][d]["psnr"]
                < summary["results"]["none"]["bicubic"][d]["psnr"])
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3
    assert {(r["degradation"], r["method"], r["size"]) for r in rows} == {
        (g, m, d) for g in ("none", "camera") for m in ("bicubic", "tiny")
        for d in ("12", "16", "32")}
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG" and im.width == 900 and 250 < im.height < 900
        # not blank: the lines and the text put many colours on the white
        assert len(im.convert("RGB").getcolors(1 << 20)) > 50
    crossovers = [ln for ln in printed.splitlines() if ln.startswith("crossover ")]
    assert len(crossovers) == 2 and crossovers == summary["crossover_lines"]
    assert "degradation none (6 faces)" in printed and f"wrote {out}" in printed


def test_area_downscale_and_the_model_input(tool):
    face = _face()
    small = tool.area_downscale(face, 64)
    # area downscale by 2: the mean of each 2x2 block
    blocks = face.astype(np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(small.astype(np.float64) - blocks).max() <= 1.0
    assert np.array_equal(tool.small_face(face, 20, "none", 0, 5), tool.area_downscale(face, 20))
    # resize: at 16 px the model sees the face itself; otherwise PIL bicubic to 16x16
    d16 = tool.area_downscale(face, 16)
    assert np.array_equal(tool.model_input(d16, "resize"), d16)
    for d in (12, 32):
        s = tool.area_downscale(face, d)
        expected = np.asarray(Image.fromarray(s).resize((16, 16), Image.BICUBIC))
        assert np.array_equal(tool.model_input(s, "resize"), expected)
    # pipeline: the photo pipeline's input (warp to the aligned frame, bilinear chain), close
    # to the resize on a smooth face but not the same
    for d in (12, 16, 32):
        s = tool.area_downscale(face, d)
        a, b = tool.model_input(s, "pipeline"), tool.model_input(s, "resize")
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8
        diff = np.abs(a.astype(np.float64) - b)
        assert 0 < diff.mean() < 6.0


def test_the_warp_puts_the_face_on_the_crop(tool):
    """A 89-px face spans the 178x178 crop of the aligned frame (rows 20..197) at twice its
    size: its 2x2 means give the face back, and not the face moved by a pixel."""
    face = tool.area_downscale(_face(1), 89)
    frame = np.asarray(tool.aligned_frame(face), np.float64)
    assert frame.shape == (218, 178, 3)
    crop = frame[20:198]
    back = crop.reshape(89, 2, 89, 2, 3).mean(axis=(1, 3))
    err = np.abs(back - face)[2:-2, 2:-2].mean()
    moved = np.abs(back - np.roll(face, 1, axis=1))[2:-2, 2:-2].mean()
    assert err < 1.5 and moved > 2 * err


def test_the_camera_is_fixed_per_seed_and_position(tool):
    small = tool.area_downscale(_face(), 24)
    a = tool.camera(small, seed=0, position=3)
    assert a.shape == small.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, tool.camera(small, seed=0, position=3))
    np.testing.assert_array_equal(a, tool.small_face(_face(), 24, "camera", 0, 3))
    assert not np.array_equal(a, small)
    assert not np.array_equal(a, tool.camera(small, seed=1, position=3))
    assert not np.array_equal(a, tool.camera(small, seed=0, position=4))
    diff = np.abs(a.astype(np.float64) - small)
    assert 1.0 < diff.mean() < 15.0  # mild: blur 0.6 px, noise 3, JPEG 75
    # every step can be switched off
    np.testing.assert_array_equal(tool.camera(small, 0, 3, blur=0, noise=0, jpeg_quality=0),
                                  small)
    gray = np.full((64, 64, 3), 128, np.uint8)
    noisy = tool.camera(gray, 0, 0, blur=0.6, noise=3.0, jpeg_quality=0).astype(np.float64)
    assert noisy.mean() == pytest.approx(128, abs=0.3)
    assert noisy.std() == pytest.approx(3.0, rel=0.1)


def test_crossover(tool):
    rows = {12: {"psnr_gain": 1.0}, 16: {"psnr_gain": 0.5}, 20: {"psnr_gain": 0.1},
            24: {"psnr_gain": -0.2}, 32: {"psnr_gain": 0.05}}
    assert tool.crossover(rows) == {"last_better": 32, "first_not_better": 24}
    rows[32]["psnr_gain"] = -1.0
    line = tool.crossover_line("m", "none", rows, with_lpips=False)
    assert line == ("crossover m / none: beats bicubic in PSNR up to d = 20 px (+0.10 dB); "
                    "first stops at d = 24 px (-0.20 dB)")
    worse = {d: {"psnr_gain": -1.0} for d in (12, 16)}
    assert tool.crossover(worse) == {"last_better": None, "first_not_better": 12}
    assert "never beats bicubic" in tool.crossover_line("m", "camera", worse, False)
    better = {d: {"psnr_gain": 1.0} for d in (12, 16)}
    assert "at every size, up to d = 16 px" in tool.crossover_line("m", "none", better, False)


def test_nice_ticks(tool):
    assert sweep_plot.nice_ticks(-2.7, 1.2) == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]
    ticks = sweep_plot.nice_ticks(-0.03, 0.11)
    assert ticks[0] <= -0.03 and ticks[-1] >= 0.11 and 0.0 in ticks and len(ticks) <= 9


@pytest.mark.parametrize("flag, message", [
    ("--sizes=12,abc", "error: --sizes=12,abc: 'abc' is not a whole number of pixels"),
    ("--sizes=2,16", "error: --sizes=2,16: 2 is outside 4 to 128 pixels"),
    ("--sizes=16,256", "error: --sizes=16,256: 256 is outside 4 to 128 pixels"),
    ("--sizes=", "error: --sizes: give at least one face size, e.g. --sizes=12,16,24,32"),
    ("--degradation=none,fog", "error: --degradation: unknown 'fog'; expected a comma-separated "
                               "list of none, camera"),
    ("--checkpoint=x=/no/such/checkpoint", "error: --checkpoint=x=/no/such/checkpoint: "
                                           "/no/such/checkpoint does not exist"),
    ("--model_input=crop", None),
])
def test_bad_flags_are_one_line(tool, tiny_checkpoint, tmp_path, capsys, flag, message):
    argv = ["tool", f"--data_root={tmp_path}", f"--output={tmp_path / 'out'}"]
    if not flag.startswith("--checkpoint"):
        argv.append(f"--checkpoint=t={tiny_checkpoint}")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: tool.main(argv + [flag]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    if message:
        assert err == [message]
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_no_images_are_one_line(tool, tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, expected in [
        ([f"--data_root={empty}", f"--output={tmp_path / 'o'}"],
         "error: --checkpoint=NAME=PATH is required (repeat it for several models)"),
        ([f"--data_root={empty}", f"--checkpoint=t={tiny_checkpoint}"],
         "error: --output is required (see --help)"),
        ([f"--data_root={empty}", "--source=folder", f"--checkpoint=t={tiny_checkpoint}",
          f"--output={tmp_path / 'o'}"], "error: no image files under"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: tool.main(["tool"] + argv))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), err


def test_helpers_refuse_unknown_modes(tool):
    with pytest.raises(UserError):
        tool.small_face(_face(), 16, "fog", 0, 0)
    with pytest.raises(UserError):
        tool.model_input(tool.area_downscale(_face(), 16), "crop")
