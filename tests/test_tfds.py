"""CelebA through the real TensorFlow Datasets library, with its own mock data (no download).

``tfds.testing.mock_data`` replaces TFDS's download and the stored records
with random examples of ``celeb_a``'s real feature spec (218x178 JPEG-decoded
images), so everything after the download -- the builder, ``as_dataset``,
our preprocessing, the cache and training -- runs for real.  The network
probe that makes an offline machine fail fast is replaced by "online" here;
the offline path is tested on its own, in a subprocess whose HTTPS traffic goes
to a closed local port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from progsr_jax import data, infer
from progsr_jax.data import celeba_tfds
from progsr_jax.errors import UserError
from progsr_jax.evaluation import sr as sr_eval
from progsr_jax.training.sr import trainer as sr

tfds = pytest.importorskip("tensorflow_datasets", reason="pip install -e '.[tfds]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 6  # mock examples per split


@pytest.fixture
def mock_celeb_a(monkeypatch, tmp_path):
    monkeypatch.setattr(celeba_tfds, "probe_network", lambda: None)
    with tfds.testing.mock_data(num_examples=NUM, data_dir=str(tmp_path / "tfds")):
        yield str(tmp_path / "tfds")


def _cfg(tmp_path, data_dir, **kw):
    base = dict(source="celeba", root=None, tfds_data_dir=data_dir, split="val",
                cache_dir=str(tmp_path / "cache"), num_workers=0)
    base.update(kw)
    return base


def test_tfds_missing_library_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(UserError, match=r"pip install 'progsr_jax\[tfds\]'"):
        data.build_dataset(_cfg(tmp_path, None), progress=False, log=lambda s: None)


def test_tfds_celeb_a_reader_end_to_end(mock_celeb_a, tmp_path):
    logs = []
    ds = data.build_dataset(_cfg(tmp_path, mock_celeb_a), progress=False, log=logs.append)
    assert any("reading CelebA through TensorFlow Datasets celeb_a" in m for m in logs)
    assert len(ds) == NUM and ds.files[0] == "celeb_a/val/000000"
    for r in data.RESOLUTIONS:
        assert ds.images[r].shape == (NUM, r, r, 3) and ds.images[r].dtype == np.uint8
    # The partitions the mock gives: NUM examples in each of train / validation / test.
    for split in ("train", "test"):
        other = data.build_dataset(_cfg(tmp_path, mock_celeb_a, split=split), progress=False,
                                   log=lambda s: None)
        assert len(other) == NUM
    # The second build opens the cache instead of reading TFDS again.
    logs.clear()
    again = data.build_dataset(_cfg(tmp_path, mock_celeb_a), progress=False, log=logs.append)
    assert any("from cache" in m for m in logs)
    np.testing.assert_array_equal(again.images[128], ds.images[128])


def test_tfds_image_equals_folder_source_for_the_same_pixels(mock_celeb_a, tmp_path):
    builder = tfds.builder("celeb_a", data_dir=mock_celeb_a)
    raw = [ex["image"] for ex in tfds.as_numpy(builder.as_dataset(split="validation",
                                                                 shuffle_files=False))]
    assert raw[0].shape == (218, 178, 3)
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, img in enumerate(raw):
        Image.fromarray(img).save(folder / f"{i:06d}.png")  # lossless: the same pixels
    via_tfds = data.build_dataset(_cfg(tmp_path, mock_celeb_a), progress=False,
                                  log=lambda s: None)
    via_folder = data.build_dataset(dict(source="folder", root=str(folder), split="all",
                                         crop="celeba", cache_dir="", num_workers=0),
                                    progress=False, log=lambda s: None)
    for r in data.RESOLUTIONS:  # byte-identical 16/32/64/128 arrays
        np.testing.assert_array_equal(via_tfds.images[r], via_folder.images[r])


def test_tfds_smoke_training_run(mock_celeb_a, tmp_path, tiny_config):
    c = tiny_config(**{"data.source": "celeba", "data.root": None,
                       "data.tfds_data_dir": mock_celeb_a, "val.num_images": 4,
                       "val.batch_size": 4})
    c.data.cache_dir = str(tmp_path / "cache")
    sr.train_and_evaluate(c, str(tmp_path / "w"))
    log = (tmp_path / "w" / "log.txt").read_text()
    assert "TensorFlow Datasets celeb_a" in log
    recs = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert max(r["step"] for r in recs) == 6
    val = [r for r in recs if "val_psnr" in r]
    assert [r["stage"] for r in val][-1] == 3 and val[-1]["val_count"] == 4


def test_tfds_offline_main_ends_in_one_line(tmp_path):
    """The paper command on a machine without network: one line saying how to get CelebA."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-m", "progsr_jax.main", "--config=configs/step3.py",
                        f"--workdir={tmp_path / 'w'}",
                        f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
                        f"--config.data.cache_dir={tmp_path / 'cache'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: CelebA is not prepared") and "cannot be reached" in last
    assert str(tmp_path / "tfds" / "downloads" / "manual") in last and "data.root" in last
    # Nothing half-written into the cache.
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in os.listdir(cache) if not p.startswith(".")]


def test_tfds_evaluate_reads_the_test_split(mock_celeb_a, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the decode cache
    cfg = sr_eval.EvalConfig(data_root=mock_celeb_a, output=str(tmp_path / "out"),
                             method="bicubic", source="tfds", split="test", lpips=False,
                             progress=False, batch_size=4)
    result = sr_eval.evaluate(cfg, log=lambda s: None)
    assert result["num_images"] == NUM and result["split"] == "test"
    assert result["source"] == "tfds" and 10 < result["psnr"] < 40
    assert (tmp_path / "out" / "comparison.png").exists()


def test_tfds_infer_writes_the_test_split(mock_celeb_a, tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = infer.run(str(tiny_checkpoint), None, str(tmp_path / "out"), source="tfds",
                    split="test", limit=4, data_root=mock_celeb_a, progress=False,
                    log=lambda s: None)
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == [f"celeb_a_test_{i:06d}.png" for i in range(4)]
    assert len(out["written"]) == 4 and Image.open(tmp_path / "out" / names[0]).size == (128, 128)
    with pytest.raises(UserError, match="--source=tfds reads CelebA itself"):
        infer.run(str(tiny_checkpoint), "x.png", str(tmp_path / "o2"), source="tfds")
