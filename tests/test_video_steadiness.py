"""tools/video_steadiness.py on a few frames: the clip, the truth, the scores and the figure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from progsr_jax.errors import UserError
from progsr_jax.photo import align

# PyAV is the optional extra `video` (pip install -e '.[video]'); CI installs it.
pytest.importorskip("av", reason="PyAV not installed (pip install -e '.[video]')")
from progsr_jax.video import streams


def test_paths_transforms_and_metrics(tool_module):
    tool = tool_module("video_steadiness")
    rng = np.random.default_rng(0)
    for generator in tool.GENERATORS:
        p = tool.paths(generator, 50, (256, 144), 12.0, 30.0, rng)
        assert p.shape == (50, 2, 4)
        assert 11.9 <= p[:, :, 2].min() and p[:, :, 2].max() <= 30.1  # spans within the range
        m = tool.transform_of(*p[7, 1])
        assert align.CROP_SIZE / align.similarity_params(m)["scale"] == pytest.approx(p[7, 1, 2])
        centre = align.apply(align.invert(m), align.FRAME_CENTRE[None])[0]
        np.testing.assert_allclose(centre, p[7, 1, :2], atol=1e-9)
    # the scores: a copy of the truth has no flicker and infinite PSNR; noise adds flicker
    truth = np.repeat(rng.uniform(0, 255, (1, 1, 128, 128, 3)).astype(np.float32), 6, axis=0)
    mask = tool.face_mask()
    same = tool.scores(truth, truth, mask)
    assert same["flicker"] == pytest.approx(0.0, abs=1e-6) and same["psnr"] > 90
    noisy = truth + rng.normal(0, 5, truth.shape).astype(np.float32)
    worse = tool.scores(noisy, truth, mask)
    assert 5 < worse["flicker"] < 6.5 and 30 < worse["psnr"] < 40  # E|N(0, 5 sqrt 2)| = 5.6
    # jitter: the true transforms reported as the track's give 0
    truth_json = {"transforms": [[tool.transform_of(40 + t, 50, 20, 0).tolist()] for t in range(5)]}
    tracks = {"tracks": [{"per_frame": [{"frame": t, "transform": truth_json["transforms"][t][0]}
                                        for t in range(5)]}]}
    j, aligned, pairs = tool.jitter(tracks, truth_json)
    assert j == pytest.approx(0.0, abs=1e-9) and aligned == 1.0 and pairs == 4


def test_make_and_score_a_tiny_clip(tmp_path, mtcnn_weights, tiny_checkpoint, tool_module, celeba_root):
    tool = tool_module("video_steadiness")
    work = tmp_path / "clip"
    out = tmp_path / "docs" / "steady.png"
    assert tool.main(["video_steadiness", f"--workdir={work}", f"--checkpoint={tiny_checkpoint}",
                      f"--output={out}", "--frames=10", "--upscale=2", f"--shared={celeba_root.parents[1]}",
                      "--max_face=0", "--option=combine_window=1"]) == 0
    truth = json.loads((work / "truth.json").read_text())
    assert truth["frames"] == 10 and len(truth["transforms"]) == 10 and truth["faces"] == 2
    clip = streams.VideoReader(str(work / "input.mp4"))
    assert clip.info.size == (256, 144) and clip.info.frames == 10
    assert streams.VideoReader(str(work / "truth.mp4")).info.size == (512, 288)
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["methods"]) == {"bicubic", "frame-by-frame", "smoothed"}
    for r in report["methods"].values():
        assert np.isfinite(r["flicker"]) and 5 < r["psnr"] < 60
        assert len(r["flicker_over_time"]) == 9 and len(r["psnr_over_time"]) == 10
    assert report["options"] == {"combine_window": 1}
    assert out.exists() and out.stat().st_size > 10_000
    with pytest.raises(UserError, match="--option=nope=1"):
        tool.parse_options(["nope=1"])
