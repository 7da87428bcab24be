"""Distilled FAN: safe .pth loading, conversion, Flax/PyTorch parity, landmark decoding, FAN4 layout."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image

from progsr_jax import data
from progsr_jax.data import crops
from progsr_jax.errors import UserError
from progsr_jax.evaluation import metrics
from progsr_jax.interop.torch_pickle import LEGACY_MAGIC, UnsafePickleError, load_torch_file
from progsr_jax.nets import fan as fan_lib
from progsr_jax.nets.fan import StudentFAN, abstract_variables
from progsr_jax.nets.layers import count_params

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_fan_weights.py"


# ---------------------------------------------------------------------------
# PyTorch reference of fan_squeeze, written from shared/README.md


def _torch_reference(state_dict):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class FanSqueezeRef(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 5, 1, 2)
            layers = []
            for cin, cout in ((32, 64), (64, 128), (128, 128)):
                layers += [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout, eps=1e-5),
                           nn.LeakyReLU(0.01)]
            layers += [nn.Conv2d(128, 68, 3, 1, 1), nn.LeakyReLU(0.01)]
            self.layers = nn.Sequential(*layers)

        def forward(self, x):
            return self.layers(self.conv(x))

    net = FanSqueezeRef()
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    return net.eval()


def _torch_apply(net, x_nhwc, train=False):
    import torch

    net.train(train)
    with torch.no_grad():
        y = net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    net.eval()
    return y.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def released_state_dict(distilled_fan_file):
    return load_torch_file(distilled_fan_file)


@pytest.fixture(scope="module")
def converted_dir(distilled_fan_file, tmp_path_factory, convert_fan_tool):
    out = tmp_path_factory.mktemp("fan") / "converted"
    assert convert_fan_tool.main(["convert_fan_weights.py", "distilled", "--input", str(distilled_fan_file), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def celeba_faces(celeba_root):
    paths = data.list_files("celeba", celeba_root, "val")[:6]
    pre = [data.preprocess(data.open_image(p)) for p in paths]
    return {s: np.stack([p[s] for p in pre]).astype(np.float32) / 255.0 for s in (64, 128)}


# ---------------------------------------------------------------------------
# torch_pickle


def test_released_file_layout(released_state_dict):
    sd = released_state_dict
    expected = {"conv.weight": (32, 3, 5, 5), "conv.bias": (32,), "layers.0.weight": (64, 32, 3, 3),
                "layers.3.weight": (128, 64, 3, 3), "layers.6.weight": (128, 128, 3, 3),
                "layers.9.weight": (68, 128, 3, 3), "layers.9.bias": (68,)}
    for k, shape in expected.items():
        assert sd[k].shape == shape, k
    for i, c in ((1, 64), (4, 128), (7, 128)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert sd[f"layers.{i}.{name}"].shape == (c,)
        assert f"layers.{i}.num_batches_tracked" in sd
    assert len(sd) == 25
    learnable = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                   "num_batches_tracked")))
    assert learnable == 321_412


def test_torch_pickle_formats(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.LeakyReLU())
    sd = dict(m.state_dict())
    base = torch.arange(24.0)
    sd["half"] = torch.randn(3).half()
    sd["bf16"] = torch.randn(5).bfloat16()
    sd["view_t"] = base[2:8].view(2, 3).t()  # non-contiguous view sharing a storage
    sd["strided"] = base.view(4, 6)[:, 1::2]
    sd["scalar"] = torch.tensor(3.5)
    for legacy in (False, True):
        for obj, kind in ((sd, "sd"), ({"model_state_dict": sd, "step": 3}, "wrapped"), (m, "module")):
            path = tmp_path / f"{kind}_{legacy}.pth"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            got = load_torch_file(path)
            ref = m.state_dict() if kind == "module" else sd
            assert set(got) == set(ref)
            for k, v in ref.items():
                want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                np.testing.assert_array_equal(got[k], want, err_msg=f"{kind} legacy={legacy} {k}")


def _legacy_header() -> bytes:
    info = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return pickle.dumps(LEGACY_MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps(info, 2)


def _payload(marker: pathlib.Path) -> bytes:
    # GLOBAL os.system; MARK; unicode arg; TUPLE; REDUCE; STOP  (protocol-0 text opcodes)
    return b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."


@pytest.mark.parametrize("fmt", ["plain", "legacy", "zip"])
def test_malicious_pickle_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil_{fmt}.pth"
    if fmt == "plain":
        evil.write_bytes(_payload(marker))
    elif fmt == "legacy":
        evil.write_bytes(_legacy_header() + _payload(marker) + pickle.dumps([], 2))
    else:
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("archive/data.pkl", _payload(marker))
            zf.writestr("archive/byteorder", "little")
    if fmt == "plain":  # control: the payload is live under plain pickle
        subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(evil)!r}, 'rb'))"],
                       check=False, capture_output=True)
        assert marker.exists()
        marker.unlink()
    proc = subprocess.run([sys.executable, str(TOOL), "distilled", "--input", str(evil),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load"), proc.stderr
    assert "os.system" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out" / "fan_meta.json").exists()


@pytest.mark.parametrize("global_name", [b"builtins\neval", b"torch.storage\n_load_from_bytes",
                                         b"subprocess\ncall", b"fan_model\nsomething_else"])
def test_unlisted_globals_refused(tmp_path, global_name):
    path = tmp_path / "bad.pth"
    path.write_bytes(_legacy_header() + b"c" + global_name + b"\n(Vx\ntR." + pickle.dumps([], 2))
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        load_torch_file(path)


def test_not_a_torch_file(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"hello world")
    with pytest.raises(UserError):
        load_torch_file(p)
    with pytest.raises(UserError, match="no such file"):
        load_torch_file(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------
# StudentFAN conversion and parity


def test_param_count_and_layout():
    v = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.01, s.dtype),
                               abstract_variables(StudentFAN()))  # random init compiles slowly
    assert count_params(v["params"]) == 321_412
    y = StudentFAN().apply(v, np.zeros((2, 20, 24, 3), np.float32))
    assert y.shape == (2, 20, 24, 68)
    assert set(v["batch_stats"]) == {"layers_1", "layers_4", "layers_7"}
    assert jax.tree_util.tree_structure(v["params"]).num_leaves == 16  # 5 convs + 3 BNs
    assert count_params(abstract_variables(StudentFAN(width=0.5))["params"]) < 321_412 // 3


def test_parity_with_pytorch(converted_dir, released_state_dict, celeba_faces):
    fan = fan_lib.load(converted_dir)
    assert fan.meta["kind"] == "student_fan"
    ref = _torch_reference(released_state_dict)
    for size in (64, 128):
        x = celeba_faces[size]
        got = np.asarray(fan(x))
        want = _torch_apply(ref, x)
        assert got.shape == (x.shape[0], size, size, 68)
        diff = float(np.abs(got - want).max())
        print(f"parity {size}x{size}: max abs diff {diff:.2e}")
        assert diff <= 1e-4
    # training-mode BatchNorm (batch statistics) also matches PyTorch's train()
    x = celeba_faces[64]
    got, _ = fan.module.apply(fan.variables, x, train=True, mutable=["batch_stats"])
    want = _torch_apply(ref, x, train=True)
    assert float(np.abs(np.asarray(got) - want).max()) <= 1e-4


def test_zip_state_dict_converts(tmp_path, released_state_dict, converted_dir, celeba_faces, convert_fan_tool):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in released_state_dict.items()}
    path = tmp_path / "fan_state_dict.pth"
    torch.save({"state_dict": sd}, path)  # zip format, wrapped
    out = tmp_path / "conv2"
    assert convert_fan_tool.main(["convert_fan_weights.py", "distilled", "--input", str(path), "--output", str(out)]) == 0
    a = fan_lib.load(out)
    b = fan_lib.load(converted_dir)
    x = celeba_faces[64][:2]
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_wrong_state_dict_and_missing_dir(tmp_path, released_state_dict, convert_fan_tool):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in released_state_dict.items() if k != "conv.bias"}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match="missing keys.*conv.bias"):
        convert_fan_tool.main(["convert_fan_weights.py", "distilled", "--input", str(path), "--output", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no converted FAN"):
        fan_lib.load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        fan_lib.load(tmp_path / "nope")


# ---------------------------------------------------------------------------
# Heatmap decoding, NME, .pts


def _get_preds_fromhm_reference(hm_nchw):
    """face-alignment's get_preds_fromhm semantics, step by step (1-based, then -0.5)."""
    n, c, h, w = hm_nchw.shape
    flat = hm_nchw.reshape(n, c, h * w)
    idx = flat.argmax(-1) + 1
    preds = np.zeros((n, c, 2))
    preds[..., 0] = (idx - 1) % w + 1
    preds[..., 1] = np.floor((idx - 1) / w) + 1
    for i in range(n):
        for j in range(c):
            hm_ = hm_nchw[i, j]
            px, py = int(preds[i, j, 0]) - 1, int(preds[i, j, 1]) - 1
            if 0 < px < w - 1 and 0 < py < h - 1:
                diff = np.array([hm_[py, px + 1] - hm_[py, px - 1], hm_[py + 1, px] - hm_[py - 1, px]])
                preds[i, j] += np.sign(diff) * 0.25
    preds += -0.5
    return preds


