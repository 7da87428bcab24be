"""The training machinery both trainers share.

* :func:`data_parallel`: the device mesh and the two shardings of data
  parallelism (replicated state, batch split over the ``data`` axis).
* :class:`StopSignal`: SIGTERM/SIGINT ask the loop to checkpoint and exit;
  with several processes a signal on any one of them stops all at the same
  step.
* :func:`nonfinite_bits` / :func:`keep_if_finite`: the in-graph non-finite
  check: a step whose loss or gradient norm is not finite leaves the state
  as it was, and says which terms were bad.
* :func:`train_loop`: the loop itself: steps from the input pipeline
  (:class:`progsr_jax.data.InputPipeline`), metrics averaged over each log
  window (with images/s), hooks after every step, a checkpoint every
  ``checkpoint_every`` steps, at the end, on a signal and before a data
  worker's death ends the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from progsr_jax.data import WorkerDied, writing
from progsr_jax.errors import UserError
from progsr_jax.training import distributed, reporting, resume


@dataclasses.dataclass(frozen=True)
class Shardings:
    mesh: Mesh
    replicated: NamedSharding  # parameters, optimiser state, scalars
    batch: NamedSharding  # the leading (batch) axis split over all devices


def data_parallel(devices: Sequence[Any] | None = None) -> Shardings:
    """Data parallelism over ``devices`` (default: all, on every host).

    The devices are grouped by process (a stable sort), so that each process
    holds one block of rows of the batch (:func:`progsr_jax.data.local_rows`).
    """
    ordered = sorted(devices or jax.devices(), key=lambda d: d.process_index)
    mesh = Mesh(np.array(ordered), ("data",))
    return Shardings(mesh, NamedSharding(mesh, PartitionSpec()),
                     NamedSharding(mesh, PartitionSpec("data")))


def describe_devices() -> str:
    devices = jax.devices()
    return (f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind}); "
            f"process {jax.process_index()} of {jax.process_count()}")


class StopSignal:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits cleanly.

    A second signal gives up at once (KeyboardInterrupt).  :meth:`agreed` is
    what the loop asks: with one process, whether a signal came; with
    several, whether one came to any of them, asked only at the steps every
    process checks (``check``: the log cadence), so that all stop, save and
    exit at the same step.  (A preemption notice arrives as SIGTERM on one
    host; a process that stopped alone would wait in the checkpoint's
    barrier while the others wait in the next step's collectives.)
    """

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def agreed(self, check: bool) -> bool:
        """Whether to stop after this step (a collective when several processes run)."""
        if jax.process_count() == 1:
            return self.signal is not None
        return check and distributed.any_process(self.signal is not None)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def nonfinite_bits(metrics: dict, names: Sequence[str]) -> jnp.ndarray:
    """In-graph bitmask: bit ``i`` is set when ``metrics[names[i]]`` is not finite."""
    return sum(jnp.where(jnp.isfinite(metrics[n]), 0, 1 << i) for i, n in enumerate(names))


def bit_names(mask: int, names: Sequence[str]) -> list[str]:
    return [n for i, n in enumerate(names) if int(mask) & (1 << i)]


