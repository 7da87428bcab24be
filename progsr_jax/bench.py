"""Benchmarks: the training iteration and inference, JAX against PyTorch, with the work counted.

    python -m progsr_jax.bench --stage=3 --batch_size=16 --steps=10 [--dtype=bfloat16]
    python -m progsr_jax.bench --stage=3 --batch_size=16 --steps=10 --torch   # PyTorch eager
    python -m progsr_jax.bench --mode=inference --batch_size=64 --io=end_to_end
    python -m progsr_jax.bench --suite [--out=bench.jsonl]   # everything, JAX vs PyTorch
    python -m progsr_jax.bench --mode=export --steps=5      # onnxruntime (CPU) vs JAX, batch 1, 64
    python -m progsr_jax.bench --mode=data --degradation=real --steps=150 --repeats=3

What is timed.  ``--mode=train``: the real jitted iteration of
``progsr_jax.training.sr.trainer`` (G update with pixel, perceptual, adversarial,
heatmap and attention losses, then the critic's update with the gradient
penalty) at ``--stage``, alpha 0.5 at stages 2-3 (the fade-in path, the most
expensive), random FAN weights; ``--torch``: the same iteration in PyTorch
eager (:func:`progsr_jax.interop.pytorch.reference.train_iteration`).
``--mode=inference``: the step-3 generator, 16x16 -> 128x128.  Each is
measured two ways (``--io``):

* ``device``: inputs already on the device, ``--steps`` calls, one wait for
  the device at the end;
* ``end_to_end``: uint8 faces in host memory to (inference) uint8 faces in
  host memory.  JAX inference runs the one batched path every command uses
  (:func:`progsr_jax.inference.batching.super_resolve`: uint8 converted on the device,
  copies overlapped with the work); JAX training takes host batches through
  the trainer's own input path (``to_float`` on the host and
  :class:`progsr_jax.data.InputPipeline` putting batches on the devices in a
  background thread).  PyTorch copies pinned uint8
  memory to the device without blocking, converts there, and (inference)
  copies the uint8 outputs back into pinned memory without blocking; one
  wait at the end.

PyTorch runs with ``torch.backends.cudnn.benchmark`` on and never waits for
the device inside the timed loop; ``bfloat16`` is ``torch.autocast``.

The work.  ``flops_per_step`` and ``flops_per_image`` are XLA's cost
analysis of the *lowered, unoptimised* module of the JAX step
(``jax.jit(f).lower(...).cost_analysis()``): every convolution and matmul
(2 FLOPs a multiply-add, counting only the kernel taps that fall inside the
zero-padded input) and the elementwise work.  The compiled module's
analysis is not used: on a GPU it leaves out the convolutions XLA hands to
cuDNN.  ``tests/test_bench.py`` checks the count against one made by hand
from the layer shapes.  ``achieved_tflops`` divides it by the time, and
``fraction_of_peak`` by the device's dense peak for the precision in use
(:data:`PEAK_TFLOPS`; float32 convolutions run as TF32 on NVIDIA GPUs since
Ampere and in bfloat16 passes on TPUs; ``--peak_tflops`` overrides).  The
PyTorch rows use the same count (the same work, up to the transposed
convolutions' edge taps, below 1%).

``--suite`` measures training at ``--stages`` x ``--dtypes`` and inference
at ``--infer_batches`` x ``--dtypes``, both ways, in three processes run one
after the other: PyTorch, JAX (two runs of each row) and PyTorch again, so
every row is timed torch, JAX, JAX, torch.  It prints one JSON line per
measurement (also appended to ``--out``) and a table with the JAX / PyTorch
ratios, the FLOPs, the fractions of peak, the memory and the time of the
paper's 200k-iteration schedule.  ``tools/bench_gpu.sh`` runs it on one GPU.

``--mode=data`` times the trainers' input pipeline
(:class:`progsr_jax.data.InputPipeline`, batches on the host) on 256 built-in
synthetic faces in a decode cache in a temporary folder: batches (of
``--batch_size``) with inputs degraded on the fly with ``--degradation`` (a
preset of :mod:`progsr_jax.data.degradation`) at stages 1 and 3, made by each
number of worker processes in ``--workers`` (0: in-process), ``--steps``
batches of each stage after a warm-up, in ``--repeats`` rounds (medians); and
the clean chain in-process.  Prints one JSON line with images/s and each
worker count's speed-up over 0.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from progsr_jax import cli, data, export
from progsr_jax.data import degradation, writing
from progsr_jax.errors import UserError
from progsr_jax.inference import SuperResolver
from progsr_jax.nets import gan, vgg
from progsr_jax.nets.fan import StudentFAN
from progsr_jax.training import config as config_files
from progsr_jax.training import core
from progsr_jax.training.sr import config as sr_config
from progsr_jax.training.sr import trainer as train

#: Dense (no sparsity) peak TFLOP/s of one device per precision, from the vendors'
#: datasheets; the first name found in ``device_kind`` wins.
PEAK_TFLOPS = (
    ("H200", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
    ("H100 PCIe", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
    ("H100", {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4}),
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
    ("L4", {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5", {"bfloat16": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0}),
)
IO_KINDS = ("device", "end_to_end")


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("mode", "train", ["train", "inference", "export", "data"],
                      "What to time (export: onnxruntime vs JAX inference, batch 1 and 64; "
                      "data: degraded stage-3 batches).", flag_values=fv)
    flags.DEFINE_enum("io", "device", list(IO_KINDS), "device: inputs already on the device; "
                      "end_to_end: uint8 faces in host memory (to uint8 faces in host memory).",
                      flag_values=fv)
    flags.DEFINE_integer("stage", 3, "Stage 1, 2 or 3.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "Global batch size.", flag_values=fv)
    flags.DEFINE_integer("steps", 10, "Timed iterations (inference end to end: batches).",
                         flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "Untimed iterations first.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", flag_values=fv)
    flags.DEFINE_float("width", 1.0, "Model width multiplier (1.0 = paper).", flag_values=fv)
    flags.DEFINE_float("d_width", None, "Discriminator width multiplier (default: --width).",
                       flag_values=fv)
    flags.DEFINE_bool("torch", False, "Time the PyTorch eager reference instead.", flag_values=fv)
    flags.DEFINE_enum("torch_device", "auto", ["auto", "cuda", "cpu"],
                      "PyTorch's device (auto: cuda when available).", flag_values=fv)
    flags.DEFINE_bool("fan", True, "Include the heatmap and attention losses (stages 2-3).",
                      flag_values=fv)
    flags.DEFINE_string("degradation", "real", "--mode=data: the degradation preset",
                        flag_values=fv)
    flags.DEFINE_list("workers", None, "--mode=data: the worker process counts to time, e.g. "
                      "0,2 (default: 0, 1, 2 and the CPU cores)", flag_values=fv)
    flags.DEFINE_integer("repeats", 1, "--mode=data: rounds over the worker counts (the "
                         "median is reported)", flag_values=fv)
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = default).", flag_values=fv)
    flags.DEFINE_float("peak_tflops", None, "The device's peak TFLOP/s for the precision in "
                       "use (default: the table PEAK_TFLOPS).", flag_values=fv)
    flags.DEFINE_bool("suite", False, "JAX vs PyTorch: training and inference, every row.",
                      flag_values=fv)
    flags.DEFINE_list("stages", ["1", "2", "3"], "--suite: training stages.", flag_values=fv)
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "--suite: compute dtypes.",
                      flag_values=fv)
    flags.DEFINE_list("infer_batches", ["64", "256"], "--suite: inference batch sizes.",
                      flag_values=fv)
    flags.DEFINE_integer("runs", 2, "--suite: JAX runs of each row (between two PyTorch runs).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "--suite: also append the JSON lines to this file.",
                        flag_values=fv)
    flags.DEFINE_integer("timeout", 900, "--suite: seconds allowed per process.", flag_values=fv)
    flags.DEFINE_enum("suite_worker", None, ["jax", "torch"],
                      "Internal: the rows of one framework, for --suite.", flag_values=fv)


def _check(fv):
    if fv.stage not in (1, 2, 3):
        raise UserError(f"--stage must be 1, 2 or 3, got {fv.stage}")
    if fv.batch_size < 2:
        raise UserError(f"--batch_size must be at least 2, got {fv.batch_size}")
    if fv.steps < 1:
        raise UserError(f"--steps must be >= 1, got {fv.steps}")
    if fv.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {fv.warmup}")
    for name in ("width", "d_width", "peak_tflops"):
        if fv[name].value is not None and not fv[name].value > 0:
            raise UserError(f"--{name} must be > 0, got {fv[name].value}")
    if fv.timeout < 1:
        raise UserError(f"--timeout must be >= 1 second, got {fv.timeout}")
    if fv.torch_threads < 0:
        raise UserError(f"--torch_threads must be >= 0 (0: default), got {fv.torch_threads}")
    if fv.mode == "data" and degradation.from_config(fv.degradation) is None:
        raise UserError("--mode=data needs a --degradation preset other than 'none'")
    if fv.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {fv.repeats}")
    if fv.out is not None:
        if not fv.suite:
            raise UserError("--out is only written by --suite")
        writing.check_output_file(fv.out, "--out")
    if fv.suite or fv.suite_worker:
        stages, _, batches = _suite_lists(fv)
        if not stages or any(s not in (1, 2, 3) for s in stages):
            raise UserError(f"--stages must list 1, 2 or 3, got {','.join(fv.stages)}")
        if any(b < 1 for b in batches):
            raise UserError(f"--infer_batches must be positive, got {','.join(fv.infer_batches)}")


def _suite_lists(fv) -> tuple[list[int], list[str], list[int]]:
    try:
        stages = [int(s) for s in fv.stages]
        batches = [int(b) for b in fv.infer_batches]
    except ValueError:
        raise UserError("--stages and --infer_batches take comma-separated integers") from None
    dtypes = list(fv.dtypes)
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad or not dtypes:
        raise UserError(f"--dtypes must list float32 and/or bfloat16, got {','.join(fv.dtypes)}")
    return stages, dtypes, batches


# --------------------------------------------------------------------------- the work


def lowered_flops(lowered) -> float | None:
    """FLOPs of a lowered (unoptimised) computation by XLA's cost analysis, or None."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def precision(dtype: str, device) -> str:
    """What the convolutions compute in: float32, tf32 or bfloat16."""
    if dtype == "bfloat16":
        return "bfloat16"
    if device.platform == "tpu":
        return "bfloat16"  # the default precision: one bfloat16 pass
    wanted = str(jax.config.jax_default_matmul_precision or "default").lower()
    cc = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and cc and float(cc) >= 8.0 and wanted in ("default", "tensorfloat32"):
        return "tf32"
    return "float32"


