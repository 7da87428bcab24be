"""Official PyTorch generator/discriminator checkpoints -> Orbax -> Flax inference."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="converting official checkpoints needs torch")

from progsr_jax import inference  # noqa: E402
from progsr_jax.inference import checkpoints  # noqa: E402
from progsr_jax.interop.pytorch import reference as tr  # noqa: E402
from progsr_jax.training import config as config_files  # noqa: E402
from progsr_jax.training import resume  # noqa: E402
from progsr_jax.training.sr import trainer as train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_pfsr_checkpoint as tool  # noqa: E402


def _official_generator(width=0.25, seed=0):
    torch.manual_seed(seed)
    g = tr.Generator(width)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is exercised
        for m in g.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return g.eval()


@pytest.mark.parametrize("step,alpha,prefix", [(3, 1.0, ""), (3, 0.4, "module."),
                                               (2, 0.7, ""), (1, 1.0, "module.")])
def test_converted_generator_matches_pytorch(tmp_path, step, alpha, prefix):
    g = _official_generator()
    sd = {prefix + k: v for k, v in g.state_dict().items()}
    path = tmp_path / "generator.ckpt"
    torch.save({"step": step, "alpha": alpha, "iteration": 1234, "model_state_dict": sd}, path)
    assert tool.main(["convert_pfsr_checkpoint.py", "--generator", str(path), "--output", str(tmp_path / "out")]) == 0
    sr = inference.load(str(tmp_path / "out"))
    assert (sr.stage, sr.alpha, sr.iteration) == (step, alpha, 1234)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        want = g(torch.from_numpy(x.transpose(0, 3, 1, 2)), step, alpha).numpy()
    np.testing.assert_allclose(np.asarray(sr(x)), want.transpose(0, 2, 3, 1), atol=1e-4)


def test_discriminator_is_converted_and_seeds_training(tmp_path):
    g = _official_generator()
    torch.manual_seed(1)
    d = tr.Discriminator(0.25)
    torch.save({"step": 3, "alpha": 1.0, "iteration": 5, "model_state_dict": g.state_dict()},
               tmp_path / "g.ckpt")
    torch.save({"step": 3, "alpha": 1.0, "iteration": 5, "model_state_dict": d.state_dict()},
               tmp_path / "d.ckpt")
    tool.main(["convert_pfsr_checkpoint.py", "--generator", str(tmp_path / "g.ckpt"), "--discriminator",
               str(tmp_path / "d.ckpt"), "--output", str(tmp_path / "out")])
    disc = checkpoints.load_discriminator(str(tmp_path / "out"))
    np.testing.assert_allclose(disc["params"]["linear2"]["weight"],
                               d.linear2.weight.detach().numpy().T, atol=0)
    # Fine-tuning start: a fresh training state takes G and D from the converted checkpoint.

    c = config_files.load("step3.py")
    c.model.width = 0.25
    state, _, _ = train.create_train_state(c, jax.random.PRNGKey(0))
    state = resume.init_from_pretrained(state, str(tmp_path / "out"))
    np.testing.assert_allclose(state.d_params["linear2"]["weight"],
                               d.linear2.weight.detach().numpy().T)


def test_missing_key_is_refused_by_name(tmp_path):
    sd = _official_generator().state_dict()
    del sd["step2.0.conv.3.conv.weight_orig"]
    torch.save({"step": 3, "alpha": 1.0, "iteration": 0, "model_state_dict": sd},
               tmp_path / "g.ckpt")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_pfsr_checkpoint.py"),
                        "--generator", str(tmp_path / "g.ckpt"), "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "step2.0.conv.3.conv.weight_orig" in r.stderr


def test_full_width_official_key_set_converts(tmp_path):
    g = tr.Generator(1.0)
    sd = g.state_dict()
    assert len(sd) == 76  # the official generator's state keys
    torch.save({"step": 3, "alpha": 1.0, "iteration": 100000, "model_state_dict": sd},
               tmp_path / "g.ckpt")
    meta = tool.convert(str(tmp_path / "g.ckpt"), None, str(tmp_path / "out"))
    assert meta["width"] == 1.0
    assert inference.load(str(tmp_path / "out")).output_size == 128
