"""Distillation of the landmark student (progsr_jax.distill) from teacher heatmaps.

The synthetic tests need nothing outside the repository: the "teacher" is a
randomly initialised StudentFAN run over the built-in synthetic faces, its
heatmaps written in the teacher-folder format of :mod:`progsr_jax.data.teacher`.
The CelebA test uses ``../shared`` and PyTorch (the real teacher pass) and
skips without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import serialization

from progsr_jax.data import synthetic, teacher
from progsr_jax.errors import UserError
from progsr_jax.inference import checkpoints
from progsr_jax.nets import fan as fan_lib
from progsr_jax.nets import losses
from progsr_jax.nets.fan import StudentFAN
from progsr_jax.training import config as config_files
from progsr_jax.training import resume
from progsr_jax.training.distill import augment as distill_augment
from progsr_jax.training.distill import config as distill_config
from progsr_jax.training.distill import conv_taps
from progsr_jax.training.distill import data as distill_data
from progsr_jax.training.distill import optim as distill_optim
from progsr_jax.training.distill import state as distill_state
from progsr_jax.training.distill import step as distill_step
from progsr_jax.training.distill import trainer as distill
from progsr_jax.training.distill import validation as teacher_nme
from progsr_jax.training.sr import trainer as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def distill_config_of(variant=None):
    return config_files.load("distill_fan.py", variant)


def smoke_config(tmp_path, teacher_dir, **overrides):
    c = distill_config_of("smoke")
    c.teacher_heatmaps = str(teacher_dir)
    c.data.cache_dir = str(tmp_path / "cache")
    c.update_from_flattened_dict(overrides)
    return c


def _leaves(state):
    return jax.tree_util.tree_leaves(jax.device_get({"p": state.params, "s": state.batch_stats,
                                                     "o": state.opt_state, "e": state.ema}))


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_teacher):
    """(config, workdir, final state) of a 12-iteration smoke distillation."""
    tmp = tmp_path_factory.mktemp("trained")
    c = smoke_config(tmp, synthetic_teacher, steps=12)
    state = distill.train_and_evaluate(c, str(tmp / "one"))
    return c, tmp / "one", state


def test_smoke_end_to_end(trained):
    c, one, state = trained
    assert int(state.step) == 12

    # the loss goes down and validation NME (64 and 128) is logged
    recs = _metrics(one)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0]
    val = [r for r in recs if "val_nme64_pct" in r]
    assert [r["step"] for r in val] == [4, 8, 12]
    assert all(0 <= r["val_nme64_pct"] < 100 and 0 <= r["val_nme128_pct"] < 100 for r in val)
    assert val[-1]["val_count64"] == 8 and val[-1]["val_count128"] == 4
    assert os.path.isfile(one / "samples" / "landmarks_0000012.png")

    # the workdir is a converted-FAN folder
    fan = fan_lib.load(one)
    assert fan.meta["step"] == 12 and fan.meta["final"] and fan.meta["width"] == 0.125
    assert fan(np.zeros((2, 64, 64, 3), np.float32)).shape == (2, 64, 64, 68)
    # ... holding the moving average of the weights (the smoke variant keeps one; :cpu does not)
    assert c.ema_decay > 0 and state.ema is not None and fan.meta["ema_decay"] == c.ema_decay
    for a, b in zip(jax.tree_util.tree_leaves(fan.variables),
                    jax.tree_util.tree_leaves(jax.device_get(state.ema))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(fan.variables["params"]["layers_9"]["weight"],
                              jax.device_get(state.params["layers_9"]["weight"]))

    # --eval_only reproduces the final validation numbers
    result = distill.evaluate_only(c, str(one), None)
    assert result["val_nme64_pct"] == pytest.approx(val[-1]["val_nme64_pct"])
    assert json.loads((one / "eval_nme.json").read_text())["fan_step"] == 12


@pytest.mark.slow
def test_student_plugs_into_super_resolution_training(tmp_path, trained, tiny_config):
    """--config.fan.checkpoint=<distillation workdir>: the heatmap and attention losses use it."""
    _, one, _ = trained
    c = tiny_config(final_stage=2, stage_steps=(1, 2, 0))
    c.data.cache_dir = str(tmp_path / "cache")
    c.fan.checkpoint = str(one)
    train.train_and_evaluate(c, str(tmp_path / "sr"))
    assert f"heatmap and attention losses use the FAN at {one}" in (
        tmp_path / "sr" / "log.txt").read_text()
    recs = [r for r in _metrics(tmp_path / "sr") if r.get("stage") == 2 and "heatmap" in r]
    assert recs and all(r["heatmap"] > 0 and r["attention"] > 0 for r in recs)


def test_resume_is_exact(tmp_path, trained):
    """Stopped at 6 and resumed (with its batches made by a worker process): the same
    weights, optimiser and EMA state, bit for bit, as the uninterrupted run (the
    augmentation is drawn from (seed, step))."""
    c, _, state = trained
    assert distill_augment.uses_augmentation(c) and c.augment.flip and distill_state.uses_ema(c)
    c = c.copy_and_resolve_references()
    c.val.sizes = (64,)  # validation does not touch the training state; keep this test short
    two = tmp_path / "two"
    half = distill.train_and_evaluate(c, str(two), stop_after=6)
    assert int(half.step) == 6 and fan_lib.load(two).meta["final"] is False
    c.data.workers = 1  # the second half's batches from a worker process: the same, bit for bit
    resumed = distill.train_and_evaluate(c, str(two))  # the same command again
    assert int(resumed.step) == 12
    for a, b in zip(_leaves(state), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert "resumed from checkpoint at iteration 6" in (two / "log.txt").read_text()
    # the checkpoint holds the EMA: resuming without it (or the reverse) is refused
    c.steps = 14
    c.ema_decay = 0.0
    with pytest.raises(UserError, match="with an EMA"):
        distill.train_and_evaluate(c, str(two))


def test_ema_round_trips_through_a_checkpoint(trained):
    c, one, state = trained
    module = StudentFAN(width=c.model.width)
    # ema_t = d_t ema_{t-1} + (1 - d_t) w_t, d_t = min(ema_decay, (1 + t) / (10 + t))
    assert float(distill_state.ema_decay_at(c, 0)) == pytest.approx(0.1)
    assert float(distill_state.ema_decay_at(c, 10 ** 6)) == pytest.approx(c.ema_decay)
    assert distill_state.student_variables(state) is state.ema
    mgr = checkpoints.manager(str(one), c.keep_checkpoints, create=False)
    restored = resume.restore_latest(mgr, distill_state.create_state(c, module))
    mgr.close()
    assert int(restored.step) == 12 and restored.ema is not None
    for a, b in zip(_leaves(state), _leaves(restored)):
        np.testing.assert_array_equal(a, b)
    # without EMA the state (and so the checkpoint) holds nothing more than before EMA
    # existed: checkpoints of format progsr_jax/distill/1 still resume
    c = c.copy_and_resolve_references()
    c.ema_decay = 0.0
    plain = distill_state.create_state(c, module)
    assert plain.ema is None
    assert set(serialization.to_state_dict(plain)) == {"step", "params", "batch_stats",
                                                       "opt_state"}
    assert "ema" in serialization.to_state_dict(state)


def _gaussian_heatmaps(points, size=64, sigma=1.0):
    """(size, size, 68) Gaussian heatmaps centred on ``points`` (68, 2) ``(x, y)``."""
    g = np.arange(size, dtype=np.float64)
    dx = (g[None, :] - points[:, 0:1]) ** 2  # (68, W)
    dy = (g[None, :] - points[:, 1:2]) ** 2  # (68, H)
    hm = np.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma ** 2))
    hm[hm < 1e-20] = 0.0  # no float32 subnormals (XLA on a CPU flushes them to 0)
    return np.transpose(hm, (1, 2, 0)).astype(np.float32)


def test_flip_gives_the_landmarks_of_the_flipped_face():
    """Mirroring an image and its teacher heatmaps (channels permuted, then flipped)
    gives heatmaps whose landmarks are those of the mirrored face: point k at
    (W - 1 - x, y) of the original's point FLIP_PERMUTATION[k]."""
    perm = distill_augment.FLIP_PERMUTATION
    assert sorted(perm) == list(range(68)) and list(perm[perm]) == list(range(68))
    image, points = synthetic.make_face(synthetic.face_rng(0, 3), 64)
    x = image[None].astype(np.float32) / 255.0
    y = _gaussian_heatmaps(points.astype(np.float64))[None]
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    fx, fy = jax.jit(distill_augment.transform)(x, y, one, zero, zero, np.ones(1, bool))
    np.testing.assert_array_equal(np.asarray(fx), x[:, :, ::-1])  # an exact mirror
    got = fan_lib.heatmaps_to_landmarks(np.asarray(fy))[0]
    want = np.stack([63 - points[perm, 0], points[perm, 1]], axis=1)
    assert np.abs(got - want).max() <= 0.5  # argmax decoding: within half a pixel
    np.testing.assert_allclose(got, np.stack(
        [63 - fan_lib.heatmaps_to_landmarks(y)[0][perm, 0],
         fan_lib.heatmaps_to_landmarks(y)[0][perm, 1]], axis=1), atol=1e-6)
    # and they are a face in the 68-point layout again: image-left before image-right
    lx = got[:, 0]
    for left, right in ((0, 16), (17, 21), (21, 22), (22, 26), (36, 39), (39, 42), (42, 45),
                        (31, 33), (33, 35), (48, 51), (51, 54), (60, 62), (62, 64), (59, 55)):
        assert lx[left] < lx[right], (left, right)
    # the unflipped examples of a batch are untouched
    x2, y2 = np.concatenate([x, x]), np.concatenate([y, y])
    fx2, fy2 = distill_augment.transform(x2, y2, np.ones(2, np.float32), np.zeros(2, np.float32),
                                      np.zeros(2, np.float32), np.array([False, True]))
    np.testing.assert_array_equal(np.asarray(fx2[0]), x[0])
    np.testing.assert_array_equal(np.asarray(fy2[0]), y[0])
    np.testing.assert_array_equal(np.asarray(fy2[1]), np.asarray(fy[0]))