def peak_tflops(device_kind: str, prec: str, override: float | None = None) -> float | None:
    """The device's dense peak for ``prec`` (:data:`PEAK_TFLOPS`), ``override`` if given."""
    if override:
        return float(override)
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks.get(prec)
    return None


def _executable_bytes(compiled) -> int | None:
    """Device memory of one call of a compiled computation: arguments, outputs and temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend has it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def _process_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports memory
        return None
    return stats.get("peak_bytes_in_use")


def _device_fields() -> dict:
    devs = jax.devices()
    return {"device": f"{devs[0].platform}:{devs[0].device_kind}", "num_devices": len(devs)}


def _with_rates(out: dict, peak_override: float | None) -> dict:
    """Adds achieved TFLOP/s and the fraction of the peak to a measurement."""
    flops, dt = out.get("flops_per_step"), out["step_time_s"]
    if flops:
        out["achieved_tflops"] = flops / dt / 1e12
        peak = peak_tflops(out.get("device", ""), out["precision"], peak_override)
        out["peak_tflops"] = peak
        if peak:
            out["fraction_of_peak"] = out["achieved_tflops"] / peak
    return out


def _timed(run_one, steps: int, warmup: int, wait) -> tuple[float, object]:
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


def _host_faces(n: int, size: int, seed: int) -> np.ndarray:
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
        self.pool = {"lr": _host_faces(self.POOL * batch_size, 16, 0),
                     "hr": _host_faces(self.POOL * batch_size, self.res, 1)}
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
            self.memory = _executable_bytes(self.compiled)

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
            dt, metrics = _timed(lambda i: self._step(self.batch), steps, warmup,
                                 jax.block_until_ready)
        else:
            # The trainer's input path: host batches made and put on the devices by the
            # input pipeline's background thread while the step runs.
            with data.InputPipeline(self._host_batch, 0, warmup + steps,
                                    sharding=self.shardings.batch) as batches:
                it = iter(batches)
                dt, metrics = _timed(lambda i: self._step(next(it)[1]), steps, warmup,
                                     jax.block_until_ready)
        return {"framework": "jax", "mode": "train", "io": io, "stage": self.stage,
                "batch_size": self.batch_size, "dtype": self.dtype, "width": self.width,
                "fan": self.use_fan, "images_per_sec": self.batch_size / dt, "step_time_s": dt,
                "compile_s": self.compile_s, "flops_per_step": self.flops,
                "flops_per_image": self.flops / self.batch_size if self.flops else None,
                "memory_bytes": self.memory, "peak_memory_bytes": _process_peak_bytes(),
                "precision": precision(self.dtype, jax.devices()[0]),
                "finite": bool(np.isfinite(float(metrics["g_loss"]))), **_device_fields()}


class JaxInference:
    """The step-3 generator at one batch size: device-only and the batched path end to end."""

    def __init__(self, batch_size: int, dtype: str, width: float, compile: bool = True):
        self.batch_size, self.dtype, self.width = batch_size, dtype, width
        self.x = jax.device_put(data.to_float(_host_faces(batch_size, 16, 2)))
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
            self.memory = _executable_bytes(self.forward)

    def measure(self, io: str, steps: int, warmup: int) -> dict:
        b = self.batch_size
        if io == "device":
            dt, _ = _timed(lambda i: self.forward(self.sr.variables, self.x, self.alpha), steps,
                           warmup, jax.block_until_ready)
        else:
            faces = _host_faces(steps * b, 16, 3)
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
                "memory_bytes": self.memory, "peak_memory_bytes": _process_peak_bytes(),
                "precision": precision(self.dtype, jax.devices()[0]), **_device_fields()}


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


# --------------------------------------------------------------------------- PyTorch


def _torch():
    """The torch module (an optional, heavy dependency: imported only here)."""
    try:
        import torch  # optional dependency (the torch extra)
    except ImportError:
        raise UserError("--torch needs PyTorch: pip install 'progsr_jax[torch]'") from None
    return torch


def _torch_device(torch, wanted: str):
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError(f"PyTorch {torch.__version__} has no CUDA device (a CPU-only build, or "
                        "no GPU visible): the PyTorch rows are skipped; install a CUDA build "
                        "of torch to compare")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    return torch.device(wanted)


class _TorchRow:
    """What the PyTorch rows share: device, autocast, waits, memory and the report."""

    def __init__(self, torch, dev, dtype: str):
        self.torch, self.dev, self.dtype = torch, dev, dtype
        self.cuda = dev.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(dev)

    def autocast(self):
        return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16,
                                   enabled=self.dtype == "bfloat16")

    def wait(self, _=None):
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def host_uint8(self, faces: np.ndarray):
        """NHWC uint8 faces in host memory (pinned when copying to a GPU)."""
        t = self.torch.from_numpy(faces)
        return t.pin_memory() if self.cuda else t

    def to_device_float(self, u8):
        """Host uint8 NHWC -> device float NCHW in [-1, 1], without blocking the host."""
        x = u8.to(self.dev, non_blocking=True).permute(0, 3, 1, 2)
        return x.float() / 127.5 - 1.0

    def fields(self, precision_name: str) -> dict:
        torch = self.torch
        return {"framework": "torch", "dtype": self.dtype, "precision": precision_name,
                "device": (f"gpu:{torch.cuda.get_device_name(self.dev)}" if self.cuda
                           else "cpu"),
                "num_devices": 1, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(self.dev) if self.cuda
                else None, "compile_s": 0.0}

    def precision(self) -> str:
        if self.dtype == "bfloat16":
            return "bfloat16"
        torch = self.torch
        if (self.cuda and torch.cuda.get_device_capability(self.dev)[0] >= 8
                and torch.backends.cudnn.allow_tf32):
            return "tf32"
        return "float32"


class TorchTrain(_TorchRow):
    """The authors' iteration in PyTorch eager at one stage, measured both ways."""

    POOL = JaxTrain.POOL

    def __init__(self, stage: int, batch_size: int, dtype: str, width: float, use_fan: bool,
                 device: str = "auto"):
        torch = _torch()
        # PyTorch modules of the reference (they need torch, an optional dependency).
        from progsr_jax.interop.pytorch import reference as tr
        from progsr_jax.interop.pytorch.fan4 import FanSqueeze

        super().__init__(torch, _torch_device(torch, device), dtype)
        self.tr, self.stage, self.batch_size, self.width = tr, stage, batch_size, width
        self.use_fan = use_fan
        dev = self.dev
        torch.manual_seed(0)
        self.G, self.D = tr.Generator(width).to(dev), tr.Discriminator(width).to(dev)
        self.vgg = tr.VGG16Features().to(dev)
        tr.load_flax_vgg_into(self.vgg, vgg.load_vgg16_features_params())
        self.fan = FanSqueeze().to(dev).eval() if use_fan else None
        for net in (self.vgg, self.fan):
            for p in (net.parameters() if net is not None else ()):
                p.requires_grad_(False)
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=1e-3, betas=(0.0, 0.99))
        self.d_opt = torch.optim.Adam(self.D.parameters(), lr=1e-3, betas=(0.0, 0.99))
        paper = config_files.load("step3.py")
        self.weights = {k: sr_config.loss_weights(paper, k) for k in (1, 2, 3)}
        self.res = gan.output_size(stage)
        self.alpha = 0.5 if stage > 1 else 1.0
        self.pool = {"lr": self.host_uint8(_host_faces(self.POOL * batch_size, 16, 0)),
                     "hr": self.host_uint8(_host_faces(self.POOL * batch_size, self.res, 1))}
        self.batch = (self.to_device_float(self.pool["lr"][:batch_size]),
                      self.to_device_float(self.pool["hr"][:batch_size]))

    def _step(self, lr_img, hr_img):
        with self.autocast():
            return self.tr.train_iteration(self.G, self.D, self.vgg, self.fan, self.g_opt,
                                           self.d_opt, lr_img, hr_img, self.stage, self.alpha,
                                           self.weights)

    def _host_step(self, i):
        rows = slice((i % self.POOL) * self.batch_size, (i % self.POOL + 1) * self.batch_size)
        return self._step(self.to_device_float(self.pool["lr"][rows]),
                          self.to_device_float(self.pool["hr"][rows]))

    def measure(self, io: str, steps: int, warmup: int) -> dict:
        run = (lambda i: self._step(*self.batch)) if io == "device" else self._host_step
        dt, (g_loss, _) = _timed(run, steps, warmup, self.wait)
        return {**self.fields(self.precision()), "mode": "train", "io": io, "stage": self.stage,
                "batch_size": self.batch_size, "width": self.width, "fan": self.use_fan,
                "images_per_sec": self.batch_size / dt, "step_time_s": dt,
                "finite": bool(self.torch.isfinite(g_loss.float()).item())}


