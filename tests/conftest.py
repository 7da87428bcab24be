"""Shared test fixtures.

Real data and weights live in ``../shared`` beside the repository (override
with ``PROGSR_SHARED=/path``).  Tests that need them skip with a clear reason
when they are absent, so a fresh clone still passes.
"""

from __future__ import annotations

import os

# Faster XLA:CPU compiles for the whole suite, its subprocesses included: the models
# here are tiny, so compiling is most of a test's time, and every comparison runs both
# of its sides under the same flags.  (The code runs slower; no test times anything.)
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import importlib.util  # noqa: E402 - after XLA_FLAGS is set
import pathlib  # noqa: E402

import jax
import numpy as np
import pytest

from progsr_jax import data
from progsr_jax.data import teacher
from progsr_jax.errors import UserError
from progsr_jax.inference import checkpoints as checkpoint
from progsr_jax.nets import gan
from progsr_jax.nets.fan import StudentFAN
from progsr_jax.photo import mtcnn
from progsr_jax.training import config as config_files
from progsr_jax.training.distill import state as distill_state

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("PROGSR_SHARED", REPO.parent / "shared"))


def _need(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set PROGSR_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def shared_path() -> pathlib.Path:
    """Where the shared folder would be (it may not exist: for tests with a fallback)."""
    return SHARED


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    return _need(SHARED, "shared data folder")


@pytest.fixture(scope="session")
def celeba_root() -> pathlib.Path:
    return _need(SHARED / "data" / "celeba", "CelebA subset")


@pytest.fixture(scope="session")
def faces68_root() -> pathlib.Path:
    return _need(SHARED / "data" / "faces68", "faces68 landmark data")


@pytest.fixture(scope="session")
def distilled_fan_file() -> pathlib.Path:
    return _need(SHARED / "weights" / "distilled_fan" / "compressed_model_011000.pth",
                 "released distilled FAN weights")


@pytest.fixture(scope="session")
def mtcnn_weights() -> pathlib.Path:
    """MTCNN's weights folder (from facenet-pytorch's wheel), or skip with the install command."""
    try:
        return mtcnn.weights_dir()
    except UserError as e:
        pytest.skip(f"MTCNN weights not installed ({mtcnn.PIP_COMMAND}): {e}")


def _tiny_sr_config(**overrides):
    """A 2+2+2-iteration SR run on 8 synthetic faces at a sixteenth of the width."""
    c = config_files.load("step3.py", "smoke")
    c.model.width = 0.0625
    c.batch_size = 2
    c.stage_steps = (2, 2, 2)
    c.fade_steps = 1
    c.log_every = 1
    c.checkpoint_every = 2
    c.sample_every = 100
    c.num_samples = 2
    c.data.num_synthetic = 8
    c.data.num_workers = 0
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**{"dotted.field": value})``: :func:`_tiny_sr_config`."""
    return _tiny_sr_config


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A sixteenth-width step-3 generator (random weights) saved as a converted checkpoint."""
    _, variables = gan.init_generator(0, width=0.0625)
    path = tmp_path_factory.mktemp("tiny_generator") / "ckpt"
    meta = {"stage": 3, "alpha": 1.0, "iteration": 0, "width": 0.0625, "dtype": "float32",
            "format": checkpoint.FORMAT}
    checkpoint.save_converted(str(path), jax.device_get(variables), None, meta)
    return path


def load_tool(name: str):
    """``tools/<name>.py`` as a module (tools are scripts, not package modules)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tool_module():
    """``tool_module("face_size_sweep")``: a tool script loaded as a module."""
    return load_tool


@pytest.fixture(scope="session")
def convert_fan_tool():
    return load_tool("convert_fan_weights")


class _FakeSR:
    """A stand-in for ``inference.load()``: 8x nearest-neighbour upsampling times ``gain``
    (1.05 leaves [-1, 1], to test clipping); records the batch size of every call."""

    step, alpha, output_size = 3, 1.0, 128

    def __init__(self, gain: float = 1.0):
        self.gain = gain
        self.calls = []

    def __call__(self, x):
        x = np.asarray(x, np.float32)
        assert x.shape[1:] == (16, 16, 3) and -1.0 <= x.min() and x.max() <= 1.0
        self.calls.append(x.shape[0])
        return np.repeat(np.repeat(x, 8, axis=1), 8, axis=2) * np.float32(self.gain)


@pytest.fixture(scope="session")
def fake_sr_type():
    """The class of a fake super-resolver: ``fake_sr_type(gain=1.0)``."""
    return _FakeSR


def _write_teacher(directory, files, heatmaps, teacher_name="synthetic-random", crop="none"):
    """A complete teacher folder (the format of progsr_jax.data.teacher) holding ``heatmaps``."""
    os.makedirs(directory, exist_ok=True)
    n = len(files)
    with open(os.path.join(directory, teacher.FILES_FILE), "w") as f:
        f.write("".join(name + "\n" for name in files))
    hm = np.lib.format.open_memmap(os.path.join(directory, teacher.HEATMAPS_FILE), mode="w+",
                                   dtype=np.float16, shape=(n,) + teacher.HEATMAP_SHAPE)
    hm[:] = heatmaps.astype(np.float16)
    hm.flush()
    del hm
    teacher.write_json_atomic(os.path.join(directory, teacher.PROGRESS_FILE),
                              {"done": [0], "bad": {}})
    teacher.write_json_atomic(os.path.join(directory, teacher.META_FILE), {
        "format": teacher.FORMAT, "version": teacher.VERSION, "teacher": teacher_name,
        "dtype": "float16", "num_images": n, "shape": list(teacher.HEATMAP_SHAPE),
        "chunk_size": n, "weights_sha256": teacher_name, "crop": crop, "split": "train"})


def child_processes(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of the running children of process ``pid`` (Linux /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":  # (zombies are not running)
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):  # it ended while we looked
            continue
    return out


def survivors(pids, timeout: float = 30.0) -> list[int]:
    """The processes of ``pids`` still running (not ended, nor zombies) after up to
    ``timeout`` seconds."""
    import time

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.time() + timeout
    while True:
        left = [p for p in pids if running(p)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.1)


class _Processes:
    children = staticmethod(child_processes)
    survivors = staticmethod(survivors)


@pytest.fixture(scope="session")
def processes():
    """``processes.children(pid)`` (:func:`child_processes`) and ``processes.survivors(pids,
    timeout)`` (:func:`survivors`); skips where Linux's /proc is absent."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc to list child processes")
    return _Processes


@pytest.fixture(scope="session")
def write_teacher():
    """``write_teacher(directory, files, heatmaps, teacher_name=..., crop=...)``: a teacher folder."""
    return _write_teacher


@pytest.fixture(scope="module")
def synthetic_teacher(tmp_path_factory):
    """Teacher heatmaps of a random StudentFAN (width 0.25) on the distillation smoke config's
    32 faces."""
    tmp = tmp_path_factory.mktemp("teacher")
    c = config_files.load("distill_fan.py", "smoke")
    c.data.cache_dir = str(tmp / "cache")
    ds = data.build_dataset(config_files.data_config(c, "train"), progress=False, log=lambda m: None)
    module = StudentFAN(width=0.25)
    variables = distill_state.create_state(c, module)  # a random student of another width
    variables = {"params": variables.params, "batch_stats": variables.batch_stats}
    x = np.asarray(ds.images[64], np.float32) / 255.0
    hm = np.asarray(jax.jit(module.apply)(variables, x))
    _write_teacher(tmp / "hm", ds.files, hm)
    return tmp / "hm"