def keep_if_finite(ok, new_state, old_state):
    """``new_state`` where ``ok`` (a scalar bool), else ``old_state``, leaf by leaf (in-graph)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new_state, old_state)


def diverged(names: Iterable[str], step: int, latest_checkpoint: int | None,
             hint: str) -> UserError:
    """The one-line error of a run that met a non-finite loss or gradient."""
    where = (f"the last good checkpoint is iteration {latest_checkpoint}"
             if latest_checkpoint is not None else "no checkpoint had been saved yet")
    return UserError(f"training diverged: non-finite {', '.join(names)} at iteration {step} "
                     f"({where}); {hint}")


def mean_metrics(host_metrics: list[dict], skip: Iterable[str] = ()) -> dict[str, float]:
    """The mean of each metric over the steps of one log window."""
    skip = set(skip)
    keys = [k for k in host_metrics[0] if k not in skip] if host_metrics else []
    return {k: float(np.mean([m[k] for m in host_metrics])) for k in keys}


@dataclasses.dataclass
class Hooks:
    """What a trainer does around the shared loop (see :func:`train_loop`).

    ``log(done, host_metrics, images_per_sec)`` every ``log_every`` steps, at
    the end and on a signal, after ``check(state)``; ``after_step(done,
    state, last)`` after every step (samples, validation); ``save(done,
    state)`` every ``checkpoint_every`` steps, at the end and on a signal.
    """

    log: Callable[[int, list, float], None]
    save: Callable[[int, Any], None]
    check: Callable[[Any], None] = lambda state: None
    after_step: Callable[[int, Any, bool], None] = lambda done, state, last: None


def train_loop(state, step_fn: Callable, batches: Iterable, *, end: int, batch_size: int,
               log_every: int, checkpoint_every: int, hooks: Hooks, stop: StopSignal, bar,
               info: Callable[[str], None]):
    """Runs ``state, metrics = step_fn(state, step, batch)`` for each ``(step, batch)``.

    Metrics stay on the device until a log step.  On a signal the loop saves
    a checkpoint and exits the process with status 0 (re-running the same
    command resumes); with several processes at the first log step after
    the signal, on all processes (:meth:`StopSignal.agreed`).  A data worker
    process that dies (:class:`progsr_jax.data.WorkerDied`) ends the run with
    a UserError naming the cause, after a checkpoint of the last iteration
    done (one process; with several, a lone checkpoint would wait for the
    others: the run resumes from the last regular one).
    """
    pending, t_last, n_last = [], time.time(), None
    done = saved = None
    batches = iter(batches)
    while True:
        try:
            step, batch = next(batches)
        except StopIteration:
            return state
        except WorkerDied as e:
            if stop.signal is not None and jax.process_count() == 1:
                # Ctrl-C reached a worker before it could ignore it: the stop asked for.
                _save_once(hooks, state, done, saved)
                info(f"stopped by signal {stop.signal}; checkpoint saved, re-run the same "
                     "command to resume")
                raise SystemExit(0) from None
            where = "the run resumes from its last checkpoint"
            if jax.process_count() == 1 and _save_once(hooks, state, done, saved):
                where = f"checkpoint saved at iteration {done}"
            raise UserError(f"{e}; {where}: re-run the same command to resume") from None
        if n_last is None:
            n_last = step
        state, metrics = step_fn(state, step, batch)
        del batch  # its host buffers (shared memory from a worker) go now
        pending.append(metrics)
        done = step + 1
        last = done == end
        stopping = stop.agreed(done % log_every == 0 or last)
        if done % log_every == 0 or last or stopping:
            host = jax.device_get(pending)
            pending = []
            hooks.check(state)
            now = time.time()
            rate = (done - n_last) * batch_size / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            hooks.log(done, host, rate)
        bar.update(1)  # after the log hook: a plain progress line shows this step's losses
        hooks.after_step(done, state, last)
        if done % checkpoint_every == 0 or last or stopping:
            hooks.check(state)
            hooks.save(done, state)
            saved = done
        if stopping:
            cause = f"signal {stop.signal}" if stop.signal else "a signal to another process"
            info(f"stopped by {cause} at iteration {done}; checkpoint saved, "
                 "re-run the same command to resume")
            raise SystemExit(0)


def _save_once(hooks: Hooks, state, done: int | None, saved: int | None) -> bool:
    """Saves iteration ``done`` unless nothing was done or it is saved already; whether
    a checkpoint of ``done`` exists now."""
    if done is None:
        return False
    if done != saved:
        hooks.check(state)
        hooks.save(done, state)
    return True


@contextlib.contextmanager
def run_workdir(workdir: str, config) -> Iterator[tuple[reporting.Reporter, Callable[[], None]]]:
    """``with run_workdir(workdir, config) as (reporter, started):`` the workdir of a run.

    The workdir is checked (:func:`progsr_jax.data.writing.run_folder`; a resumed one
    must hold the same architecture, :func:`resume.check_config`) and gets the run's
    reporter.  The trainer calls ``started()`` when its loop begins: only then are
    ``config.json`` and the reporter's files written, so a run that stops before leaves
    a new workdir removed and an existing one as it was.  The reporter's files are
    closed however the run ends.
    """
    with writing.run_folder(workdir) as folder:
        resume.check_config(workdir, config)
        reporter = reporting.Reporter(workdir)

        def started() -> None:
            resume.write_config(workdir, config)
            reporter.start()
            folder.keep()

        try:
            yield reporter, started
        finally:
            reporter.close()