def test_zoom_and_shift_move_image_and_heatmaps_alike():
    image, points = synthetic.make_face(synthetic.face_rng(0, 5), 64)
    x = image[None].astype(np.float32) / 255.0
    y = _gaussian_heatmaps(points.astype(np.float64))[None]
    one, no = np.ones(1, np.float32), np.zeros(1, bool)
    # an integer shift moves the pixels (and so the landmarks) by whole pixels
    sx, sy = distill_augment.transform(x, y, one, np.full(1, 2.0, np.float32),
                                    np.full(1, -1.0, np.float32), no)
    np.testing.assert_array_equal(np.asarray(sx)[0, 5:-5, 5:-5], x[0, 6:-4, 3:-7])
    got = fan_lib.heatmaps_to_landmarks(np.asarray(sy))[0]
    np.testing.assert_allclose(got, fan_lib.heatmaps_to_landmarks(y)[0] + [2, -1], atol=1e-6)
    # a zoom by 1.1 about the centre moves each landmark to c + 1.1 (p - c)
    zx, zy = distill_augment.transform(x, y, np.full(1, 1.1, np.float32), np.zeros(1, np.float32),
                                    np.zeros(1, np.float32), no)
    got = fan_lib.heatmaps_to_landmarks(np.asarray(zy))[0]
    assert np.abs(got - (31.5 + 1.1 * (points - 31.5))).max() <= 0.75
    assert np.asarray(zx).min() >= 0 and np.asarray(zx).max() <= 1
    # the random draw is a function of the key only
    c = distill_config_of("smoke")
    key = jax.random.fold_in(jax.random.key(c.seed), 7)
    a = distill_augment.augment(c, key, np.concatenate([x] * 4), np.concatenate([y] * 4))
    b = distill_augment.augment(c, key, np.concatenate([x] * 4), np.concatenate([y] * 4))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_misuse_gives_one_line_errors(tmp_path, synthetic_teacher, trained, write_teacher):
    with pytest.raises(UserError, match="no such folder"):
        distill.train_and_evaluate(smoke_config(tmp_path, tmp_path / "nope"), str(tmp_path / "w1"))
    with pytest.raises(UserError, match="teacher_heatmaps is not set"):
        distill.train_and_evaluate(smoke_config(tmp_path, ""), str(tmp_path / "w2"))
    # heatmaps of other images than the data: nothing matches
    other = tmp_path / "other"
    write_teacher(other, [f"elsewhere/{i}.jpg" for i in range(3)],
                  np.zeros((3,) + teacher.HEATMAP_SHAPE, np.float32))
    with pytest.raises(UserError, match="none of the 32 images"):
        distill.train_and_evaluate(smoke_config(tmp_path, other), str(tmp_path / "w3"))
    # resuming a workdir with other teacher heatmaps is refused
    work = tmp_path / "w4"
    shutil.copytree(trained[1], work)
    files = (synthetic_teacher / teacher.FILES_FILE).read_text().split()
    hm = teacher.open(synthetic_teacher).get(range(len(files)))
    write_teacher(tmp_path / "t2", files, hm, teacher_name="another")
    with pytest.raises(UserError, match="teacher_sha256"):
        distill.train_and_evaluate(smoke_config(tmp_path, tmp_path / "t2", steps=16), str(work))

    # the command line prints one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "progsr_jax.distill",
                           "--config=configs/distill_fan.py:smoke", f"--workdir={tmp_path / 'w5'}",
                           f"--config.teacher_heatmaps={tmp_path / 'nope'}"],
                          check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "no such folder" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_held_out_indices():
    assert list(distill_data.held_out_indices(10, 0.2)) == [0, 5]
    assert len(distill_data.held_out_indices(4591, 0.05)) == 230
    assert len(distill_data.held_out_indices(10, 0.0)) == 0
    assert list(teacher_nme.teacher_to_size(np.array([[0.0, 63.0]]), 128)[0]) == [0.5, 126.5]


