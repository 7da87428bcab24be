r"""Distils the landmark network ("fan_squeeze" student) from precomputed teacher heatmaps.

Usage::

    python -m progsr_jax.distill --config=configs/distill_fan.py --workdir=DIR \
        --config.teacher_heatmaps=HM_DIR --config.data.root=CELEBA_ROOT \
        [--config.val.teacher_heatmaps=HM_VAL_DIR] [--config.<field>=...]
    python -m progsr_jax.distill --config=configs/distill_fan.py --workdir=DIR --eval_only \
        --config.val.teacher_heatmaps=HM_VAL_DIR --config.data.root=CELEBA_ROOT [--fan=FAN_DIR]

The teacher heatmaps come from ``tools/convert_fan_weights.py teacher-heatmaps``
(format: :mod:`progsr_jax.teacher`).  The student
(:class:`progsr_jax.fan.StudentFAN`) sees the same 64x64 step-2 targets in
[0, 1] that the teacher pass saw and is trained with the mean squared error to
the teacher's (64, 64, 68) heatmaps (paper: Adam, lr 1e-4, batch 16, up to
100k iterations), BatchNorm in training mode with running statistics.

Which images are used: the dataset ``data`` (source, root, split) is built as
for super-resolution training and each of its files is matched to a row of
the teacher folder by its path relative to the data root (by the last path
parts, see :meth:`progsr_jax.teacher.TeacherHeatmaps.indices_for`).  Files
without a teacher row, and rows the teacher pass could not decode, are
skipped with a message; no match at all is an error.

Validation (paper Table 1 metric): landmarks are decoded from heatmaps by
argmax (:func:`progsr_jax.landmarks.heatmaps_to_landmarks`) and the NME is
the mean over the 68 points of ``||student - teacher||_2 / image size``,
averaged over the images, in percent.

* ``val_nme64_pct``: the student on the 64x64 image vs the teacher's
  landmarks from the stored 64x64 heatmaps.
* ``val_nme128_pct``: the student on the 128x128 image of the same face (the
  step-3 target) vs the teacher's 64x64 landmarks scaled to 128 with the
  pixel-centre mapping ``p128 = 2 * (p64 + 0.5) - 0.5``, divided by 128.  The
  teacher is only run at 64x64, so this measures how well the student
  transfers to twice the resolution (the paper's "128x128" column, which uses
  a teacher at 128, is not reproduced exactly).

The held-out images are ``val.teacher_heatmaps`` (teacher heatmaps of another
split, e.g. CelebA ``val``, decoded from ``data.root`` with split
``val.split``) or, without it, ``val.fraction`` of the training images, evenly
spaced in dataset order and excluded from training.

Workdir contents
----------------
``fan_meta.json`` + ``variables/``
    the student in the converted-FAN layout of :mod:`progsr_jax.landmarks`,
    written at every checkpoint and at the end: ``landmarks.load(DIR)`` and
    ``--config.fan.checkpoint=DIR`` in super-resolution training take the
    workdir itself.
``checkpoints/``
    Orbax training checkpoints (student, BatchNorm statistics, Adam state,
    step).  Re-running the same command resumes exactly: batch ``s`` is
    :func:`progsr_jax.data.batch_indices` ``(n, batch, seed, s)`` and the step
    is deterministic.  SIGTERM/SIGINT save a checkpoint and exit.
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

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from progsr_jax import _xla_cpu
from progsr_jax import checkpoint as ckpt_lib
from progsr_jax.errors import UserError, run_cli
from progsr_jax.fan import LEAKY_SLOPE, OUTPUT_LAYER

log = logging.getLogger("progsr_jax")

FORMAT = "progsr_jax/distill/1"
STUDENT_KIND = "student_fan"  # what progsr_jax.landmarks expects in fan_meta.json
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "muon")


# --------------------------------------------------------------------------- configuration


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The distillation recipe; ``variant``: ``paper`` (default), ``cpu`` or ``smoke``."""
    placeholder = ml_collections.config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 16
    c.steps = 100_000  # paper: "up to 100k iterations" (the released file is iteration 11,000)
    c.lr = 1e-4
    c.lr_schedule = "constant"  # or "cosine": linear warm-up, then cosine decay to 0 at `steps`
    c.warmup_steps = 0
    c.b1 = 0.9  # Adam betas and eps: PyTorch's defaults, as in the authors' code
    c.b2 = 0.999
    c.eps = 1e-8
    # 'adam' (the paper's) or 'muon': the convolution weights (all but the last
    # layer's) are updated by Muon (optax.contrib.muon: Nesterov momentum
    # muon_beta, orthogonalised by Newton-Schulz iterations) with the learning rate
    # muon_lr (same schedule as lr), everything else by Adam with lr (with
    # Nesterov momentum, as optax's Muon does); see make_optimizer.
    c.optimizer = "adam"
    c.muon_lr = 0.05
    c.muon_beta = 0.95
    c.conv_grad = "auto"  # 'auto', 'taps' or 'xla': see conv_tap_grad
    c.output_grad = "exact"  # or 'straight_through': see make_train_step
    # Weight of an extra term on top of the paper's MSE: the KL divergence between the
    # teacher's and the student's spatial softmax (temperature kl_temperature) of each
    # heatmap, which concentrates on where each maximum lies (see make_train_step).
    # 0: the paper's loss, MSE alone.
    c.kl_weight = 0.0
    c.kl_temperature = 0.02
    # folder written by tools/convert_fan_weights.py teacher-heatmaps
    c.teacher_heatmaps = placeholder(str)

    c.model = ml_collections.ConfigDict()
    c.model.width = 1.0  # 1.0 = the released architecture (321,412 parameters)
    # Multiplies the initial weights and bias of the last convolution (PyTorch's default
    # uniform init); see create_state.  1.0: the plain default init.
    c.model.output_init_scale = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.source = "celeba"  # 'celeba' | 'folder' | 'synthetic' | 'tfds' (as in config_lib)
    c.data.root = placeholder(str)
    c.data.split = "train"
    c.data.cache_dir = placeholder(str)
    c.data.num_workers = -1  # -1: one per CPU core; 0: decode in-process
    c.data.strict = False
    c.data.max_images = placeholder(int)
    c.data.num_synthetic = 2048

    c.val = ml_collections.ConfigDict()
    c.val.teacher_heatmaps = placeholder(str)  # teacher heatmaps of a held-out split
    c.val.split = "val"  # split of data.root those heatmaps belong to
    c.val.fraction = 0.05  # without val.teacher_heatmaps: hold out this share of the training rows
    c.val.max_images = placeholder(int)  # cap on the validation images at 64x64 (None: all)
    c.val.max_images_128 = placeholder(int)  # cap at 128x128 (4x the cost); None: as at 64
    c.val.sizes = (64, 128)
    c.val.batch_size = 32
    c.val.num_samples = 8  # faces in the landmark overlay PNG

    c.log_every = 100
    c.eval_every = 5_000
    c.checkpoint_every = 5_000
    c.keep_checkpoints = 3

    variant = variant or "paper"
    if variant == "paper":
        return c
    if variant == "cpu":
        # The released architecture in about 12 minutes on 2 CPU cores, validation
        # included (README, "Distilling your own landmark network"; measured: 12.1
        # min, validation NME64 1.23% against the released FAN).  Deviations
        # from the paper's recipe, each measured on CelebA (validation NME64 against
        # the released FAN after the same number of images):
        # * Muon for the convolution weights (make_optimizer): in 600 iterations
        #   1.5% against Adam's 2.3%;
        # * batch 4: on a CPU an image costs about the same in any batch, and more,
        #   smaller steps go further than fewer, larger ones (Adam, 2,400 images:
        #   2.4% at batch 4, 2.8% at batch 8);
        # * a warm-up and a cosine decay of larger learning rates (Muon 0.05, Adam
        #   1.4e-3 with b2 0.99) instead of a constant 1e-4: the run sees 30x fewer
        #   images than the released student (11,000 iterations of batch 16);
        # * the last convolution starts 100x smaller and its LeakyReLU is
        #   back-propagated straight through (create_state, make_train_step);
        # * kl_weight 1e-4: a small spatial-softmax KL term next to the MSE, which
        #   pays for where each heatmap's maximum is (spatial_softmax_kl; Adam,
        #   600 iterations: 2.31% against 2.39% without).
        c.optimizer = "muon"
        c.muon_lr = 0.05
        c.batch_size = 4
        c.steps = 1400
        c.lr = 1.4e-3
        c.b2 = 0.99
        c.lr_schedule = "cosine"
        c.warmup_steps = 50
        c.output_grad = "straight_through"
        c.model.output_init_scale = 0.01
        c.kl_weight = 1e-4
        c.log_every = 50
        c.eval_every = 100_000  # only at the end (30-40 s at 64 and 128)
        c.checkpoint_every = 500
        c.val.max_images_128 = 200
        return c
    if variant == "smoke":
        # Built-in synthetic faces (teacher heatmaps for them must still be given),
        # a narrow student and a few iterations: every code path in seconds,
        # with the optimizer and loss of the cpu variant.
        c.optimizer = "muon"
        c.output_grad = "straight_through"
        c.kl_weight = 1e-4
        c.data.source = "synthetic"
        c.data.num_synthetic = 32
        c.data.num_workers = 0
        c.model.width = 0.125
        c.batch_size = 4
        c.steps = 8
        c.lr = 1e-3
        c.log_every = 2
        c.eval_every = 4
        c.checkpoint_every = 4
        c.val.fraction = 0.25
        c.val.max_images_128 = 4
        c.val.batch_size = 8
        c.val.num_samples = 4
        return c
    raise UserError(f"unknown variant {variant!r} (use paper, cpu or smoke)")


