"""Pre-emption, bad images and misuse: the command-line programs end to end."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from progsr_jax import inference
from progsr_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")

# A tiny three-stage run: 4 + 8 + 4 iterations, a checkpoint every 2.
TINY = ["--config=configs/step3.py:smoke", "--config.model.width=0.0625",
        "--config.batch_size=2", "--config.stage_steps=(4, 8, 4)", "--config.fade_steps=3",
        "--config.log_every=1", "--config.checkpoint_every=2", "--config.sample_every=100",
        "--config.data.num_synthetic=16", "--config.data.num_workers=0"]


# The same run with inputs degraded on the fly (issue 20) by 2 worker processes (issue 27):
# resume and N devices stay exact.
DEGRADED = ("--config.data.degradation.preset=real", "--config.data.degradation.clean_prob=0.25",
            "--config.data.workers=2")
#: How a data worker process of a run shows in ``ps``.
WORKER = "from multiprocessing.spawn import spawn_main"


def _main(workdir, *extra, cache, stage_steps=None):
    tiny = TINY if stage_steps is None else [
        a for a in TINY if not a.startswith("--config.stage_steps")] + [
        f"--config.stage_steps={stage_steps}"]
    return [sys.executable, "-m", "progsr_jax.main", f"--workdir={workdir}", *tiny,
            f"--config.data.cache_dir={cache}", *extra]


def _run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _output(workdir):
    x = np.linspace(-1, 1, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
    return np.asarray(inference.load(str(workdir))(x))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), DEGRADED], ids=["clean", "degraded"])
def test_sigkill_during_stage2_then_resume_equals_uninterrupted(tmp_path, extra, processes):
    cache = tmp_path / "cache"
    r = _run(_main(tmp_path / "full", *extra, cache=cache))
    assert r.returncode == 0, r.stderr[-2000:]

    work = tmp_path / "killed"
    proc = subprocess.Popen(_main(work, *extra, cache=cache), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 900
    try:
        while time.time() < deadline:  # kill once stage 2 is under way (iteration >= 7 logged)
            if metrics.exists():
                recs = []
                for line in metrics.read_text().splitlines():
                    try:  # the line being written may be incomplete
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
                if any(r["stage"] == 2 and r["step"] >= 7 for r in recs):
                    break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("stage 2 never started")
        children = processes.children(proc.pid)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # Its data workers end by themselves (nothing stopped them); so does the rest.
    assert sum(WORKER in cmd for cmd in children.values()) == (2 if extra else 0), children
    assert processes.survivors(children) == []

    r = _run(_main(work, *extra, cache=cache))  # the same command resumes
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from checkpoint at iteration" in r.stderr
    np.testing.assert_allclose(_output(work), _output(tmp_path / "full"), atol=1e-5, rtol=0)


def _start_and_wait_for(work, *extra, cache, records: int = 1, stage_steps=None):
    """A run started in the background, once it has logged ``records`` metrics records."""
    proc = subprocess.Popen(_main(work, *extra, cache=cache, stage_steps=stage_steps),
                            cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if len(lines) >= records:
                return proc
            if proc.poll() is not None:
                pytest.fail(f"the run ended early: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        pytest.fail(f"not {records} metrics records within 600 s")
    except BaseException:
        proc.kill()
        proc.communicate(timeout=60)
        raise


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, processes):
    """SIGTERM (with 2 data workers running): a checkpoint, exit 0, no process left."""
    work = tmp_path / "w"
    proc = _start_and_wait_for(work, *DEGRADED, "--config.checkpoint_every=1000",
                               cache=tmp_path / "c")
    try:
        children = processes.children(proc.pid)
        assert sum(WORKER in cmd for cmd in children.values()) == 2, children
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "checkpoint saved" in err
    assert inference.load(str(work)).iteration is not None
    assert processes.survivors(children) == []


@pytest.mark.slow
def test_a_killed_data_worker_ends_the_run_with_one_line_after_a_checkpoint(tmp_path, processes):
    """A data worker killed (as by the out-of-memory killer): the run saves the iteration it
    had done, ends with one error line naming the cause, and leaves no process behind."""
    work = tmp_path / "w"
    # Stage 1 long enough that the workers are still needed: they make only a few batches
    # ahead of the train step.
    proc = _start_and_wait_for(work, *DEGRADED, "--config.checkpoint_every=1000",
                               cache=tmp_path / "c", records=2, stage_steps=(1000, 8, 4))
    try:
        children = processes.children(proc.pid)
        workers = [pid for pid, cmd in children.items() if WORKER in cmd]
        assert len(workers) == 2, children
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    # The batch the worker was writing into shared memory when it was killed is freed by
    # multiprocessing's resource tracker when the run exits, which says so after our line
    # ("resource_tracker: There appear to be N leaked shared_memory objects to clean up").
    lines = [ln for ln in err.strip().splitlines()
             if "resource_tracker" not in ln and "warnings.warn(" not in ln]
    last = lines[-1]
    assert last.startswith("error: a data worker process died (killed by SIGKILL"), last
    done = int(re.search(r"checkpoint saved at iteration (\d+): re-run the same command", last)[1])
    assert 2 <= done < 1000 and (work / "checkpoints" / str(done)).is_dir()
    assert processes.survivors(children) == []


def _image_folder(folder, n_good=40):
    folder.mkdir()
    faces, _ = synthetic.synthetic_dataset(n_good, seed=3)
    for i, face in enumerate(faces):
        Image.fromarray(face).save(folder / f"good_{i:02d}.png")
    face = Image.fromarray(faces[0])
    (folder / "truncated.jpg").write_bytes(_jpeg_bytes(face)[:400])
    (folder / "notes.jpg").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    face.resize((8, 8)).save(folder / "tiny.png")
    face.convert("CMYK").save(folder / "cmyk.jpg")
    face.convert("L").save(folder / "gray.png")
    face.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((np.asarray(face.convert("L"), np.uint16) * 257)).save(folder / "deep16.png")
    return {"truncated.jpg", "notes.jpg", "empty.png", "tiny.png"}


def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.slow
def test_training_and_inference_on_a_folder_with_bad_files(tmp_path):
    """Bad files are skipped (and named) when the cache is built; a data worker process
    makes the batches of the rest."""
    bad = _image_folder(tmp_path / "faces")
    work = tmp_path / "w"
    tiny = [a for a in TINY if not a.startswith("--config.stage_steps")]
    r = _run([sys.executable, "-m", "progsr_jax.main", f"--workdir={work}", *tiny,
              "--config.final_stage=1", "--config.stage_steps=(2, 2, 2)",
              "--config.data.source=folder", f"--config.data.root={tmp_path / 'faces'}",
              f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.workers=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 4 of 48" in r.stderr, r.stderr[-3000:]
    for name in bad:
        assert name in r.stderr

    out = tmp_path / "out"
    r = _run([sys.executable, "-m", "progsr_jax.infer", f"--checkpoint={work}",
              f"--input={tmp_path / 'faces'}", f"--output={out}"])
    assert r.returncode == 0, r.stderr[-2000:]
    written = sorted(os.listdir(out))
    assert len(written) == 44, written
    text = r.stdout + r.stderr
    for name in bad:
        assert name in text


@pytest.mark.parametrize("case", ["missing_root", "empty_folder", "batch_zero",
                                  "empty_checkpoint_dir", "evaluate_empty_folder"])
def test_misuse_gives_one_line_error(tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [sys.executable, "-m", "progsr_jax.main", f"--workdir={tmp_path / 'w'}",
            "--config=configs/step3.py:smoke"]
    cmd = {
        "missing_root": base + ["--config.data.source=celeba",
                                f"--config.data.root={tmp_path / 'nowhere'}"],
        "empty_folder": base + ["--config.data.source=folder", f"--config.data.root={empty}"],
        "batch_zero": base + ["--config.batch_size=0"],
        "empty_checkpoint_dir": [sys.executable, "-m", "progsr_jax.infer",
                                 f"--checkpoint={empty}", f"--input={empty}",
                                 f"--output={tmp_path / 'o'}"],
        "evaluate_empty_folder": [sys.executable, "-m", "progsr_jax.evaluate",
                                  "--method=bicubic", "--source=folder", f"--data_root={empty}",
                                  f"--output={tmp_path / 'o'}"],
    }[case]
    r = _run(cmd, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), DEGRADED], ids=["clean", "degraded"])
def test_four_devices_train_like_one(tmp_path, extra):
    """Global batch 8 split over 4 forced host devices ends with the losses of 1 device."""
    finals = {}
    for n in (1, 4):
        env = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} "
                                  f"--xla_force_host_platform_device_count={n}")
        work = tmp_path / f"d{n}"
        r = subprocess.run(_main(work, "--config.batch_size=8", *extra, cache=tmp_path / "cache"),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"devices: {n} x cpu" in r.stderr
        recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
        finals[n] = [r for r in recs if "g_loss" in r][-1]  # the last training record
    for key in ("pixel", "perceptual", "adversarial", "g_loss", "d_loss", "gradient_penalty"):
        a, b = finals[1][key], finals[4][key]
        assert abs(a - b) <= 0.02 * max(abs(a), 1e-3), (key, a, b)
