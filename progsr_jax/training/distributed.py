"""Training on several processes (hosts): launch, one writer, agreed stop, data prepared once.

JAX's multi-controller model: the same command runs on every host (a TPU VM
pod slice's workers, or one process per GPU node); every process sees all
devices of the run (``jax.devices()``) but feeds and reads only its own
(``jax.local_devices()``), and every process must issue the same collective
operations in the same order.  What each piece of the trainers does about it:

* :func:`define_flags` / :func:`initialize`: ``--multihost`` with
  ``--coordinator_address``, ``--num_processes`` and ``--process_id``
  (``jax.distributed.initialize``; without them JAX detects the cluster:
  TPU VMs, Slurm, Open MPI).
* Input: each process loads only its rows of the global batch
  (:func:`progsr_jax.data.local_rows`, :func:`progsr_jax.data.assemble`).
* State: :func:`replicate` makes the replicated global arrays from each
  process's identical host copy, without a collective; a checkpoint is
  restored straight into that sharding
  (:func:`progsr_jax.training.resume.restore_latest`).
* :func:`is_writer`: process 0 alone writes logs, metrics, TensorBoard,
  samples and JSON metadata; every process takes part in Orbax saves.
* :func:`any_process`: the stop asked by a signal on one process, agreed by
  all at the same step (:class:`progsr_jax.training.core.StopSignal`).
* :func:`prepare_once`: process 0 builds the decode cache (and prepares
  TFDS) while the others wait, then they open it.

With one process every function here is the single-host behaviour.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from progsr_jax.errors import UserError

T = TypeVar("T")


def define_flags(fv: flags.FlagValues) -> None:
    """The launch flags of ``python -m progsr_jax.main`` and ``python -m progsr_jax.distill``."""
    flags.DEFINE_bool("multihost", False, "Several processes (hosts) train together: call "
                      "jax.distributed.initialize() first. Run the same command on every host.",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "With --multihost: HOST:PORT of process "
                        "0's coordinator (default: detected on TPU VMs, Slurm, Open MPI).",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "With --multihost: the number of processes "
                         "(default: detected).", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "With --multihost: this process's index, 0 .. "
                         "num_processes - 1 (default: detected).", flag_values=fv)


def initialize(fv: flags.FlagValues) -> None:
    """With ``--multihost``: ``jax.distributed.initialize`` with the flags given (the
    rest detected)."""
    explicit = {"coordinator_address": fv.coordinator_address,
                "num_processes": fv.num_processes, "process_id": fv.process_id}
    given = {k: v for k, v in explicit.items() if v is not None}
    if not fv.multihost:
        if given:
            raise UserError(f"--{next(iter(given))} needs --multihost")
        return
    if fv.num_processes is not None and fv.num_processes < 1:
        raise UserError(f"--num_processes must be at least 1, got {fv.num_processes}")
    if fv.process_id is not None and fv.num_processes is not None and not (
            0 <= fv.process_id < fv.num_processes):
        raise UserError(f"--process_id must be in 0 .. {fv.num_processes - 1}, "
                        f"got {fv.process_id}")
    try:
        jax.distributed.initialize(**given)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--multihost: could not start jax.distributed "
                        f"({str(e).splitlines()[0][:200]}); give --coordinator_address, "
                        "--num_processes and --process_id where JAX cannot detect them") from None


def is_writer() -> bool:
    """Process 0 writes the run's files; the others only compute (and join Orbax saves)."""
    return jax.process_index() == 0


def replicate(tree: T, sharding: jax.sharding.Sharding) -> T:
    """``tree`` (the same values on every process) as global arrays of ``sharding``.

    Each process fills only its own devices from its host copy
    (``jax.make_array_from_callback``), so nothing crosses hosts; a single
    process gets what ``jax.device_put(tree, sharding)`` gives.
    """
    def one(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (a collective: every
    process must call it at the same point)."""
    if jax.process_count() == 1:
        return bool(flag)

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str) -> None:
    """Waits until every process has reached ``barrier(name)``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_once(name: str, build: Callable[[], T]) -> T:
    """``build()`` on process 0 first while the others wait, then on the others.

    For work whose result later calls only open: the decode cache and TFDS's
    prepared dataset on a folder every host shares.  Where each host has its
    own cache folder, each still builds its own (after process 0).
    """
    if jax.process_count() == 1:
        return build()
    result = build() if is_writer() else None
    barrier(f"progsr_jax prepared {name}")
    return result if is_writer() else build()
