"""Teacher heatmap pass (tools/convert_fan_weights.py teacher-heatmaps) and its reader.

Tolerances: heatmaps are stored as float16 by default, whose rounding error is
at most 2**-11 relative (about 4.9e-4 of the value), so stored values are
compared to the PyTorch outputs with rtol=atol=1e-3.  uint8 storage is exact
to half a quantisation step, (max - min) / 510 of each image's channel.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from progsr_jax import data
from progsr_jax.data import teacher
from progsr_jax.errors import UserError
from progsr_jax.interop.torch_pickle import load_torch_file

torch = pytest.importorskip("torch")


def _inputs64(celeba_root, n):
    paths = data.list_files("celeba", celeba_root, "train")[:n]
    return paths, np.stack([data.preprocess(data.open_image(p))[64] for p in paths]).astype(np.float32) / 255.0


def _squeeze_reference(state_dict):
    """fan_squeeze from the facts in shared/README.md, independent of progsr_jax.interop.pytorch.fan4."""
    nn = torch.nn
    net = nn.Module()
    net.conv = nn.Conv2d(3, 32, 5, 1, 2)
    net.layers = nn.Sequential(
        nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.01),
        nn.Conv2d(64, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.01),
        nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.01),
        nn.Conv2d(128, 68, 3, 1, 1), nn.LeakyReLU(0.01))
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    net.eval()

    def run(x):
        with torch.no_grad():
            y = net.layers(net.conv(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())))
        return y.permute(0, 2, 3, 1).numpy()

    return run


def _args(**kw):
    out = []
    for k, v in kw.items():
        out.append(f"--{k}={v}")
    return out


def test_distilled_teacher_end_to_end_and_resume(tmp_path, celeba_root, distilled_fan_file, convert_fan_tool):
    tool = convert_fan_tool
    out = tmp_path / "teacher"
    common = ["convert_fan_weights.py", "teacher-heatmaps", "--teacher=distilled", "--no_progress",
              *_args(weights=distilled_fan_file, data_root=celeba_root, split="train", limit=20,
                     batch_size=8, chunk_size=8, output=out)]
    s = tool.teacher_heatmaps(teacher="distilled", weights=str(distilled_fan_file),
                              data_root=str(celeba_root), split="train", limit=20, batch_size=8,
                              chunk_size=8, output=str(out), progress=False)
    assert (s["chunks"], s["computed_chunks"], s["computed_images"]) == (3, 3, 20)

    paths, x = _inputs64(celeba_root, 20)
    want = _squeeze_reference(load_torch_file(distilled_fan_file))(x)
    r = teacher.open(out)
    assert len(r) == 20 and r.complete and not r.bad
    assert r.files[0].endswith(pathlib.Path(paths[0]).name)
    assert r.meta["teacher"] == "distilled" and r.meta["dtype"] == "float16"
    got = r.get(np.arange(20))
    assert got.dtype == np.float32 and got.shape == (20, 64, 64, 68)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(r[5], got[5])
    np.testing.assert_array_equal(r.get([7, 2, 7]), got[[7, 2, 7]])
    np.testing.assert_array_equal(r.indices_for(paths[3:5]), [3, 4])
    before = np.array(np.load(out / "heatmaps.npy"))

    # second run: nothing left to do
    assert tool.main(common) == 0
    s2 = tool.teacher_heatmaps(teacher="distilled", weights=str(distilled_fan_file),
                               data_root=str(celeba_root), split="train", limit=20, batch_size=8,
                               chunk_size=8, output=str(out), progress=False)
    assert (s2["computed_chunks"], s2["skipped_chunks"]) == (0, 3)

    # interrupted run: chunk 1 not recorded as done -> only it is recomputed
    prog = json.loads((out / "progress.json").read_text())
    prog["done"] = [0, 2]
    (out / "progress.json").write_text(json.dumps(prog))
    hm = np.load(out / "heatmaps.npy", mmap_mode="r+")
    hm[8:16] = 0
    hm.flush()
    del hm
    with pytest.raises(UserError, match="incomplete"):
        teacher.open(out)
    assert teacher.open(out, allow_incomplete=True).complete is False
    s3 = tool.teacher_heatmaps(teacher="distilled", weights=str(distilled_fan_file),
                               data_root=str(celeba_root), split="train", limit=20, batch_size=8,
                               chunk_size=8, output=str(out), progress=False)
    assert (s3["computed_chunks"], s3["computed_images"]) == (1, 8)
    np.testing.assert_array_equal(np.load(out / "heatmaps.npy"), before)

    # a different run into the same folder is refused
    with pytest.raises(UserError, match="different run"):
        tool.main(["convert_fan_weights.py", "teacher-heatmaps", "--teacher=distilled", "--no_progress",
                   *_args(weights=distilled_fan_file, data_root=celeba_root, split="train",
                          limit=12, batch_size=8, chunk_size=8, output=out)])


def test_uint8_storage(tmp_path, celeba_root, distilled_fan_file, convert_fan_tool):
    out = tmp_path / "q"
    convert_fan_tool.main(["convert_fan_weights.py", "teacher-heatmaps", "--teacher=distilled", "--no_progress", "--dtype=uint8",
                  *_args(weights=distilled_fan_file, data_root=celeba_root, split="val", limit=5,
                         batch_size=4, output=out)])

    paths = data.list_files("celeba", celeba_root, "val")[:5]
    x = np.stack([data.preprocess(data.open_image(p))[64] for p in paths]).astype(np.float32) / 255.0
    want = _squeeze_reference(load_torch_file(distilled_fan_file))(x)
    got = teacher.open(out).get(range(5))
    step = (want.max(axis=(1, 2)) - want.min(axis=(1, 2)))[:, None, None, :] / 255.0
    assert np.all(np.abs(got - want) <= step / 2 + 1e-5)
    assert np.load(out / "heatmaps.npy", mmap_mode="r").dtype == np.uint8


def test_fan4_teacher_random_weights(tmp_path, celeba_root, convert_fan_tool):
    import torch.nn.functional as F

    from progsr_jax.interop.pytorch.fan4 import FAN4

    torch.manual_seed(0)
    net = FAN4(4)
    weights = tmp_path / "fan4_random.pth.tar"
    torch.save(net.state_dict(), weights, _use_new_zipfile_serialization=False)  # like 2DFAN4's file
    out = tmp_path / "fan4"
    assert convert_fan_tool.main(["convert_fan_weights.py", "teacher-heatmaps", "--teacher=fan4", "--no_progress",
                         *_args(weights=weights, data_root=celeba_root, split="train", limit=1,
                                batch_size=4, output=out)]) == 0
    _, x = _inputs64(celeba_root, 1)  # FAN4 takes ~3 s per image on a CPU core
    with torch.no_grad():
        up = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=(256, 256),
                           mode="bilinear", align_corners=False)
        want = net.eval()(up)[-1].permute(0, 2, 3, 1).numpy()
    r = teacher.open(out)
    assert r.meta["teacher"] == "fan4" and len(r) == 1
    np.testing.assert_allclose(r.get([0]), want, rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_and_bad_inputs(tmp_path, celeba_root, convert_fan_tool):
    tool = convert_fan_tool

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x)

    ts = tmp_path / "2DFAN4-cd938726ad.zip"
    torch.jit.save(torch.jit.script(Tiny()), ts)
    with pytest.raises(UserError, match="TorchScript.*torch.jit.load"):
        tool.main(["convert_fan_weights.py", "teacher-heatmaps", "--teacher=fan4", "--no_progress",
                   *_args(weights=ts, data_root=celeba_root, split="val", limit=1,
                          output=tmp_path / "o")])
    sd = tmp_path / "wrong.pth"
    torch.save(Tiny().state_dict(), sd)
    with pytest.raises(UserError, match="does not match FAN4"):
        tool.main(["convert_fan_weights.py", "teacher-heatmaps", "--teacher=fan4", "--no_progress",
                   *_args(weights=sd, data_root=celeba_root, split="val", limit=1,
                          output=tmp_path / "o2")])
    with pytest.raises(UserError, match="no teacher heatmaps"):
        teacher.open(tmp_path)


def test_folder_source_with_unreadable_image(tmp_path, celeba_root, distilled_fan_file, convert_fan_tool):
    root = tmp_path / "imgs"
    root.mkdir()
    for i, p in enumerate(data.list_files("celeba", celeba_root, "val")[:2]):
        shutil.copy(p, root / f"{i}.jpg")
    (root / "1b_broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "t"
    s = convert_fan_tool.teacher_heatmaps(teacher="distilled", weights=str(distilled_fan_file),
                                 data_root=str(root), split="all", source="folder", output=str(out),
                                 progress=False)
    r = teacher.open(out)
    assert r.files == ["0.jpg", "1.jpg", "1b_broken.jpg"] and r.meta["crop"] == "square"
    assert list(r.bad) == [2] and len(s["bad"]) == 1
    hm = r.get([0, 1, 2])
    assert np.all(hm[2] == 0) and np.abs(hm[:2]).max() > 0.1
