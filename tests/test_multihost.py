"""Several processes (``--multihost``): two processes on localhost, 2 CPU devices each.

Every run is a real ``python -m progsr_jax.main`` / ``progsr_jax.distill``
started as ``jax.distributed`` processes on a free local port (gloo, JAX's
CPU collectives), each with a timeout and its own log file; every process a
test starts is killed when the test ends, however it ends.  A one-process run
on 4 forced host devices (the same global mesh) is the reference.  The runs
are shared between the tests through module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from progsr_jax import distill, main, progress
from progsr_jax.errors import UserError
from progsr_jax.inference import checkpoints
from progsr_jax.training import reporting
from progsr_jax.training.sr import config as sr_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
TIMEOUT = 900  # seconds, per run

# configs/step3.py:smoke through its three stages, shortened: 4 + 4 + 4 iterations of the
# global batch 4 (one image per device), the critic on, the VGG term off (compile time).
SR = ["--config=configs/step3.py:smoke", "--config.stage_steps=(4, 4, 4)",
      "--config.fade_steps=2", "--config.log_every=2", "--config.checkpoint_every=4",
      "--config.eval_every=4", "--config.sample_every=4", "--config.data.num_synthetic=32",
      "--config.data.num_workers=0"] + [f"--config.loss.stage{k}.perceptual=0" for k in (1, 2, 3)]
# 1 process on 4 devices against 2 processes on 2 devices each: the same mesh and programs,
# but the cross-process sums (gloo) round differently in the last bits from the first step
# on, and Adam with b1 = 0 turns a last-bit difference of a tiny gradient into a different
# step (measured over these 12 iterations: losses within 1e-4 relative, G's parameters
# within 2e-4 relative L2, single biases up to 5e-3 apart).  The tolerance is the one of
# the 4-device test (tests/test_reliability.py: losses within 2%), also applied to each
# field of the state as a relative L2 distance.
TOLERANCE = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Runs:
    """Starts runs of 1 or 2 processes and kills whatever is left of them at the end."""

    def __init__(self, tmp):
        self.tmp, self.procs, self.count = tmp, [], 0

    def start(self, module: str, workdir, processes: int, *extra) -> list[subprocess.Popen]:
        self.count += 1
        cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *extra]
        port = _free_port()
        procs = []
        for i in range(processes):
            env = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} "
                                      f"--xla_force_host_platform_device_count={4 // processes}")
            args = cmd + (["--multihost", f"--coordinator_address=localhost:{port}",
                           f"--num_processes={processes}", f"--process_id={i}"]
                          if processes > 1 else [])
            log = open(self.tmp / f"run{self.count}_{os.path.basename(workdir)}_p{i}.log", "w")
            p = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            p.log_path = log.name
            log.close()
            procs.append(p)
            self.procs.append(p)
        return procs

    def wait(self, procs, timeout=TIMEOUT) -> list[str]:
        """Waits for every process; returns their logs (fails on a timeout or error)."""
        deadline = time.time() + timeout
        for p in procs:
            try:
                p.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"a run did not finish within {timeout} s")
        logs = [open(p.log_path).read() for p in procs]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, f"exit {p.returncode}:\n{log[-3000:]}"
        return logs

    def run(self, module, workdir, processes, *extra) -> list[str]:
        return self.wait(self.start(module, workdir, processes, *extra))

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()
                p.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("multihost"))
    try:
        yield r
    finally:
        r.kill()


def _sr(runs, workdir, processes, *extra):
    return runs.run("progsr_jax.main", workdir, processes, *SR,
                    f"--config.data.cache_dir={runs.tmp / 'cache'}", *extra)


def _final_state(workdir) -> dict:
    """The training state of the latest checkpoint, as numpy (path -> array)."""
    mgr = checkpoints.manager(str(workdir), create=False)
    step = mgr.latest_step()
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    mgr.close()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
               for k in a if a[k].size)


def _relative_diff(a: dict, b: dict) -> float:
    """The largest relative L2 distance over the state's fields (G, D, their statistics and
    optimiser states): ||a - b|| / ||a||."""
    worst = 0.0
    for field in ("g_params", "g_stats", "d_params", "g_opt", "d_opt", "params",
                  "batch_stats", "opt_state", "ema"):
        keys = [k for k in a if k.startswith(f"['{field}']") and a[k].size]
        if keys:
            num = sum(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)
                      for k in keys)
            den = sum(np.sum(a[k].astype(np.float64) ** 2) for k in keys)
            worst = max(worst, float(np.sqrt(num / max(den, 1e-30))))
    return worst


def _assert_close(a: dict, b: dict, what: str) -> None:
    diff, rel = _max_diff(a, b), _relative_diff(a, b)
    print(f"\n{what}: max abs diff {diff:.3g}, largest relative L2 diff of a field {rel:.3g}")
    assert rel <= TOLERANCE, (what, diff, rel)


def _final_losses(workdir) -> dict:
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "g_loss" in r][-1]


def _steps(workdir) -> int:
    return int(_final_state(workdir)["['step']"])


@pytest.fixture(scope="module")
def sr_runs(runs):
    """The uninterrupted runs: one process on 4 devices and two processes on 2 each, whose
    batches (each process's rows) are made by a data worker process each."""
    t0 = time.time()
    _sr(runs, runs.tmp / "one", 1)
    t1 = time.time()
    logs = _sr(runs, runs.tmp / "two", 2, "--config.data.workers=1")
    print(f"\nuninterrupted 1-process run {t1 - t0:.0f} s, 2-process run {time.time() - t1:.0f} s")
    return runs.tmp / "one", runs.tmp / "two", logs


@pytest.mark.slow
def test_two_processes_train_like_one(sr_runs):
    one, two, _ = sr_runs
    assert _steps(one) == _steps(two) == 12
    _assert_close(_final_state(one), _final_state(two),
                  "1 process x 4 devices vs 2 processes x 2 devices")
    a, b = _final_losses(one), _final_losses(two)
    for key in ("pixel", "adversarial", "g_loss", "d_loss", "gradient_penalty"):
        assert abs(a[key] - b[key]) <= TOLERANCE * max(abs(a[key]), 1e-3), (key, a, b)


@pytest.mark.slow
def test_one_writer(sr_runs):
    _, two, logs = sr_runs
    log = (two / "log.txt").read_text().splitlines()
    assert "devices: 4 x cpu (cpu); process 0 of 2" in log[0]
    assert sum("data: batches made by 1 worker process" in line for line in log) == 1
    assert sum("stage 1: 32x32" in line for line in log) == 1  # each line once
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in records if "g_loss" in r]
    val = [r["step"] for r in records if "val_psnr" in r]
    assert train == [2, 4, 6, 8, 10, 12] and val == [4, 8, 12]
    assert len(os.listdir(two / "tensorboard")) == 1
    assert sorted(os.listdir(two / "samples")) == [
        "stage1_0000004.png", "stage2_0000008.png", "stage3_0000012.png"]
    # process 0 prints the log lines (plain progress lines, no redraws); process 1 nothing
    assert "train 12/12 (100%)" in logs[0] and "\r" not in logs[0].split("stage 1:")[1]
    assert "iteration" not in logs[1] and "train 12/12" not in logs[1]


