"""progsr_jax.export: ONNX and StableHLO artefacts equal the Flax generator on real faces.

Two tiny generators (a sixteenth of the width, random weights and random
BatchNorm statistics, so that folding the statistics is tested): a finished
step-3 model and one stopped at stage 2 inside its fade-in (alpha 0.6).  Each
is exported with a dynamic batch and with fixed batches, and run on CelebA
validation faces made by the training chain (skipped without ../shared).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest
from PIL import Image

from progsr_jax import bench, data, export, infer, inference
from progsr_jax.errors import UserError
from progsr_jax.inference import checkpoints as checkpoint_format
from progsr_jax.inference import serialized
from progsr_jax.nets import gan

_INSTALL = ("needs the export extra: pip install -e '.[export]' && "
            "pip install --no-deps jax2onnx==0.17.1")
pytest.importorskip("jax2onnx", reason=_INSTALL)
pytest.importorskip("onnxruntime", reason=_INSTALL)

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32: max abs difference allowed against the Flax outputs
MODELS = {"step3": (3, 1.0), "stage2": (2, 0.6)}
EXPORTS = [("step3", "dynamic"), ("step3", "1"), ("step3", "7"), ("stage2", "dynamic"),
           ("stage2", "7")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{name: path}`` of the two tiny generators, saved as converted checkpoints."""
    _, variables = gan.init_generator(0, width=0.0625)
    variables = jax.device_get(variables)
    rng = np.random.default_rng(0)
    stats = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])
    for layer in jax.tree_util.tree_leaves(stats, is_leaf=lambda d: "running_var" in d):
        layer["running_mean"] = rng.normal(0, 0.2, layer["running_mean"].shape).astype(np.float32)
        layer["running_var"] = rng.uniform(0.5, 2.0, layer["running_var"].shape).astype(np.float32)
    variables = {"params": variables["params"], "batch_stats": stats}
    root = tmp_path_factory.mktemp("export_models")
    out = {}
    for name, (stage, alpha) in MODELS.items():
        meta = {"stage": stage, "alpha": alpha, "iteration": 0, "width": 0.0625,
                "dtype": "float32", "format": checkpoint_format.FORMAT}
        checkpoint_format.save_converted(str(root / name), variables, None, meta)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def faces(celeba_root):
    """Seven CelebA validation faces as (7, 16, 16, 3) uint8, by the training chain."""
    files = data.list_files("celeba", celeba_root, "val")[:7]
    return np.stack([data.preprocess(data.open_image(f))[16] for f in files])


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """``{(model, batch): folder}`` holding model.onnx and model.stablehlo with contracts."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, batch in EXPORTS:
        folder = root / f"{name}_{batch}"
        written = export.export(str(models[name]), str(folder), batch_size=batch,
                                partial=name != "step3", log=lambda _: None)
        assert sorted(written) == ["onnx", "stablehlo"]
        out[name, batch] = folder
    return out


def _flax(models, name, x):
    return np.asarray(inference.load(str(models[name]))(x))


def _sizes(batch):
    return (1, 7) if batch == "dynamic" else (int(batch),)


def test_contracts(exports):
    for (name, batch), folder in exports.items():
        stage, alpha = MODELS[name]
        for fmt, file in export.FILES.items():
            c = json.loads((folder / (file + ".json")).read_text())
            size = 16 * 2 ** stage
            n = "batch" if batch == "dynamic" else int(batch)
            assert c["format"] == fmt and c["file"] == file
            assert c["input"] == {"name": "lr", "layout": "NHWC", "shape": [n, 16, 16, 3],
                                  "dtype": "float32", "range": [-1.0, 1.0],
                                  "from_uint8": "u8 / 127.5 - 1"}
            assert c["output"]["shape"] == [n, size, size, 3] and c["output"]["layout"] == "NHWC"
            assert (c["stage"], c["alpha"], c["output_size"]) == (stage, alpha, size)
            assert c["batch"] == ("dynamic" if batch == "dynamic" else int(batch))
            assert c["finished_step3"] == (name == "step3")
            assert c["converter"]["name"] == {"onnx": "jax2onnx", "stablehlo": "jax.export"}[fmt]
            assert c["versions"]["jax"]


def test_onnx_equals_flax_on_real_faces(exports, models, faces):
    import onnxruntime as ort

    x = data.to_float(faces)
    for (name, batch), folder in exports.items():
        session = ort.InferenceSession(str(folder / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape
        assert shape[1:] == [16, 16, 3]
        assert shape[0] == (int(batch) if batch != "dynamic" else "batch")
        for n in _sizes(batch):
            y = session.run(None, {"lr": x[:n]})[0]
            ref = _flax(models, name, x[:n])
            size = 16 * 2 ** MODELS[name][0]
            assert y.shape == ref.shape == (n, size, size, 3) and y.dtype == np.float32
            diff = float(np.abs(y - ref).max())
            print(f"onnx {name} batch={batch} n={n}: max abs diff {diff:.2e}")
            assert diff <= TOL


def test_stablehlo_equals_flax_without_the_package(exports, models, faces, tmp_path):
    """``jax.export.deserialize(...).call(x)`` in a process where progsr_jax cannot be imported:
    ``python -I -S`` with only the environment's site-packages folder on the path (so neither
    the checkout nor an editable install's .pth hook is seen)."""
    x = data.to_float(faces)
    jobs = {f"{name}_{batch}_{n}": (str(exports[name, batch] / "model.stablehlo"), n)
            for name, batch in EXPORTS for n in _sizes(batch)}
    np.savez(tmp_path / "x.npz", x=x)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = tmp_path / "run_stablehlo.py"
    script.write_text(
        "import json, sys\n"
        "sys.path.append(sys.argv[1])\n"
        "try:\n"
        "    import progsr_jax\n"
        "    sys.exit('progsr_jax is importable here')\n"
        "except ImportError:\n"
        "    pass\n"
        "import jax, numpy as np\n"
        "x = np.load('x.npz')['x']\n"
        "out = {}\n"
        "for key, (path, n) in json.load(open('jobs.json')).items():\n"
        "    exp = jax.export.deserialize(open(path, 'rb').read())\n"
        "    out[key] = np.asarray(exp.call(x[:n]))\n"
        "np.savez('y.npz', **out)\n"
        "print('ok', 'progsr_jax' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-I", "-S", str(script),
                           sysconfig.get_paths()["purelib"]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "False"]
    y = np.load(tmp_path / "y.npz")
    for key, (_, n) in jobs.items():
        name = key.split("_")[0]
        ref = _flax(models, name, x[:n])
        assert y[key].shape == ref.shape
        diff = float(np.abs(y[key] - ref).max())
        print(f"stablehlo {key}: max abs diff {diff:.2e}")
        assert diff <= TOL


