"""Batches: a stateless, deterministic data order, and the input pipeline that makes them.

:func:`batch_indices` / :func:`get_batch` give a data order in which a batch
is a pure function of ``(seed, step)``, so resuming training at any step
reproduces the exact batches.  :class:`InputPipeline` is the trainers' input,
built on grain: a ``MapDataset`` indexed by step whose element is that step's
batch (:class:`BatchLoader` for super-resolution), made ahead by worker
processes (or a background thread) and put on the devices in a background
thread.  With several processes each process loads only its rows of the
global batch (:func:`local_rows`) and :func:`assemble` makes the global array
from them, without a collective.  Pixel values in super-resolution batches
are float32 in ``[-1, 1]`` (:func:`~progsr_jax.data.images.to_float`).
"""

from __future__ import annotations

import functools
import gc
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from absl import flags

from progsr_jax.data import degradation as degradation_lib
from progsr_jax.data.cache import Dataset, by_path, opened
from progsr_jax.data.images import to_float
from progsr_jax.errors import UserError

#: ``data.workers = -1`` (auto) on a degraded run: half the cores (the rest drive the
#: devices and the train step), at most this many.
MAX_AUTO_WORKERS = 16


@functools.lru_cache(maxsize=8)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.setflags(write=False)
    return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of batch ``step``: a pure function of its arguments.

    The infinite example stream is the concatenation of one permutation per
    epoch; stream position ``k = step * batch_size + j`` is example
    ``permutation(seed, e)[k % num_examples]`` with ``e = k // num_examples``
    and ``permutation(seed, e) = np.random.default_rng([seed, e]).permutation``.
    A batch may straddle two epochs.  No state is kept, so resuming at any
    step gives exactly the batches an uninterrupted run would have seen.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    k = np.arange(batch_size, dtype=np.int64) + np.int64(step) * batch_size
    epochs = k // num_examples
    positions = k % num_examples
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _permutation(num_examples, int(seed), int(e))[positions[sel]]
    return out


def gather(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]``, reading a memmap in ascending order for locality."""
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx),) + arr.shape[1:], arr.dtype)
    out[order] = arr[idx[order]]
    return out


def get_batch(ds: Dataset, step: int, batch_size: int, seed: int, stage: int,
              rows: slice | None = None,
              degradation: degradation_lib.Spec | None = None) -> dict[str, np.ndarray]:
    """Batch ``step`` of the deterministic order (see :func:`batch_indices`).

    ``rows``: only these rows of the global batch (this process's, see
    :func:`local_rows`); the batch itself does not depend on how it is split.
    Returns ``{'lr': float32 (B,16,16,3), 'hr': float32 (B,r,r,3)}`` with
    ``r = 16 * 2**stage`` (stage 1, 2, 3 -> 32, 64, 128; stage 0 gives r = 16),
    values ``uint8 / 127.5 - 1`` in [-1, 1].  With a ``degradation``
    (:mod:`~progsr_jax.data.degradation`) the 16x16 inputs are made from the
    128x128 images now, image ``j`` of the global batch by ``(seed, step, j)``;
    without one they are the cached clean chain.
    """
    return _floats(_make_batch(ds.images, len(ds), step, batch_size, seed, stage, rows,
                               degradation))


def _floats(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A uint8 batch ``{'lr', 'hr'}`` in float32 ``[-1, 1]`` (:func:`to_float` of each)."""
    return {k: to_float(v) for k, v in batch.items()}


