"""Benchmark the full training iteration (and inference) on in-memory synthetic data.

    python -m progsr_jax.bench --stage=3 --batch_size=4 --steps=5 [--dtype=bfloat16]
    python -m progsr_jax.bench --stage=3 --batch_size=4 --steps=5 --torch   # PyTorch eager
    python -m progsr_jax.bench --mode=inference --batch_size=64 --steps=20
    python -m progsr_jax.bench --suite [--out=bench.jsonl]     # JAX vs PyTorch, stages 1-3

Training mode times the real jitted iteration of ``progsr_jax.train`` (G update
with pixel, perceptual, adversarial, heatmap and attention losses, then the D
update with WGAN-GP) at the given stage, alpha < 1 at stages 2-3 (the fade-in
path, the most expensive), FAN weights random (speed does not depend on them).
``--torch`` times ``progsr_jax.torch_reference.train_iteration``, the same
iteration in PyTorch eager, on the same machine.  Prints one JSON line.

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

from absl import app, flags

from progsr_jax.errors import UserError, run_cli

_STAGE = flags.DEFINE_integer("stage", 3, "Stage 1, 2 or 3.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed iterations after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed iterations (the first compiles).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Model width multiplier (1.0 = paper).")
_D_WIDTH = flags.DEFINE_float("d_width", None, "Discriminator width multiplier (default: --width).")
_TORCH = flags.DEFINE_bool("torch", False, "Time the PyTorch eager reference instead.")
_FAN = flags.DEFINE_bool("fan", True, "Include the heatmap and attention losses (stages 2-3).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "inference"], "What to time.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = default).")
_SUITE = flags.DEFINE_bool("suite", False, "JAX vs PyTorch at stages 1-3 plus inference.")
_OUT = flags.DEFINE_string("out", None, "--suite: also append the JSON lines to this file.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "--suite: seconds allowed per measurement.")
_PEAK = flags.DEFINE_float("peak_tflops", None,
                           "Device peak TFLOP/s for the dtype; adds the fraction reached.")


def _check():
    if _STAGE.value not in (1, 2, 3):
        raise UserError(f"--stage must be 1, 2 or 3, got {_STAGE.value}")
    if _BATCH.value < 2:
        raise UserError(f"--batch_size must be at least 2, got {_BATCH.value}")
    if _STEPS.value < 1:
        raise UserError(f"--steps must be >= 1, got {_STEPS.value}")


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


def bench_jax_train(stage, batch_size, steps, warmup, dtype, width, use_fan):
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from progsr_jax import config_lib, train, vgg
    from progsr_jax.fan import StudentFAN

    config = config_lib.base_config()
    config.batch_size = batch_size
    config.model.width = width
    config.model.d_width = _D_WIDTH.value
    config.model.dtype = dtype
    config.data.source = "synthetic"
    devices = jax.devices()
    config_lib.validate(config, len(devices))
    mesh = Mesh(np.array(devices), ("data",))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    state, g, d = train.create_train_state(config, jax.random.PRNGKey(0))
    state = jax.device_put(state, rep)
    vgg_params = jax.device_put(vgg.load_vgg16_features_params(), rep)
    fan = StudentFAN()
    fan_vars = jax.device_put(fan.init(jax.random.PRNGKey(1), np.zeros((1, 64, 64, 3), np.float32)), rep)
    res = 16 * 2 ** stage
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
        if _PEAK.value:
            out["fraction_of_peak"] = out["achieved_tflops"] / _PEAK.value
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
    jax.block_until_ready(sr(x))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(sr(x))
    t0 = time.perf_counter()
    for _ in range(steps):
        y = sr(x)
    jax.block_until_ready(y)
    dt = (time.perf_counter() - t0) / steps
    devs, peak = _device_info()
    return {"framework": "jax", "mode": "inference", "batch_size": batch_size, "dtype": dtype,
            "width": width, "faces_per_sec": batch_size / dt, "images_per_sec": batch_size / dt,
            "step_time_s": dt, "compile_s": compile_s,
            "device": f"{devs[0].platform}:{devs[0].device_kind}", "num_devices": len(devs),
            "peak_memory_bytes": peak}


def bench_torch(stage, batch_size, steps, warmup, width, use_fan, mode, threads):
    try:
        import torch
    except ImportError:
        raise UserError("--torch needs PyTorch: pip install 'progsr_jax[torch]'") from None
    from progsr_jax import config_lib, torch_reference as tr, vgg

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
    fan = tr.StudentFAN().to(dev).eval() if use_fan else None
    if fan is not None:
        for p in fan.parameters():
            p.requires_grad_(False)
    g_opt = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99))
    weights = config_lib.PAPER_LOSS_WEIGHTS
    res = 16 * 2 ** stage
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
            "compile_s": 0.0, "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(),
            "num_devices": 1, "peak_memory_bytes": peak, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _run_one(args: list[str]) -> dict:
    """One measurement in a fresh process (separate memory, compile caches, threads)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "progsr_jax.bench", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT.value)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {_TIMEOUT.value} s", "args": args}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail, "args": args}
    return json.loads(lines[-1])


