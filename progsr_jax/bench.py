"""Benchmark the full training iteration (and inference) on in-memory synthetic data.

    python -m progsr_jax.bench --stage=3 --batch_size=4 --steps=5 [--dtype=bfloat16]
    python -m progsr_jax.bench --stage=3 --batch_size=4 --steps=5 --torch   # PyTorch eager
    python -m progsr_jax.bench --mode=inference --batch_size=64 --steps=20
    python -m progsr_jax.bench --mode=export --steps=5      # onnxruntime (CPU) vs JAX, batch 1, 64
    python -m progsr_jax.bench --mode=data --degradation=real --steps=150 --repeats=3
    python -m progsr_jax.bench --suite [--out=bench.jsonl]     # JAX vs PyTorch, stages 1-3

Training mode times the real jitted iteration of ``progsr_jax.training.sr`` (G update
with pixel, perceptual, adversarial, heatmap and attention losses, then the D
update with WGAN-GP) at the given stage, alpha < 1 at stages 2-3 (the fade-in
path, the most expensive), FAN weights random (speed does not depend on them).
``--torch`` times ``progsr_jax.interop.pytorch.reference.train_iteration``, the same
iteration in PyTorch eager, on the same machine.  Prints one JSON line.

``--mode=data`` times the trainers' input pipeline
(:class:`progsr_jax.data.InputPipeline`, batches on the host) on 256 built-in
synthetic faces in a decode cache in a temporary folder: batches (of
``--batch_size``) with inputs degraded on the fly with ``--degradation`` (a
preset of :mod:`progsr_jax.data.degradation`) at stages 1 and 3, made by each
number of worker processes in ``--workers`` (0: in-process), ``--steps``
batches of each stage after a warm-up, in ``--repeats`` rounds (medians); and
the clean chain in-process.  Prints one JSON line with images/s and each
worker count's speed-up over 0.

``--suite`` runs JAX and PyTorch at stages 1-3 (batch ``--batch_size``) and
the inference benchmark, each in its own process, then prints a table with
the JAX/PyTorch speed-ups and the time the paper's 200k-iteration schedule
would take at the measured speeds (``tools/bench_gpu.sh`` runs it on a GPU;
about 3-5 minutes there).
"""

from __future__ import annotations

import json
import platform
import time

from absl import flags