def validate(config, num_devices: int = 1) -> None:
    """Raises UserError with a one-line message for any invalid value."""
    def bad(msg):
        raise UserError(f"invalid config: {msg}")

    def positive_int(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            bad(f"{name} must be a positive integer, got {value!r}")

    if not config.teacher_heatmaps:
        bad("teacher_heatmaps is not set: pass --config.teacher_heatmaps=DIR (a folder written by "
            "tools/convert_fan_weights.py teacher-heatmaps)")
    for name in ("batch_size", "steps", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints"):
        positive_int(name, config[name])
    if config.batch_size < 2:
        bad("batch_size must be at least 2 (BatchNorm in training mode needs two samples)")
    if config.batch_size % num_devices:
        bad(f"batch_size {config.batch_size} is not divisible by the {num_devices} devices")
    if not config.lr > 0:
        bad(f"lr must be > 0, got {config.lr}")
    if config.conv_grad not in ("auto", "taps", "xla"):
        bad(f"conv_grad must be 'auto', 'taps' or 'xla', got {config.conv_grad!r}")
    if config.output_grad not in ("exact", "straight_through"):
        bad(f"output_grad must be 'exact' or 'straight_through', got {config.output_grad!r}")
    if config.optimizer not in OPTIMIZERS:
        bad(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    if config.optimizer == "muon" and not config.muon_lr > 0:
        bad(f"muon_lr must be > 0, got {config.muon_lr}")
    if config.optimizer == "muon" and not 0 <= config.muon_beta < 1:
        bad(f"muon_beta must be in [0, 1), got {config.muon_beta}")
    if not config.kl_weight >= 0:
        bad(f"kl_weight must be >= 0, got {config.kl_weight}")
    if not config.kl_temperature > 0:
        bad(f"kl_temperature must be > 0, got {config.kl_temperature}")
    if config.lr_schedule not in SCHEDULES:
        bad(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {config.lr_schedule!r}")
    if not isinstance(config.warmup_steps, int) or not 0 <= config.warmup_steps < config.steps:
        bad(f"warmup_steps must be an integer in [0, steps), got {config.warmup_steps!r}")
    if not config.model.width > 0:
        bad(f"model.width must be > 0, got {config.model.width}")
    if not config.model.output_init_scale >= 0:
        bad(f"model.output_init_scale must be >= 0, got {config.model.output_init_scale}")
    if config.data.source not in ("synthetic", "celeba", "folder", "tfds"):
        bad(f"data.source must be 'synthetic', 'celeba', 'folder' or 'tfds', "
            f"got {config.data.source!r}")
    if config.data.source in ("celeba", "folder") and not config.data.root:
        bad(f"data.source={config.data.source!r} needs --config.data.root=<folder>")
    if not config.val.teacher_heatmaps and not 0 <= config.val.fraction < 1:
        bad(f"val.fraction must be in [0, 1), got {config.val.fraction}")
    sizes = tuple(config.val.sizes)
    if not sizes or any(s not in (64, 128) for s in sizes):
        bad(f"val.sizes must be a non-empty subset of (64, 128), got {sizes!r}")
    positive_int("val.batch_size", config.val.batch_size)
    for name in ("max_images", "max_images_128"):
        v = config.val[name]
        if v is not None and (not isinstance(v, int) or v < 1):
            bad(f"val.{name} must be a positive integer or None, got {v!r}")


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    """Images of one split matched to their teacher heatmaps.

    ``images[r]`` (r = 64, 128) are the dataset's uint8 arrays (memory-mapped),
    ``ds_rows[i]`` / ``teacher_rows[i]`` the dataset and teacher row of
    example ``i``.
    """

    name: str
    files: list[str]
    images: dict[int, np.ndarray]
    ds_rows: np.ndarray
    teacher_rows: np.ndarray
    teacher: Any  # progsr_jax.teacher.TeacherHeatmaps

    def __len__(self) -> int:
        return len(self.ds_rows)

    def subset(self, idx: np.ndarray) -> Split:
        idx = np.asarray(idx, np.int64)
        return dataclasses.replace(self, files=[self.files[i] for i in idx],
                                   ds_rows=self.ds_rows[idx], teacher_rows=self.teacher_rows[idx])

    def inputs(self, idx: np.ndarray, size: int = 64) -> np.ndarray:
        """float32 (len(idx), size, size, 3) in [0, 1], the teacher's input convention."""
        rows = self.ds_rows[np.asarray(idx, np.int64)]
        order = np.argsort(rows, kind="stable")  # ascending reads of the memory map
        out = np.empty((len(rows), size, size, 3), np.uint8)
        out[order] = self.images[size][rows[order]]
        return out.astype(np.float32) / np.float32(255.0)

    def targets(self, idx: np.ndarray) -> np.ndarray:
        """float32 (len(idx), 64, 64, 68) teacher heatmaps."""
        return self.teacher.get(self.teacher_rows[np.asarray(idx, np.int64)])


def _data_cfg(config, split: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.data.to_dict())
    c.split = split
    c.seed = config.seed
    return c


def open_teacher(directory: str, what: str):
    from progsr_jax import teacher as teacher_lib

    if not os.path.isdir(directory):
        raise UserError(f"{what}: no such folder: {directory} (create it with: python "
                        "tools/convert_fan_weights.py teacher-heatmaps ... --output DIR)")
    return teacher_lib.open(directory)


def load_split(config, teacher_dir: str, split: str, name: str, info=print) -> Split:
    """Builds the dataset of ``split`` and matches its files to the rows of ``teacher_dir``."""
    from progsr_jax import data as data_lib

    reader = open_teacher(teacher_dir, f"{name} teacher heatmaps")
    data_crop = {"folder": "square", "synthetic": "none"}.get(config.data.source, "celeba")
    teacher_crop = reader.meta.get("crop")
    if teacher_crop and config.data.source != "synthetic" and teacher_crop != data_crop:
        raise UserError(f"{teacher_dir} was computed on {teacher_crop!r} crops but data.source="
                        f"{config.data.source!r} uses {data_crop!r} crops: the images would not "
                        "match their heatmaps")
    ds = data_lib.build_dataset(_data_cfg(config, split), log=info)
    ds_rows, teacher_rows, missing = [], [], []
    for i, path in enumerate(ds.files):
        try:
            row = int(reader.indices_for([path])[0])
        except UserError:
            missing.append(path)
            continue
        if row in reader.bad:
            missing.append(path)
            continue
        ds_rows.append(i)
        teacher_rows.append(row)
    if not ds_rows:
        where = reader.meta.get("data_root", "?")
        raise UserError(f"none of the {len(ds.files)} images of {config.data.source} split "
                        f"{split!r} has a heatmap in {teacher_dir} (it holds {len(reader)} images "
                        f"of split {reader.meta.get('split', '?')!r} of {where}); "
                        "check data.root, data.split and the teacher folder")
    if missing:
        info(f"{name}: {len(missing)} of {len(ds.files)} images have no usable teacher heatmap "
             f"in {teacher_dir} and are skipped (e.g. {os.path.basename(missing[0])})")
    info(f"{name}: {len(ds_rows)} images with teacher heatmaps "
         f"({reader.meta.get('teacher', '?')} teacher, {teacher_dir})")
    return Split(name=name, files=[ds.files[i] for i in ds_rows], images=ds.images,
                 ds_rows=np.asarray(ds_rows, np.int64),
                 teacher_rows=np.asarray(teacher_rows, np.int64), teacher=reader)


def held_out_indices(n: int, fraction: float) -> np.ndarray:
    """``round(fraction * n)`` evenly spaced example indices (at least one if fraction > 0)."""
    if fraction <= 0 or n < 2:
        return np.zeros(0, np.int64)
    k = min(n - 1, max(1, round(fraction * n)))
    return np.unique(np.floor(np.arange(k) * (n / k)).astype(np.int64))


def load_splits(config, info=print, need_train: bool = True) -> tuple[Split | None, Split | None]:
    """(train, validation) splits; validation is None when there is none."""
    train_split = val_split = None
    if need_train or not config.val.teacher_heatmaps:
        train_split = load_split(config, config.teacher_heatmaps, config.data.split, "train", info)
    if config.val.teacher_heatmaps:
        val_split = load_split(config, config.val.teacher_heatmaps, config.val.split, "val", info)
    elif config.val.fraction > 0:
        held = held_out_indices(len(train_split), config.val.fraction)
        if len(held):
            keep = np.setdiff1d(np.arange(len(train_split)), held)
            val_split = dataclasses.replace(train_split.subset(held), name="val")
            train_split = train_split.subset(keep)
            info(f"val: {len(held)} training images held out (val.fraction={config.val.fraction})")
    return train_split, val_split


class _Batches:
    """Training batches of steps ``start..end-1``, loaded one step ahead in a thread."""

    def __init__(self, split: Split, batch_size: int, seed: int, start: int, end: int):
        from progsr_jax import data as data_lib

        self._indices = lambda s: data_lib.batch_indices(len(split), batch_size, seed, s)
        self.split, self.start, self.end = split, start, end
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def _load(self, step: int):
        idx = self._indices(step)
        return self.split.inputs(idx), self.split.targets(idx)

    def __iter__(self):
        pending = self._pool.submit(self._load, self.start) if self.start < self.end else None
        for step in range(self.start, self.end):
            x, y = pending.result()
            if step + 1 < self.end:
                pending = self._pool.submit(self._load, step + 1)
            yield step, x, y

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- training


@flax.struct.dataclass
class DistillState:
    step: jnp.ndarray  # completed iterations
    params: Any
    batch_stats: Any
    opt_state: Any


def learning_rate(config) -> optax.Schedule:
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.lr)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.steps,
                                              end_value=0.0)


def muon_dimensions(params) -> dict:
    """Which parameters Muon updates: the (kh, kw, in, out) weights of every convolution
    but the last (``OUTPUT_LAYER``), each as a (kh * kw * in, out) matrix; None: Adam."""
    from optax.contrib import MuonDimensionNumbers

    matrix = MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)

    def dims(layer, name, p):
        is_conv = name == "weight" and getattr(p, "ndim", 0) == 4
        return matrix if is_conv and layer != OUTPUT_LAYER else None

    return {layer: {name: dims(layer, name, p) for name, p in leaves.items()}
            for layer, leaves in params.items()}


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam (the paper's optimizer), or Muon for the convolution weights and Adam for the rest.

    Muon (Jordan et al. 2024; :func:`optax.contrib.muon`) replaces each weight
    matrix's momentum by the nearest semi-orthogonal matrix (5 Newton-Schulz
    iterations), so that every direction of the weight moves at the same rate
    instead of the few that dominate the gradient.  On CelebA it reaches in
    600 iterations of batch 4 a validation NME (1.5%) that Adam with the same
    schedule reaches only after about 2,000 (measured with the ``:cpu``
    settings; Adam at 600: 2.3%).  The Newton-Schulz iterations add about 5%
    to a CPU step.

    With ``optimizer='muon'`` the last convolution, the biases and the BatchNorm
    scales are updated by optax's Muon companion Adam (Nesterov momentum,
    ``lr`` with the same schedule).
    """
    schedule = learning_rate(config)
    if config.optimizer == "adam":
        return optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
    from optax.contrib import muon

    ratio = float(config.muon_lr) / float(config.lr)
    return muon(lambda step: schedule(step) * ratio, beta=config.muon_beta,
                adam_b1=config.b1, adam_b2=config.b2, eps=config.eps,
                adam_learning_rate=schedule, muon_weight_dimension_numbers=muon_dimensions)


def create_state(config, module) -> DistillState:
    """The initial state: a random student, a fresh Adam state, step 0.

    The weights follow PyTorch's default initialisation (see
    :mod:`progsr_jax.layers`), drawn from ``seed`` with JAX's ``rbg`` PRNG:
    with the default threefry generator the initialisation alone takes longer
    to compile on a CPU than the whole train step.

    ``model.output_init_scale`` multiplies the last convolution's initial
    weights and bias.  With the default init the untrained student's heatmaps
    are about 0.35 (std) everywhere while the teacher's are about 0 except at
    68 small peaks; the first iterations then have gradients about 100x larger
    than later ones, which Adam's second-moment estimate (b2 = 0.999) remembers
    for thousands of iterations, shrinking every later step.  Starting near
    zero (0.01) avoids that: on CelebA the student reaches in 150 iterations
    a validation NME (about 8%) that the default init does not reach in 200
    (about 27%).
    """
    shape = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    scale = float(config.model.output_init_scale)

    def init(key):
        variables = module.lazy_init(key, shape)  # no forward pass, only the variables
        params = dict(variables["params"])
        params[OUTPUT_LAYER] = jax.tree_util.tree_map(lambda p: p * scale, params[OUTPUT_LAYER])
        return DistillState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=variables["batch_stats"],
                            opt_state=make_optimizer(config).init(params))

    return jax.jit(init)(jax.random.key(config.seed, impl="rbg"))


# Convolution weight gradients as matrix products.  Without YNNPACK's dot
# fusions (see progsr_jax/_xla_cpu.py) XLA:CPU computes the weight gradient of
# a convolution (a convolution over the batch and image axes) about 4x slower
# than the forward convolution; written as one matrix product per kernel tap,
# sum_{n,h,w} x[n, h+i, w+j, :]^T g[n, h, w, :], it takes about as long as the
# forward pass.  With YNNPACK (progsr_jax's default) XLA's own gradient is the
# faster one on two or more cores (a train step of the student at batch 4 on 2
# cores: 0.31 s against 0.36 s with the taps) and the taps only win on a single
# core (0.61 s against 0.72 s), so conv_grad='auto' takes the taps on a CPU
# when the process may use only one core or YNNPACK is off.  The values are the
# same up to float32 summation order.


def _conv(x, w, padding: int):
    return jax.lax.conv_general_dilated(x, w, window_strides=(1, 1),
                                        padding=((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_tap_grad(x, w, padding: int):
    """Stride-1 NHWC x HWIO convolution whose weight gradient is computed tap by tap."""
    return _conv(x, w, padding)


def _conv_tap_grad_fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _conv_tap_grad_bwd(padding, residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda v: _conv(v, w, padding), x)[1](g)[0]
    kh, kw, cin, cout = w.shape
    _, h, wd, _ = g.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    g2 = g.reshape(-1, cout)
    taps = [xp[:, i:i + h, j:j + wd, :].reshape(-1, cin).T @ g2
            for i in range(kh) for j in range(kw)]
    return dx, jnp.stack(taps).reshape(kh, kw, cin, cout).astype(w.dtype)


conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


def _tap_grad_interceptor(next_fun, args, kwargs, context):
    """Flax method interceptor: :class:`layers.Conv2d` calls go through :func:`conv_tap_grad`."""
    from progsr_jax.layers import Conv2d

    mod = context.module
    if isinstance(mod, Conv2d) and context.method_name == "__call__":
        x = args[0].astype(mod.dtype)
        w = mod.get_variable("params", "weight").astype(mod.dtype)
        b = mod.get_variable("params", "bias").astype(mod.dtype)
        return conv_tap_grad(x, w, mod.padding) + b
    return next_fun(*args, **kwargs)


def use_tap_grad(config) -> bool:
    """Whether the train step uses :func:`conv_tap_grad` (``conv_grad``: see above for auto)."""
    if config.conv_grad == "auto":
        return jax.default_backend() == "cpu" and (_cpu_cores() < 2 or not _xla_cpu.ynn_flag_set())
    return config.conv_grad == "taps"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def spatial_softmax_kl(target, pred, temperature: float):
    """Mean over images and landmarks of KL(softmax(target / T) || softmax(pred / T)).

    The softmax runs over the pixels of each (N, H, W, C) heatmap channel.  With
    a small temperature (0.02 for heatmaps whose peaks are about 0.5) the
    teacher's distribution sits on the few pixels within about 0.05 of its
    maximum, so the term measures whether the student puts its maximum -- the
    decoded landmark -- on the same pixels, including along the flat ridges of
    the jaw-line heatmaps where the MSE barely depends on it.
    """
    n, h, w, c = target.shape
    lt = jax.nn.log_softmax(target.reshape(n, h * w, c).astype(jnp.float32) / temperature, axis=1)
    lp = jax.nn.log_softmax(pred.reshape(n, h * w, c).astype(jnp.float32) / temperature, axis=1)
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - lp), axis=1))


def make_train_step(config, module):
    """``step_fn(state, x, y) -> (state, metrics)``: one Adam step on the MSE to the heatmaps.

    The objective is the paper's mean squared error to the teacher heatmaps,
    plus ``kl_weight`` x :func:`spatial_softmax_kl` when ``kl_weight > 0``
    (metrics: ``loss`` = the objective, ``mse``, and ``kl``).

    ``output_grad="straight_through"`` keeps the loss (its value and its
    minimum) but back-propagates through the student's final LeakyReLU(0.01)
    as if it were the identity.  With the exact gradient, every output pixel
    whose pre-activation is negative -- soon almost all of them, since the
    teacher's heatmaps are about 0 except at 68 small peaks -- passes back only
    1% of its error, also at the peaks the student has not found yet; the
    straight-through gradient passes back all of it.  On CelebA it reaches in
    200 iterations a validation NME (3.5%) that the exact gradient reaches
    only after about 400.
    """
    tx = make_optimizer(config)
    schedule = learning_rate(config)
    taps = use_tap_grad(config)
    straight_through = config.output_grad == "straight_through"
    kl_weight = float(config.kl_weight)
    kl_temperature = float(config.kl_temperature)

    def loss_fn(params, batch_stats, x, y):
        out, upd = module.apply({"params": params, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
        out = out.astype(jnp.float32)
        if straight_through:
            # The last convolution's output z, recovered by inverting the final
            # LeakyReLU(0.01); z + stop_gradient(out - z) has the value of out and
            # the gradient of z.
            z = jnp.where(out >= 0, out, out * (1.0 / LEAKY_SLOPE))
            out = z + jax.lax.stop_gradient(out - z)
        terms = {"mse": jnp.mean(jnp.square(out - y))}
        loss = terms["mse"]
        if kl_weight:
            terms["kl"] = spatial_softmax_kl(y, out, kl_temperature)
            loss = loss + kl_weight * terms["kl"]
        return loss, (upd["batch_stats"], terms)

    def step_fn(state: DistillState, x, y):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        with (nn.intercept_methods(_tap_grad_interceptor) if taps
              else contextlib.nullcontext()):
            (loss, (stats, terms)), grads = grad_fn(state.params, state.batch_stats, x, y)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=stats, opt_state=opt_state)
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        return new, metrics

    return step_fn


# --------------------------------------------------------------------------- evaluation


def teacher_to_size(points64: np.ndarray, size: int) -> np.ndarray:
    """Teacher landmarks of the 64x64 heatmaps in the pixel coordinates of a ``size`` image."""
    s = size / 64.0
    return (np.asarray(points64, np.float64) + 0.5) * s - 0.5


class Evaluator:
    """Validation NME of a student against the teacher landmarks of a split."""

    def __init__(self, split: Split, sizes=(64, 128), max_images: int | None = None,
                 max_images_128: int | None = None, batch_size: int = 32):
        from progsr_jax import landmarks

        self.split = split
        self.batch_size = batch_size
        n = len(split) if max_images is None else min(len(split), max_images)
        self.counts = {64: n, 128: min(n, max_images_128) if max_images_128 else n}
        self.sizes = tuple(int(s) for s in sizes)
        pts = [landmarks.heatmaps_to_landmarks(split.targets(np.arange(i, min(n, i + 64))))
               for i in range(0, n, 64)]
        self.teacher_points = np.concatenate(pts).astype(np.float64)  # (n, 68, 2) at 64x64

    def student_points(self, apply_fn, variables, size: int, n: int) -> np.ndarray:
        from progsr_jax import landmarks

        out = []
        for i in range(0, n, self.batch_size):
            idx = np.arange(i, min(n, i + self.batch_size))
            x = self.split.inputs(idx, size)
            pad = self.batch_size - len(idx)  # one compiled shape per size
            if pad:
                x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)])
            hm = np.asarray(jax.device_get(apply_fn(variables, x)))[:len(idx)]
            out.append(landmarks.heatmaps_to_landmarks(hm))
        return np.concatenate(out).astype(np.float64)

    def __call__(self, apply_fn, variables) -> tuple[dict, np.ndarray]:
        """(metrics, student points at 64x64 of the first images) for ``apply_fn(variables, x)``."""
        from progsr_jax import landmarks

        metrics, pts64 = {}, None
        for size in self.sizes:
            n = self.counts[size]
            pred = self.student_points(apply_fn, variables, size, n)
            if size == 64:
                pts64 = pred
            nme = landmarks.nme(pred, teacher_to_size(self.teacher_points[:n], size), size)
            metrics[f"val_nme{size}_pct"] = float(100 * np.mean(nme))
            metrics[f"val_nme{size}_median_pct"] = float(100 * np.median(nme))
            metrics[f"val_count{size}"] = int(n)
        return metrics, pts64


def save_overlay(path: str, faces_u8: np.ndarray, teacher_pts: np.ndarray,
                 student_pts: np.ndarray, scale: int = 4) -> None:
    """A row of 64x64 faces upscaled ``scale``x with teacher (green) and student (red) points."""
    from PIL import Image, ImageDraw

    tiles = []
    for face, tp, sp in zip(faces_u8, teacher_pts, student_pts):
        size = face.shape[0] * scale
        img = Image.fromarray(np.asarray(face)).resize((size, size), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for pts, colour in ((tp, (0, 255, 0)), (sp, (255, 40, 40))):
            for x, y in (np.asarray(pts, np.float64) + 0.5) * scale - 0.5:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        tiles.append(np.asarray(img))
    grid = np.concatenate(tiles, axis=1)
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- outputs


def _reporter(workdir: str):
    from progsr_jax import reporting

    class Reporter(reporting.Reporter):
        """The training Reporter with a generic scalar log (no stage/alpha fields)."""

        def scalars(self, step: int, rec: dict) -> None:
            rec = {"step": int(step), **{k: float(v) for k, v in rec.items()}, "time": time.time()}
            self.last = rec
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
            if self._tb is not None:
                for k, v in rec.items():
                    if k not in ("step", "time"):
                        self._tb.add_scalar(k, v, step)
                self._tb.flush()

    return Reporter(workdir)


def export_student(directory: str, variables: dict, meta: dict) -> None:
    """Writes ``variables/`` and ``fan_meta.json`` (the layout :func:`landmarks.load` reads)."""
    import orbax.checkpoint as ocp

    from progsr_jax.landmarks import META_FILE, VARIABLES_DIR

    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(directory), VARIABLES_DIR), variables, force=True)
        ckptr.wait_until_finished()
    path = os.path.join(directory, META_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _save_checkpoint(manager, state: DistillState, step: int, meta: dict) -> None:
    import orbax.checkpoint as ocp
    from flax import serialization

    tree = serialization.to_state_dict(jax.device_get(state))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


def _check_resume(manager, meta: dict) -> None:
    """Refuses to resume a run whose teacher or training images differ from this one's."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return
    try:
        old = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:  # noqa: BLE001 - a checkpoint without meta is reported by restore_latest
        return
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise UserError(f"{manager.directory} holds checkpoints of another kind of run "
                        "(not a FAN distillation); use another --workdir")
    for key in ("teacher_sha256", "num_train"):
        if old.get(key) != meta.get(key):
            raise UserError(f"{manager.directory} was trained with {key}={old.get(key)}; this "
                            f"command has {key}={meta.get(key)} (other teacher heatmaps or "
                            "images?). Use another --workdir or the same data")