def test_exported_model_adapter(exports, models, faces):
    """The SuperResolver-like adapter: both backends, fixed batches chunked and padded."""
    x = data.to_float(faces)
    ref = _flax(models, "step3", x)
    for batch in ("dynamic", "1"):
        for backend in ("onnx", "stablehlo"):
            sr = serialized.load(str(exports["step3", batch]), backend)
            assert (sr.stage, sr.alpha, sr.output_size, sr.backend) == (3, 1.0, 128, backend)
            assert float(np.abs(sr(x) - ref).max()) <= TOL
    sr = serialized.load(str(exports["stage2", "7"]))
    assert (sr.stage, sr.alpha, sr.output_size) == (2, 0.6, 64)
    assert float(np.abs(sr(x[:3]) - _flax(models, "stage2", x[:3])).max()) <= TOL
    with pytest.raises(UserError, match="expected inputs of shape"):
        sr(x[:, :8])
    with pytest.raises(UserError, match="not found"):
        serialized.load(str(exports["step3", "1"] / "missing"))


def test_infer_exported_writes_the_same_pngs(exports, models, faces, tmp_path):
    src = tmp_path / "lr"
    src.mkdir()
    for k, face in enumerate(faces):
        Image.fromarray(face).save(src / f"face{k}.png")
    log = []
    res = infer.run(None, str(src), str(tmp_path / "onnx"), mode="lowres", progress=False,
                    exported=str(exports["step3", "dynamic"]), log=log.append)
    ref = infer.run(str(models["step3"]), str(src), str(tmp_path / "flax"), mode="lowres",
                    progress=False, log=lambda _: None)
    assert len(res["written"]) == len(ref["written"]) == len(faces)
    for a, b in zip(sorted(res["written"]), sorted(ref["written"])):
        assert pathlib.Path(a).name == pathlib.Path(b).name
        pa, pb = (np.asarray(Image.open(p), np.int16) for p in (a, b))
        assert pa.shape == (128, 128, 3) and np.abs(pa - pb).max() <= 1
    with pytest.raises(UserError, match="not both"):
        infer.run(str(models["step3"]), str(src), str(tmp_path / "x"),
                  exported=str(exports["step3", "dynamic"]))
    with pytest.raises(UserError, match="not --mode=photo"):
        infer.run(None, str(src), str(tmp_path / "x"), mode="photo",
                  exported=str(exports["step3", "dynamic"]))