def _make_batch(images: dict[int, np.ndarray], num_examples: int, step: int, batch_size: int,
                seed: int, stage: int, rows: slice | None,
                degradation: degradation_lib.Spec | None) -> dict[str, np.ndarray]:
    """:func:`get_batch` in uint8."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    rows = rows or slice(None)
    idx = batch_indices(num_examples, batch_size, seed, step)[rows]
    r = 16 * 2 ** stage
    hr = gather(images[r], idx)
    if degradation is None:
        lr = gather(images[16], idx)
    else:
        hr128 = hr if r == 128 else gather(images[128], idx)
        positions = np.arange(batch_size)[rows]  # places in the global batch
        lr = degradation_lib.degrade(hr128, degradation, seed, step, positions)
    return {"lr": lr, "hr": hr}


class BatchLoader:
    """``step -> get_batch(ds, step, batch_size, seed, stage, rows, degradation)`` in uint8.

    The element of the super-resolution trainer's :class:`InputPipeline`,
    made float by :meth:`finish` in the training process: a quarter of the
    bytes cross from a worker, and the result is :func:`get_batch`'s, byte
    for byte.
    ``stages``: the stage of every step, an int or the run's schedule
    ``((stage, end_step), ...)`` (a step takes the first pair with ``step <
    end_step``), so that one pipeline, one set of workers, serves every stage
    of a run.  Pickled for a worker process with the decode cache's memory
    maps by path (:func:`~progsr_jax.data.cache.by_path`): the worker opens
    the cache, it does not receive a copy (images held in memory are copied).
    """

    def __init__(self, ds: Dataset, batch_size: int, seed: int,
                 stages: int | Sequence[tuple[int, int]], rows: slice | None = None,
                 degradation: degradation_lib.Spec | None = None):
        self.images = dict(ds.images)
        self.num_examples = len(ds)
        self.batch_size, self.seed, self.rows = int(batch_size), int(seed), rows
        self.stages = ((int(stages), None),) if isinstance(stages, int) else tuple(
            (int(k), int(end)) for k, end in stages)
        self.degradation = degradation

    def stage(self, step: int) -> int:
        for k, end in self.stages:
            if end is None or step < end:
                return k
        raise ValueError(f"step {step} is past the last stage's end ({self.stages[-1][1]})")

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return _make_batch(self.images, self.num_examples, step, self.batch_size, self.seed,
                           self.stage(step), self.rows, self.degradation)

    #: ``batch -> batch`` in float32 ``[-1, 1]``: the :class:`InputPipeline`'s ``finish``.
    finish = staticmethod(_floats)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, images=by_path(self.images))

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, images=opened(state["images"]))


def local_rows(sharding: Any, batch_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` that this process's devices hold.

    ``sharding`` splits the leading axis (``PartitionSpec('data')``); the
    process's devices must hold one contiguous block of rows, as the mesh of
    :func:`progsr_jax.training.core.data_parallel` (devices ordered by
    process) gives.  One process: ``slice(0, batch_size)``.
    """
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        s = index[0] if index else slice(None)
        start, stop, _ = s.indices(batch_size)
        starts.append(start)
        stops.append(stop)
    blocks = sorted(set(zip(starts, stops)))  # devices holding the same rows count once
    if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])):
        raise ValueError(f"this process's devices do not hold one block of the batch: {blocks}")
    return slice(blocks[0][0], blocks[-1][1])


