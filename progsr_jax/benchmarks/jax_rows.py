"""JAX rows: the training iteration (:class:`JaxTrain`) and the step-3 generator
(:class:`JaxInference`), device-only or end to end, with their FLOPs."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from progsr_jax import data
from progsr_jax.benchmarks.accounting import (
    device_fields,
    executable_bytes,
    lowered_flops,
    precision,
    process_peak_bytes,
)
from progsr_jax.inference import SuperResolver
from progsr_jax.nets import gan, vgg
from progsr_jax.nets.fan import StudentFAN
from progsr_jax.training import config as config_files
from progsr_jax.training import core
from progsr_jax.training.sr import config as sr_config
from progsr_jax.training.sr import trainer as train


def timed(run_one, steps: int, warmup: int, wait) -> tuple[float, object]:
    """(Seconds per call, the last result): ``run_one(i)`` ``warmup`` times, then ``steps``
    times with one ``wait(result)`` at the end."""
    result = None
    for i in range(warmup):
        result = run_one(i)
    if result is not None:
        wait(result)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        result = run_one(i)
    wait(result)
    return (time.perf_counter() - t0) / steps, result


def host_faces(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- JAX


class JaxTrain:
    """The training iteration of one stage, lowered and compiled once, measured both ways."""

    POOL = 4  # distinct host batches cycled through end to end

    def __init__(self, stage: int, batch_size: int, dtype: str, width: float,
                 d_width: float | None = None, use_fan: bool = True, compile: bool = True):
        config = config_files.load("step3.py")
        config.batch_size = batch_size
        config.model.width = width
        config.model.d_width = d_width
        config.model.dtype = dtype
        config.data.source = "synthetic"
        devices = jax.devices()
        sr_config.validate(config, len(devices))
        self.stage, self.batch_size, self.dtype, self.width = stage, batch_size, dtype, width
        self.use_fan = use_fan
        self.shardings = core.data_parallel(devices)
        rep, shard = self.shardings.replicated, self.shardings.batch
        compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        g = gan.Generator(width=width, dtype=compute)
        d = gan.Discriminator(width=sr_config.d_width(config), dtype=compute)
        fan = StudentFAN()
        if compile:
            self.state = jax.device_put(_initial_state(width, d_width), rep)
            self.vgg_params = jax.device_put(vgg.load_vgg16_features_params(), rep)
            self.fan_vars = jax.device_put(_initial_fan(), rep)
        else:  # counting the work needs the shapes only
            key = jax.random.PRNGKey(0)
            self.state = jax.eval_shape(lambda: train.create_train_state(config, key)[0])
            self.vgg_params = vgg.load_vgg16_features_params()
            self.fan_vars = jax.eval_shape(lambda: fan.init(key, jnp.zeros((1, 64, 64, 3))))
        self.res = gan.output_size(stage)
        self.alpha = np.float32(0.5 if stage > 1 else 1.0)
        self.pool = {"lr": host_faces(self.POOL * batch_size, 16, 0),
                     "hr": host_faces(self.POOL * batch_size, self.res, 1)}
        self.batch = jax.device_put(self._host_batch(0), shard)
        fn = jax.jit(train.make_train_step(config, g, d, stage, use_fan, fan),
                     donate_argnums=(0,), in_shardings=(rep, shard, None, rep, rep),
                     out_shardings=(rep, rep))
        self.lowered = fn.lower(self.state, self.batch, self.alpha, self.vgg_params, self.fan_vars)
        self.flops = lowered_flops(self.lowered)
        self.compiled, self.compile_s, self.memory = None, None, None
        if compile:
            t0 = time.perf_counter()
            self.compiled = self.lowered.compile()
            self.compile_s = time.perf_counter() - t0
            self.memory = executable_bytes(self.compiled)

    def _host_batch(self, step: int) -> dict:
        """The trainer's host batch (float32 in [-1, 1]) made from uint8 faces in memory."""
        rows = slice((step % self.POOL) * self.batch_size, (step % self.POOL + 1) * self.batch_size)
        return {"lr": data.to_float(self.pool["lr"][rows]), "hr": data.to_float(self.pool["hr"][rows])}

    def _step(self, batch):
        self.state, metrics = self.compiled(self.state, batch, self.alpha, self.vgg_params,
                                            self.fan_vars)
        return metrics

    def measure(self, io: str, steps: int, warmup: int) -> dict:
        if io == "device":
            dt, metrics = timed(lambda i: self._step(self.batch), steps, warmup,
                                 jax.block_until_ready)
        else:
            # The trainer's input path: host batches made and put on the devices by the
            # input pipeline's background thread while the step runs.
            with data.InputPipeline(self._host_batch, 0, warmup + steps,
                                    sharding=self.shardings.batch) as batches:
                it = iter(batches)
                dt, metrics = timed(lambda i: self._step(next(it)[1]), steps, warmup,
                                     jax.block_until_ready)
        return {"framework": "jax", "mode": "train", "io": io, "stage": self.stage,
                "batch_size": self.batch_size, "dtype": self.dtype, "width": self.width,
                "fan": self.use_fan, "images_per_sec": self.batch_size / dt, "step_time_s": dt,
                "compile_s": self.compile_s, "flops_per_step": self.flops,
                "flops_per_image": self.flops / self.batch_size if self.flops else None,
                "memory_bytes": self.memory, "peak_memory_bytes": process_peak_bytes(),
                "precision": precision(self.dtype, jax.devices()[0]),
                "finite": bool(np.isfinite(float(metrics["g_loss"]))), **device_fields()}


