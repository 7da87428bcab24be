"""``tools/degraded_group_photo.py``: the degraded photo, the comparison picture, one-line errors.

Needs the shared faces (``../shared``, ``PROGSR_SHARED``) and MTCNN's weights
(``pip install --no-deps facenet-pytorch==2.6.0``); skipped with the reason otherwise.
The model is ``conftest.py``'s tiny random generator: this checks the files, not the faces.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from progsr_jax.errors import run_cli


@pytest.fixture(scope="module")
def tool(tool_module):
    return tool_module("degraded_group_photo")




def test_writes_the_jpeg_and_the_comparison(tool, mtcnn_weights, shared_dir, tiny_checkpoint, tmp_path,
                                            capsys):
    out = tmp_path / "docs" / "group.png"
    assert tool.main(["tool", f"--checkpoint=tiny={tiny_checkpoint}", f"--output={out}",
                      f"--shared={shared_dir}", "--upscale=2"]) == 0
    jpeg = tmp_path / "docs" / "group_input.jpg"
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"wrote {jpeg}" in printed
    w, h = tool.PHOTO_SIZE
    with Image.open(jpeg) as im:
        assert im.format == "JPEG" and im.size == (w, h)
        lowres = np.asarray(im.convert("RGB"), np.float32)
    with Image.open(out) as im:
        assert im.format == "PNG"
        # bicubic, the model and the photo before degradation, each at 2x, side by side
        assert im.width >= 3 * 2 * w and 2 * h < im.height < 3 * 2 * h + 200
    # the degraded photo is the composed one, shrunk, blurred, noisy: close to it, not equal
    hr = tool.compose(tool.aligned_faces(str(shared_dir)),
                      tool.background((w * 6, h * 6)), 6)
    clean = np.asarray(hr.reduce(6), np.float32)
    diff = np.abs(lowres - clean)
    assert 1.0 < diff.mean() < 12.0
    # the camera's noise follows the seed
    a = tool.degrade(hr, 6, 0.5, 2.0, seed=0)
    np.testing.assert_array_equal(a, tool.degrade(hr, 6, 0.5, 2.0, seed=0))
    assert not np.array_equal(a, tool.degrade(hr, 6, 0.5, 2.0, seed=1))


@pytest.mark.parametrize("value, message", [
    ("nothere=/no/such/checkpoint", "error: --checkpoint=nothere=/no/such/checkpoint: "
                                    "/no/such/checkpoint does not exist"),
    ("=/tmp", "error: --checkpoint==/tmp: expected NAME=PATH"),
])
def test_bad_checkpoint_is_one_line(tool, tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: tool.main(["tool", f"--checkpoint={value}",
                                   f"--output={tmp_path / 'x.png'}"]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [message]
    assert not (tmp_path / "x.png").exists()


def test_an_unloadable_checkpoint_is_one_line(tool, mtcnn_weights, shared_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: tool.main(["tool", f"--checkpoint=e={empty}", f"--shared={shared_dir}",
                                   f"--output={tmp_path / 'x.png'}"]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(empty) in err[0]


def test_the_camera_on_a_flat_gray(tool):
    """Area downscale of a flat field keeps it; the noise has ``--noise`` as its std at 128,
    less on darker pixels; the blur alone changes nothing on a flat field."""
    gray = Image.new("RGB", (64 * 6, 48 * 6), (128, 128, 128))
    assert np.array_equal(tool.degrade(gray, 6, 1.0, 0.0, seed=0), np.full((48, 64, 3), 128))
    noisy = tool.degrade(gray, 6, 0.0, 3.0, seed=0).astype(np.float64)
    assert noisy.mean() == pytest.approx(128, abs=0.2) and noisy.std() == pytest.approx(3.0, rel=0.08)
    dark = tool.degrade(Image.new("RGB", gray.size, (32, 32, 32)), 6, 0.0, 3.0, seed=0)
    expected = 3.0 * np.sqrt(0.2 + 0.8 * 32 / 128)  # 1.9 gray levels
    assert dark.astype(np.float64).std() == pytest.approx(expected, rel=0.1)
