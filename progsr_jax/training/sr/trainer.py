"""The super-resolution trainer: state, the jitted train step of each stage, the run.

Layout follows flax's ``examples/imagenet``: :func:`create_train_state`,
:func:`make_train_step` (one jit-compiled step per stage) and
:func:`train_and_evaluate`, which runs the stages with the shared loop of
:mod:`progsr_jax.training.core`.

Determinism: the data order is a function of (seed, global step) and the
randomness of step ``s`` is ``fold_in(PRNGKey(seed), s)``, so a run resumed
from a checkpoint continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from progsr_jax import data as data_lib
from progsr_jax.data import celeba_tfds
from progsr_jax.data import degradation as degradation_lib
from progsr_jax.inference import SuperResolver, checkpoints
from progsr_jax.nets import fan as fan_lib
from progsr_jax.nets import gan, losses, vgg
from progsr_jax.training import config as config_files
from progsr_jax.training import core, distributed, reporting, resume
from progsr_jax.training.sr import config as sr_config
from progsr_jax.training.sr import validation as sr_validation

log = logging.getLogger("progsr_jax")

# Which stage's block each top-level module belongs to; a stage-k update touches
# groups 1..k.  Every group has its own Adam state (and step count), like the
# per-parameter state of PyTorch's Adam in the authors' code, where a block's
# parameters start being optimised when its stage starts.
G_GROUPS = {"step1_0": 1, "step1_1": 1, "step1_3": 1, "step1_4": 1, "step1_5": 1, "to_rgb_0": 1,
            "step2_0": 2, "step2_1": 2, "step2_2": 2, "to_rgb_1": 2,
            "step3_0": 3, "step3_1": 3, "step3_2": 3, "to_rgb_2": 3}
D_GROUPS = {"from_rgb_0": 1, "step1_0": 1, "equal_conv": 1, "linear": 1, "linear2": 1,
            "from_rgb_1": 2, "step2_0": 2, "from_rgb_2": 3, "step3_0": 3}

METRIC_TERMS = sr_config.LOSS_TERMS


def split_groups(params: dict, groups: dict[str, int]) -> dict[str, dict]:
    out: dict[str, dict] = {"1": {}, "2": {}, "3": {}}
    for name, sub in params.items():
        out[str(groups[name])][name] = sub
    return out


def merge_groups(parts: dict[str, dict]) -> dict:
    merged = {}
    for sub in parts.values():
        merged.update(sub)
    return merged


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # completed iterations, counted over all stages
    g_params: Any
    g_stats: Any
    d_params: Any
    g_opt: Any  # {'1','2','3'}: Adam state of each stage's parameter group
    d_opt: Any
    bad_step: jnp.ndarray  # first iteration with a non-finite loss/gradient, -1 if none
    bad_terms: jnp.ndarray  # bitmask over metric names (see nonfinite_names)


def _global_norm(tree) -> jnp.ndarray:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree_util.tree_leaves(tree)))


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    return optax.adam(o.lr, b1=o.b1, b2=o.b2, eps=o.eps)


def create_train_state(config, key) -> tuple[TrainState, gan.Generator, gan.Discriminator]:
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    kg, kd = jax.random.split(key)
    g, gv = gan.init_generator(kg, config.model.width, dtype)
    d, dv = gan.init_discriminator(kd, sr_config.d_width(config), dtype)
    tx = make_optimizer(config)
    g_opt = {k: tx.init(v) for k, v in split_groups(gv["params"], G_GROUPS).items()}
    d_opt = {k: tx.init(v) for k, v in split_groups(dv["params"], D_GROUPS).items()}
    state = TrainState(step=jnp.zeros((), jnp.int32), g_params=gv["params"],
                       g_stats=gv["batch_stats"], d_params=dv["params"], g_opt=g_opt, d_opt=d_opt,
                       bad_step=jnp.full((), -1, jnp.int32), bad_terms=jnp.zeros((), jnp.int32))
    return state, g, d


# Names whose finiteness is checked every step (bit i of bad_terms <-> name i).
CHECKED = METRIC_TERMS + ("g_loss", "d_loss", "gradient_penalty", "g_grad_norm", "d_grad_norm")


def nonfinite_names(mask: int) -> list[str]:
    return core.bit_names(mask, CHECKED)


def _apply_groups(tx, grads, opt_state, params, groups, stage, lr_scale=1.0):
    """Adam on the parameter groups of stages 1..stage; later groups stay untouched.

    ``lr_scale`` multiplies the updates (Adam's update is linear in its
    learning rate): the ``optim.decay`` schedule, see :func:`lr_scale_at`.
    """
    g_parts, p_parts = split_groups(grads, groups), split_groups(params, groups)
    new_opt = dict(opt_state)
    for k in range(1, stage + 1):
        key = str(k)
        upd, new_opt[key] = tx.update(g_parts[key], opt_state[key], p_parts[key])
        upd = jax.tree_util.tree_map(lambda u: u * lr_scale, upd)
        p_parts[key] = optax.apply_updates(p_parts[key], upd)
    return merge_groups(p_parts), new_opt


def make_train_step(config, g: gan.Generator, d: gan.Discriminator, stage: int,
                    use_fan: bool, fan_module=None) -> Callable:
    """The full training iteration of one stage (pure; jit it).

    ``step_fn(state, batch, alpha, vgg_params, fan_vars, lr_scale=1) -> (state, metrics)``:
    one generator update, then one discriminator update on a fresh G(x) from
    the updated generator, as in the authors' code.  A non-finite loss or
    gradient norm leaves the state unchanged and is recorded in
    ``bad_step``/``bad_terms``; from then on updates are skipped.

    Every network of the step (G, D, VGG and the FAN, whatever dtype
    ``fan_module`` was made with) computes in ``g.dtype``; parameters,
    BatchNorm statistics, the losses, the gradient penalty's input gradient
    and norms and Adam stay float32.  No work is spent on gradients nobody
    uses: the real images go through VGG and the FAN forward only, and the
    critic scores the real and the fake images of its update in one call.
    """
    w = sr_config.loss_weights(config, stage)
    tx = make_optimizer(config)
    vgg_net = vgg.VGG16Features(dtype=g.dtype)
    fan_net = None if fan_module is None else fan_module.clone(dtype=g.dtype)
    key0 = jax.random.PRNGKey(config.seed)
    pixel_kind = config.loss.pixel
    norm_mode = config.loss.heatmap_norm
    fan_on = use_fan and stage > 1 and (w["heatmap"] > 0 or w["attention"] > 0)
    perc_on = w["perceptual"] > 0
    adv_on = w["adversarial"] > 0  # with no adversarial term the critic is not trained either

    def step_fn(state: TrainState, batch, alpha, vgg_params, fan_vars, lr_scale=1.0):
        lr, hr = batch["lr"], batch["hr"]
        key = jax.random.fold_in(key0, state.step)

        def d_apply(params, x, groups=1):
            return d.apply({"params": params}, x, stage=stage, alpha=alpha, groups=groups)

        def g_loss_fn(g_params):
            fake, upd = g.apply({"params": g_params, "batch_stats": state.g_stats}, lr,
                                stage=stage, alpha=alpha, train=True, mutable=["batch_stats"])
            terms = {t: jnp.zeros((), jnp.float32) for t in METRIC_TERMS}
            terms["pixel"] = losses.pixel_loss(fake, hr, pixel_kind)
            if adv_on:
                terms["adversarial"] = -jnp.mean(d_apply(state.d_params, fake))
            if perc_on:  # two calls: the real features are targets (forward only)
                feats_fake = vgg_net.apply({"params": vgg_params}, 0.5 * fake + 0.5)
                feats_real = vgg_net.apply({"params": vgg_params}, 0.5 * hr + 0.5)
                terms["perceptual"] = losses.perceptual_loss(
                    feats_fake, [jax.lax.stop_gradient(f) for f in feats_real])
            if fan_on:
                fan_apply = lambda x: fan_net.apply(fan_vars, x, train=False)  # noqa: E731
                terms["heatmap"], terms["attention"] = losses.heatmap_and_attention_losses(
                    fan_apply, fake, hr, norm_mode)
            total = sum(w[t] * terms[t] for t in METRIC_TERMS if w[t] > 0)
            return total, (terms, upd["batch_stats"])

        (g_loss, (terms, g_stats)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
            state.g_params)
        g_params, g_opt = _apply_groups(tx, g_grads, state.g_opt, state.g_params, G_GROUPS, stage,
                                        lr_scale)

        if adv_on:
            # Discriminator update on a fresh G(x) from the updated generator (train-mode
            # BatchNorm, which updates the running statistics a second time, as the
            # authors' code does).
            fake, upd = g.apply({"params": g_params, "batch_stats": g_stats}, lr, stage=stage,
                                alpha=alpha, train=True, mutable=["batch_stats"])
            fake = jax.lax.stop_gradient(fake)
            g_stats = upd["batch_stats"]
            eps = jax.random.uniform(key, (hr.shape[0], 1, 1, 1), jnp.float32)

            def d_loss_fn(d_params):
                return losses.discriminator_loss(
                    lambda x, groups=1: d_apply(d_params, x, groups), hr, fake, eps,
                    config.loss.gp_weight, config.loss.drift)

            (d_loss, d_aux), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.d_params)
            d_params, d_opt = _apply_groups(tx, d_grads, state.d_opt, state.d_params, D_GROUPS,
                                            stage, lr_scale)
            d_grad_norm = _global_norm(d_grads)
        else:
            zero = jnp.zeros((), jnp.float32)
            d_loss, d_grad_norm, d_params, d_opt = zero, zero, state.d_params, state.d_opt
            d_aux = {"d_real": zero, "d_fake": zero, "gradient_penalty": zero}

        metrics = dict(terms)
        metrics.update(g_loss=g_loss, d_loss=d_loss, g_grad_norm=_global_norm(g_grads),
                       d_grad_norm=d_grad_norm, **d_aux)
        bits = core.nonfinite_bits(metrics, CHECKED)
        ok = (bits == 0) & (state.bad_step < 0)
        new = state.replace(step=state.step + 1, g_params=g_params, g_stats=g_stats,
                            d_params=d_params, g_opt=g_opt, d_opt=d_opt)
        frozen = state.replace(
            step=state.step + 1,
            bad_step=jnp.where(state.bad_step < 0, state.step, state.bad_step).astype(jnp.int32),
            bad_terms=jnp.where(state.bad_step < 0, bits, state.bad_terms).astype(jnp.int32))
        state = core.keep_if_finite(ok, new, frozen)
        metrics["alpha"] = jnp.asarray(alpha, jnp.float32)
        return state, metrics

    return step_fn


def stage_schedule(config) -> list[tuple[int, int, int]]:
    """[(stage, first global step, end global step)] for the stages this run trains."""
    out, begin = [], 0
    for k in range(config.start_stage, config.final_stage + 1):
        n = int(config.stage_steps[k - 1])
        out.append((k, begin, begin + n))
        begin += n
    return out


def alpha_at(config, stage: int, it: int) -> float:
    """Fade-in weight at iteration ``it`` (0-based) of ``stage``: min(1, it / fade_steps)."""
    if stage == 1 or config.fade_steps == 0:
        return 1.0
    return min(1.0, it / config.fade_steps)


def lr_scale_at(config, stage: int, it: int) -> float:
    """The learning-rate multiplier at iteration ``it`` (0-based) of ``stage``.

    ``optim.decay='none'`` (the paper's): 1 throughout.  ``'cosine'``: 1 until
    the final stage, then a cosine from 1 to 0 over the final stage's
    iterations; a short run ends on small steps instead of wherever Adam's
    last large ones left the generator.
    """
    if config.optim.decay == "none" or stage != config.final_stage:
        return 1.0
    n = max(1, int(config.stage_steps[stage - 1]))
    return 0.5 * (1.0 + math.cos(math.pi * min(it, n) / n))


def stage_at(config, step: int) -> tuple[int, int]:
    """(stage, iteration within the stage) of global step ``step``."""
    for k, begin, end in stage_schedule(config):
        if step < end:
            return k, step - begin
    k, begin, _ = stage_schedule(config)[-1]
    return k, step - begin


# --------------------------------------------------------------------------- the run


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Trains stages ``start_stage..final_stage`` in ``workdir``; resumes if it holds a checkpoint."""
    sr_config.validate(config, len(jax.devices()))
    if config.fan.checkpoint:  # the folders the config names, before any work
        fan_lib.check_folder(config.fan.checkpoint)
    if config.init_from:
        checkpoints.resolve(config.init_from)
    # A run that stops before its training loop (a bad data root, FAN or init_from
    # checkpoint) leaves no new workdir, and an existing one as it was.
    with core.run_workdir(workdir, config) as (reporter, started):
        return _train(config, workdir, reporter, started=started)


def _train(config, workdir: str, reporter, started: Callable[[], None] = lambda: None
           ) -> TrainState:
    reporter.info(core.describe_devices())
    shard = core.data_parallel()

    ds = distributed.prepare_once("training data", lambda: data_lib.build_dataset(
        config_files.data_config(config), log=reporter.info))
    reporter.info(f"data: {len(ds)} training images from {_describe_source(config)}, "
                  f"split {config.data.split}")

    degradation = degradation_lib.from_config(config.data.degradation)
    if degradation is not None:
        reporter.info(f"data: 16x16 inputs degraded on the fly "
                      f"({degradation_lib.describe(config.data.degradation)}); validation "
                      "stays on the clean chain")
    state, g, d = create_train_state(config, jax.random.PRNGKey(config.seed))
    state = distributed.replicate(state, shard.replicated)
    validator = _validator(config, g, reporter, shard.batch)
    manager = checkpoints.manager(workdir, config.keep_checkpoints)
    restored = resume.restore_latest(manager, state)  # straight into the replicated sharding
    if restored is not None:
        state = restored
        reporter.info(f"resumed from checkpoint at iteration {int(state.step)}")
    elif config.init_from:
        state = resume.init_from_pretrained(state, config.init_from)
        state = distributed.replicate(state, shard.replicated)
        reporter.info(f"initialised G (and D if present) from {config.init_from}")

    vgg_params = distributed.replicate(vgg.load_vgg16_features_params(), shard.replicated)
    fan_module, fan_vars = None, None
    if config.fan.checkpoint:
        fan_module, fan_vars = fan_lib.load_variables(config.fan.checkpoint)
        fan_vars = distributed.replicate(fan_vars, shard.replicated)
        reporter.info(f"heatmap and attention losses use the FAN at {config.fan.checkpoint}")
    elif config.final_stage > 1:
        reporter.info("fan.checkpoint is not set: the heatmap and attention losses are off")

    schedule = stage_schedule(config)
    total = schedule[-1][2]
    sample_idx = np.arange(min(config.num_samples, len(ds)))
    start_time = time.time()

    def check(state):
        bad = int(jax.device_get(state.bad_step))
        if bad >= 0:
            names = nonfinite_names(int(jax.device_get(state.bad_terms)))
            manager.wait_until_finished()
            error = core.diverged(names, bad, manager.latest_step(),
                                  "lower optim.lr or check the data")
            reporter.info(f"non-finite {', '.join(names)} at iteration {bad}; training stopped")
            raise error

    def validate(done, state, stage, alpha):
        t0 = time.time()
        values = validator({"params": state.g_params, "batch_stats": state.g_stats}, stage, alpha)
        reporter.scalars(done, {"stage": stage, **values})
        size = gan.output_size(stage)
        reporter.info(f"iteration {done}: validation at {size}x{size} on {values['val_count']} "
                      f"images: PSNR {values['val_psnr']:.2f} dB (bicubic "
                      f"{values['val_psnr_bicubic']:.2f}), SSIM {values['val_ssim']:.4f} "
                      f"(bicubic {values['val_ssim_bicubic']:.4f}) [{time.time() - t0:.0f} s]")
        bar.set_postfix(stage=stage, val_psnr=f"{values['val_psnr']:.2f}",
                        bicubic=f"{values['val_psnr_bicubic']:.2f}")

    started()
    loader = data_lib.BatchLoader(ds, config.batch_size, config.seed,
                                  [(stage, end) for stage, _, end in schedule],
                                  rows=data_lib.local_rows(shard.batch, config.batch_size),
                                  degradation=degradation)
    workers = data_lib.workers_for(config.data.workers, degradation is not None)
    if workers and int(state.step) < total:
        reporter.info(f"data: batches made by {workers} worker process"
                      f"{'es' if workers > 1 else ''} (data.workers)")
    with core.StopSignal() as stop, \
            reporter.progress(total, int(state.step), config.log_every) as bar, \
            data_lib.InputPipeline(loader, int(state.step), total, workers=workers,
                                   finish=loader.finish, sharding=shard.batch,
                                   buffer=config.data.prefetch) as batches:
        for stage, begin, end in schedule:
            if int(state.step) >= end:
                continue
            jitted = jax.jit(make_train_step(config, g, d, stage, fan_vars is not None, fan_module),
                             donate_argnums=(0,),
                             in_shardings=(shard.replicated, shard.batch, None, shard.replicated,
                                           shard.replicated, None),
                             out_shardings=(shard.replicated, shard.replicated))
            reporter.info(f"stage {stage}: {gan.output_size(stage)}x{gan.output_size(stage)} output, "
                          f"iterations {begin}..{end - 1}")

            def step_fn(state, step, batch, stage=stage, begin=begin, jitted=jitted):
                alpha = alpha_at(config, stage, step - begin)
                lr_scale = lr_scale_at(config, stage, step - begin)
                return jitted(state, batch, np.float32(alpha), vgg_params, fan_vars,
                              np.float32(lr_scale))

            def log(done, host, rate, stage=stage, begin=begin):
                alpha = alpha_at(config, stage, done - 1 - begin)
                reporter.scalars(done, {"stage": stage, "alpha": alpha,
                                        **core.mean_metrics(host, skip=("alpha",)),
                                        "images_per_sec": rate})
                bar.set_postfix(stage=stage, g=f"{reporter.last['g_loss']:.3f}",
                                d=f"{reporter.last['d_loss']:.3f}")

            def after_step(done, state, last, stage=stage, begin=begin):
                alpha = alpha_at(config, stage, done - 1 - begin)
                if reporter.writer and (done % config.sample_every == 0 or last):
                    write_samples(workdir, g, state, ds, sample_idx, stage, alpha, done)
                if validator is not None and (done % config.eval_every == 0 or last):
                    validate(done, state, stage, alpha)

            def save(done, state, stage=stage, begin=begin):
                alpha = alpha_at(config, stage, done - 1 - begin)
                resume.save(manager, state, done, _meta(config, stage, alpha, done - begin))

            state = core.train_loop(
                state, step_fn, batches.until(end), end=end, batch_size=config.batch_size,
                log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                hooks=core.Hooks(log=log, save=save, check=check, after_step=after_step),
                stop=stop, bar=bar, info=reporter.info)
    manager.wait_until_finished()
    reporter.info(f"finished {total} iterations in {time.time() - start_time:.0f} s")
    return state


def _describe_source(config) -> str:
    source, root = config.data.source, config.data.root
    if source == "synthetic":
        return "the built-in synthetic faces"
    if source == "tfds" or (source == "celeba" and not root):
        return celeba_tfds.describe(config.data.tfds_data_dir or
                                    (root if source == "tfds" else None))
    return f"{source} at {root}"


def _validator(config, g, reporter, batch_sharding):
    """The held-out set's :class:`~progsr_jax.training.sr.validation.Validator`, or None."""
    val_cfg = sr_validation.data_config(config)
    if val_cfg is None:
        if int(config.val.num_images) > 0:
            reporter.info("validation is off: a folder source needs --config.val.root=<folder of "
                          "held-out images>")
        return None
    val_ds = distributed.prepare_once("validation data", lambda: data_lib.build_dataset(
        val_cfg, log=reporter.info))
    reporter.info(f"validation: {min(len(val_ds), int(config.val.num_images))} held-out images "
                  f"(split {val_cfg.split}) every {config.eval_every} iterations and at the end "
                  "of each stage")
    return sr_validation.Validator(val_ds, config.val.num_images, config.val.batch_size, g,
                                   batch_sharding)


def write_samples(workdir: str, g, state: TrainState, ds, idx, stage: int, alpha: float,
                  step: int) -> str:
    """``samples/stage<k>_<step>.png``: LR | bicubic | SR | HR rows of the first images.

    Computed on this process's own device from a host copy of G (the writer
    alone calls it; nothing involves the other processes).
    """
    res = gan.output_size(stage)
    lr_u8 = np.asarray(ds.images[16][idx])
    hr_u8 = np.asarray(ds.images[res][idx])
    variables = jax.device_get({"params": state.g_params, "batch_stats": state.g_stats})
    sr = SuperResolver(variables, stage, alpha, model=g).super_resolve(lr_u8, len(lr_u8))
    path = os.path.join(workdir, "samples", f"stage{stage}_{step:07d}.png")
    reporting.save_grid(path, lr_u8, sr, hr_u8)
    return path


def _meta(config, stage, alpha, iteration):
    return {"stage": stage, "alpha": float(alpha), "iteration": int(iteration),
            "width": float(config.model.width), "d_width": sr_config.d_width(config),
            "dtype": config.model.dtype,
            "format": checkpoints.FORMAT}
