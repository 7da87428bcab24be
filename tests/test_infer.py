"""Inference on files and folders of every image mode, with a fake generator."""

from __future__ import annotations

import pathlib
import sys
import types

import numpy as np
import pytest
from PIL import Image

import progsr_jax
from progsr_jax import data, infer
from progsr_jax.errors import run_cli


@pytest.fixture
def fake_inference(monkeypatch, fake_sr_type):
    """Makes progsr_jax.inference.load return a FakeSR."""
    try:
        from progsr_jax import inference
    except ImportError:  # not written yet: a stand-in module
        inference = types.ModuleType("progsr_jax.inference")
        monkeypatch.setitem(sys.modules, "progsr_jax.inference", inference)
        monkeypatch.setattr(progsr_jax, "inference", inference, raising=False)
    holder = {}

    def load(path):
        holder["path"] = path
        holder["sr"] = fake_sr_type(gain=1.05)
        return holder["sr"]

    monkeypatch.setattr(inference, "load", load, raising=False)
    return holder


def _rgb(w, h, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                     (xx + yy) * 127 // max(w + h - 2, 1)], -1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def make_inputs(root: pathlib.Path) -> tuple[list[str], list[str]]:
    """Writes one image per mode (+ bad files); returns (usable names, bad names)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir()
    Image.fromarray(_rgb(300, 200)).save(root / "rgb_wide.jpg", quality=90)
    Image.fromarray(_rgb(64, 64)[..., 0]).save(root / "gray.jpg")
    rgba = np.dstack([_rgb(80, 80), np.full((80, 80), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    Image.fromarray(_rgb(70, 90)).convert("CMYK").save(root / "cmyk.jpg")
    deep = _rgb(64, 64)[..., 1].astype(np.uint16) * 257
    Image.fromarray(deep).save(root / "sub" / "deep16.png")
    Image.fromarray(_rgb(48, 48)).convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    Image.fromarray(_rgb(40, 40)).convert("1").save(root / "bilevel.bmp")
    Image.fromarray(_rgb(50, 50)).save(root / "dup.jpg")
    Image.fromarray(_rgb(50, 50, 1)).save(root / "dup.png")
    full = root / "full.tmp"
    Image.fromarray(_rgb(200, 200, 3)).save(full, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(full.read_bytes()[:1500])
    full.unlink()
    (root / "text.jpg").write_text("this is not a jpeg\n")
    usable = ["rgb_wide.jpg", "gray.jpg", "alpha.png", "cmyk.jpg", "sub/deep16.png",
              "palette.png", "bilevel.bmp", "dup.jpg", "dup.png"]
    return usable, ["truncated.jpg", "text.jpg"]


def test_folder_of_every_mode(tmp_path, fake_inference):
    usable, bad = make_inputs(tmp_path / "in")
    lines = []
    res = infer.run(str(tmp_path), str(tmp_path / "in"), str(tmp_path / "out"),
                    batch_size=4, progress=False, log=lines.append)
    assert len(res["written"]) == len(usable)
    assert sorted(pathlib.Path(p).name for p, _ in res["skipped"]) == sorted(bad)
    expected = {"rgb_wide.png", "gray.png", "alpha.png", "cmyk.png", "sub/deep16.png",
                "palette.png", "bilevel.png", "dup.png", "dup.png.png"}
    got = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")}
    assert got == expected
    for p in (tmp_path / "out").rglob("*.png"):
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (128, 128)
    text = "\n".join(lines)
    assert "truncated.jpg" in text and "text.jpg" in text and "skipped 2" in text
    assert set(fake_inference["sr"].calls) == {4}  # padded batches


def test_output_is_the_mapped_generator_output(tmp_path, fake_inference):
    src = tmp_path / "face.png"
    Image.fromarray(_rgb(96, 120, 5)).save(src)
    out = tmp_path / "result.png"
    infer.run(str(tmp_path), str(src), str(out), progress=False, log=lambda *a: None)
    lr = data.preprocess(data.open_image(str(src)), crop="square")[16].astype(np.float32)
    x = lr / 127.5 - 1
    y = np.clip(0.5 * np.repeat(np.repeat(x, 8, 0), 8, 1) * 1.05 + 0.5, 0, 1)
    expected = np.floor(y * 255 + 0.5).astype(np.uint8)
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im), expected)
    # an existing folder as --output gets <stem>.png
    (tmp_path / "dir").mkdir()
    infer.run(str(tmp_path), str(src), str(tmp_path / "dir"), progress=False, log=lambda *a: None)
    assert (tmp_path / "dir" / "face.png").exists()


def test_lowres_mode(tmp_path, fake_inference):
    src = tmp_path / "lr"
    src.mkdir()
    tiny = _rgb(16, 16, 7)
    Image.fromarray(tiny).save(src / "tiny16.png")
    Image.fromarray(_rgb(40, 30)).save(src / "wide.png")
    Image.fromarray(_rgb(8, 8)[..., 0]).save(src / "gray8.png")
    res = infer.run(str(tmp_path), str(src), str(tmp_path / "out"), mode="lowres", progress=False,
                    log=lambda *a: None)
    assert len(res["written"]) == 3 and not res["skipped"]
    with Image.open(tmp_path / "out" / "tiny16.png") as im:
        out = np.asarray(im)
    # a 16x16 input is used as is: the fake generator upsamples it 8x nearest
    x = tiny.astype(np.float32) / 127.5 - 1
    exp = np.floor(np.clip(0.5 * 1.05 * x + 0.5, 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[::8, ::8], exp)


def test_nothing_usable_is_an_error(tmp_path, fake_inference, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.jpg").write_text("nope")
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    argv = ["infer", f"--checkpoint={tmp_path}", f"--input={src}", f"--output={tmp_path / 'out'}",
            "--noprogress"]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: infer.main(argv))
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: nothing could be processed")
    assert "a.jpg" in "\n".join(err) and "b.png" in "\n".join(err)
    # misuse: missing input
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: infer.main(["infer", f"--checkpoint={tmp_path}",
                                    f"--input={tmp_path / 'nope'}",
                                    f"--output={tmp_path / 'o'}"]))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: --input does not exist")
