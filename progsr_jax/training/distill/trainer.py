r"""The landmark-distillation trainer: a "fan_squeeze" student from precomputed teacher heatmaps.

The teacher heatmaps come from ``tools/convert_fan_weights.py teacher-heatmaps``
(format: :mod:`progsr_jax.data.teacher`).  The student
(:class:`progsr_jax.nets.fan.StudentFAN`) sees the same 64x64 step-2 targets in
[0, 1] that the teacher pass saw and is trained with the mean squared error to
the teacher's (64, 64, 68) heatmaps (paper: Adam, lr 1e-4, batch 16, up to
100k iterations), BatchNorm in training mode with running statistics.  Data:
:mod:`~progsr_jax.training.distill.data`; step and optimiser:
:mod:`~progsr_jax.training.distill.step`; validation NME:
:mod:`progsr_jax.training.distill.validation`.  The loop, checkpoints, stop signal
and reporting are the shared ones of :mod:`progsr_jax.training.core`.

Workdir contents
----------------
``fan_meta.json`` + ``variables/``
    the student as a FAN folder (:func:`progsr_jax.nets.fan.save`), written
    at every checkpoint and at the end: ``fan.load(DIR)`` and
    ``--config.fan.checkpoint=DIR`` in super-resolution training take the
    workdir itself.  With ``ema_decay > 0`` it holds the moving average of
    the weights (which validation measures too), not the last iterate.
``checkpoints/``
    Orbax training checkpoints (student, BatchNorm statistics, optimiser
    state, step, and the EMA weights when ``ema_decay > 0``).  Re-running the
    same command resumes exactly: batch ``s`` is
    :func:`progsr_jax.data.batch_indices` ``(n, batch, seed, s)``, its
    augmentation is drawn from ``fold_in(key(seed), s)`` and the step is
    deterministic.  SIGTERM/SIGINT save a checkpoint and exit.  Checkpoints of
    runs without EMA are unchanged (format ``progsr_jax/distill/1``); a run
    with EMA cannot resume one without, or the reverse.
``metrics.jsonl``, ``tensorboard/``, ``log.txt``
    ``loss`` (the objective), ``mse`` (and ``kl``), ``grad_norm``, ``lr``,
    ``images_per_sec`` every ``log_every`` steps; ``val_nme64_pct``,
    ``val_nme128_pct`` (and medians) every ``eval_every`` steps and at the end.
``samples/landmarks_<step>.png``
    validation faces upscaled x4 with the teacher's points (green) and the
    student's (red) at 64x64 input.
``eval_nme.json``
    written by ``--eval_only``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from progsr_jax import data as data_lib
from progsr_jax.data import writing
from progsr_jax.errors import UserError
from progsr_jax.inference import checkpoints
from progsr_jax.nets import fan as fan_lib
from progsr_jax.nets.fan import StudentFAN
from progsr_jax.nets.layers import count_params
from progsr_jax.training import core, distributed, resume
from progsr_jax.training.distill import config as distill_config
from progsr_jax.training.distill import data as distill_data
from progsr_jax.training.distill import state as distill_state
from progsr_jax.training.distill import step as distill_step
from progsr_jax.training.distill.validation import Evaluator, save_overlay

FORMAT = "progsr_jax/distill/1"


def train_and_evaluate(config, workdir: str, stop_after: int | None = None):
    """Distils the student in ``workdir`` (resuming from its latest checkpoint).

    ``stop_after``: stop (with a checkpoint) once this global step is reached,
    as if the run had been interrupted there; for tests.
    """
    distill_config.validate(config, len(jax.devices()))
    # A run that stops before its training loop leaves no new workdir, an old one as it was.
    with core.run_workdir(workdir, config) as (reporter, started):
        return _distill(config, workdir, reporter, stop_after, started=started)


def _describe(config, num_params: int, num_train: int) -> str:
    opt = f"Adam lr {config.lr}"
    if config.optimizer == "muon":
        opt = f"Muon lr {config.muon_lr} (convolutions) + {opt}"
    loss = "MSE" + (f" + {config.kl_weight} x KL" if config.kl_weight else "")
    a = config.augment
    aug = [name for name, on in (("flips", a.flip), (f"zoom +-{a.scale:g}", a.scale > 0),
                                 (f"shift +-{a.shift:g} px", a.shift > 0)) if on]
    extra = (f"; augmentation: {', '.join(aug)}" if aug else "") + (
        f"; EMA {config.ema_decay:g} of the weights for validation and export"
        if distill_state.uses_ema(config) else "")
    return (f"student: width {config.model.width}, {num_params:,} parameters; {config.steps} "
            f"iterations of batch {config.batch_size} on {num_train} images, {opt} "
            f"({config.lr_schedule}), {loss}{extra}")


def _check_ema(manager, ema: bool) -> None:
    """Refuses to resume a run with EMA from one without (or the reverse): the
    checkpointed state would not hold what this config needs."""
    step = manager.latest_step()
    if step is None:
        return
    try:
        old = manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
    except Exception:  # noqa: BLE001 - reported by restore_latest
        return
    had = bool(isinstance(old, dict) and old.get("ema"))
    if had != ema:
        raise UserError(f"{manager.directory} was trained {'with' if had else 'without'} an EMA "
                        f"of the weights; this command has ema_decay={'0' if had else 'on'}. "
                        "Use another --workdir or the same ema_decay")


def _distill(config, workdir: str, reporter, stop_after: int | None,
             started: Callable[[], None] = lambda: None):
    start_time = time.time()
    reporter.info(core.describe_devices())
    train_split, val_split = distill_data.load_splits(config, info=reporter.info)
    shard = core.data_parallel()

    module = StudentFAN(width=float(config.model.width))
    state = distributed.replicate(distill_state.create_state(config, module), shard.replicated)
    num_params = count_params(state.params)
    teacher_sha = str(train_split.teacher.meta.get("weights_sha256")
                      or train_split.teacher.directory)
    meta = {"format": FORMAT, "teacher_sha256": teacher_sha, "num_train": len(train_split),
            "width": float(config.model.width), "ema": distill_state.uses_ema(config)}
    manager = checkpoints.manager(workdir, config.keep_checkpoints)
    resume.check_run_kind(manager, meta, "a FAN distillation", ("teacher_sha256", "num_train"))
    _check_ema(manager, meta["ema"])
    restored = resume.restore_latest(manager, state)  # straight into the replicated sharding
    if restored is not None:
        state = restored
        reporter.info(f"resumed from checkpoint at iteration {int(state.step)}")
    else:
        reporter.info(_describe(config, num_params, len(train_split)))

    jitted = jax.jit(distill_step.make_train_step(config, module), donate_argnums=(0,),
                     in_shardings=(shard.replicated, shard.batch, shard.batch),
                     out_shardings=(shard.replicated, shard.replicated))
    apply_fn = _sharded_apply(module, shard)
    evaluator = None
    if val_split is not None:
        evaluator = Evaluator(val_split, config.val.sizes, config.val.max_images,
                              config.val.max_images_128, config.val.batch_size)
    student_meta = {"width": float(config.model.width), "num_params": num_params,
                    "ema_decay": float(config.ema_decay),
                    "source": "progsr_jax.distill",
                    "teacher": train_split.teacher.meta.get("teacher"),
                    "teacher_sha256": teacher_sha}
    last_val: dict = {}

    variables = distill_state.student_variables  # the EMA weights when the run keeps them

    def log(done, host, rate):
        bad = [int(m.pop(distill_step.NONFINITE)) for m in host]
        if any(bad):
            first = next(i for i, b in enumerate(bad) if b)
            raise core.diverged(core.bit_names(bad[first], distill_step.CHECKED),
                                done - len(host) + first, manager.latest_step(),
                                "lower --config.lr")
        rec = {**core.mean_metrics(host), "images_per_sec": rate}
        reporter.scalars(done, rec)
        bar.set_postfix(loss=f"{rec['loss']:.3g}")

    def after_step(done, state, last):
        nonlocal last_val
        if evaluator is not None and (done % config.eval_every == 0 or done == config.steps):
            t0 = time.time()
            last_val, pts64 = evaluator(apply_fn, variables(state))
            reporter.scalars(done, last_val)
            k = min(config.val.num_samples, len(pts64)) if pts64 is not None else 0
            if k and reporter.writer:
                save_overlay(os.path.join(workdir, "samples", f"landmarks_{done:07d}.png"),
                             val_split.images[64][val_split.ds_rows[:k]],
                             evaluator.teacher_points[:k], pts64[:k])
            reporter.info(f"iteration {done}: validation NME " + ", ".join(
                f"{s}x{s} {last_val[f'val_nme{s}_pct']:.3f}% ({last_val[f'val_count{s}']} images)"
                for s in evaluator.sizes) + f" [{time.time() - t0:.0f} s]")

    def save(done, state):
        resume.save_state(manager, state, done, meta)
        fan_lib.save(workdir, variables(state), dict(student_meta, step=int(done),
                                                       final=done >= config.steps, **last_val))

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    step0 = int(state.step)
    loader = distill_data.BatchLoader(train_split, config.batch_size, config.seed,
                                      rows=data_lib.local_rows(shard.batch, config.batch_size))
    workers = data_lib.workers_for(config.data.workers, degraded=False)
    started()
    with core.StopSignal() as stop, \
            reporter.progress(config.steps, step0, config.log_every) as bar, \
            data_lib.InputPipeline(loader, step0, end, workers=workers, sharding=shard.batch,
                                   buffer=1) as batches:
        try:
            state = core.train_loop(
                state, lambda s, step, batch: jitted(s, *batch), batches, end=end,
                batch_size=config.batch_size, log_every=config.log_every,
                checkpoint_every=config.checkpoint_every,
                hooks=core.Hooks(log=log, save=save, after_step=after_step), stop=stop, bar=bar,
                info=reporter.info)
        finally:
            manager.close()
    if step0 >= config.steps:
        reporter.info(f"already finished ({step0} iterations); the student is in {workdir}")
    elif end == config.steps:
        reporter.info(f"finished {config.steps} iterations ({time.time() - start_time:.0f} s in "
                      f"this run); the student is in {workdir} (fan.load(DIR), "
                      f"--config.fan.checkpoint=DIR)")
    return state


def _sharded_apply(module, shard):
    """``(variables, x) -> heatmaps`` for validation: ``x`` (the whole batch, on every
    process) padded to a multiple of the devices, each process computing its rows."""
    devices = len(shard.batch.device_set)
    jitted = jax.jit(lambda v, x: module.apply(v, x, train=False),
                     out_shardings=shard.replicated)

    def apply(variables, x):
        n = len(x)
        pad = -n % devices
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        rows = data_lib.local_rows(shard.batch, len(x))
        return np.asarray(jitted(variables, data_lib.assemble(x[rows], shard.batch)))[:n]

    return apply


def evaluate_only(config, workdir: str | None, fan_dir: str | None) -> dict:
    """Validation NME of a FAN folder (default: the workdir's student)."""
    fan_dir = fan_dir or workdir
    if not fan_dir:
        raise UserError("--eval_only needs --workdir (its distilled student) or --fan=DIR")
    if workdir:
        writing.check_output(workdir, "--workdir")
    if not config.val.teacher_heatmaps and not config.teacher_heatmaps:
        raise UserError("--eval_only needs --config.val.teacher_heatmaps=DIR (or "
                        "--config.teacher_heatmaps=DIR with val.fraction > 0)")
    if not config.val.teacher_heatmaps and not config.val.fraction > 0:
        raise UserError("no validation images: set --config.val.teacher_heatmaps=DIR or "
                        "--config.val.fraction > 0")

    def info(message):
        print(message, file=sys.stderr)

    _, val_split = distill_data.load_splits(config, info=info, need_train=False)
    fan = fan_lib.load(fan_dir)
    evaluator = Evaluator(val_split, config.val.sizes, config.val.max_images,
                          config.val.max_images_128, config.val.batch_size)
    metrics, pts64 = evaluator(lambda v, x: fan(x), None)
    result = {"fan": os.path.abspath(fan_dir), "fan_step": fan.meta.get("step"),
              "teacher_heatmaps": os.path.abspath(config.val.teacher_heatmaps or
                                                  config.teacher_heatmaps), **metrics}
    if workdir:
        writing.write_json(os.path.join(workdir, "eval_nme.json"), result)
        k = min(config.val.num_samples, len(pts64))
        if k:
            save_overlay(os.path.join(workdir, "samples", "landmarks_eval.png"),
                         val_split.images[64][val_split.ds_rows[:k]],
                         evaluator.teacher_points[:k], pts64[:k])
    print(json.dumps(result))
    return result