def test_celeba_released_teacher_matches_itself(tmp_path, celeba_root, distilled_fan_file,
                                                convert_fan_tool):
    """The released FAN against its own heatmaps: NME ~ 0; real CelebA paths are matched."""
    pytest.importorskip("torch")
    tool = convert_fan_tool
    hm = tmp_path / "hm_val"
    tool.teacher_heatmaps(teacher="distilled", weights=str(distilled_fan_file),
                          data_root=str(celeba_root), split="val", limit=16, batch_size=16,
                          output=str(hm), progress=False)
    fan_dir = tmp_path / "released"
    tool.convert_distilled(str(distilled_fan_file), str(fan_dir))

    c = distill_config_of("smoke")
    c.data.source, c.data.root, c.data.cache_dir = "celeba", str(celeba_root), str(tmp_path / "c")
    c.data.max_images = 16
    c.val.teacher_heatmaps = str(hm)
    c.val.max_images_128 = 16
    result = distill.evaluate_only(c, None, str(fan_dir))
    assert result["val_count64"] == 16
    assert result["val_nme64_pct"] < 0.05  # only float16 storage can move an argmax
    # At 128x128 the released student itself is far from its 64x64 landmarks (its
    # receptive field is 13 pixels): about 6% NME on these faces.
    assert 0 < result["val_nme128_pct"] < 20

    # the same heatmaps are no training data for the train split
    c.teacher_heatmaps = str(hm)
    with pytest.raises(UserError, match="none of the 16 images of celeba split 'train'"):
        distill.train_and_evaluate(c, str(tmp_path / "w"))