class TorchInference(_TorchRow):
    """The step-3 generator in PyTorch eager (no grad), measured both ways."""

    def __init__(self, batch_size: int, dtype: str, width: float, device: str = "auto"):
        torch = _torch()
        # The reference generator needs torch, an optional dependency.
        from progsr_jax.interop.pytorch import reference as tr

        super().__init__(torch, _torch_device(torch, device), dtype)
        self.batch_size, self.width = batch_size, width
        torch.manual_seed(0)
        self.G = tr.Generator(width).to(self.dev).eval()
        self.x = self.to_device_float(self.host_uint8(_host_faces(batch_size, 16, 2)))

    def _forward(self, x):
        with self.torch.inference_mode(), self.autocast():
            return self.G(x, 3, 1.0)

    def measure(self, io: str, steps: int, warmup: int) -> dict:
        torch, b = self.torch, self.batch_size
        if io == "device":
            dt, _ = _timed(lambda i: self._forward(self.x), steps, warmup, self.wait)
        else:
            faces = self.host_uint8(_host_faces((warmup + steps) * b, 16, 3))
            out = torch.empty(((warmup + steps) * b, 128, 128, 3), dtype=torch.uint8)
            out = out.pin_memory() if self.cuda else out

            def run(i):
                rows = slice(i * b, (i + 1) * b)
                y = self._forward(self.to_device_float(faces[rows]))
                y = ((y.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
                out[rows].copy_(y.permute(0, 2, 3, 1), non_blocking=True)
                return y

            dt, _ = _timed(run, steps, warmup, self.wait)
        return {**self.fields(self.precision()), "mode": "inference", "io": io,
                "batch_size": b, "width": self.width, "faces_per_sec": b / dt,
                "images_per_sec": b / dt, "step_time_s": dt}


# --------------------------------------------------------------------------- other modes


def _pipeline_rates(ds, spec, batch_size: int, steps: int, warmup: int, workers: int,
                    stages: tuple[int, ...]) -> dict:
    """Images/s of each stage's batches through one InputPipeline of ``workers`` workers.

    The stages follow each other in one run of steps (one start of the workers):
    ``warmup`` batches, then ``steps`` timed ones, per stage; the clock of a stage
    starts at the batch before its first timed one (the warm-up also drains what the
    workers made ahead of the previous stage).
    """
    warmup = max(1, warmup)
    ends, end = [], 0
    for stage in stages:
        end += warmup + steps
        ends.append((stage, end))
    loader = data.BatchLoader(ds, batch_size, 0, ends, degradation=spec)
    out = {}
    t_start = time.perf_counter()
    with data.InputPipeline(loader, 0, end, workers=workers, finish=loader.finish) as batches:
        begin = 0
        for stage, stage_end in ends:
            t0 = None
            for step, _ in batches.until(stage_end):
                if step == 0:
                    out["startup_s"] = time.perf_counter() - t_start
                if step == begin + warmup - 1:
                    t0 = time.perf_counter()
            out[f"stage{stage}_images_per_sec"] = steps * batch_size / (time.perf_counter() - t0)
            begin = stage_end
    return out


def bench_data(batch_size, steps, warmup, preset, workers=None, repeats=1):
    """Images/s of degraded stage-1 and stage-3 batches from ``workers`` processes each
    (default 0, 1, 2 and the CPU cores), and of clean stage-3 batches in-process.

    The worker counts are timed in turn, ``repeats`` rounds; each figure is the median
    of its rounds, so that a slow spell of a shared machine does not fall on one count.
    """
    spec = degradation.from_config(preset)
    if spec is None:
        raise UserError("--mode=data needs a --degradation preset other than 'none'")
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    cores = os.cpu_count() or 1
    counts = sorted(set([0, 1, 2, cores] if workers is None else workers))
    if any(n < 0 for n in counts):
        raise UserError(f"--workers must be counts >= 0, got {counts}")
    samples: dict[int, list[dict]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="progsr-bench-") as tmp:
        ds = data.build_dataset(dict(source="synthetic", num_synthetic=256, cache_dir=tmp),
                                progress=False, log=lambda _: None)
        clean = _pipeline_rates(ds, None, batch_size, steps, warmup, 0, (3,))
        for _ in range(repeats):
            for n in counts:
                # Each worker's first batches, and what it makes ahead, are not timed.
                samples[n].append(_pipeline_rates(ds, spec, batch_size, steps,
                                                  max(warmup, 2 * n + 2), n, (1, 3)))
    results = []
    for n in counts:
        row = {"workers": n}
        for key in ("startup_s", "stage1_images_per_sec", "stage3_images_per_sec"):
            row[key] = statistics.median(r[key] for r in samples[n])
            if repeats > 1 and key != "startup_s":
                row[key.replace("images", "all_images")] = [r[key] for r in samples[n]]
        print(f"# {n} worker{'s' if n != 1 else ''}: stage 1 {row['stage1_images_per_sec']:.0f} "
              f"images/s, stage 3 {row['stage3_images_per_sec']:.0f} images/s (first batch "
              f"after {row['startup_s']:.1f} s)", flush=True)
        results.append(row)
    base = next((r for r in results if r["workers"] == 0), None)
    out = {"mode": "data", "batch_size": batch_size, "steps": steps, "repeats": repeats,
           "degradation": preset,
           "clean_stage3_images_per_sec_in_process": clean["stage3_images_per_sec"],
           "results": results, "cpu_count": cores}
    if base is not None:
        out["speedup_over_in_process"] = {
            str(r["workers"]): {f"stage{k}": r[f"stage{k}_images_per_sec"]
                                / base[f"stage{k}_images_per_sec"] for k in (1, 3)}
            for r in results}
    try:
        out["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return out


def bench_export(steps, warmup, width, batch_sizes=(1, 64)):
    """Faces/s of the ONNX export in onnxruntime (CPU) and of the JAX path, in one process."""
    try:
        import onnxruntime  # optional dependency (the export extra)
    except ImportError:
        raise UserError("--mode=export needs onnxruntime: pip install 'progsr_jax[export]'") \
            from None
    _, variables = gan.init_generator(jax.random.PRNGKey(0), width)
    sr = SuperResolver(variables, 3, 1.0, width)
    model, _ = export.export_onnx(export.generator_fn(sr), None)  # dynamic batch
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    rows = []
    for n in batch_sizes:
        x = np.random.default_rng(0).uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)
        runs = {"jax": lambda: np.asarray(sr(x)),
                "onnxruntime": lambda: session.run(None, {export.INPUT_NAME: x})[0]}
        row, outputs = {"batch_size": n}, {}
        for name, fn in runs.items():
            for _ in range(warmup + 1):  # the first JAX call compiles
                outputs[name] = fn()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            row[f"{name}_faces_per_sec"] = n * steps / (time.perf_counter() - t0)
        row["onnxruntime_over_jax"] = row["onnxruntime_faces_per_sec"] / row["jax_faces_per_sec"]
        row["max_abs_diff"] = float(np.abs(outputs["jax"] - outputs["onnxruntime"]).max())
        print(f"# batch {n}: JAX {row['jax_faces_per_sec']:.1f} faces/s, onnxruntime "
              f"{row['onnxruntime_faces_per_sec']:.1f} faces/s "
              f"({row['onnxruntime_over_jax']:.2f}x), max |diff| {row['max_abs_diff']:.1e}",
              flush=True)
        rows.append(row)
    return {"framework": "jax+onnxruntime", "mode": "export", "width": width, "steps": steps,
            "results": rows, "cpu_count": os.cpu_count(), **_device_fields()}


# --------------------------------------------------------------------------- the suite


def _rows(fv) -> list[dict]:
    """The suite's rows: training per (dtype, stage), inference per (dtype, batch)."""
    stages, dtypes, batches = _suite_lists(fv)
    rows = [{"mode": "train", "stage": s, "dtype": d, "batch_size": fv.batch_size}
            for d in dtypes for s in stages]
    rows += [{"mode": "inference", "batch_size": b, "dtype": d} for d in dtypes for b in batches]
    return rows


def _row_key(r: dict) -> tuple:
    return (r["mode"], r.get("stage", 0), r["batch_size"], r["dtype"])


def _row_name(key: tuple) -> str:
    mode, stage, batch, dtype = key
    if mode == "train":
        return f"train stage {stage}, batch {batch}, {dtype}"
    return f"inference 16->128, batch {batch}, {dtype}"


def _emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def run_worker(fv) -> None:
    """Every row of one framework (``--suite_worker``): one JSON line per measurement.

    JAX measures each row ``--runs`` times in a row (one compile); a row that
    fails prints an ``error`` line and the others go on.
    """
    runs = fv.runs if fv.suite_worker == "jax" else 1
    for row in _rows(fv):
        key = {k: row.get(k) for k in ("mode", "stage", "batch_size", "dtype")}
        bench = None
        try:
            if fv.suite_worker == "jax":
                bench = (JaxTrain(row["stage"], row["batch_size"], row["dtype"], fv.width,
                                  fv.d_width, fv.fan) if row["mode"] == "train"
                         else JaxInference(row["batch_size"], row["dtype"], fv.width))
            else:
                bench = (TorchTrain(row["stage"], row["batch_size"], row["dtype"], fv.width,
                                    fv.fan, fv.torch_device) if row["mode"] == "train"
                         else TorchInference(row["batch_size"], row["dtype"], fv.width,
                                             fv.torch_device))
            for _ in range(runs):
                for io in IO_KINDS:
                    _emit(_with_rates(bench.measure(io, fv.steps, fv.warmup), fv.peak_tflops))
        except UserError as e:
            _emit({"framework": fv.suite_worker, **key, "error": str(e)})
            if fv.suite_worker == "torch":
                return  # the same reason holds for every PyTorch row
        except Exception as e:  # noqa: BLE001 - reported as a row; the suite goes on
            _emit({"framework": fv.suite_worker, **key,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        del bench  # free the row's device memory before the next one
        if fv.suite_worker == "torch" and _torch().cuda.is_available():
            _torch().cuda.empty_cache()


def _worker_args(fv) -> list[str]:
    args = [f"--batch_size={fv.batch_size}", f"--steps={fv.steps}", f"--warmup={fv.warmup}",
            f"--width={fv.width}", f"--stages={','.join(fv.stages)}",
            f"--dtypes={','.join(fv.dtypes)}", f"--infer_batches={','.join(fv.infer_batches)}",
            f"--runs={fv.runs}", f"--torch_device={fv.torch_device}",
            "--fan" if fv.fan else "--nofan"]
    if fv.d_width is not None:
        args.append(f"--d_width={fv.d_width}")
    if fv.peak_tflops:
        args.append(f"--peak_tflops={fv.peak_tflops}")
    if fv.torch_threads:
        args.append(f"--torch_threads={fv.torch_threads}")
    return args


def _run_worker_process(framework: str, fv, sink) -> list[dict]:
    """One worker process; its JSON lines are passed to ``sink`` as they come."""
    cmd = [sys.executable, "-m", "progsr_jax.bench", f"--suite_worker={framework}",
           *_worker_args(fv)]
    env = dict(os.environ)
    if framework == "torch":
        env["JAX_PLATFORMS"] = "cpu"  # JAX would otherwise take most of the GPU's memory
    lines: list[dict] = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(fv.timeout, kill)
        watchdog.start()
        try:
            for text in proc.stdout:
                if text.startswith("{"):
                    line = json.loads(text)
                    lines.append(line)
                    sink(line)
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:  # interrupted: leave nothing behind
                proc.kill()
                proc.wait()
        if timed_out.is_set():
            sink({"framework": framework, "error": f"timed out after {fv.timeout} s"})
        elif proc.returncode != 0:
            err.seek(0)
            tail = (err.read().strip().splitlines() or ["no output"])[-1]
            sink({"framework": framework, "error": f"exit {proc.returncode}: {tail}"})
    return lines


def _mean(values):
    return statistics.fmean(values) if values else None


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def summarise(results: list[dict], fv) -> list[dict]:
    """One table row per (row, io): JAX and PyTorch speeds, ratio, FLOPs, peak fractions."""
    table = []
    for row in _rows(fv):
        key = _row_key(row)
        for io in IO_KINDS:
            got = {fw: [r for r in results if r.get("framework") == fw and "error" not in r
                        and _row_key(r) == key and r.get("io") == io]
                   for fw in ("jax", "torch")}
            jax_rs, torch_rs = got["jax"], got["torch"]
            j = _mean([r["images_per_sec"] for r in jax_rs])
            t = _mean([r["images_per_sec"] for r in torch_rs])
            flops_img = next((r["flops_per_image"] for r in jax_rs if r.get("flops_per_image")),
                             None)
            device = next((r["device"] for r in jax_rs), "")
            out = {"row": _row_name(key), "io": io, "mode": key[0], "stage": key[1],
                   "batch_size": key[2], "dtype": key[3],
                   "jax_runs": [r["images_per_sec"] for r in jax_rs],
                   "torch_runs": [r["images_per_sec"] for r in torch_rs],
                   "jax_images_per_sec": j, "torch_images_per_sec": t,
                   "jax_over_torch": j / t if j and t else None,
                   "flops_per_image": flops_img,
                   "jax_memory_bytes": max((r.get("memory_bytes") or 0 for r in jax_rs),
                                           default=0) or None,
                   "torch_memory_bytes": max((r.get("peak_memory_bytes") or 0
                                              for r in torch_rs), default=0) or None}
            for fw, rate, rs in (("jax", j, jax_rs), ("torch", t, torch_rs)):
                if rate and flops_img:
                    out[f"{fw}_tflops"] = rate * flops_img / 1e12
                    prec = rs[0]["precision"]
                    peak = peak_tflops(device, prec, fv.peak_tflops)
                    out[f"{fw}_precision"] = prec
                    out[f"{fw}_fraction_of_peak"] = out[f"{fw}_tflops"] / peak if peak else None
            table.append(out)
    return table


def print_table(table: list[dict], fv) -> None:
    print("\n| row | io | JAX img/s (runs) | PyTorch img/s (runs) | JAX / PyTorch | GFLOP/img "
          "| JAX TFLOP/s | JAX % of peak | PyTorch % of peak | JAX / PyTorch GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        runs = {fw: ", ".join(f"{v:,.1f}" for v in r[f"{fw}_runs"]) or "-"
                for fw in ("jax", "torch")}
        pct = {fw: (f"{100 * r[f'{fw}_fraction_of_peak']:.1f}% {r[f'{fw}_precision']}"
                    if r.get(f"{fw}_fraction_of_peak") else "-") for fw in ("jax", "torch")}
        mem = "/".join(_fmt(r[k] / 1e9 if r[k] else None, ".2f")
                       for k in ("jax_memory_bytes", "torch_memory_bytes"))
        ratio = _fmt(r["jax_over_torch"], ".2f")
        print(f"| {r['row']} | {r['io']} | {runs['jax']} | {runs['torch']} | "
              f"{ratio}{'x' if r['jax_over_torch'] else ''} | "
              f"{_fmt(r['flops_per_image'] / 1e9 if r['flops_per_image'] else None)} | "
              f"{_fmt(r.get('jax_tflops'), '.2f')} | {pct['jax']} | {pct['torch']} | {mem} |")
    schedule = config_files.load("step3.py").stage_steps
    for dtype in dict.fromkeys(r["dtype"] for r in table):
        for fw, name in (("jax", "JAX"), ("torch", "PyTorch")):
            total = 0.0
            for stage in (1, 2, 3):
                rate = next((r[f"{fw}_images_per_sec"] for r in table
                             if r["mode"] == "train" and r["stage"] == stage
                             and r["dtype"] == dtype and r["io"] == "end_to_end"), None)
                total = total + schedule[stage - 1] * fv.batch_size / rate if rate else None
                if total is None:
                    break
            if total is not None:
                print(f"Paper schedule ({sum(schedule):,} iterations of batch {fv.batch_size}), "
                      f"{dtype}, {name} end to end: {total / 3600:.2f} h")


def run_suite(fv) -> list[dict]:
    """PyTorch, JAX (``--runs`` runs of each row), PyTorch: every row timed torch, JAX, JAX, torch."""
    results: list[dict] = []
    notes: list[str] = []

    def sink(line):
        results.append(line)
        text = json.dumps(line)
        print(text, flush=True)
        if fv.out:
            with open(fv.out, "a") as f:
                f.write(text + "\n")
        if "error" in line and line["error"] not in notes:
            notes.append(line["error"])

    for framework in ("torch", "jax", "torch"):
        t0 = time.perf_counter()
        _run_worker_process(framework, fv, sink)
        print(f"# {framework}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = summarise(results, fv)
    for r in table:
        sink({"table_row": r})
    print_table(table, fv)
    for note in notes:
        print(f"note: {note}")
    return table


# --------------------------------------------------------------------------- the command


def measure_one(fv) -> dict:
    """The single measurement of the flags (``--mode=train`` or ``inference``)."""
    if fv.torch:
        if fv.torch_threads:
            _torch().set_num_threads(fv.torch_threads)
        bench = (TorchTrain(fv.stage, fv.batch_size, fv.dtype, fv.width, fv.fan, fv.torch_device)
                 if fv.mode == "train"
                 else TorchInference(fv.batch_size, fv.dtype, fv.width, fv.torch_device))
    elif fv.mode == "train":
        bench = JaxTrain(fv.stage, fv.batch_size, fv.dtype, fv.width, fv.d_width, fv.fan)
    else:
        bench = JaxInference(fv.batch_size, fv.dtype, fv.width)
    return _with_rates(bench.measure(fv.io, fv.steps, fv.warmup), fv.peak_tflops)


def main(argv=None) -> int:
    fv = cli.parse(argv, define, __doc__)
    _check(fv)
    if fv.suite_worker:
        if fv.suite_worker == "torch" and fv.torch_threads:
            _torch().set_num_threads(fv.torch_threads)
        run_worker(fv)
        return 0
    if fv.suite:
        run_suite(fv)
        return 0
    if fv.mode == "export":
        out = bench_export(fv.steps, fv.warmup, fv.width)
    elif fv.mode == "data":
        try:
            workers = None if fv.workers is None else [int(n) for n in fv.workers]
        except ValueError:
            raise UserError(f"--workers must be integers, got {','.join(fv.workers)}") from None
        out = bench_data(fv.batch_size, fv.steps, fv.warmup, fv.degradation, workers,
                         fv.repeats)
    else:
        out = measure_one(fv)
    out["host"] = platform.node()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    cli.run(main)
