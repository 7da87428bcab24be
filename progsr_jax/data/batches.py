"""Batches: a stateless, deterministic data order and one background prefetcher.

:func:`batch_indices` / :func:`get_batch` give a data order in which a batch
is a pure function of ``(seed, step)``, so resuming training at any step
reproduces the exact batches.  :class:`Prefetcher` produces batches in a
background thread and puts them on device.  With several processes each
process loads only its rows of the global batch (:func:`local_rows`) and
:func:`assemble` makes the global array from them, without a collective.
Pixel values in super-resolution batches are float32 in ``[-1, 1]``
(:func:`~progsr_jax.data.images.to_float`).
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from progsr_jax.data import degradation as degradation_lib
from progsr_jax.data.cache import Dataset
from progsr_jax.data.images import to_float


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
              rows: slice | None = None, degradation: degradation_lib.Spec | None = None,
              threads: int = 1) -> dict[str, np.ndarray]:
    """Batch ``step`` of the deterministic order (see :func:`batch_indices`).

    ``rows``: only these rows of the global batch (this process's, see
    :func:`local_rows`); the batch itself does not depend on how it is split.
    Returns ``{'lr': float32 (B,16,16,3), 'hr': float32 (B,r,r,3)}`` with
    ``r = 16 * 2**stage`` (stage 1, 2, 3 -> 32, 64, 128; stage 0 gives r = 16),
    values ``uint8 / 127.5 - 1`` in [-1, 1].  With a ``degradation``
    (:mod:`~progsr_jax.data.degradation`) the 16x16 inputs are made from the
    128x128 images now, image ``j`` of the global batch by ``(seed, step, j)``,
    in ``threads`` threads; without one they are the cached clean chain.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    rows = rows or slice(None)
    idx = batch_indices(len(ds), batch_size, seed, step)[rows]
    r = 16 * 2 ** stage
    hr = gather(ds.images[r], idx)
    if degradation is None:
        lr = gather(ds.images[16], idx)
    else:
        hr128 = hr if r == 128 else gather(ds.images[128], idx)
        positions = np.arange(batch_size)[rows]  # places in the global batch
        lr = degradation_lib.degrade(hr128, degradation, seed, step, positions, threads=threads)
    return {"lr": to_float(lr), "hr": to_float(hr)}


def batch_loader(ds: Dataset, batch_size: int, seed: int, stage: int,
                 rows: slice | None = None, degradation: degradation_lib.Spec | None = None,
                 threads: int = 1) -> Callable[[int], dict]:
    """``step -> get_batch(ds, step, batch_size, seed, stage, rows, ...)``, what
    :class:`Prefetcher` runs."""
    return functools.partial(get_batch, ds, batch_size=batch_size, seed=seed, stage=stage,
                             rows=rows, degradation=degradation, threads=threads)


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


class Prefetcher:
    """Produces ``load(step)`` for steps ``start_step .. end_step - 1`` in a thread.

    The one prefetcher of the project: the super-resolution trainer loads
    :func:`get_batch` with it, the landmark distillation its (image, heatmap)
    batches.  Iterating yields ``(step, batch)`` in order.  With ``sharding``
    (a ``jax.sharding.Sharding``) each batch (any pytree of arrays; with
    several processes, this process's rows of it) is made a global array with
    :func:`assemble` in the background thread, which exchanges nothing between
    processes (``jax.device_put`` would compare the values across hosts, a
    collective racing the train step's).
    At most ``buffer`` batches wait in the queue.  An exception in the thread
    is re-raised in the consumer.  Use as a context manager or call
    :meth:`close` to stop early.
    """

    _DONE = object()

    def __init__(self, load: Callable[[int], Any], start_step: int, end_step: int,
                 sharding: Any = None, buffer: int = 2):
        self.load, self.start_step, self.end_step = load, int(start_step), int(end_step)
        self.sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(buffer)))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="progsr-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Puts ``item`` unless asked to stop; returns False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            put_on_device = None
            if self.sharding is not None:
                put_on_device = functools.partial(assemble, sharding=self.sharding)
            for step in range(self.start_step, self.end_step):
                if self._stop.is_set():
                    return
                batch: Any = self.load(step)
                if put_on_device is not None:
                    batch = put_on_device(batch)
                if not self._put((step, batch)):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        while not self._finished:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                # Closed from elsewhere, or the thread ended without a final item.
                if self._stop.is_set() or (not self._thread.is_alive() and self._queue.empty()):
                    self._finished = True
                    return
                continue
            if item is self._DONE:
                self._finished = True
                return
            if isinstance(item, BaseException):
                self._finished = True
                self.close()
                raise item
            yield item

    def close(self):
        """Stops the thread and drops queued batches; safe to call twice."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._finished = True

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:  # noqa: BLE001
            pass


def measure_throughput(ds: Dataset, batch_size: int = 16, steps: int = 50,
                       stage: int = 3) -> float:
    """Images per second of :func:`get_batch` (one warm-up batch not timed)."""
    get_batch(ds, 0, batch_size, 0, stage)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        get_batch(ds, step, batch_size, 0, stage)
    return steps * batch_size / (time.perf_counter() - t0)