def test_tap_gradients_and_output_init():
    c = distill_config_of("smoke")
    module = StudentFAN(width=0.125)
    state = distill_state.create_state(c, module)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
    y = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 68))

    def loss(params):
        out, _ = module.apply({"params": params, "batch_stats": state.batch_stats}, x,
                              train=True, mutable=["batch_stats"])
        return jax.numpy.mean((out - y) ** 2)

    def tap_loss(params):
        with nn.intercept_methods(conv_taps.tap_grad_interceptor):
            return loss(params)

    want = jax.jit(jax.value_and_grad(loss))(state.params)
    got = jax.jit(jax.value_and_grad(tap_loss))(state.params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)

    c.model.output_init_scale = 0.01
    small = distill_state.create_state(c, module)
    np.testing.assert_allclose(small.params["layers_9"]["weight"],
                               0.01 * np.asarray(state.params["layers_9"]["weight"]), rtol=1e-6)
    np.testing.assert_array_equal(small.params["layers_6"]["weight"],
                                  state.params["layers_6"]["weight"])


def test_straight_through_output_gradient():
    c = distill_config_of("smoke")
    c.output_grad, c.conv_grad, c.kl_weight = "straight_through", "xla", 0.0
    c.augment.flip, c.augment.scale, c.augment.shift = False, 0.0, 0.0
    module = StudentFAN(width=0.125)
    state = distill_state.create_state(c, module)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
    y = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 68)) * 0.1
    _, metrics = jax.jit(distill_step.make_train_step(c, module))(state, x, y)

    def surrogate(params):  # d/dparams of sum(dL/d out * z): the straight-through gradient
        out, upd = module.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                train=True, mutable=["batch_stats", "intermediates"],
                                capture_intermediates=lambda m, _: m.name == "layers_9")
        z = upd["intermediates"]["layers_9"]["__call__"][0]
        dl_dout = jax.lax.stop_gradient(2 * (out - y) / out.size)
        return jax.numpy.sum(dl_dout * z), jax.numpy.mean((out - y) ** 2)

    grads, loss = jax.jit(jax.grad(surrogate, has_aux=True))(state.params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree_util.tree_leaves(grads)))
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-4)


