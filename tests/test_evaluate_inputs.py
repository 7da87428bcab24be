"""evaluate --source=paired (inputs made elsewhere) and --degradation (a fixed degraded set)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from progsr_jax import data
from progsr_jax.data import degradation
from progsr_jax.evaluation import sr as ev

REPO = pathlib.Path(__file__).resolve().parents[1]


def _faces(n: int) -> np.ndarray:
    ds = data.build_dataset(dict(source="synthetic", num_synthetic=n, cache_dir=""),
                            progress=False, log=lambda _: None)
    return np.asarray(ds.images[128])


def _eval(out: pathlib.Path, **kw) -> dict:
    kw.setdefault("data_root", None)
    ev.evaluate(ev.EvalConfig(output=str(out), method="bicubic", lpips=False, progress=False,
                              **kw), log=lambda *a: None)
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture
def paired(tmp_path):
    """lr/ and hr/ with 4 good pairs (JPEG-degraded LR) and every kind of bad file."""
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    hr.mkdir(), lr.mkdir()
    faces = _faces(6)
    spec = degradation.from_config("real")
    small = degradation.degrade(faces, spec, 0, 0)
    for i in range(4):
        Image.fromarray(faces[i]).save(hr / f"face{i}.png")
        Image.fromarray(small[i]).save(lr / f"face{i}.png")
    Image.fromarray(faces[4]).save(hr / "only_hr.png")          # no partner
    Image.fromarray(small[5]).save(lr / "only_lr.png")          # no partner
    Image.fromarray(faces[5]).save(hr / "wrong_lr.png")
    Image.fromarray(faces[5][::4, ::4]).save(lr / "wrong_lr.png")  # 32x32, not 16x16
    Image.fromarray(faces[5][:64, :64]).save(hr / "wrong_hr.png")  # 64x64, not 128x128
    Image.fromarray(small[5]).save(lr / "wrong_hr.png")
    (hr / "broken.png").write_bytes(b"not an image")
    Image.fromarray(small[5]).save(lr / "broken.png")
    Image.fromarray(small[0]).save(lr / "twice.png")
    Image.fromarray(small[0]).save(lr / "twice.jpg")             # one stem, two files
    Image.fromarray(faces[0]).save(hr / "twice.png")
    return tmp_path, faces, small


def test_paired_inputs_are_used_as_given_and_bad_files_are_named(paired, tmp_path):
    root, faces, small = paired
    m = _eval(tmp_path / "out", source="paired", lr_dir=str(root / "lr"), hr_dir=str(root / "hr"))
    assert m["num_images"] == 4
    reasons = m["skipped_reasons"]
    assert "no low-resolution file with the stem 'only_hr'" in reasons["only_hr.png"]
    assert any("no high-resolution file with the stem 'only_lr'" in r for r in reasons.values())
    assert "low-resolution image is 32x32, expected 16x16" in reasons["wrong_lr.png"]
    assert "high-resolution image is 64x64, expected 128x128" in reasons["wrong_hr.png"]
    assert "not an image" in reasons["broken.png"]
    assert sum("2 files with the stem 'twice'" in r for r in reasons.values()) == 2
    # The given LR, bicubic-upscaled, scored against the given HR: recompute image 0.
    rows = (tmp_path / "out" / "per_image.csv").read_text().splitlines()[1:]
    first = dict(zip(("file", "psnr"), rows[0].split(",")[:2]))
    assert first["file"] == "face0.png"
    up = np.asarray(Image.fromarray(small[0]).resize((128, 128), Image.BICUBIC), np.float64)
    mse = np.mean((up / 255 - faces[0] / 255.0) ** 2)
    assert float(first["psnr"]) == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)


def test_paired_without_any_match_or_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a" / "x.png")
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "b" / "y.png")
    cases = [(["--lr_dir", str(tmp_path / "a"), "--hr_dir", str(tmp_path / "b")],
              "no file stem is in both"),
             (["--hr_dir", str(tmp_path / "b")], "--source=paired needs --lr_dir=DIR"),
             (["--lr_dir", str(tmp_path / "a"), "--hr_dir", str(tmp_path / "nope")],
              "--hr_dir is not a folder"),
             (["--degradation=studio", "--data_root", str(tmp_path / "b"), "--source=folder"],
              "unknown degradation preset 'studio'")]
    for args, needle in cases:
        if "--source=folder" not in args:
            args = ["--source=paired", *args]
        r = subprocess.run([sys.executable, "-m", "progsr_jax.evaluate", "--method=bicubic",
                            f"--output={tmp_path / 'o'}", "--nolpips", "--noprogress", *args],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and lines[-1].startswith("error:"), r.stderr[-1500:]
        assert needle in lines[-1] and "Traceback" not in r.stderr, (needle, r.stderr[-1500:])


def test_degraded_evaluation_is_a_fixed_set(tmp_path):
    faces = _faces(5)
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, f in enumerate(faces):
        Image.fromarray(f).save(folder / f"f{i}.png")
    kw = dict(source="folder", data_root=str(folder), degradation="real")
    a = _eval(tmp_path / "a", **kw)
    b = _eval(tmp_path / "b", **kw)
    clean = _eval(tmp_path / "c", source="folder", data_root=str(folder))
    other = _eval(tmp_path / "d", degradation_seed=1, **kw)
    assert a["psnr"] == b["psnr"] and a["degradation"] == "real" and a["degradation_seed"] == 0
    assert a["psnr"] < clean["psnr"] and a["psnr"] != other["psnr"]
    # File i gets degrade(its 128 image, seed, step 0, position i).
    spec = degradation.from_config("real")
    lr = degradation.degrade(faces, spec, 0, 0)
    up = np.asarray(Image.fromarray(lr[2]).resize((128, 128), Image.BICUBIC), np.float64)
    psnr = 10 * np.log10(1 / np.mean((up / 255 - faces[2] / 255.0) ** 2))
    row = (tmp_path / "a" / "per_image.csv").read_text().splitlines()[3].split(",")
    assert row[0] == "f2.png" and float(row[1]) == pytest.approx(psnr, abs=1e-3)
    with pytest.raises(Exception, match="does not apply to --source=paired"):
        _eval(tmp_path / "e", source="paired", lr_dir=str(folder), hr_dir=str(folder),
              degradation="real")


def test_offset_selects_a_file_range_with_the_same_degraded_inputs(tmp_path, paired):
    """--offset=N --limit=M scores files N..N+M-1, each exactly as in the full run."""
    faces = _faces(6)
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, f in enumerate(faces):
        Image.fromarray(f).save(folder / f"f{i}.png")

    def rows(out):
        return (out / "per_image.csv").read_text().splitlines()[1:]

    for deg in ("none", "real"):
        kw = dict(source="folder", data_root=str(folder), degradation=deg)
        _eval(tmp_path / f"all_{deg}", **kw)
        part = _eval(tmp_path / f"part_{deg}", offset=2, limit=3, **kw)
        assert part["num_images"] == 3, part
        assert rows(tmp_path / f"part_{deg}") == rows(tmp_path / f"all_{deg}")[2:5]
    _eval(tmp_path / "tail", source="folder", data_root=str(folder), offset=4)
    assert [r.split(",")[0] for r in rows(tmp_path / "tail")] == ["f4.png", "f5.png"]
    root, _, _ = paired
    both = _eval(tmp_path / "pairs", source="paired", lr_dir=str(root / "lr"),
                 hr_dir=str(root / "hr"), offset=1, limit=2)
    names = [r.split(",")[0] for r in rows(tmp_path / "pairs")]
    # Matched pairs in stem order: broken (skipped when read), face0, face1, ...
    assert names[:2] == ["face0.png", "face1.png"] and both["num_images"] == 2, names
    with pytest.raises(Exception, match="--offset=6 is past the end: .* has 6 image"):
        _eval(tmp_path / "none", source="folder", data_root=str(folder), offset=6)
