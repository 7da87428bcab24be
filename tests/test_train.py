"""Losses, the train step of every stage, determinism, checkpoints and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from progsr_jax import inference
from progsr_jax.errors import UserError
from progsr_jax.interop import state_dict as convert
from progsr_jax.nets import gan, losses, vgg
from progsr_jax.nets.fan import StudentFAN
from progsr_jax.training import config as config_files
from progsr_jax.training.sr import config as sr_config
from progsr_jax.training.sr import trainer as train
from progsr_jax.training.sr import validation as sr_validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_alpha_schedule_matches_authors_code():
    c = config_files.load("step3.py")
    assert train.alpha_at(c, 1, 0) == 1.0
    assert train.alpha_at(c, 2, 0) == 0.0
    assert train.alpha_at(c, 2, 12_500) == 0.5
    assert train.alpha_at(c, 3, 25_000) == 1.0
    assert train.alpha_at(c, 3, 90_000) == 1.0
    assert train.stage_at(c, 0) == (1, 0)
    assert train.stage_at(c, 50_000) == (2, 0)
    assert train.stage_at(c, 100_001) == (3, 1)


def test_config_validation_messages(tiny_config):
    for field, value, msg in [("batch_size", 0, "batch_size"), ("final_stage", 4, "final_stage"),
                              ("model.dtype", "float16", "model.dtype"),
                              ("loss.pixel", "l3", "loss.pixel")]:
        c = tiny_config()
        node = c
        *path, last = field.split(".")
        for p in path:
            node = node[p]
        node[last] = value
        with pytest.raises(UserError, match=msg):
            sr_config.validate(c)
    with pytest.raises(UserError, match="divisible"):
        sr_config.validate(tiny_config(batch_size=6), num_devices=4)


def test_gradient_penalty_against_finite_differences():
    # D(x) = sum_i w_i * tanh(x_i): the gradient per sample is w * (1 - tanh(x)^2).
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4, 4, 3)), jnp.float32)
    d_apply = lambda x: jnp.sum(w * jnp.tanh(x), axis=(1, 2, 3))  # noqa: E731
    real = jnp.asarray(rng.standard_normal((3, 4, 4, 3)), jnp.float32)
    fake = jnp.asarray(rng.standard_normal((3, 4, 4, 3)), jnp.float32)
    eps = jnp.asarray(rng.uniform(size=(3, 1, 1, 1)), jnp.float32)
    gp = losses.gradient_penalty(d_apply, real, fake, eps)
    xhat = np.asarray(eps * real + (1 - eps) * fake, np.float64)
    grad = np.asarray(w, np.float64) * (1 - np.tanh(xhat) ** 2)
    want = np.mean((np.sqrt((grad ** 2).reshape(3, -1).sum(1)) - 1) ** 2)
    np.testing.assert_allclose(float(gp), want, rtol=1e-5)


torch = pytest.importorskip("torch", reason="the PyTorch parity of the D loss needs torch")


def test_discriminator_loss_matches_pytorch_autograd():
    from progsr_jax.interop.pytorch import reference as tr
    torch.manual_seed(0)
    td = tr.Discriminator(width=0.125)
    d, ref = gan.init_discriminator(jax.random.PRNGKey(0), width=0.125)
    sd = {k: v.detach().numpy().copy() for k, v in td.state_dict().items()}
    variables = convert.state_dict_to_variables(sd, ref)
    rng = np.random.default_rng(0)
    real = rng.uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32)
    fake = rng.uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32)
    eps = rng.uniform(size=(4, 1, 1, 1)).astype(np.float32)
    d_apply = lambda x, groups=1: d.apply(variables, x, stage=2, alpha=0.3, groups=groups)  # noqa: E731
    loss, aux = losses.discriminator_loss(d_apply, real, fake, eps)

    t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    tr_real, tr_fake, tr_eps = t(real), t(fake), torch.from_numpy(eps.reshape(4, 1, 1, 1))
    s_real = td(tr_real, 2, 0.3)
    real_term = s_real.mean() - 0.001 * (s_real ** 2).mean()
    x_hat = (tr_eps * tr_real + (1 - tr_eps) * tr_fake).requires_grad_(True)
    g, = torch.autograd.grad(td(x_hat, 2, 0.3).sum(), x_hat, create_graph=True)
    gp = ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    want = td(tr_fake, 2, 0.3).mean() - real_term + 10 * gp
    np.testing.assert_allclose(float(aux["gradient_penalty"]), float(gp), rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-4, atol=1e-4)


def test_heatmap_normalisation_modes():
    rng = np.random.default_rng(0)
    hm_f = jnp.asarray(rng.uniform(0.1, 2.0, (2, 4, 4, 68)), jnp.float32)
    hm_r = jnp.asarray(rng.uniform(-0.5, 1.0, (2, 4, 4, 68)), jnp.float32)
    f, r = losses.normalise_heatmaps(hm_f, hm_r, "own")
    np.testing.assert_allclose(jnp.min(f, axis=(1, 2, 3)), 0, atol=1e-6)
    np.testing.assert_allclose(jnp.max(r, axis=(1, 2, 3)), 1, atol=1e-6)
    fq, _ = losses.normalise_heatmaps(hm_f, hm_r, "pfsr_code")
    lo = np.min(np.asarray(hm_r), axis=(1, 2, 3), keepdims=True)
    hi = np.max(np.asarray(hm_f), axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(fq, (np.asarray(hm_f) - lo) / (hi - lo), rtol=1e-5)
    m = losses.attention_map(r)
    assert m.shape == (2, 4, 4, 1)
    np.testing.assert_allclose(m, np.max(np.asarray(r), axis=-1, keepdims=True), atol=1e-6)


@pytest.fixture(scope="module")
def step_setup(tiny_config):
    c = tiny_config()
    state, g, d = train.create_train_state(c, jax.random.PRNGKey(0))
    fan = StudentFAN(width=0.25)
    fan_vars = fan.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
    return c, state, g, d, fan, fan_vars, vgg.load_vgg16_features_params()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_train_step_per_stage(step_setup, stage):
    c, state, g, d, fan, fan_vars, vgg_params = step_setup
    res = 16 * 2 ** stage
    rng = np.random.default_rng(stage)
    batch = {"lr": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
             "hr": rng.uniform(-1, 1, (2, res, res, 3)).astype(np.float32)}
    fn = jax.jit(train.make_train_step(c, g, d, stage, True, fan))
    new, m = fn(state, batch, np.float32(0.5), vgg_params, fan_vars)
    assert int(new.step) == 1 and int(new.bad_step) == -1
    for name in ("pixel", "adversarial", "perceptual", "g_loss", "d_loss", "gradient_penalty"):
        assert np.isfinite(float(m[name])), name
    if stage > 1:  # the FAN is on: heatmap and attention losses are positive
        assert float(m["heatmap"]) > 0 and float(m["attention"]) > 0
    else:
        assert float(m["heatmap"]) == 0 and float(m["attention"]) == 0
    # Only the parameter groups of stages <= stage move.
    def moved(tree_new, tree_old):
        return any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(tree_new),
                                                            jax.tree_util.tree_leaves(tree_old)))

    for name, group in train.G_GROUPS.items():
        if group > stage:
            assert not moved(new.g_params[name], state.g_params[name]), name
    for name, group in train.D_GROUPS.items():
        if group > stage:
            assert not moved(new.d_params[name], state.d_params[name]), name
    assert moved(new.g_params["step1_0"], state.g_params["step1_0"])
    assert moved(new.g_params[f"to_rgb_{stage - 1}"], state.g_params[f"to_rgb_{stage - 1}"])
    assert moved(new.d_params["linear2"], state.d_params["linear2"])


def test_nonfinite_loss_freezes_state_and_names_term(step_setup):
    c, state, g, d, fan, fan_vars, vgg_params = step_setup
    batch = {"lr": np.full((2, 16, 16, 3), np.nan, np.float32),
             "hr": np.zeros((2, 32, 32, 3), np.float32)}
    fn = jax.jit(train.make_train_step(c, g, d, 1, False, None))
    new, _ = fn(state, batch, np.float32(1.0), vgg_params, None)
    assert int(new.bad_step) == 0
    assert "pixel" in train.nonfinite_names(int(new.bad_terms))
    for a, b in zip(jax.tree_util.tree_leaves(new.g_params), jax.tree_util.tree_leaves(state.g_params)):
        np.testing.assert_array_equal(a, b)


def _final_generator(workdir):
    sr = inference.load(workdir)
    x = np.linspace(-1, 1, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
    return sr, np.asarray(sr(x))


@pytest.mark.slow
def test_training_is_deterministic_and_resume_is_exact(tmp_path, tiny_config):
    """Two runs with the same seed agree; a run resumed at a stage boundary equals both."""
    c = tiny_config()
    c.data.cache_dir = str(tmp_path / "cache")
    train.train_and_evaluate(c, str(tmp_path / "a"))
    train.train_and_evaluate(c, str(tmp_path / "b"))
    resumed = tiny_config(final_stage=2)
    resumed.data.cache_dir = str(tmp_path / "cache")
    train.train_and_evaluate(resumed, str(tmp_path / "c"))
    train.train_and_evaluate(c, str(tmp_path / "c"))  # same workdir: resumes at iteration 4

    sr_a, out_a = _final_generator(tmp_path / "a")
    _, out_b = _final_generator(tmp_path / "b")
    _, out_c = _final_generator(tmp_path / "c")
    assert sr_a.stage == 3 and sr_a.alpha == 1.0 and out_a.shape == (2, 128, 128, 3)
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(out_a, out_c)

    recs = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert {r["stage"] for r in recs} == {1, 2, 3}
    val = [r for r in recs if "val_psnr" in r]  # validation records, at every stage's end
    assert [r["step"] for r in val] == [2, 4, 6]
    for r in recs:
        if r in val:
            continue
        for key in ("step", "alpha", "pixel", "perceptual", "adversarial", "heatmap",
                    "attention", "images_per_sec", "d_loss", "g_loss"):
            assert key in r
    assert os.listdir(tmp_path / "a" / "samples")
    assert (tmp_path / "a" / "config.json").exists()


@pytest.mark.slow
def test_resume_with_other_width_is_refused(tmp_path, tiny_config):
    c = tiny_config(final_stage=1)
    c.data.cache_dir = str(tmp_path / "cache")
    train.train_and_evaluate(c, str(tmp_path / "w"))
    with pytest.raises(UserError, match="model.width"):
        train.train_and_evaluate(tiny_config(**{"model.width": 0.125}), str(tmp_path / "w"))


def _run_cli(*args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300, **kw)


@pytest.mark.parametrize("args,needle", [
    (["--config.batch_size=0"], "batch_size"),
    (["--config.data.source=celeba", "--config.data.root=/nonexistent/celeba"], "/nonexistent"),
    (["--config.final_stage=5"], "final_stage"),
])
def test_main_misuse_is_one_line_error(tmp_path, args, needle):
    r = _run_cli("progsr_jax.main", "--config=configs/step3.py:smoke",
                 f"--workdir={tmp_path / 'w'}", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr.strip().splitlines()[-1], r.stderr


def test_inference_load_of_empty_directory_is_refused(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        inference.load(str(tmp_path))


def test_zero_adversarial_weight_skips_the_critic(step_setup, tiny_config):
    c, state, g, d, fan, fan_vars, vgg_params = step_setup
    c = tiny_config(**{"loss.stage1.adversarial": 0.0})
    batch = {"lr": np.zeros((2, 16, 16, 3), np.float32), "hr": np.zeros((2, 32, 32, 3), np.float32)}
    new, m = jax.jit(train.make_train_step(c, g, d, 1, False, None))(
        state, batch, np.float32(1.0), vgg_params, None)
    assert float(m["d_loss"]) == 0.0 and float(m["adversarial"]) == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(new.d_params), jax.tree_util.tree_leaves(state.d_params)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_step_tracks_float32_and_keeps_float32_state(step_setup, tiny_config):
    """model.dtype=bfloat16: bf16 compute, float32 parameters and Adam state, finite GP."""
    c, state, g, d, fan, fan_vars, vgg_params = step_setup
    c16 = tiny_config(**{"model.dtype": "bfloat16"})
    state16, g16, d16 = train.create_train_state(c16, jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(state16.g_params), leaves(state.g_params)):  # same initial weights
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(7)
    batch = {"lr": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
             "hr": rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)}
    args = (batch, np.float32(0.5), vgg_params, fan_vars)
    new32, m32 = jax.jit(train.make_train_step(c, g, d, 2, True, fan))(state, *args)
    new16, m16 = jax.jit(train.make_train_step(c16, g16, d16, 2, True, fan))(state16, *args)
    assert int(new16.bad_step) == -1
    for x in leaves((new16.g_params, new16.d_params, new16.g_opt, new16.d_opt, new16.g_stats)):
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert x.dtype == jnp.float32
    for name in ("pixel", "perceptual", "adversarial", "heatmap", "attention", "g_loss",
                 "d_real", "d_fake", "gradient_penalty", "d_loss"):
        a, b = float(m16[name]), float(m32[name])
        assert np.isfinite(a), name
        assert abs(a - b) <= 0.05 * abs(b) + 1e-3, (name, a, b)
    # One Adam step moves each weight by about lr in both precisions.
    du32 = np.asarray(new32.g_params["step1_0"]["weight"] - state.g_params["step1_0"]["weight"])
    du16 = np.asarray(new16.g_params["step1_0"]["weight"] - state16.g_params["step1_0"]["weight"])
    assert np.mean(np.sign(du32) == np.sign(du16)) > 0.9


def test_cosine_decay_only_over_the_final_stage(tiny_config):
    c = tiny_config(**{"stage_steps": (2, 2, 8), "optim.decay": "cosine"})
    assert train.lr_scale_at(c, 1, 1) == 1.0 and train.lr_scale_at(c, 2, 1) == 1.0
    assert train.lr_scale_at(c, 3, 0) == 1.0
    assert train.lr_scale_at(c, 3, 4) == pytest.approx(0.5)
    assert train.lr_scale_at(c, 3, 8) == pytest.approx(0.0, abs=1e-12)
    assert train.lr_scale_at(tiny_config(), 3, 4) == 1.0  # the paper's: no decay


def test_validation_set_is_held_out_from_the_training_source(tiny_config):
    c = tiny_config(**{"val.num_images": 5})
    v = sr_validation.data_config(c)
    assert v.source == "synthetic" and v.num_synthetic == 5 and v.seed != c.seed
    c = tiny_config(**{"data.source": "celeba", "data.root": "/data/celeba"})
    v = sr_validation.data_config(c)
    assert (v.source, v.root, v.split) == ("celeba", "/data/celeba", "val")
    assert sr_validation.data_config(tiny_config(**{"data.source": "folder",
                                                    "data.root": "/x"})) is None
    assert sr_validation.data_config(tiny_config(**{"val.num_images": 0})) is None


# --------------------------------------------------------------------------- issue 26:
# bfloat16 everywhere, no wasted work

#: Convolutions (and matmuls) of the stage-3 step allowed to stay float32 under
#: model.dtype=bfloat16, with the reason for each.  None: G, the critic (the
#: gradient penalty's double backward included), VGG and the FAN all compute in
#: bfloat16; what stays float32 is elementwise (BatchNorm statistics, the losses,
#: the penalty's input gradient and norms, Adam).
FLOAT32_IN_BFLOAT16_STEP: dict[str, str] = {}


def _convolutions(hlo_text: str) -> list[dict]:
    """Every convolution and dot_general of a StableHLO module: operand and result types."""
    import re

    out = []
    for line in hlo_text.splitlines():
        if "stablehlo.convolution" not in line and "stablehlo.dot_general" not in line:
            continue
        types = re.findall(r"tensor<([0-9x]*)x?(bf16|f32|f16|f64)>", line.split(":")[-1])
        *operands, result = [(tuple(int(d) for d in shape.split("x") if d), dt)
                             for shape, dt in types]
        out.append({"op": "convolution" if "convolution" in line else "dot_general",
                    "operands": operands, "shape": result[0], "dtype": result[1]})
    return out


@pytest.fixture(scope="module")
def stage3_steps(step_setup, tiny_config):
    """The lowered stage-3 step (StableHLO text) in float32 and in bfloat16, batch 2."""
    _, state, g, d, fan, fan_vars, vgg_params = step_setup
    rng = np.random.default_rng(3)
    batch = {"lr": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
             "hr": rng.uniform(-1, 1, (2, 128, 128, 3)).astype(np.float32)}
    out = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_config(**{"model.dtype": dtype})
        compute = jnp.dtype(dtype)  # the modules' dtype (create_train_state's choice)
        fn = jax.jit(train.make_train_step(c, g.clone(dtype=compute), d.clone(dtype=compute), 3,
                                           True, fan))
        out[dtype] = fn.lower(state, batch, np.float32(0.5), vgg_params, fan_vars).as_text()
    return out


def test_bfloat16_step_has_no_float32_convolution(stage3_steps):
    convs = {k: _convolutions(v) for k, v in stage3_steps.items()}
    assert len(convs["float32"]) == len(convs["bfloat16"]) > 150
    assert {c["dtype"] for c in convs["float32"]} == {"f32"}  # the parser sees float32 ones
    f32 = [c for c in convs["bfloat16"] if c["dtype"] != "bf16"]
    assert len(f32) == len(FLOAT32_IN_BFLOAT16_STEP), f32
    # the FAN's heatmap layer (68 channels at 128x128) included
    assert any(c["shape"][-1] == 68 for c in convs["bfloat16"])


def test_real_images_go_through_vgg_and_the_fan_forward_only(stage3_steps):
    """No backward pass over the real half: each VGG / FAN layer runs three times per step
    (fake forward, real forward, fake backward), every time on the batch of 2, never on 4."""
    convs = _convolutions(stage3_steps["float32"])
    # VGG's conv1_2 (64 -> 64) and the FAN's heatmap layer (32 -> 68 at a quarter width),
    # both at 128x128 (no other layer of the step has these kernels)
    for kernel in ((3, 3, 64, 64), (3, 3, 32, 68)):
        runs = [c for c in convs if sorted(c["operands"][1][0]) == sorted(kernel)
                and c["operands"][0][0][1:3] == (128, 128)]
        assert [c["operands"][0][0][0] for c in runs] == [2, 2, 2], runs


def test_critic_scores_real_and_fake_in_one_call_exactly(tiny_config):
    c = tiny_config()
    d, dv = gan.init_discriminator(jax.random.PRNGKey(5), 0.125)
    rng = np.random.default_rng(5)
    real = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    fake = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    eps = rng.uniform(size=(3, 1, 1, 1)).astype(np.float32)
    both = np.stack([real, fake], axis=1).reshape(6, 32, 32, 3)
    score = jax.jit(lambda x, groups: d.apply(dv, x, stage=1, alpha=1.0, groups=groups),
                    static_argnums=1)
    scores = score(both, 2)
    np.testing.assert_allclose(scores[0::2], score(real, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores[1::2], score(fake, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not split"):
        d.apply(dv, both[:5], stage=1, alpha=1.0, groups=2)

    # The critic's loss and its gradient, one call against one call per set: the same
    # mathematics, checked in float64 (in float32 the bias gradients, sums of terms that
    # nearly cancel, differ by rounding).
    d64 = gan.Discriminator(width=0.125, dtype=jnp.float64)

    def one_call(params):
        apply = lambda x, groups=1: d64.apply({"params": params}, x, stage=1,  # noqa: E731
                                              alpha=1.0, groups=groups)
        return losses.discriminator_loss(apply, real, fake, eps, c.loss.gp_weight,
                                         c.loss.drift)[0]

    def two_calls(params):  # the loss as written before: one call per set of images
        apply = lambda x: d64.apply({"params": params}, x, stage=1, alpha=1.0)  # noqa: E731
        d_real, d_fake = apply(real), apply(fake)
        gp = losses.gradient_penalty(apply, real, fake, eps)
        return (jnp.mean(d_fake) - jnp.mean(d_real) + c.loss.drift * jnp.mean(d_real ** 2)
                + c.loss.gp_weight * gp)

    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), dv["params"])
        (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(params)
                              for f in (one_call, two_calls))
        # the minibatch statistic is computed in float32 in both
        np.testing.assert_allclose(l1, l2, rtol=1e-7)
        for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
