"""The trainers' input pipeline (degraded batches by worker count) and the exported
model under onnxruntime against JAX."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import numpy as np

from progsr_jax import data, export
from progsr_jax.benchmarks.accounting import device_fields
from progsr_jax.data import degradation
from progsr_jax.errors import UserError
from progsr_jax.inference import SuperResolver
from progsr_jax.nets import gan


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
            "results": rows, "cpu_count": os.cpu_count(), **device_fields()}
