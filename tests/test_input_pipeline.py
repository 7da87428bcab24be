"""The trainers' input pipeline (progsr_jax.data.InputPipeline, built on grain).

Batches made by 0, 1 or 2 worker processes are the landed batch functions'
(``data.get_batch``, the distillation split's ``inputs`` / ``targets``) byte
for byte; the workers open the decode cache instead of receiving a copy; an
exception in a worker comes back with its type; a killed worker is one clear
error; workers ignore SIGINT / SIGTERM and none is left behind.  A worker pool
costs a few seconds to start (spawn), so the checks share few of them: one
per worker count in the identity test and one in the kill test.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import cloudpickle
import numpy as np
import pytest

from progsr_jax import data
from progsr_jax.data import degradation
from progsr_jax.data import teacher as teacher_lib
from progsr_jax.errors import UserError
from progsr_jax.training import config as config_files
from progsr_jax.training.distill import data as distill_data
from progsr_jax.training.sr import config as sr_config

REAL = degradation.from_config("real")
MILD = degradation.from_config("mild")
#: Stage 1 before step 10, then stage 3: one pipeline serves a run's stages.
STAGES = ((1, 10), (3, 100))
#: How a worker process of the pipeline shows in ``ps``.
WORKER = "from multiprocessing.spawn import spawn_main"


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """24 synthetic faces in a decode cache (memory-mapped)."""
    cache = tmp_path_factory.mktemp("cache")
    return data.build_dataset(dict(source="synthetic", num_synthetic=24, seed=1,
                                   cache_dir=str(cache)), progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def split(faces, tmp_path_factory, write_teacher):
    """A distillation split of 20 of the faces with random teacher heatmaps."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("teacher") / "hm"
    write_teacher(folder, faces.files, rng.uniform(0, 1, (len(faces), 64, 64, 68)))
    rows = np.arange(3, 23)
    return distill_data.Split("train", [faces.files[i] for i in rows], faces.images, rows,
                              rows[::-1].copy(), teacher_lib.open(folder))


def _stage(step: int) -> int:
    return next(k for k, end in STAGES if step < end)


class Everything:
    """Every kind of batch of a step in one element (one worker pool checks them all),
    and where it was made; step ``bad_step`` raises as a broken cache would."""

    def __init__(self, faces, split, bad_step):
        self.loaders = {
            "clean": data.BatchLoader(faces, 8, 3, STAGES),
            "real_rows": data.BatchLoader(faces, 8, 3, STAGES, rows=slice(2, 6), degradation=REAL),
            "mild": data.BatchLoader(faces, 8, 5, 3, degradation=MILD)}
        self.distill = distill_data.BatchLoader(split, 6, 3, rows=slice(3, 6))
        self.bad_step = bad_step

    def __call__(self, step):
        if step == self.bad_step:
            raise KeyError(f"no image for step {step}")
        out = {name: load(step) for name, load in self.loaders.items()}
        out["distill"] = self.distill(step)
        images = self.loaders["real_rows"].images[128]
        out["made_in"] = {"pid": os.getpid(), "mapped": isinstance(images, np.memmap),
                          "file": getattr(images, "filename", None)}
        return out

    def finish(self, batch):
        """In the training process: the super-resolution batches made float."""
        return {k: data.BatchLoader.finish(v) if k in self.loaders else v
                for k, v in batch.items()}


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    got = np.asarray(got)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_are_the_landed_functions_byte_for_byte(faces, split, workers):
    first, bad = 4, 19
    load = Everything(faces, split, bad)
    with data.InputPipeline(load, first, 30, workers=workers, finish=load.finish) as pipe:
        steps = []
        for step, got in pipe.until(bad):
            steps.append(step)
            stage = _stage(step)
            want = {"clean": data.get_batch(faces, step, 8, 3, stage),
                    "real_rows": data.get_batch(faces, step, 8, 3, stage, rows=slice(2, 6),
                                                degradation=REAL),
                    "mild": data.get_batch(faces, step, 8, 5, 3, degradation=MILD)}
            for name, batch in want.items():
                for key in ("lr", "hr"):
                    assert _same(got[name][key], batch[key]), (workers, step, name, key)
            idx = data.batch_indices(len(split), 6, 3, step)[3:6]
            assert _same(got["distill"][0], split.inputs(idx))
            assert _same(got["distill"][1], split.targets(idx))
            where = got["made_in"]
            assert (where["pid"] != os.getpid()) == (workers > 0)
            # the worker opened the decode cache's file: it got no copy of the images
            assert where["mapped"] and where["file"] == faces.images[128].filename
        assert steps == list(range(first, bad))
        # An exception in the batch function comes back with its type and message.
        with pytest.raises(KeyError, match="no image for step 19"):
            next(pipe)


