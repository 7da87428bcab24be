"""The one batched inference path, the output size, the bicubic baseline, the grid, the recipes."""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest
import tomllib
from PIL import Image

from progsr_jax import data
from progsr_jax.errors import UserError
from progsr_jax.inference import SuperResolver, batching, grid
from progsr_jax.nets import gan
from progsr_jax.training import config as config_files

REPO = pathlib.Path(__file__).resolve().parent.parent


class Recorder:
    """Wraps a super-resolver and records the batch shapes it is called with."""

    def __init__(self, sr):
        self.sr, self.output_size, self.calls = sr, sr.output_size, []

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return self.sr(x)


@pytest.fixture(scope="module")
def tiny_sr():
    _, variables = gan.init_generator(jax.random.PRNGKey(3), width=0.125)
    return SuperResolver(jax.device_get(variables), 2, 0.5, width=0.125)


def test_output_size_and_batch_rows():
    assert [gan.output_size(s) for s in (0, 1, 2, 3)] == [16, 32, 64, 128]
    assert [gan.stage_of_size(s) for s in (16, 32, 64, 128)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        gan.stage_of_size(100)
    assert [batching.batch_rows(n, 16) for n in (1, 2, 3, 5, 9, 16, 40)] == [1, 2, 4, 8, 16, 16, 16]
    assert [batching.batch_rows(n, 8, smallest=8) for n in (1, 5, 8)] == [8, 8, 8]
    assert batching.batch_rows(3, 6) == 4 and batching.batch_rows(5, 6) == 6


def test_super_resolve_pads_chunks_and_keeps_the_dtype_convention(tiny_sr):
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (11, 16, 16, 3), dtype=np.uint8)
    rec = Recorder(tiny_sr)
    out = batching.super_resolve(rec, lr, batch_size=4)
    assert rec.calls == [4, 4, 4]  # 4 + 4 + 3 padded to 4
    assert out.dtype == np.uint8 and out.shape == (11, 64, 64, 3)
    rec.calls.clear()
    raw = batching.super_resolve(rec, data.to_float(lr), batch_size=8)
    assert rec.calls == [8, 4]  # 8 + 3 padded to the next power of two
    assert raw.dtype == np.float32 and raw.shape == (11, 64, 64, 3)
    np.testing.assert_array_equal(out, data.to_uint8(raw))
    # padding does not change a face's result (evaluation-mode BatchNorm)
    one = np.asarray(tiny_sr(data.to_float(lr[:1])))
    np.testing.assert_allclose(raw[:1], one, atol=1e-5)
    rec.calls.clear()
    assert batching.super_resolve(rec, data.to_float(lr[:3]), 8, min_batch=8).shape[0] == 3
    assert rec.calls == [8]
    assert batching.super_resolve(rec, np.zeros((0, 16, 16, 3), np.uint8)).shape == (0, 64, 64, 3)
    # the method runs the same path
    np.testing.assert_array_equal(tiny_sr.super_resolve(lr, 4), out)
    with pytest.raises(UserError, match=r"\(N, 16, 16, 3\)"):
        batching.super_resolve(tiny_sr, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="batch_size"):
        batching.super_resolve(tiny_sr, lr, batch_size=0)


def test_stage_names(tiny_sr):
    """``stage`` is the resolution step (1-3) everywhere; ``step`` is not another name for it."""
    assert tiny_sr.stage == 2 and tiny_sr.output_size == 64
    assert not hasattr(tiny_sr, "step")
    x = np.zeros((1, 16, 16, 3), np.float32)
    variables = jax.device_get(tiny_sr.variables)
    assert tiny_sr.model.apply(variables, x, stage=1, train=False).shape == (1, 32, 32, 3)
    with pytest.raises(TypeError):
        tiny_sr.model.apply(variables, x, step=1, train=False)


def test_bicubic_baseline_and_grid():
    rng = np.random.default_rng(1)
    lr = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    up = data.upscale(lr, 64)
    np.testing.assert_array_equal(up[1], np.asarray(Image.fromarray(lr[1]).resize((64, 64), Image.BICUBIC)))
    sr = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    hr = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    plain = grid.sr_grid(lr, sr, hr)
    assert plain.shape == (128, 256, 3)
    np.testing.assert_array_equal(plain[64:, 64:128], up[1])
    np.testing.assert_array_equal(plain[:64, 128:192], sr[0])
    np.testing.assert_array_equal(plain[:64, 192:], hr[0])
    labelled = grid.sr_grid(lr, sr, hr, labels=["a", "b"], sr_label="SR (x)")
    assert labelled.shape == (16 + 2 * 130, 120 + 4 * 130, 3)  # tiles enlarged to 128