def test_missing_runtime_packages_are_one_line_errors(exports, models, tmp_path,
                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"needs jax2onnx.*--no-deps jax2onnx"):
        export.export(str(models["step3"]), str(tmp_path / "o"), formats=["onnx"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match="needs onnxruntime: pip install onnxruntime"):
        serialized.load(str(exports["step3", "dynamic"]), "onnx")


def test_help():
    proc = subprocess.run([sys.executable, "-m", "progsr_jax.export", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0
    assert "--batch_size" in proc.stdout and "--format" in proc.stdout
    assert "--partial" in proc.stdout


def test_one_line_errors(models, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    step3, stage2 = str(models["step3"]), str(models["stage2"])
    cases = [
        (dict(checkpoint=str(tmp_path / "nope"), output=str(tmp_path / "o")),
         "checkpoint not found"),
        (dict(checkpoint=step3, output=str(a_file / "sub")), "cannot write to --output"),
        (dict(checkpoint=step3, output=str(a_file)), "is a file"),
        (dict(checkpoint=step3, output=str(tmp_path / "o"), formats=["onnx", "tflite"]),
         "unknown --format"),
        (dict(checkpoint=step3, output=str(tmp_path / "o"), batch_size="0"),
         "--batch_size must be"),
        (dict(checkpoint=stage2, output=str(tmp_path / "o")),
         "stage-2 model at alpha 0.6 .*add --partial"),
        (dict(checkpoint=str(empty), output=str(tmp_path / "o")), "no checkpoint found"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(UserError, match=pattern) as e:
            export.export(log=lambda _: None, **kwargs)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # a failed export leaves no output folder
    proc = subprocess.run([sys.executable, "-m", "progsr_jax.export", f"--checkpoint={step3}",
                           f"--output={tmp_path / 'o'}", "--format=tflite"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown --format=tflite; expected a comma-separated list of onnx, stablehlo"]


def _readme_snippet() -> str:
    text = (REPO / "docs" / "export.md").read_text()
    section = text.split("# Exporting a model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_fresh_venv_with_onnxruntime_only(exports, models, faces, tmp_path):
    """The export page's snippet (docs/export.md) in a venv holding only numpy, pillow and onnxruntime (from PyPI)
    makes the PNGs ``infer --mode=lowres`` makes (to one gray level)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "numpy", "pillow", "onnxruntime"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.fail(f"pip install numpy pillow onnxruntime failed: {pip.stderr[-500:]}")
    work = tmp_path / "work"
    (work / "lr").mkdir(parents=True)
    os.symlink(exports["step3", "dynamic"], work / "exported")
    for k, face in enumerate(faces):
        Image.fromarray(face).save(work / "lr" / f"face{k}.png")
    snippet = _readme_snippet()
    assert "exported/model.onnx" in snippet and "face16.png" in snippet
    (work / "snippet.py").write_text(snippet)
    (work / "run.py").write_text(
        "import os, shutil, sys\n"
        "for name in sorted(os.listdir('lr')):\n"
        "    shutil.copy(os.path.join('lr', name), 'face16.png')\n"
        "    exec(open('snippet.py').read(), {})\n"
        "    shutil.move('face128.png', os.path.join('sr', name))\n"
        "for m in ('progsr_jax', 'jax', 'flax'):\n"
        "    assert m not in sys.modules, m\n")
    (work / "sr").mkdir()
    proc = subprocess.run([py, "-I", "run.py"], cwd=work, capture_output=True, text=True,
                          timeout=600, env={"PATH": os.environ.get("PATH", "")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    check = subprocess.run([py, "-I", "-c", "import progsr_jax"], capture_output=True, timeout=60)
    assert check.returncode != 0
    ref = infer.run(str(models["step3"]), str(work / "lr"), str(tmp_path / "infer"),
                    mode="lowres", progress=False, log=lambda _: None)
    assert len(ref["written"]) == len(faces)
    for path in ref["written"]:
        ours = np.asarray(Image.open(work / "sr" / pathlib.Path(path).name), np.int16)
        theirs = np.asarray(Image.open(path), np.int16)
        assert ours.shape == theirs.shape == (128, 128, 3)
        assert np.abs(ours - theirs).max() <= 1


def test_bench_export_mode(capsys):
    assert bench.main(["bench", "--mode=export", "--width=0.0625", "--steps=1",
                       "--warmup=0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode"] == "export"
    assert [r["batch_size"] for r in out["results"]] == [1, 64]
    for r in out["results"]:
        assert r["jax_faces_per_sec"] > 0 and r["onnxruntime_faces_per_sec"] > 0
        assert r["onnxruntime_over_jax"] == pytest.approx(
            r["onnxruntime_faces_per_sec"] / r["jax_faces_per_sec"])
        assert r["max_abs_diff"] <= TOL
