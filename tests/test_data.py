"""Tests of the data pipeline (progsr_jax.data).

Real-data tests use ../shared through the ``celeba_root`` fixture and skip
without it; everything else builds small files in ``tmp_path``.  Decoding
runs in-process (num_workers=0) to keep the file fast on small machines.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np
import pytest
from PIL import Image

from progsr_jax import data
from progsr_jax.data import BadImage, Dataset, synthetic
from progsr_jax.errors import UserError


def cfg(**kw):
    """A build_dataset config with test-friendly defaults."""
    base = dict(source="folder", root=None, split="all", cache_dir="", num_workers=0,
                strict=False, min_size=32, max_images=None, num_synthetic=8, seed=0)
    base.update(kw)
    return base


def noise_image(seed: int, w: int = 64, h: int = 64, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def reference_chain(img: Image.Image, box) -> dict[int, np.ndarray]:
    """Independent computation of the paper's preprocessing, straight with PIL."""
    out = {}
    cur = img.convert("RGB").crop(box).resize((128, 128), Image.BILINEAR)
    out[128] = np.asarray(cur)
    for r in (64, 32, 16):
        cur = cur.resize((r, r), Image.BILINEAR)
        out[r] = np.asarray(cur)
    return out


# ---------------------------------------------------------------- preprocess


def test_preprocess_matches_pil_on_real_celeba(celeba_root):
    files = data.list_files("celeba", celeba_root, "train")
    for f in (files[0], files[1234], files[-1]):
        with Image.open(f) as im:
            assert im.size == (178, 218)
            expected = reference_chain(im, (0, 20, 178, 198))
        got = data.preprocess(data.open_image(f), crop="celeba")
        assert sorted(got) == [16, 32, 64, 128]
        for r in data.RESOLUTIONS:
            assert got[r].shape == (r, r, 3) and got[r].dtype == np.uint8
            np.testing.assert_array_equal(got[r], expected[r])


def test_center_crop_rounding_and_padding():
    # 181x221: slack 3 and 43 -> left round(1.5)=2, top round(21.5)=22 (torchvision).
    img = noise_image(0, 181, 221)
    np.testing.assert_array_equal(data.preprocess(img, "celeba")[128],
                                  reference_chain(img, (2, 22, 180, 200))[128])
    # Smaller than 178: zero padding as torchvision does (white image, black border).
    white = Image.new("RGB", (100, 150), (255, 255, 255))
    out = data.preprocess(white, "celeba")[128]
    assert out[0, 0].tolist() == [0, 0, 0] and out[64, 64].tolist() == [255, 255, 255]
    # "square": centre square of side min(w, h).
    img = noise_image(1, 90, 70)
    np.testing.assert_array_equal(data.preprocess(img, "square")[32],
                                  reference_chain(img, (10, 0, 80, 70))[32])
    with pytest.raises(UserError, match="square"):
        data.preprocess(img, "none")
    with pytest.raises(UserError, match="unknown crop"):
        data.preprocess(img, "middle")


# ---------------------------------------------------------------- list_files


def test_list_files_official_layout(celeba_root):
    assert len(data.list_files("celeba", celeba_root, "train")) == 4591
    for split in ("val", "valid", "validation"):
        assert len(data.list_files("celeba", celeba_root, split)) == 780
    assert len(data.list_files("celeba", celeba_root, "all")) == 5371
    with pytest.raises(UserError, match="'test' is empty"):
        data.list_files("celeba", celeba_root, "test")
    with pytest.raises(UserError, match="unknown CelebA split"):
        data.list_files("celeba", celeba_root, "dev")


def test_kaggle_layout(celeba_root, tmp_path):
    src = celeba_root / "Img" / "img_align_celeba"
    images = tmp_path / "img_align_celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    names = ["000001.jpg", "000002.jpg", "000003.jpg"]
    for n in names:
        (images / n).symlink_to(src / n)
    val_name = data.list_files("celeba", celeba_root, "val")[0]
    (images / os.path.basename(val_name)).symlink_to(val_name)
    rows = ["image_id,partition"] + [f"{n},0" for n in names] + ["999999.jpg,0",
                                                                 f"{os.path.basename(val_name)},1"]
    (tmp_path / "list_eval_partition.csv").write_text("\n".join(rows) + "\n")

    train = data.list_files("celeba", tmp_path, "train")
    assert [os.path.basename(p) for p in train] == names  # the missing one is left out
    assert len(data.list_files("celeba", tmp_path, "val")) == 1
    ds = data.build_dataset(cfg(source="celeba", root=str(tmp_path), split="train"),
                            progress=False, log=lambda s: None)
    assert len(ds) == 3
    assert [(os.path.basename(f), "not found" in why) for f, why in ds.skipped] == [
        ("999999.jpg", True)]
    # Same pixels as from the official layout.
    np.testing.assert_array_equal(
        ds.images[64][0], data.preprocess(data.open_image(src / names[0]))[64])