def test_spatial_softmax_kl_term():
    rng = np.random.default_rng(0)
    y = rng.uniform(-0.01, 0.6, (2, 8, 8, 68)).astype(np.float32)
    p = rng.uniform(-0.01, 0.6, (2, 8, 8, 68)).astype(np.float32)
    t = 0.05

    def softmax(a):  # over the pixels of each (image, landmark)
        e = np.exp((a - a.max(axis=(1, 2), keepdims=True)) / t)
        return e / e.sum(axis=(1, 2), keepdims=True)

    py, pp = softmax(y.astype(np.float64)), softmax(p.astype(np.float64))
    want = np.mean(np.sum(py * np.log(py / pp), axis=(1, 2)))
    np.testing.assert_allclose(losses.spatial_softmax_kl(y, p, t), want, rtol=1e-4)
    assert float(losses.spatial_softmax_kl(y, y, t)) == pytest.approx(0.0, abs=1e-6)
    # it only depends on where each heatmap is high, not on a constant offset
    np.testing.assert_allclose(losses.spatial_softmax_kl(y, p + 0.3, t), want, rtol=1e-4)

    # in the train step: loss = mse + kl_weight * kl, all three logged
    c = distill_config_of("smoke")
    c.conv_grad, c.kl_weight, c.kl_temperature = "xla", 0.5, t
    c.augment.flip, c.augment.scale, c.augment.shift = False, 0.0, 0.0
    module = StudentFAN(width=0.125)
    state = distill_state.create_state(c, module)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
    _, m = jax.jit(distill_step.make_train_step(c, module))(state, x, y)
    out = module.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=True,
                       mutable=["batch_stats"])[0]
    np.testing.assert_allclose(m["mse"], np.mean((np.asarray(out) - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], losses.spatial_softmax_kl(y, out, t), rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m["mse"] + 0.5 * m["kl"], rtol=1e-6)
    c.kl_weight, c.teacher_heatmaps = -1.0, "hm"
    with pytest.raises(UserError, match="kl_weight"):
        distill_config.validate(c)


def test_muon_orthogonalises_the_convolutions_and_adam_updates_the_rest():
    c = distill_config_of("smoke")
    assert c.optimizer == "muon" and distill_config_of("cpu").optimizer == "muon"
    assert distill_config_of().optimizer == "adam"  # the paper's recipe
    state = distill_state.create_state(c, StudentFAN(width=0.25))
    params = jax.device_get(state.params)
    dims = distill_optim.muon_dimensions(params)
    for layer, leaves in params.items():
        for name, p in leaves.items():
            muon = name == "weight" and p.ndim == 4 and layer != "layers_9"
            assert (dims[layer][name] is not None) == muon, (layer, name)
    assert sum(d["weight"] is not None for d in dims.values()) == 4  # conv, layers_0/3/6

    # gradients whose singular values span 3 orders of magnitude
    rng = np.random.default_rng(0)

    def skewed(p):
        g = rng.standard_normal(p.shape).astype(np.float32)
        return g * np.logspace(0, -3, p.shape[-1], dtype=np.float32)

    grads = jax.tree_util.tree_map(skewed, params)
    tx = distill_optim.make_optimizer(c)
    updates, _ = tx.update(grads, tx.init(params), params)
    w = np.asarray(updates["layers_6"]["weight"])
    s = np.linalg.svd(w.reshape(-1, w.shape[-1]), compute_uv=False)
    g = grads["layers_6"]["weight"]
    sg = np.linalg.svd(g.reshape(-1, g.shape[-1]), compute_uv=False)
    assert sg.max() / sg.min() > 500
    # orthogonalised (approximately: 5 Newton-Schulz iterations): every direction of the
    # weight moves at a similar rate, whatever the gradient's spread
    assert s.max() / s.min() < 5
    # the last layer, biases and BatchNorm get Adam's step (with Nesterov momentum, as in
    # optax's Muon)
    adam = optax.adam(c.lr, b1=c.b1, b2=c.b2, eps=c.eps, nesterov=True)
    want, _ = adam.update(grads, adam.init(params), params)
    for layer, name in (("layers_9", "weight"), ("layers_9", "bias"), ("layers_6", "bias"),
                        ("layers_7", "weight")):
        np.testing.assert_allclose(np.asarray(updates[layer][name]),
                                   np.asarray(want[layer][name]), rtol=1e-5, atol=1e-10)