def _teacher_sha(split: Split) -> str:
    return str(split.teacher.meta.get("weights_sha256") or split.teacher.directory)


# --------------------------------------------------------------------------- the loop


def train_and_evaluate(config, workdir: str, stop_after: int | None = None) -> DistillState:
    """Distils the student in ``workdir`` (resuming from its latest checkpoint).

    ``stop_after``: stop (with a checkpoint) once this global step is reached,
    as if the run had been interrupted there; for tests.
    """
    validate(config, len(jax.devices()))
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
        raise UserError(f"workdir {workdir} is not writable")
    reporter = _reporter(workdir)
    try:
        return _distill(config, workdir, reporter, stop_after)
    finally:
        reporter.close()


def _distill(config, workdir: str, reporter, stop_after: int | None) -> DistillState:
    from progsr_jax.fan import StudentFAN, count_params
    from progsr_jax.train import _Stop

    start_time = time.time()
    devices = jax.devices()
    reporter.info(f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind})")
    train_split, val_split = load_splits(config, info=reporter.info)
    ckpt_lib.check_or_write_config(workdir, config)

    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    module = StudentFAN(width=float(config.model.width))
    state = create_state(config, module)
    num_params = count_params({"params": state.params})
    meta = {"format": FORMAT, "teacher_sha256": _teacher_sha(train_split),
            "num_train": len(train_split), "width": float(config.model.width)}
    manager = ckpt_lib.manager(workdir, config.keep_checkpoints)
    _check_resume(manager, meta)
    restored = ckpt_lib.restore_latest(manager, state)
    if restored is not None:
        state = restored
        reporter.info(f"resumed from checkpoint at iteration {int(state.step)}")
    else:
        opt = f"Adam lr {config.lr}"
        if config.optimizer == "muon":
            opt = f"Muon lr {config.muon_lr} (convolutions) + {opt}"
        loss = "MSE" + (f" + {config.kl_weight} x KL" if config.kl_weight else "")
        reporter.info(f"student: width {config.model.width}, {num_params:,} parameters; "
                      f"{config.steps} iterations of batch {config.batch_size} on "
                      f"{len(train_split)} images, {opt} ({config.lr_schedule}), {loss}")
    state = jax.device_put(state, replicated)

    jitted = jax.jit(make_train_step(config, module), donate_argnums=(0,),
                     in_shardings=(replicated, batch_sharding, batch_sharding),
                     out_shardings=(replicated, replicated))
    apply_fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
    evaluator = None
    if val_split is not None:
        evaluator = Evaluator(val_split, config.val.sizes, config.val.max_images,
                              config.val.max_images_128, config.val.batch_size)
    student_meta = {"kind": STUDENT_KIND, "width": float(config.model.width),
                    "num_params": num_params, "source": "progsr_jax.distill",
                    "teacher": train_split.teacher.meta.get("teacher"),
                    "teacher_sha256": meta["teacher_sha256"],
                    "input": "NHWC RGB in [0, 1], any size", "output": "(N, H, W, 68) heatmaps"}

    def evaluate(step: int) -> dict:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        t0 = time.time()
        metrics, pts64 = evaluator(apply_fn, variables)
        reporter.scalars(step, metrics)
        k = min(config.val.num_samples, len(pts64)) if pts64 is not None else 0
        if k:
            save_overlay(os.path.join(workdir, "samples", f"landmarks_{step:07d}.png"),
                         val_split.images[64][val_split.ds_rows[:k]],
                         evaluator.teacher_points[:k], pts64[:k])
        reporter.info(f"iteration {step}: validation NME " + ", ".join(
            f"{s}x{s} {metrics[f'val_nme{s}_pct']:.3f}% ({metrics[f'val_count{s}']} images)"
            for s in evaluator.sizes) + f" [{time.time() - t0:.0f} s]")
        return metrics

    def save(step: int, val_metrics: dict) -> None:
        _save_checkpoint(manager, state, step, meta)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        export_student(workdir, variables, dict(student_meta, step=int(step),
                                                final=step >= config.steps, **val_metrics))

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    step0 = int(state.step)
    last_val: dict = {}
    batches = _Batches(train_split, config.batch_size, config.seed, step0, end)
    with _Stop() as stop, reporter.progress(config.steps, step0) as bar:
        pending, t_last, n_last = [], time.time(), step0
        try:
            for step, x, y in batches:
                state, metrics = jitted(state, jax.device_put(x, batch_sharding),
                                        jax.device_put(y, batch_sharding))
                pending.append(metrics)
                done = step + 1
                bar.update(1)
                last = done == end
                if done % config.log_every == 0 or last or stop.signal:
                    host = jax.device_get(pending)
                    pending = []
                    rec = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    if not all(np.isfinite(v) for v in rec.values()):
                        raise UserError(f"distillation diverged: non-finite loss or gradient "
                                        f"before iteration {done} (the last good checkpoint is "
                                        f"iteration {manager.latest_step()}); lower --config.lr")
                    now = time.time()
                    rec["images_per_sec"] = (done - n_last) * config.batch_size / max(
                        now - t_last, 1e-9)
                    t_last, n_last = now, done
                    reporter.scalars(done, rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3g}")
                if evaluator is not None and (done % config.eval_every == 0
                                              or done == config.steps):
                    last_val = evaluate(done)
                if done % config.checkpoint_every == 0 or last or stop.signal:
                    save(done, last_val)
                if stop.signal:
                    reporter.info(f"stopped by signal {stop.signal} at iteration {done}; "
                                  "checkpoint saved, re-run the same command to resume")
                    raise SystemExit(0)
        finally:
            batches.close()
            manager.close()
    if step0 >= config.steps:
        reporter.info(f"already finished ({step0} iterations); the student is in {workdir}")
    elif end == config.steps:
        reporter.info(f"finished {config.steps} iterations ({time.time() - start_time:.0f} s in "
                      f"this run); the student is in {workdir} (landmarks.load(DIR), "
                      f"--config.fan.checkpoint=DIR)")
    return state


