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
(:data:`progsr_jax.benchmarks.accounting.PEAK_TFLOPS`; float32 convolutions run as TF32 on NVIDIA GPUs since
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

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from absl import flags

from progsr_jax import cli
from progsr_jax.benchmarks.accounting import peak_tflops, with_rates
from progsr_jax.benchmarks.input_and_export import bench_data, bench_export
from progsr_jax.benchmarks.jax_rows import JaxInference, JaxTrain
from progsr_jax.benchmarks.torch_rows import TorchInference, TorchTrain, load_torch
from progsr_jax.data import degradation, writing
from progsr_jax.errors import UserError
from progsr_jax.training import config as config_files

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
                    _emit(with_rates(bench.measure(io, fv.steps, fv.warmup), fv.peak_tflops))
        except UserError as e:
            _emit({"framework": fv.suite_worker, **key, "error": str(e)})
            if fv.suite_worker == "torch":
                return  # the same reason holds for every PyTorch row
        except Exception as e:  # noqa: BLE001 - reported as a row; the suite goes on
            _emit({"framework": fv.suite_worker, **key,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        del bench  # free the row's device memory before the next one
        if fv.suite_worker == "torch" and load_torch().cuda.is_available():
            load_torch().cuda.empty_cache()


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
            load_torch().set_num_threads(fv.torch_threads)
        bench = (TorchTrain(fv.stage, fv.batch_size, fv.dtype, fv.width, fv.fan, fv.torch_device)
                 if fv.mode == "train"
                 else TorchInference(fv.batch_size, fv.dtype, fv.width, fv.torch_device))
    elif fv.mode == "train":
        bench = JaxTrain(fv.stage, fv.batch_size, fv.dtype, fv.width, fv.d_width, fv.fan)
    else:
        bench = JaxInference(fv.batch_size, fv.dtype, fv.width)
    return with_rates(bench.measure(fv.io, fv.steps, fv.warmup), fv.peak_tflops)


def main(argv=None) -> int:
    fv = cli.parse(argv, define, __doc__)
    _check(fv)
    if fv.suite_worker:
        if fv.suite_worker == "torch" and fv.torch_threads:
            load_torch().set_num_threads(fv.torch_threads)
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