def _gaussians(points, size, sigma=1.5):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    n, c, _ = points.shape
    hm = np.zeros((n, size, size, c), np.float32)
    for i in range(n):
        for j in range(c):
            x, y = points[i, j]
            hm[i, :, :, j] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return hm


def test_heatmaps_to_landmarks_recovers_points():
    rng = np.random.default_rng(0)
    pts = rng.uniform(2, 61, size=(3, 68, 2))
    hm = _gaussians(pts, 64)
    got = fan_lib.heatmaps_to_landmarks(hm)
    assert got.shape == (3, 68, 2)
    err = np.abs(got - pts)
    assert err.max() <= 0.25 + 1e-6  # argmax +- 0.25 quantisation
    assert err.mean() < np.abs(np.rint(pts) - pts).mean()  # better than plain argmax
    # exact points on pixel centres come back exactly; border peaks get no shift
    exact = np.array([[[10.0, 20.0], [0.0, 33.0], [63.0, 63.0]]])
    np.testing.assert_array_equal(fan_lib.heatmaps_to_landmarks(_gaussians(exact, 64)), exact)
    # a single (H, W, C) map
    assert fan_lib.heatmaps_to_landmarks(hm[0]).shape == (68, 2)


def test_heatmaps_to_landmarks_matches_face_alignment_semantics():
    rng = np.random.default_rng(1)
    hm = rng.normal(size=(2, 16, 12, 68)).astype(np.float32)  # non-square, edges included
    hm[0, 0, 5, 0] = 10  # peak on the top border
    hm[1, 7, 11, 1] = 10  # peak on the right border
    ref = _get_preds_fromhm_reference(hm.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(fan_lib.heatmaps_to_landmarks(hm, convention="face_alignment"), ref)
    np.testing.assert_allclose(fan_lib.heatmaps_to_landmarks(hm), ref - 0.5)


def test_nme_hand_checked():
    gt = np.zeros((68, 2))
    pred = gt + np.array([3.0, 4.0])  # every point 5 px off
    assert metrics.nme(pred, gt, 100) == pytest.approx(0.05)
    pred[34:] = 0  # half of them exact
    assert metrics.nme(pred, gt, 100) == pytest.approx(0.025)
    batch = metrics.nme(np.stack([pred, gt]), np.stack([gt, gt]), 50)
    np.testing.assert_allclose(batch, [0.05, 0.0])


def test_read_pts(tmp_path, faces68_root):
    p = tmp_path / "a.pts"
    p.write_text("version: 1\nn_points: 3\n{\n1.5 2\n3 4.25\n5 6\n}\n")
    np.testing.assert_array_equal(crops.read_pts(p), [[1.5, 2], [3, 4.25], [5, 6]])
    p.write_text("version: 1\nn_points: 4\n{\n1 2\n}\n")
    with pytest.raises(UserError):
        crops.read_pts(p)
    real = sorted((faces68_root / "afw").glob("*.pts"))[0]
    assert crops.read_pts(real).shape == (68, 2)


def test_landmarks_on_real_faces_are_plausible(converted_dir, faces68_root):
    """Loose sanity check of the released FAN on annotated faces (the NME is reported, not tuned)."""
    fan = fan_lib.load(converted_dir)
    errs = []
    for pts_path in sorted((faces68_root / "ffhq").glob("*.pts"))[:4]:
        gt = crops.read_pts(pts_path)
        img = Image.open(pts_path.with_suffix(".png")).convert("RGB")
        lo, hi = gt.min(0), gt.max(0)
        side = 2.4 * float((hi - lo).max())
        x0, y0 = (lo + hi) / 2 - side / 2
        pad = int(side) + 2
        big = Image.new("RGB", (img.width + 2 * pad, img.height + 2 * pad))
        big.paste(img, (pad, pad))
        im = big.resize((64, 64), Image.BILINEAR, box=(x0 + pad, y0 + pad, x0 + side + pad, y0 + side + pad))
        pred = fan.landmarks(np.asarray(im, np.float32)[None] / 255.0)[0]
        g = (gt + 0.5 - np.array([x0, y0])) * 64 / side - 0.5
        errs.append(metrics.nme(pred, g, 64))
    print(f"distilled FAN NME on {len(errs)} FFHQ faces at 64x64: {100 * np.mean(errs):.2f}%")
    assert np.mean(errs) < 0.15


# ---------------------------------------------------------------------------
# FAN4 (teacher) layout


def test_fan4_layout():
    pytest.importorskip("torch")
    from progsr_jax.interop.pytorch.fan4 import FAN4, FAN4_NUM_KEYS, FAN4_NUM_PARAMS

    m = FAN4(4)
    sd = m.state_dict()
    assert len(sd) == FAN4_NUM_KEYS == 1129
    assert sum(p.numel() for p in m.parameters()) == FAN4_NUM_PARAMS == 23_820_176
    for k in ("conv1.weight", "bn1.running_var", "conv2.downsample.2.weight", "m0.b1_4.conv1.weight",
              "m3.b2_plus_1.bn3.num_batches_tracked", "top_m_3.conv3.weight", "conv_last0.bias",
              "bn_end2.weight", "l3.weight", "bl2.weight", "al0.weight"):
        assert k in sd, k
    assert "bl3.weight" not in sd and "al3.weight" not in sd
    assert tuple(sd["l3.weight"].shape) == (68, 256, 1, 1)


def _face_alignment_fan_module():
    spec = importlib.util.find_spec("face_alignment")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face_alignment is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "fan.py")
    if not os.path.isfile(path):
        pytest.skip(f"face_alignment has no {path}")
    # load models/fan.py alone: the package __init__ imports heavy optional dependencies
    mspec = importlib.util.spec_from_file_location("_face_alignment_fan", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def test_fan4_matches_face_alignment():
    torch = pytest.importorskip("torch")
    fa = _face_alignment_fan_module()
    from progsr_jax.interop.pytorch.fan4 import FAN4

    ref, ours = fa.FAN(4), FAN4(4)
    a, b = ref.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    assert all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var") else
              v if k.endswith("num_batches_tracked") else
              0.1 * torch.randn(v.shape, generator=g)) for k, v in b.items()}
    ref.load_state_dict(sd)
    ours.load_state_dict(sd)
    x = torch.rand(1, 3, 64, 64, generator=g)  # any multiple of 64 works; small is fast
    with torch.no_grad():
        ya, yb = ref.eval()(x), ours.eval()(x)
    assert len(ya) == len(yb) == 4
    for p, q in zip(ya, yb):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