def run_suite() -> list[dict]:
    from progsr_jax import config_lib

    common = [f"--batch_size={_BATCH.value}", f"--steps={_STEPS.value}",
              f"--warmup={_WARMUP.value}", f"--width={_WIDTH.value}"]
    if _D_WIDTH.value is not None:
        common.append(f"--d_width={_D_WIDTH.value}")
    jobs = []
    for stage in (1, 2, 3):
        jobs.append(("jax", stage, [f"--stage={stage}", f"--dtype={_DTYPE.value}", *common]))
        jobs.append(("torch", stage, [f"--stage={stage}", "--torch", *common]))
    inf = [f"--batch_size={max(_BATCH.value, 64)}", f"--steps={max(_STEPS.value, 10)}",
           f"--width={_WIDTH.value}", "--mode=inference"]
    jobs.append(("jax", "inference", [*inf, f"--dtype={_DTYPE.value}"]))
    jobs.append(("torch", "inference", [*inf, "--torch"]))
    results = []
    for framework, what, args in jobs:
        t0 = time.perf_counter()
        res = _run_one(args)
        res.setdefault("framework", framework)
        res["what"] = what
        results.append(res)
        line = json.dumps(res)
        print(line, flush=True)
        if _OUT.value:
            with open(_OUT.value, "a") as f:
                f.write(line + "\n")
        print(f"# {framework} {what}: {time.perf_counter() - t0:.0f} s", flush=True)

    def speed(fw, what):
        for r in results:
            if r.get("framework") == fw and r["what"] == what and "error" not in r:
                return r["images_per_sec"]
        return None

    steps = config_lib.base_config().stage_steps
    print("\n| | JAX img/s | PyTorch img/s | JAX / PyTorch |")
    print("|---|---|---|---|")
    total = {"jax": 0.0, "torch": 0.0}
    for stage in (1, 2, 3):
        j, t = speed("jax", stage), speed("torch", stage)
        ratio = f"{j / t:.2f}x" if j and t else "-"
        print(f"| stage {stage}, batch {_BATCH.value} | {j or 0:.2f} | {t or 0:.2f} | {ratio} |")
        for fw, v in (("jax", j), ("torch", t)):
            total[fw] = total[fw] + steps[stage - 1] * _BATCH.value / v if v else float("nan")
    j, t = speed("jax", "inference"), speed("torch", "inference")
    ratio = f"{j / t:.2f}x" if j and t else "-"
    print(f"| inference 16->128 (faces/s) | {j or 0:.1f} | {t or 0:.1f} | {ratio} |")
    print(f"\nPaper schedule ({sum(steps):,} iterations of batch {_BATCH.value}) at these "
          f"speeds: JAX {total['jax'] / 3600:.2f} h, PyTorch {total['torch'] / 3600:.2f} h")
    return results


def _main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    _check()
    if _SUITE.value:
        run_suite()
        return
    if _TORCH.value:
        out = bench_torch(_STAGE.value, _BATCH.value, _STEPS.value, _WARMUP.value, _WIDTH.value,
                          _FAN.value, _MODE.value, _THREADS.value)
    elif _MODE.value == "inference":
        out = bench_jax_inference(_BATCH.value, _STEPS.value, _WARMUP.value, _DTYPE.value,
                                  _WIDTH.value)
    else:
        out = bench_jax_train(_STAGE.value, _BATCH.value, _STEPS.value, _WARMUP.value,
                              _DTYPE.value, _WIDTH.value, _FAN.value)
    out["host"] = platform.node()
    print(json.dumps(out))


def main():
    app.run(lambda argv: run_cli(lambda: _main(argv)))


if __name__ == "__main__":
    main()