def test_folder_source_on_faces68(faces68_root):
    files = data.list_files("folder", faces68_root, "all")
    assert len(files) == 337 + 870 + 10  # afw, helen_train, ffhq; .pts files ignored
    assert files == sorted(files, key=lambda p: os.path.relpath(p, faces68_root))
    img = data.open_image(files[0])
    out = data.preprocess(img, "square")
    assert out[128].shape == (128, 128, 3)


# ---------------------------------------------------------------- bad files


def make_messy_folder(root: pathlib.Path) -> dict[str, str]:
    """Good, convertible and bad files; returns {name: expected bad reason word}."""
    root.mkdir(parents=True, exist_ok=True)
    noise_image(1).save(root / "good1.jpg", quality=95)
    sub = root / "sub"
    sub.mkdir()
    noise_image(2, 80, 60).save(sub / "good2.PNG")
    Image.new("CMYK", (64, 64), (0, 0, 0, 0)).save(root / "cmyk.jpg")
    Image.new("L", (64, 64), 77).save(root / "gray.png")
    Image.new("RGBA", (64, 64), (200, 100, 50, 128)).save(root / "rgba.png")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(root / "deep16.png")
    # Bad ones.
    noise_image(3, 128, 128).save(root / "truncated.jpg", quality=95)
    blob = (root / "truncated.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(blob[: len(blob) // 2])
    (root / "notes.jpg").write_text("this is not an image\n")
    (root / "empty.png").write_bytes(b"")
    noise_image(4, 8, 8).save(root / "tiny.png")
    (root / "readme.txt").write_text("ignored: not an image extension")
    return {"truncated.jpg": "truncated", "notes.jpg": "not an image",
            "empty.png": "empty", "tiny.png": "too small"}


def test_open_image_modes(tmp_path):
    make_messy_folder(tmp_path)
    for name in ("cmyk.jpg", "gray.png", "rgba.png", "deep16.png", "good1.jpg"):
        im = data.open_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (64, 64), name
    px = lambda name: np.asarray(data.open_image(tmp_path / name))[10, 10].tolist()  # noqa: E731
    assert px("gray.png") == [77, 77, 77]
    assert px("rgba.png") == [100, 50, 25]                      # composited on black
    assert px("deep16.png") == [round(40000 * 255 / 65535)] * 3  # scaled, not clipped
    assert min(px("cmyk.jpg")) > 240                             # no ink -> white
    bw = Image.new("1", (40, 40), 1)
    bw.save(tmp_path / "bw.png")
    assert px("bw.png") == [255, 255, 255]
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(tmp_path / "float.tif")
    assert px("float.tif") == [128, 128, 128]
    pal = Image.new("P", (40, 40), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 0, 0, 0, 90, 60, 30])
    pal.save(tmp_path / "pal.gif")
    assert px("pal.gif") == [90, 60, 30]