def test_recipes_resolve_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = config_files.resolve("configs/step3.py:smoke")
    assert found.endswith(os.path.join("configs", "step3.py") + ":smoke")
    assert os.path.isfile(found.rsplit(":", 1)[0])
    assert os.path.isfile(config_files.resolve("step1.py"))
    assert config_files.resolve("elsewhere/step3.py") == "elsewhere/step3.py"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "step3.py").write_text("")
    assert config_files.resolve("configs/step3.py") == "configs/step3.py"  # a file on disk wins


def test_pyproject_lists_every_package():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = sorted(".".join(p.parent.relative_to(REPO).parts)
                  for p in (REPO / "progsr_jax").rglob("__init__.py"))
    assert sorted(set(conf["packages"]) - {"progsr_jax.configs"}) == tree
    assert conf["package-dir"]["progsr_jax.configs"] == "configs"


def test_device_conversions_equal_the_host_ones():
    """uint8 -> float and float -> uint8 on the device: the host functions' bits, at every
    uint8 value and at the rounding edges (x.5 grey levels), where a slip would show."""
    u8 = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(batching._uint8_to_float(u8)), data.to_float(u8))
    levels = np.arange(-3, 260, 0.5, dtype=np.float32)  # grey levels, halves included
    y = levels / np.float32(127.5) - np.float32(1.0)
    y = np.concatenate([y, np.nextafter(y, np.float32(-2)), np.nextafter(y, np.float32(2)),
                        np.float32([-7.0, 7.0, 0.0, -0.0])])
    y = np.random.default_rng(0).permutation(y).reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(np.asarray(batching._float_to_uint8(y)), data.to_uint8(y))


def _reference(sr, faces, batch_size, min_batch=1):
    """The batched path before issue 26: host conversions, one chunk after the other."""
    x = data.to_float(faces)
    out = []
    for start in range(0, len(x), batch_size):
        part = x[start:start + batch_size]
        k = len(part)
        rows = batching.batch_rows(k, batch_size, min(min_batch, batch_size))
        part = np.concatenate([part, np.zeros((rows - k,) + part.shape[1:], np.float32)])
        out.append(data.to_uint8(np.asarray(sr(part), np.float32)[:k]))
    return np.concatenate(out)


def _faces_16(shared_root, n):
    """``n`` real 16x16 CelebA validation faces from ../shared, or random ones without it."""
    root = shared_root / "data" / "celeba"
    if not root.exists():
        return np.random.default_rng(4).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    ds = data.build_dataset(dict(source="celeba", root=str(root), split="val", cache_dir="",
                                 num_workers=0, max_images=n), progress=False, log=lambda _: None)
    return np.asarray(ds.images[16][:n])


def test_pipelined_path_returns_the_same_bytes(tiny_sr, shared_path):
    faces = _faces_16(shared_path, 27)
    noise = np.random.default_rng(5).integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)
    for x, batch, min_batch in ((faces, 4, 1), (faces, 8, 8), (noise, 16, 1)):
        np.testing.assert_array_equal(batching.super_resolve(tiny_sr, x, batch, min_batch),
                                      _reference(tiny_sr, x, batch, min_batch))
    # a model with host outputs (the exported ones) takes the host conversions, same bytes
    class HostModel:
        output_size = tiny_sr.output_size

        def __call__(self, v):
            return np.asarray(tiny_sr(v))

    host = HostModel()
    np.testing.assert_array_equal(batching.super_resolve(host, noise, 4),
                                  _reference(tiny_sr, noise, 4))


def test_chunks_are_in_flight_before_the_first_is_fetched(tiny_sr, monkeypatch):
    events = []
    rec = Recorder(tiny_sr)
    real_dispatch, real_collect = batching._dispatch, batching._collect
    monkeypatch.setattr(batching, "_dispatch",
                        lambda *a: events.append("send") or real_dispatch(*a))
    monkeypatch.setattr(batching, "_collect",
                        lambda *a: events.append("fetch") or real_collect(*a))
    lr = np.random.default_rng(6).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    out = batching.super_resolve(rec, lr, batch_size=2)
    depth = batching.IN_FLIGHT
    assert depth >= 2
    assert events == ["send"] * (depth + 1) + ["fetch", "send"] * (5 - depth - 1) + ["fetch"] * (depth + 1)
    assert out.shape == (10, 64, 64, 3) and out.dtype == np.uint8