def evaluate_only(config, workdir: str | None, fan_dir: str | None) -> dict:
    """Validation NME of a converted FAN folder (default: the workdir's student)."""
    from progsr_jax import landmarks

    fan_dir = fan_dir or workdir
    if not fan_dir:
        raise UserError("--eval_only needs --workdir (its distilled student) or --fan=DIR")
    if not config.val.teacher_heatmaps and not config.teacher_heatmaps:
        raise UserError("--eval_only needs --config.val.teacher_heatmaps=DIR (or "
                        "--config.teacher_heatmaps=DIR with val.fraction > 0)")
    if not config.val.teacher_heatmaps and not config.val.fraction > 0:
        raise UserError("no validation images: set --config.val.teacher_heatmaps=DIR or "
                        "--config.val.fraction > 0")

    def info(message):
        print(message, file=sys.stderr)

    _, val_split = load_splits(config, info=info, need_train=False)
    fan = landmarks.load(fan_dir)
    evaluator = Evaluator(val_split, config.val.sizes, config.val.max_images,
                          config.val.max_images_128, config.val.batch_size)
    metrics, pts64 = evaluator(lambda v, x: fan(x), None)
    result = {"fan": os.path.abspath(fan_dir), "fan_step": fan.meta.get("step"),
              "teacher_heatmaps": os.path.abspath(config.val.teacher_heatmaps or
                                                  config.teacher_heatmaps), **metrics}
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "eval_nme.json"), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        k = min(config.val.num_samples, len(pts64))
        if k:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            save_overlay(os.path.join(workdir, "samples", "landmarks_eval.png"),
                         val_split.images[64][val_split.ds_rows[:k]],
                         evaluator.teacher_points[:k], pts64[:k])
    print(json.dumps(result))
    return result