def test_bad_files_are_skipped_with_reasons(tmp_path):
    expected_bad = make_messy_folder(tmp_path)
    logs: list[str] = []
    ds = data.build_dataset(cfg(root=str(tmp_path)), progress=False, log=logs.append)
    assert len(ds) == 6
    assert sorted(os.path.basename(f) for f in ds.files) == sorted(
        ["good1.jpg", "good2.PNG", "cmyk.jpg", "gray.png", "rgba.png", "deep16.png"])
    reasons = {os.path.basename(f): why for f, why in ds.skipped}
    assert set(reasons) == set(expected_bad)
    for name, word in expected_bad.items():
        assert word in reasons[name], (name, reasons[name])
    summary = [line for line in logs if line.startswith("skipped")]
    assert len(summary) == 1 and summary[0].startswith("skipped 4 of 10 files:")
    for name in expected_bad:
        assert name in summary[0]
    for r in data.RESOLUTIONS:
        assert ds.images[r].shape == (6, r, r, 3) and ds.images[r].dtype == np.uint8
    gray = ds.files.index(str(tmp_path / "gray.png"))
    assert (np.asarray(ds.images[16][gray]) == 77).all()

    with pytest.raises(UserError, match="strict.*(truncated|notes|empty|tiny)"):
        data.build_dataset(cfg(root=str(tmp_path), strict=True), progress=False,
                           log=lambda s: None)


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_text("no")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(UserError, match="no usable images"):
        data.build_dataset(cfg(root=str(tmp_path), cache_dir=str(tmp_path / "cache")),
                           progress=False, log=lambda s: None)
    assert [p for p in os.listdir(tmp_path / "cache") if p.startswith(".tmp")] == []


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    noise_image(0, 64, 64).save(tmp_path / "big.png")
    noise_image(0, 40, 40).save(tmp_path / "medium.png")
    monkeypatch.setattr(data.images, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage, match="decompression bomb"):
        data.open_image(tmp_path / "big.png")
    with pytest.raises(UserError, match="big.png .*decompression bomb"):
        data.build_dataset(cfg(root=str(tmp_path), min_size=8), progress=False,
                           log=lambda s: None)
    # PIL's own limit (warning between 1x and 2x, error above) is refused as well.
    monkeypatch.setattr(data.images, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("big.png", "medium.png"):
        with pytest.raises(BadImage, match="decompression bomb"):
            data.open_image(tmp_path / name)


# ---------------------------------------------------------------- misuse


def test_misuse_gives_clear_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.list_files("celeba", tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match="no data root"):  # (celeba without a root: TFDS)
        data.build_dataset(cfg(source="folder", root=None), progress=False)
    (tmp_path / "Img" / "img_align_celeba").mkdir(parents=True)
    noise_image(0).save(tmp_path / "Img" / "img_align_celeba" / "000001.jpg")
    with pytest.raises(UserError, match="partition file not found"):
        data.list_files("celeba", tmp_path, "train")
    (tmp_path / "Eval").mkdir()
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text("000002.jpg 0\n")
    with pytest.raises(UserError, match="none of the 1 files"):
        data.list_files("celeba", tmp_path, "train")
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text("000001.jpg zero\n")
    with pytest.raises(UserError, match=r"list_eval_partition.txt:1"):
        data.list_files("celeba", tmp_path, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no image files"):
        data.list_files("folder", empty, "all")
    with pytest.raises(UserError, match="no partitions"):
        data.list_files("folder", tmp_path, "val")
    with pytest.raises(UserError, match="unknown data source"):
        data.build_dataset(cfg(source="imagenet"), progress=False)
    with pytest.raises(UserError, match="num_workers"):
        data.build_dataset(cfg(root=str(tmp_path), num_workers=-2), progress=False)
    with pytest.raises(UserError, match="max_images"):
        data.build_dataset(cfg(root=str(tmp_path), max_images=0), progress=False)


# ---------------------------------------------------------------- cache


def test_cache_hit_and_key(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        noise_image(i, 96, 80).save(root / f"{i}.png")
    cache = tmp_path / "cache"
    c = cfg(root=str(root), cache_dir=str(cache))
    logs: list[str] = []
    first = data.build_dataset(c, progress=False, log=logs.append)
    entries = [p for p in os.listdir(cache) if not p.startswith(".")]
    assert len(entries) == 1 and not any(p.startswith(".tmp") for p in os.listdir(cache))
    assert isinstance(first.images[128], np.memmap)

    t0 = time.perf_counter()
    second = data.build_dataset(c, progress=False, log=logs.append)
    assert time.perf_counter() - t0 < 1.0
    assert "from cache" in logs[-1]
    assert second.files == first.files
    for r in data.RESOLUTIONS:
        np.testing.assert_array_equal(second.images[r], first.images[r])

    # A new file, or a changed one, makes a new key.
    noise_image(99, 96, 80).save(root / "new.png")
    third = data.build_dataset(c, progress=False, log=logs.append)
    assert len(third) == 7 and "from cache" not in logs[-1]
    os.utime(root / "0.png", ns=(1, 1))
    data.build_dataset(c, progress=False, log=logs.append)
    assert len([p for p in os.listdir(cache) if not p.startswith(".")]) == 3
    # max_images is the first N of the list.
    four = data.build_dataset(dict(c, max_images=4), progress=False, log=logs.append)
    assert four.files == third.files[:4]


# ---------------------------------------------------------------- batching


def small_dataset(n: int = 10) -> Dataset:
    rng = np.random.default_rng(0)
    images = {r: rng.integers(0, 256, (n, r, r, 3), dtype=np.uint8) for r in data.RESOLUTIONS}
    return Dataset(files=[f"f{i}" for i in range(n)], images=images, landmarks=None, skipped=[])


def test_batch_indices_epochs_and_determinism():
    n, b, seed = 10, 4, 7
    stream = np.concatenate([data.batch_indices(n, b, seed, s) for s in range(10)])
    for e in range(4):  # every example exactly once per epoch
        np.testing.assert_array_equal(np.sort(stream[e * n:(e + 1) * n]), np.arange(n))
        np.testing.assert_array_equal(stream[e * n:(e + 1) * n],
                                      np.random.default_rng([seed, e]).permutation(n))
    # Step 2 covers stream positions 8..11: the end of epoch 0 and the start of epoch 1.
    p0, p1 = (np.random.default_rng([seed, e]).permutation(n) for e in (0, 1))
    np.testing.assert_array_equal(data.batch_indices(n, b, seed, 2),
                                  np.concatenate([p0[8:], p1[:2]]))
    np.testing.assert_array_equal(data.batch_indices(n, b, seed, 5),
                                  data.batch_indices(n, b, seed, 5))
    assert not np.array_equal(data.batch_indices(n, b, seed, 0), data.batch_indices(n, b, 8, 0))
    # Batch larger than the dataset: spans several epochs.
    big = data.batch_indices(3, 7, 0, 1)
    assert len(big) == 7 and set(big) <= {0, 1, 2}


def test_get_batch_is_stateless():
    ds = small_dataset()
    fresh = data.get_batch(ds, 13, 4, 3, stage=2)
    for s in (0, 5, 99, 12):
        data.get_batch(ds, s, 4, 3, stage=2)
    again = data.get_batch(ds, 13, 4, 3, stage=2)
    for k in ("lr", "hr"):
        np.testing.assert_array_equal(fresh[k], again[k])
    assert set(fresh) == {"lr", "hr"}
    assert fresh["lr"].shape == (4, 16, 16, 3) and fresh["hr"].shape == (4, 64, 64, 3)
    assert fresh["lr"].dtype == np.float32 and fresh["hr"].dtype == np.float32
    idx = data.batch_indices(10, 4, 3, 13)
    np.testing.assert_allclose(fresh["hr"], ds.images[64][idx] / 127.5 - 1, atol=1e-6)
    for stage, r in ((1, 32), (3, 128)):
        assert data.get_batch(ds, 0, 2, 0, stage)["hr"].shape == (2, r, r, 3)
    with pytest.raises(ValueError):
        data.get_batch(ds, 0, 2, 0, stage=4)


def test_measure_throughput_is_positive():
    assert data.measure_throughput(small_dataset(), batch_size=4, steps=3, stage=1) > 0


# ---------------------------------------------------------------- synthetic source


def test_build_synthetic(tmp_path):
    c = cfg(source="synthetic", num_synthetic=6, seed=3, cache_dir=str(tmp_path))
    ds = data.build_dataset(c, progress=False, log=lambda s: None)
    assert len(ds) == 6 and ds.landmarks.shape == (6, 68, 2)
    faces, lms = synthetic.synthetic_dataset(6, 3)
    np.testing.assert_array_equal(ds.images[128], faces)
    np.testing.assert_array_equal(ds.landmarks, lms)
    np.testing.assert_array_equal(
        ds.images[16][2], data.preprocess(Image.fromarray(faces[2]), "none")[16])
    again = data.build_dataset(c, progress=False, log=lambda s: None)
    np.testing.assert_array_equal(again.landmarks, ds.landmarks)


# ---------------------------------------------------------------- worker pool


def test_worker_pool_gives_the_same_arrays(celeba_root, tmp_path):
    c = cfg(source="celeba", root=str(celeba_root), split="val", max_images=64)
    serial = data.build_dataset(c, progress=False, log=lambda s: None)
    pooled = data.build_dataset(dict(c, num_workers=2, cache_dir=str(tmp_path)),
                                progress=False, log=lambda s: None)
    assert pooled.files == serial.files and len(pooled) == 64
    for r in data.RESOLUTIONS:
        np.testing.assert_array_equal(pooled.images[r], serial.images[r])