from progsr_jax import cli
from progsr_jax.errors import UserError


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("stage", 3, "Stage 1, 2 or 3.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "Global batch size.", flag_values=fv)
    flags.DEFINE_integer("steps", 10, "Timed iterations after warm-up.", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "Untimed iterations (the first compiles).", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", flag_values=fv)
    flags.DEFINE_float("width", 1.0, "Model width multiplier (1.0 = paper).", flag_values=fv)
    flags.DEFINE_float("d_width", None, "Discriminator width multiplier (default: --width).",
                       flag_values=fv)
    flags.DEFINE_bool("torch", False, "Time the PyTorch eager reference instead.", flag_values=fv)
    flags.DEFINE_bool("fan", True, "Include the heatmap and attention losses (stages 2-3).",
                      flag_values=fv)
    flags.DEFINE_enum("mode", "train", ["train", "inference", "export", "data"],
                      "What to time (export: onnxruntime vs JAX inference, batch 1 and 64; "
                      "data: the input pipeline's degraded batches).", flag_values=fv)
    flags.DEFINE_string("degradation", "real", "--mode=data: the degradation preset",
                        flag_values=fv)
    flags.DEFINE_list("workers", None, "--mode=data: the worker process counts to time, e.g. "
                      "0,2 (default: 0, 1, 2 and the CPU cores)", flag_values=fv)
    flags.DEFINE_integer("repeats", 1, "--mode=data: rounds over the worker counts (the "
                         "median is reported)", flag_values=fv)
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = default).", flag_values=fv)
    flags.DEFINE_bool("suite", False, "JAX vs PyTorch at stages 1-3 plus inference.",
                      flag_values=fv)
    flags.DEFINE_string("out", None, "--suite: also append the JSON lines to this file.",
                        flag_values=fv)
    flags.DEFINE_integer("timeout", 900, "--suite: seconds allowed per measurement.",
                         flag_values=fv)
    flags.DEFINE_float("peak_tflops", None,
                       "Device peak TFLOP/s for the dtype; adds the fraction reached.",
                       flag_values=fv)


def _check(fv):
    if fv.stage not in (1, 2, 3):
        raise UserError(f"--stage must be 1, 2 or 3, got {fv.stage}")
    if fv.batch_size < 2:
        raise UserError(f"--batch_size must be at least 2, got {fv.batch_size}")
    if fv.steps < 1:
        raise UserError(f"--steps must be >= 1, got {fv.steps}")


def _device_info():
    import jax
    devs = jax.devices()
    peak = None
    try:
        stats = devs[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    return devs, peak


def bench_jax_train(stage, batch_size, steps, warmup, dtype, width, use_fan, d_width=None,
                    peak_tflops=None):
    import jax
    import numpy as np

    from progsr_jax import models, vgg
    from progsr_jax.fan import StudentFAN
    from progsr_jax.training import config as config_files
    from progsr_jax.training import core, sr_config
    from progsr_jax.training import sr as train

    config = config_files.load("step3.py")
    config.batch_size = batch_size
    config.model.width = width
    config.model.d_width = d_width
    config.model.dtype = dtype
    config.data.source = "synthetic"
    devices = jax.devices()
    sr_config.validate(config, len(devices))
    shardings = core.data_parallel(devices)
    rep, shard = shardings.replicated, shardings.batch

    state, g, d = train.create_train_state(config, jax.random.PRNGKey(0))
    state = jax.device_put(state, rep)
    vgg_params = jax.device_put(vgg.load_vgg16_features_params(), rep)
    fan = StudentFAN()
    fan_vars = jax.device_put(fan.init(jax.random.PRNGKey(1),
                                       np.zeros((1, 64, 64, 3), np.float32)), rep)
    res = models.output_size(stage)
    rng = np.random.default_rng(0)
    batch = {"lr": rng.uniform(-1, 1, (batch_size, 16, 16, 3)).astype(np.float32),
             "hr": rng.uniform(-1, 1, (batch_size, res, res, 3)).astype(np.float32)}
    batch = jax.device_put(batch, shard)
    fn = jax.jit(train.make_train_step(config, g, d, stage, use_fan, fan), donate_argnums=(0,),
                 in_shardings=(rep, shard, None, rep, rep), out_shardings=(rep, rep))
    alpha = np.float32(0.5 if stage > 1 else 1.0)
    t0 = time.perf_counter()
    lowered = fn.lower(state, batch, alpha, vgg_params, fan_vars)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops")) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001
        pass
    for _ in range(warmup):
        state, m = compiled(state, batch, alpha, vgg_params, fan_vars)
        jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch, alpha, vgg_params, fan_vars)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / steps
    devs, peak = _device_info()
    out = {"framework": "jax", "mode": "train", "stage": stage, "batch_size": batch_size,
           "dtype": dtype, "width": width, "fan": use_fan,
           "images_per_sec": batch_size / dt, "step_time_s": dt, "compile_s": compile_s,
           "device": f"{devs[0].platform}:{devs[0].device_kind}", "num_devices": len(devs),
           "peak_memory_bytes": peak, "flops_per_step": flops,
           "finite": bool(np.isfinite(float(m["g_loss"])))}
    if flops:
        out["achieved_tflops"] = flops / dt / 1e12
        if peak_tflops:
            out["fraction_of_peak"] = out["achieved_tflops"] / peak_tflops
    return out


def _pipeline_rates(ds, spec, batch_size: int, steps: int, warmup: int, workers: int,
                    stages: tuple[int, ...]) -> dict:
    """Images/s of each stage's batches through one InputPipeline of ``workers`` workers.

    The stages follow each other in one run of steps (one start of the workers):
    ``warmup`` batches, then ``steps`` timed ones, per stage; the clock of a stage
    starts at the batch before its first timed one (the warm-up also drains what the
    workers made ahead of the previous stage).
    """
    from progsr_jax import data

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
    import os
    import statistics
    import tempfile

    from progsr_jax import data
    from progsr_jax.data import degradation

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


def bench_jax_inference(batch_size, steps, warmup, dtype, width):
    import jax
    import numpy as np

    from progsr_jax import models
    from progsr_jax.inference import SuperResolver

    _, variables = models.init_generator(jax.random.PRNGKey(0), width)
    sr = SuperResolver(variables, 3, 1.0, width, dtype)
    x = np.random.default_rng(0).uniform(-1, 1, (batch_size, 16, 16, 3)).astype(np.float32)
    t0 = time.perf_counter()
    sr.super_resolve(x, batch_size)  # the batched path every command runs, outputs on the host
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        sr.super_resolve(x, batch_size)
    t0 = time.perf_counter()
    for _ in range(steps):
        sr.super_resolve(x, batch_size)
    dt = (time.perf_counter() - t0) / steps
    devs, peak = _device_info()
    return {"framework": "jax", "mode": "inference", "batch_size": batch_size, "dtype": dtype,
            "width": width, "faces_per_sec": batch_size / dt, "images_per_sec": batch_size / dt,
            "step_time_s": dt, "compile_s": compile_s,
            "device": f"{devs[0].platform}:{devs[0].device_kind}", "num_devices": len(devs),
            "peak_memory_bytes": peak}


def bench_export(steps, warmup, width, batch_sizes=(1, 64)):
    """Faces/s of the ONNX export in onnxruntime (CPU) and of the JAX path, in one process."""
    import os
    import tempfile

    import jax
    import numpy as np

    from progsr_jax import export, models
    from progsr_jax.inference import SuperResolver

    try:
        import onnxruntime
    except ImportError:
        raise UserError("--mode=export needs onnxruntime: pip install 'progsr_jax[export]'") \
            from None
    _, variables = models.init_generator(jax.random.PRNGKey(0), width)
    sr = SuperResolver(variables, 3, 1.0, width)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, export.FILES["onnx"])
        export.export_onnx(export.generator_fn(sr), None, path)  # dynamic batch
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
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
    devs, _ = _device_info()
    return {"framework": "jax+onnxruntime", "mode": "export", "width": width, "steps": steps,
            "results": rows, "device": f"{devs[0].platform}:{devs[0].device_kind}",
            "cpu_count": os.cpu_count()}