def _wait_for_step(workdir, step: int, procs, timeout=TIMEOUT):
    """Waits until metrics.jsonl has a training record at ``step`` or later."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended early"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line being written
                    if json.loads(line).get("step", 0) >= step and "g_loss" in json.loads(line):
                        return
        time.sleep(0.2)
    pytest.fail(f"no iteration {step} logged within {timeout} s")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_resume_is_exact(runs, sr_runs):
    """SIGTERM to process 1 (not the writer): both save at the same step and exit 0;
    the resumed 2-process run ends like the uninterrupted one (bit for bit, though that
    one's batches came from data worker processes and these from the processes
    themselves), and a copy of the stopped run resumed by one process ends within the
    tolerance of it."""
    one, two, _ = sr_runs
    work = runs.tmp / "stopped"
    procs = runs.start("progsr_jax.main", work, 2, *SR,
                       f"--config.data.cache_dir={runs.tmp / 'cache'}")
    _wait_for_step(work, 4, procs)  # then stage 2 compiles: the stop comes within stage 2
    procs[1].send_signal(signal.SIGTERM)
    logs = runs.wait(procs)
    stopped = _steps(work)
    assert 4 < stopped < 12, stopped
    assert f"stopped by a signal to another process at iteration {stopped}" in logs[0]
    assert "checkpoint saved" in (work / "log.txt").read_text()
    shutil.copytree(work, runs.tmp / "stopped_copy")

    t0 = time.time()
    _sr(runs, work, 2)
    diff = _max_diff(_final_state(two), _final_state(work))
    print(f"\nSIGTERM at iteration {stopped}, resumed with 2 processes ({time.time() - t0:.0f} s): "
          f"max abs diff to the uninterrupted 2-process run {diff:.3g}")
    assert diff == 0.0

    _sr(runs, runs.tmp / "stopped_copy", 1)
    _assert_close(_final_state(one), _final_state(runs.tmp / "stopped_copy"),
                  f"2 processes stopped at {stopped}, resumed by 1 process x 4 devices, "
                  "against the 1-process run")


@pytest.mark.slow
def test_one_process_run_resumed_by_two(runs, sr_runs):
    """The 1-process run's checkpoint at iteration 8 (a copy of its workdir without the
    later checkpoint) resumed by 2 processes."""
    one, _, _ = sr_runs
    work = runs.tmp / "one_then_two"
    shutil.copytree(one, work)
    shutil.rmtree(work / "checkpoints" / "12")
    assert _steps(work) == 8
    _sr(runs, work, 2)
    assert "resumed from checkpoint at iteration 8" in (work / "log.txt").read_text()
    _assert_close(_final_state(one), _final_state(work),
                  "1 process to iteration 8, resumed by 2 processes, against the 1-process run")


@pytest.mark.slow
def test_distill_two_processes_like_one(runs, synthetic_teacher):
    finals = {}
    for n in (1, 2):
        work = runs.tmp / f"distill{n}"
        runs.run("progsr_jax.distill", work, n, "--config=configs/distill_fan.py:smoke",
                 f"--config.teacher_heatmaps={synthetic_teacher}",
                 f"--config.data.cache_dir={runs.tmp / 'cache'}")
        finals[n] = _final_state(work)
        assert json.loads((work / "fan_meta.json").read_text())["final"] is True
    assert int(finals[2]["['step']"]) == 8
    _assert_close(finals[1], finals[2], "distill: 1 process x 4 devices vs 2 processes x 2")


def test_launch_flags_need_multihost():
    with pytest.raises(UserError, match="--num_processes needs --multihost"):
        main.main(["main", "--config=configs/step3.py:smoke", "--workdir=/nonexistent",
                   "--num_processes=2"])
    with pytest.raises(UserError, match="--process_id needs --multihost"):
        distill.main(["distill", "--config=configs/distill_fan.py:smoke",
                      "--workdir=/nonexistent", "--process_id=1"])
    with pytest.raises(UserError, match="--eval_only runs on one process"):
        distill.main(["distill", "--config=configs/distill_fan.py:smoke", "--eval_only",
                      "--multihost"])


def test_divisibility_error_says_what_to_set(tiny_config):
    with pytest.raises(UserError, match=r"set --config.batch_size to a multiple of 4 \(e.g. 4"):
        sr_config.validate(tiny_config(batch_size=6), num_devices=4)


def test_plain_progress_lines_when_not_a_terminal(tmp_path, capsys):
    """Where stderr is not a terminal the bar is one plain line per log interval."""
    reporter = reporting.Reporter(str(tmp_path), writer=True)
    try:
        with reporter.progress(10, 0, every=4) as bar:
            for i in range(10):
                bar.set_postfix(stage=1, g=f"{i:.1f}")
                bar.update(1)
    finally:
        reporter.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 3, err
    assert "train 4/10 (40%)" in lines[0] and lines[0].endswith("stage=1 g=3.0")
    assert "train 10/10 (100%)" in lines[2] and "0:00 left" in lines[2]


def test_only_the_writer_writes(tmp_path, capsys):
    reporter = reporting.Reporter(str(tmp_path / "w"), writer=False)
    reporter.info("hello")
    reporter.scalars(3, {"loss": 1.5})
    with reporter.progress(4, 0, every=1) as bar:
        bar.update(4)
    reporter.close()
    assert reporter.last["loss"] == 1.5
    assert not (tmp_path / "w").exists() and capsys.readouterr().err == ""


def test_data_progress_is_plain_lines_when_not_a_terminal(capsys):
    """Every long step's progress (decoding, TFDS, evaluate, infer) prints whole lines off a
    terminal: no carriage returns, a line at the end."""
    items = list(progress.track(range(5), 5, "decoding images", "img"))
    assert items == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.strip().splitlines()[-1].split("] ", 1)[1].startswith("decoding images 5/5 (100%)")