class JaxInference:
    """The step-3 generator at one batch size: device-only and the batched path end to end."""

    def __init__(self, batch_size: int, dtype: str, width: float, compile: bool = True):
        self.batch_size, self.dtype, self.width = batch_size, dtype, width
        self.x = jax.device_put(data.to_float(host_faces(batch_size, 16, 2)))
        self.alpha = jnp.float32(1.0)
        if compile:
            self.sr = SuperResolver(_initial_generator(width), 3, 1.0, width, dtype,
                                    batch_size=batch_size)
            model, variables = self.sr.model, self.sr.variables
        else:  # counting the work needs the shapes only
            model = gan.Generator(width=width, dtype=jnp.dtype(dtype))
            variables = gan.generator_shapes(width)
        # What the SuperResolver runs (evaluation-mode generator), compiled here once
        # for the count, the memory and the device-only timing.
        forward = jax.jit(lambda v, x, a: model.apply(v, x, stage=3, alpha=a, train=False))
        lowered = forward.lower(variables, self.x, self.alpha)
        self.flops = lowered_flops(lowered)
        self.compile_s, self.memory, self.forward = None, None, None
        if compile:
            t0 = time.perf_counter()
            self.forward = lowered.compile()
            self.compile_s = time.perf_counter() - t0
            self.memory = executable_bytes(self.forward)

    def measure(self, io: str, steps: int, warmup: int) -> dict:
        b = self.batch_size
        if io == "device":
            dt, _ = timed(lambda i: self.forward(self.sr.variables, self.x, self.alpha), steps,
                           warmup, jax.block_until_ready)
        else:
            faces = host_faces(steps * b, 16, 3)
            # at least one untimed batch: the batched path compiles its shapes
            self.sr.super_resolve(faces[:max(1, warmup) * b], b, min_batch=b)
            t0 = time.perf_counter()
            out = self.sr.super_resolve(faces, b, min_batch=b)
            dt = (time.perf_counter() - t0) / steps
            assert out.dtype == np.uint8 and out.shape == (steps * b, 128, 128, 3)
        return {"framework": "jax", "mode": "inference", "io": io, "batch_size": b,
                "dtype": self.dtype, "width": self.width, "faces_per_sec": b / dt,
                "images_per_sec": b / dt, "step_time_s": dt, "compile_s": self.compile_s,
                "flops_per_step": self.flops,
                "flops_per_image": self.flops / b if self.flops else None,
                "memory_bytes": self.memory, "peak_memory_bytes": process_peak_bytes(),
                "precision": precision(self.dtype, jax.devices()[0]), **device_fields()}


@functools.lru_cache(maxsize=4)
def _initial_state(width: float, d_width: float | None) -> train.TrainState:
    """The trainer's initial state (host copy; every dtype starts from the same values)."""
    config = config_files.load("step3.py")
    config.model.width, config.model.d_width = width, d_width
    state, _, _ = train.create_train_state(config, jax.random.PRNGKey(0))
    return jax.device_get(state)


@functools.lru_cache(maxsize=1)
def _initial_fan() -> dict:
    """Random variables of the paper's FAN (host copy; speed does not depend on them)."""
    return jax.device_get(StudentFAN().init(jax.random.PRNGKey(1),
                                            np.zeros((1, 64, 64, 3), np.float32)))


@functools.lru_cache(maxsize=4)
def _initial_generator(width: float) -> dict:
    return jax.device_get(gan.init_generator(jax.random.PRNGKey(0), width)[1])


def train_flops(stage: int, batch_size: int = 2, width: float = 1.0, dtype: str = "float32",
                use_fan: bool = True) -> float:
    """FLOPs of one training iteration (lowered, not compiled)."""
    return JaxTrain(stage, batch_size, dtype, width, use_fan=use_fan, compile=False).flops


def inference_flops(batch_size: int = 2, width: float = 1.0, dtype: str = "float32") -> float:
    """FLOPs of one call of the step-3 generator in evaluation mode (lowered, not compiled)."""
    return JaxInference(batch_size, dtype, width, compile=False).flops