def bench_torch(stage, batch_size, steps, warmup, width, use_fan, mode, threads):
    try:
        import torch
    except ImportError:
        raise UserError("--torch needs PyTorch: pip install 'progsr_jax[torch]'") from None
    from progsr_jax import models, vgg
    from progsr_jax.interop.pytorch import reference as tr
    from progsr_jax.interop.pytorch.fan4 import FanSqueeze
    from progsr_jax.training import config as config_files
    from progsr_jax.training import sr_config

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    G, D = tr.Generator(width).to(dev), tr.Discriminator(width).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if mode == "inference":
        G.eval()
        x = torch.rand(batch_size, 3, 16, 16, device=dev) * 2 - 1
        with torch.no_grad():
            for _ in range(warmup):
                G(x, 3, 1.0)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                G(x, 3, 1.0)
            sync()
        dt = (time.perf_counter() - t0) / steps
        return {"framework": "torch", "mode": "inference", "batch_size": batch_size,
                "faces_per_sec": batch_size / dt, "images_per_sec": batch_size / dt,
                "step_time_s": dt, "device": str(dev), "num_devices": 1,
                "torch": torch.__version__, "threads": torch.get_num_threads()}
    vgg_net = tr.VGG16Features().to(dev)
    tr.load_flax_vgg_into(vgg_net, vgg.load_vgg16_features_params())
    for p in vgg_net.parameters():
        p.requires_grad_(False)
    fan = FanSqueeze().to(dev).eval() if use_fan else None
    if fan is not None:
        for p in fan.parameters():
            p.requires_grad_(False)
    g_opt = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99))
    paper = config_files.load("step3.py")
    weights = {k: sr_config.loss_weights(paper, k) for k in (1, 2, 3)}
    res = models.output_size(stage)
    lr_img = torch.rand(batch_size, 3, 16, 16, device=dev) * 2 - 1
    hr_img = torch.rand(batch_size, 3, res, res, device=dev) * 2 - 1
    alpha = 0.5 if stage > 1 else 1.0
    for _ in range(warmup):
        tr.train_iteration(G, D, vgg_net, fan, g_opt, d_opt, lr_img, hr_img, stage, alpha, weights)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        g_loss, _ = tr.train_iteration(G, D, vgg_net, fan, g_opt, d_opt, lr_img, hr_img, stage,
                                       alpha, weights)
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {"framework": "torch", "mode": "train", "stage": stage, "batch_size": batch_size,
            "width": width, "fan": use_fan, "images_per_sec": batch_size / dt, "step_time_s": dt,
            "compile_s": 0.0,
            "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
            "num_devices": 1, "peak_memory_bytes": peak, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _run_one(args: list[str], timeout: int) -> dict:
    """One measurement in a fresh process (separate memory, compile caches, threads)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "progsr_jax.bench", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "args": args}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail, "args": args}
    return json.loads(lines[-1])


def run_suite(fv) -> list[dict]:
    from progsr_jax.training import config as config_files

    common = [f"--batch_size={fv.batch_size}", f"--steps={fv.steps}",
              f"--warmup={fv.warmup}", f"--width={fv.width}"]
    if fv.d_width is not None:
        common.append(f"--d_width={fv.d_width}")
    jobs = []
    for stage in (1, 2, 3):
        jobs.append(("jax", stage, [f"--stage={stage}", f"--dtype={fv.dtype}", *common]))
        jobs.append(("torch", stage, [f"--stage={stage}", "--torch", *common]))
    inf = [f"--batch_size={max(fv.batch_size, 64)}", f"--steps={max(fv.steps, 10)}",
           f"--width={fv.width}", "--mode=inference"]
    jobs.append(("jax", "inference", [*inf, f"--dtype={fv.dtype}"]))
    jobs.append(("torch", "inference", [*inf, "--torch"]))
    results = []
    for framework, what, args in jobs:
        t0 = time.perf_counter()
        res = _run_one(args, fv.timeout)
        res.setdefault("framework", framework)
        res["what"] = what
        results.append(res)
        line = json.dumps(res)
        print(line, flush=True)
        if fv.out:
            with open(fv.out, "a") as f:
                f.write(line + "\n")
        print(f"# {framework} {what}: {time.perf_counter() - t0:.0f} s", flush=True)

    def speed(fw, what):
        for r in results:
            if r.get("framework") == fw and r["what"] == what and "error" not in r:
                return r["images_per_sec"]
        return None

    steps = config_files.load("step3.py").stage_steps
    print("\n| | JAX img/s | PyTorch img/s | JAX / PyTorch |")
    print("|---|---|---|---|")
    total = {"jax": 0.0, "torch": 0.0}
    for stage in (1, 2, 3):
        j, t = speed("jax", stage), speed("torch", stage)
        ratio = f"{j / t:.2f}x" if j and t else "-"
        print(f"| stage {stage}, batch {fv.batch_size} | {j or 0:.2f} | {t or 0:.2f} | {ratio} |")
        for fw, v in (("jax", j), ("torch", t)):
            total[fw] = total[fw] + steps[stage - 1] * fv.batch_size / v if v else float("nan")
    j, t = speed("jax", "inference"), speed("torch", "inference")
    ratio = f"{j / t:.2f}x" if j and t else "-"
    print(f"| inference 16->128 (faces/s) | {j or 0:.1f} | {t or 0:.1f} | {ratio} |")
    print(f"\nPaper schedule ({sum(steps):,} iterations of batch {fv.batch_size}) at these "
          f"speeds: JAX {total['jax'] / 3600:.2f} h, PyTorch {total['torch'] / 3600:.2f} h")
    return results


def main(argv=None) -> int:
    fv = cli.parse(argv, define, __doc__)
    _check(fv)
    if fv.suite:
        run_suite(fv)
        return 0
    if fv.torch:
        out = bench_torch(fv.stage, fv.batch_size, fv.steps, fv.warmup, fv.width, fv.fan, fv.mode,
                          fv.torch_threads)
    elif fv.mode == "export":
        out = bench_export(fv.steps, fv.warmup, fv.width)
    elif fv.mode == "data":
        try:
            workers = None if fv.workers is None else [int(n) for n in fv.workers]
        except ValueError:
            raise UserError(f"--workers must be integers, got {','.join(fv.workers)}") from None
        out = bench_data(fv.batch_size, fv.steps, fv.warmup, fv.degradation, workers,
                         fv.repeats)
    elif fv.mode == "inference":
        out = bench_jax_inference(fv.batch_size, fv.steps, fv.warmup, fv.dtype, fv.width)
    else:
        out = bench_jax_train(fv.stage, fv.batch_size, fv.steps, fv.warmup, fv.dtype, fv.width,
                              fv.fan, fv.d_width, fv.peak_tflops)
    out["host"] = platform.node()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    cli.run(main)