def test_loaders_cross_to_workers_by_path(faces, split):
    """What a worker receives: the cache's and the teacher's file names, not their bytes."""
    loader = data.BatchLoader(faces, 8, 2, STAGES, rows=slice(0, 4), degradation=REAL)
    blob = cloudpickle.dumps(loader)  # how grain sends it
    arrays = sum(a.nbytes for a in faces.images.values())
    assert len(blob) < 4096 < arrays, (len(blob), arrays)
    again = cloudpickle.loads(blob)
    for r, a in faces.images.items():
        assert isinstance(again.images[r], np.memmap) and again.images[r].filename == a.filename
    for step in (0, 12):
        for key in ("lr", "hr"):
            assert again(step)[key].dtype == np.uint8  # made float in the training process
            assert _same(again(step)[key], loader(step)[key])
            assert _same(loader.finish(again(step))[key],
                         data.get_batch(faces, step, 8, 2, _stage(step), slice(0, 4), REAL)[key])

    distill = distill_data.BatchLoader(split, 6, 1)
    blob = cloudpickle.dumps(distill)
    heatmaps = os.path.getsize(os.path.join(split.teacher.directory, teacher_lib.HEATMAPS_FILE))
    assert len(blob) < 4096 < heatmaps, (len(blob), heatmaps)
    again = cloudpickle.loads(blob)
    assert isinstance(again.split.images[64], np.memmap) and again.split.files == []
    for got, want in zip(again(7), distill(7)):
        assert _same(got, want)

    # Images held in memory (no cache folder) are copied: correct, only bigger.
    in_memory = data.Dataset(faces.files, {r: np.array(a) for r, a in faces.images.items()})
    assert len(cloudpickle.dumps(data.BatchLoader(in_memory, 8, 0, 1))) > arrays


def test_in_process_pipeline_on_devices_stages_and_early_close(faces):
    jax = pytest.importorskip("jax")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loader = data.BatchLoader(faces, 4, 0, STAGES)
    before = {t.ident for t in threading.enumerate()}
    with data.InputPipeline(loader, 8, 14, finish=loader.finish, sharding=sharding) as pipe:
        stage1 = list(pipe.until(10))
        (s10, b10), = list(pipe.until(11))
    assert [s for s, _ in stage1] == [8, 9] and s10 == 10
    assert isinstance(b10["hr"], jax.Array) and b10["hr"].sharding == sharding
    assert b10["hr"].shape == (4, 128, 128, 3)  # stage 3 from step 10 on
    assert _same(np.asarray(b10["hr"]), data.get_batch(faces, 10, 4, 0, 3)["hr"])
    # Closed before its end: its threads end.
    deadline = time.time() + 10
    while time.time() < deadline and any(
            t.ident not in before and t.name.startswith("grain") for t in threading.enumerate()):
        time.sleep(0.05)
    assert [t.name for t in threading.enumerate()
            if t.ident not in before and t.name.startswith("grain")] == []


def test_a_killed_worker_is_one_clear_error_and_leaves_nothing_behind(faces, processes):
    me = os.getpid()
    before = set(processes.children(me))
    pipe = data.InputPipeline(data.BatchLoader(faces, 8, 0, 3, degradation=REAL), 0, 100_000,
                              workers=2)  # (uint8 batches: no finish needed here)
    workers = []
    try:
        for _ in range(3):
            next(pipe)
        workers = [p for p, cmd in processes.children(me).items()
                   if p not in before and WORKER in cmd]
        assert len(workers) == 2, processes.children(me)
        # A terminal's Ctrl-C or a scheduler's SIGTERM to the process group: the training
        # process decides (it saves a checkpoint, then stops the workers).
        os.kill(workers[1], signal.SIGINT)
        os.kill(workers[1], signal.SIGTERM)
        for _ in range(4):
            next(pipe)
        assert processes.survivors([workers[1]], timeout=0) == [workers[1]]

        os.kill(workers[0], signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(data.WorkerDied) as e:
            for _ in range(100_000):  # the batches made before the death come first
                next(pipe)
        message = str(e.value)
        assert time.time() - t0 < 60
        assert message.startswith("a data worker process died (killed by SIGKILL"), message
        assert "data.workers" in message and "\n" not in message
        assert isinstance(e.value, UserError)  # a command prints it as one error line
    finally:
        pipe.close()
    assert processes.survivors(workers) == []


def test_how_many_workers():
    cores = os.cpu_count() or 1
    assert data.workers_for(-1, degraded=False) == 0
    assert data.workers_for(-1, degraded=True) == min(data.batches.MAX_AUTO_WORKERS,
                                                      max(1, cores // 2))
    assert data.workers_for(3, degraded=False) == 3 and data.workers_for(0, degraded=True) == 0
    with pytest.raises(UserError, match="data.workers"):
        data.workers_for(-2, degraded=True)
    for name in ("step3.py:smoke", "distill_fan.py:smoke"):
        c = config_files.load(*name.split(":"))
        assert c.data.workers == -1
    c = config_files.load("step3.py", "smoke")
    c.data.workers = -3
    with pytest.raises(UserError, match=r"data.workers must be an integer >= 0 .* or -1"):
        sr_config.validate(c)