def assemble(local: Any, sharding: Any) -> Any:
    """The global arrays whose rows of this process are ``local`` (a pytree of arrays).

    ``jax.make_array_from_process_local_data``: each process passes only its
    rows (:func:`local_rows`) and nothing is exchanged between processes; with
    one process this is ``jax.device_put(local, sharding)``.
    """
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def workers_for(setting: int, degraded: bool) -> int:
    """The worker processes of :class:`InputPipeline` for the ``data.workers`` setting.

    ``-1`` (auto): none for clean batches (the cached chain is copied at tens of
    thousands of images/s in-process), half the CPU cores (at most
    :data:`MAX_AUTO_WORKERS`, at least 1) for degraded ones, which cost a core
    0.7-2 ms per image (docs/data.md).  ``0``: in-process (a background thread).
    """
    setting = int(setting)
    if setting < -1:
        raise UserError(f"invalid config: data.workers must be >= 0, or -1 (auto), got {setting}")
    if setting >= 0:
        return setting
    return min(MAX_AUTO_WORKERS, max(1, (os.cpu_count() or 1) // 2)) if degraded else 0


class WorkerDied(UserError):
    """A worker process of :class:`InputPipeline` ended without being asked to."""


# grain's message for a worker process that ended unexpectedly (it checks the exit code).
_DIED = re.compile(r"terminated unexpectedly with exit code (-?\d+)")


def _cause(exit_code: int) -> str:
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}" + (": out of memory?" if name == "SIGKILL" else "")
    return f"exit status {exit_code}: its error is printed above"


def _exit_with(parent: int) -> None:
    """Ends this worker process when its parent has gone (killed: nothing stopped us)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _worker_init(index: int, count: int, parent: int) -> None:
    """Runs first in each worker process of :class:`InputPipeline`.

    The training process stops its workers itself (on SIGTERM and Ctrl-C it
    saves a checkpoint first), so a worker ignores those signals, which a
    terminal or a scheduler sends to the whole process group; and it ends when
    the training process dies without stopping it (SIGKILL).
    """
    del index, count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), name="progsr-parent-watch",
                     daemon=True).start()


class _Numbered:
    """``step -> (step, load(step))``: the element, numbered so its order is checked."""

    def __init__(self, load: Callable[[int], Any]):
        self.load = load

    def __call__(self, step) -> tuple[int, Any]:
        step = int(step)
        return step, self.load(step)


class _Finish:
    """``(step, batch) -> (step, batch finished and on the devices)``, in the training process."""

    def __init__(self, finish: Callable[[Any], Any] | None, sharding: Any):
        self.finish, self.sharding = finish, sharding

    def __call__(self, item: tuple[int, Any]) -> tuple[int, Any]:
        step, batch = item
        if self.finish is not None:
            batch = self.finish(batch)
        if self.sharding is not None:
            batch = assemble(batch, self.sharding)
        return step, batch


class InputPipeline:
    """``(step, load(step))`` for steps ``start_step .. end_step - 1``, in order.

    The one input pipeline of the trainers, built on grain: a
    ``grain.MapDataset`` over the steps whose element is ``load(step)``
    (:class:`BatchLoader`, or the distillation's loader; with several
    processes, this process's rows of the batch).  Elements are made ahead:

    * ``workers > 0``: in that many worker processes (grain's
      ``mp_prefetch``, started with "spawn"; worker ``i`` makes the steps
      ``start_step + i + k * workers``, ``buffer`` of them ahead), the arrays
      coming back through shared memory.  ``load`` is pickled for them: the
      decode cache's memory maps cross by path (:class:`BatchLoader`).
    * ``workers == 0``: in a background thread of this process.

    In another background thread of this process, which keeps ``buffer``
    batches ready, ``finish(batch)`` (e.g. :meth:`BatchLoader.finish`: uint8
    crosses from the workers, a quarter of float32's bytes) and, with ``sharding``
    (a ``jax.sharding.Sharding``), :func:`assemble` make each batch a global
    array (nothing exchanged between processes).
    Iterating yields ``(step, batch)``; :meth:`until` stops before a step.
    An exception in ``load`` is re-raised here with its type; a worker that
    dies raises :class:`WorkerDied`.  Use as a context manager or call
    :meth:`close`: it stops the workers (and the threads).  Workers ignore
    SIGINT / SIGTERM (the training process stops them after its checkpoint)
    and end by themselves when the training process is killed.
    """

    def __init__(self, load: Callable[[int], Any], start_step: int, end_step: int, *,
                 workers: int = 0, finish: Callable[[Any], Any] | None = None,
                 sharding: Any = None, buffer: int = 2):
        # grain imports jax and orbax (about a second): only the trainers need it.
        import grain

        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if not flags.FLAGS.is_parsed():
            # grain reads its absl flags from the global FLAGS; our commands parse theirs
            # into a private FlagValues (progsr_jax.cli), so grain's keep their defaults.
            flags.FLAGS.mark_as_parsed()
        self.start_step, self.end_step, self.workers = int(start_step), int(end_step), workers
        self._next = self.start_step
        buffer = max(1, int(buffer))
        ds = grain.MapDataset.range(self.start_step, max(self.start_step, self.end_step))
        ds = ds.map(_Numbered(load)).to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        if workers > 0:
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer),
                worker_init_fn=functools.partial(_worker_init, parent=os.getpid()))
        if finish is not None or sharding is not None:
            ds = ds.map(_Finish(finish, sharding))
        self._it = iter(grain.experimental.ThreadPrefetchIterDataset(
            ds, prefetch_buffer_size=buffer))

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._it is None or self._next >= self.end_step:
            raise StopIteration
        try:
            step, batch = next(self._it)
        except RuntimeError as e:
            died = _DIED.search(str(e))
            if died is None:
                raise
            self.close()
            raise WorkerDied(f"a data worker process died ({_cause(int(died.group(1)))}) "
                             f"before the batch of iteration {self._next} was made; fewer "
                             "data.workers need less memory, 0 makes the batches in-process"
                             ) from None
        if step != self._next:
            raise RuntimeError(f"input pipeline out of order: step {step}, expected {self._next}")
        self._next += 1
        return step, batch

    def until(self, end_step: int) -> Iterator[tuple[int, Any]]:
        """The next ``(step, batch)`` items up to step ``end_step - 1``: one stage of a run."""
        while self._next < min(end_step, self.end_step):
            yield next(self)

    def close(self) -> None:
        """Stops the workers and threads and drops the batches made ahead; safe to call twice."""
        it, self._it = self._it, None
        if it is not None:
            it.close()
            del it
            # grain's iterators hold batches in reference cycles: free them (and their
            # shared memory) now, not at interpreter exit, when freeing them fails.
            gc.collect()

    def __enter__(self) -> "InputPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_throughput(ds: Dataset, batch_size: int = 16, steps: int = 50,
                       stage: int = 3) -> float:
    """Images per second of :func:`get_batch` (one warm-up batch not timed)."""
    get_batch(ds, 0, batch_size, 0, stage)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        get_batch(ds, step, batch_size, 0, stage)
    return steps * batch_size / (time.perf_counter() - t0)
