"""Training on several processes (hosts): launch, one writer, agreed stop, data prepared once.

JAX's multi-controller model: the same command runs on every host (a TPU VM
pod slice's workers, or one process per GPU node); every process sees all
devices of the run (``jax.devices()``) but feeds and reads only its own
(``jax.local_devices()``), and every process must issue the same collective
operations in the same order.  What each piece of the trainers does about it:

* :func:`define_flags` / :func:`initialize`: ``--multihost`` with
  ``--coordinator_address``, ``--num_processes`` and ``--process_id``
  (``jax.distributed.initialize``; without them JAX detects the cluster:
  TPU VMs, Slurm, Open MPI), checked first (``HOST:PORT``, a host that
  resolves, a free port on process 0, a coordinator that answers on the
  others) and bounded by ``--coordinator_timeout``: a one-line error naming
  the address instead of a hang or JAX's abort.
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

import errno
import os
import re
import socket
import sys
import threading
import time
from typing import Callable, TypeVar

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from progsr_jax.errors import UserError

T = TypeVar("T")
#: Seconds ``--multihost`` waits for the coordinator and the other processes (JAX's default).
DEFAULT_COORDINATOR_TIMEOUT = 300


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
    flags.DEFINE_integer("coordinator_timeout", DEFAULT_COORDINATOR_TIMEOUT, "With --multihost: "
                         "seconds to wait for the coordinator to answer and for every process "
                         "to join; then the command stops with an error naming the address.",
                         flag_values=fv)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) -> ``(host, port)``; UserError otherwise."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-z]+)\]:(\d+)|([^:\[\]\s/]+):(\d+)", address.strip())
    if not m:
        raise UserError(f"--coordinator_address={address}: expected HOST:PORT, e.g. "
                        "10.0.0.1:12345 or [::1]:12345")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise UserError(f"--coordinator_address={address}: the port must be 1 .. 65535, "
                        f"got {port}")
    return host, port


def _resolve(host: str, port: int, address: str) -> None:
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--coordinator_address={address}: cannot resolve the host {host!r} "
                        f"({getattr(e, 'strerror', None) or e})") from None


def _check_port_free(port: int, address: str) -> None:
    """Process 0 runs the coordinator on ``port`` of every interface: refuse a port in use."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here: the IPv4 check follows
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    continue
                raise UserError(f"--coordinator_address={address}: process 0 runs the "
                                f"coordinator on port {port}, but it cannot be used here "
                                f"({e.strerror or e}); choose a free port") from None
        return


def _wait_for_coordinator(host: str, port: int, address: str, deadline: float,
                          timeout: int) -> None:
    """Processes other than 0: wait until something answers at ``host:port``."""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, left))):
                return
        except OSError:
            if time.monotonic() + 0.5 >= deadline:
                raise UserError(f"--multihost: no coordinator answered at {address} within "
                                f"{timeout} s (--coordinator_timeout): is process 0 running "
                                "there with the same --coordinator_address?") from None
            time.sleep(0.5)


def _watchdog(seconds: float, message: str) -> threading.Timer:
    """Ends the process with ``error: message`` (exit 2) after ``seconds``: JAX's own
    timeout inside ``jax.distributed.initialize`` aborts the process with a stack dump."""
    def give_up():
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(2)

    timer = threading.Timer(max(seconds, 0.1), give_up)
    timer.daemon = True
    timer.start()
    return timer


def initialize(fv: flags.FlagValues) -> None:
    """With ``--multihost``: ``jax.distributed.initialize`` with the flags given (the
    rest detected), after checking them; the wait for the coordinator and the other
    processes ends after ``--coordinator_timeout`` seconds with a one-line error."""
    explicit = {"coordinator_address": fv.coordinator_address,
                "num_processes": fv.num_processes, "process_id": fv.process_id}
    given = {k: v for k, v in explicit.items() if v is not None}
    if not fv.multihost:
        if given:
            raise UserError(f"--{next(iter(given))} needs --multihost")
        if fv.coordinator_timeout != DEFAULT_COORDINATOR_TIMEOUT:
            raise UserError("--coordinator_timeout needs --multihost")
        return
    timeout = fv.coordinator_timeout
    if timeout is None or timeout < 1:
        raise UserError(f"--coordinator_timeout must be at least 1 second, got {timeout}")
    if fv.num_processes is not None and fv.num_processes < 1:
        raise UserError(f"--num_processes must be at least 1, got {fv.num_processes}")
    if fv.process_id is not None and fv.process_id < 0:
        raise UserError(f"--process_id must be >= 0, got {fv.process_id}")
    if fv.process_id is not None and fv.num_processes is not None and not (
            0 <= fv.process_id < fv.num_processes):
        raise UserError(f"--process_id must be in 0 .. {fv.num_processes - 1}, "
                        f"got {fv.process_id}")
    deadline = time.monotonic() + timeout
    address = fv.coordinator_address
    if address is not None:
        host, port = parse_address(address)
        _resolve(host, port, address)
        if fv.process_id == 0:
            _check_port_free(port, address)
        elif fv.process_id is not None:
            _wait_for_coordinator(host, port, address, deadline, timeout)
    where = f"the coordinator at {address}" if address else "the detected coordinator"
    if fv.process_id == 0:
        message = (f"--multihost: not every one of the {fv.num_processes or 'detected'} "
                   f"processes joined {where} within {timeout} s (--coordinator_timeout); "
                   "start the same command on every host")
    else:
        message = (f"--multihost: {where} did not start the run within {timeout} s "
                   "(--coordinator_timeout): are all processes running, with the same "
                   "--coordinator_address and --num_processes?")
    watchdog = _watchdog(deadline - time.monotonic(), message)
    try:
        # JAX's own limit comes later than the watchdog's, so the one-line error wins.
        jax.distributed.initialize(**given, initialization_timeout=timeout + 60)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--multihost: could not start jax.distributed "
                        f"({str(e).splitlines()[0][:200]}); give --coordinator_address, "
                        "--num_processes and --process_id where JAX cannot detect them") from None
    finally:
        watchdog.cancel()


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