# --------------------------------------------------------------------------- command line


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the "
                        "distilled student.")
    config_flags.DEFINE_config_file("config", None, "configs/distill_fan.py[:paper|cpu|smoke]",
                                    lock_config=True)
    flags.DEFINE_bool("eval_only", False, "Only compute the validation NME of --fan (default: "
                      "the workdir's student) and write WORKDIR/eval_nme.json.")
    flags.DEFINE_string("fan", None, "With --eval_only: a converted FAN folder to evaluate.")


def _main(argv) -> None:
    from absl import flags
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    fv = flags.FLAGS
    if fv.config is None:
        raise UserError("--config is required, e.g. --config=configs/distill_fan.py")
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax's INFO lines off the console
    if fv.eval_only:
        evaluate_only(fv.config, fv.workdir, fv.fan)
        return
    if not fv.workdir:
        raise UserError("--workdir is required")
    if fv.fan:
        raise UserError("--fan is only used with --eval_only")
    train_and_evaluate(fv.config, fv.workdir)


def main() -> None:
    from absl import app

    logging.getLogger("absl").setLevel(logging.WARNING)
    _define_flags()

    def runner(argv):
        run_cli(lambda: _main(argv))

    try:
        app.run(runner, flags_parser=_parse_flags)
    except UserError as e:  # raised while parsing
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv):
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(str(e).splitlines()[0]) from None
    except Exception as e:  # noqa: BLE001 - config file errors (missing file, bad variant, ...)
        raise UserError(f"could not load the configuration: {str(e).splitlines()[0]}") from None


if __name__ == "__main__":
    main()
