"""The checkpoint format: Orbax folders holding a generator, a critic and their metadata.

What inference, the conversion tools and both trainers read and write
(``progsr_jax.training.resume`` adds the training runs' save/resume on
top).  A checkpoint directory (``<workdir>/checkpoints``) is managed by an
Orbax ``CheckpointManager``; each saved step holds the items

* ``state``: the whole training state (super-resolution:
  :class:`progsr_jax.training.sr.trainer.TrainState` with G, D, both optimiser
  states and the global iteration; distillation: the student and its
  optimiser); data position and RNG follow from the iteration;
* ``generator``: ``{'params', 'batch_stats'}`` of G, what inference loads;
* ``discriminator``: ``{'params'}`` of D (converted official checkpoints);
* ``meta``: JSON with ``stage``, ``alpha``, ``iteration``, ``width``, ``dtype``
  and ``format`` (:data:`FORMAT`).

Orbax writes each step to a temporary directory and renames it when
complete, so a run killed during a save still has its previous checkpoint.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from progsr_jax.errors import UserError

FORMAT = "progsr_jax/1"
ITEMS = ("state", "generator", "discriminator", "meta")


def manager(workdir_or_dir: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    directory = os.path.abspath(workdir_or_dir)
    if os.path.basename(directory) != "checkpoints":
        directory = os.path.join(directory, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save_converted(directory: str, generator: dict, discriminator: dict | None, meta: dict) -> None:
    """Writes a converted official checkpoint (no training state) as step ``meta['iteration']``."""
    mgr = manager(directory, keep=1)
    items = dict(generator=ocp.args.StandardSave(generator), meta=ocp.args.JsonSave(meta))
    if discriminator is not None:
        items["discriminator"] = ocp.args.StandardSave(discriminator)
    mgr.save(int(meta.get("iteration", 0)), args=ocp.args.Composite(**items), force=True)
    mgr.wait_until_finished()
    mgr.close()


def resolve(path: str) -> tuple[str, int]:
    """(checkpoints directory, step) for a workdir, a checkpoints directory or one step's directory."""
    if path and os.path.isfile(path):
        raise UserError(f"checkpoint path {path!r} is a file; expected a training workdir, a "
                        "checkpoint directory or a converted checkpoint (a folder)")
    if not path or not os.path.isdir(path):
        raise UserError(f"checkpoint path {path!r} does not exist or is not a directory")
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "generator")) and os.path.basename(path).isdigit():
        return os.path.dirname(path), int(os.path.basename(path))
    directory = path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        directory = os.path.join(path, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(directory)
                   if n.isdigit() and os.path.isdir(os.path.join(directory, n, "generator")))
    if not steps:
        raise UserError(f"no checkpoint found in {path} (expected a training workdir, its "
                        "checkpoints/ folder, or a converted checkpoint)")
    return directory, steps[-1]


def load_generator(path: str) -> tuple[dict, dict]:
    """(variables {'params', 'batch_stats'} as numpy, meta) of the generator at ``path``."""
    directory, step = resolve(path)
    mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                item_names=ITEMS)
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        gen = mgr.restore(step, args=ocp.args.Composite(
            generator=ocp.args.StandardRestore())).generator
    except FileNotFoundError as e:
        raise UserError(f"incomplete checkpoint at {directory}/{step}: {e}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # corrupt Orbax/TensorStore files
        quiet_closed_loop_reports()
        raise UserError(f"cannot read the checkpoint at {directory}/{step} (truncated or "
                        f"corrupt?): {_first_line(e)}") from None
    finally:
        mgr.close()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{directory}/{step} is not a progsr_jax checkpoint (format "
                        f"{meta.get('format') if isinstance(meta, dict) else meta!r})")
    bad = [k for k in ("stage", "alpha") if not isinstance(meta.get(k), (int, float))]
    if bad or meta["stage"] not in (1, 2, 3):
        raise UserError(f"{directory}/{step}: its meta has no valid {(bad or ['stage'])[0]!r}")
    if not isinstance(gen, dict) or set(gen) != {"params", "batch_stats"}:
        raise UserError(f"{directory}/{step}: the generator item holds no params and "
                        "batch_stats")
    gen = jax.tree_util.tree_map(np.asarray, gen)
    return gen, meta


def _drop_closed_loop_reports(args) -> None:
    if isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(args.exc_value):
        return
    _previous_unraisablehook(args)


_previous_unraisablehook = sys.unraisablehook


def quiet_closed_loop_reports() -> None:
    """After a failed restore: Orbax stops at the first read that fails while TensorStore's
    other reads are still running; as they finish they call into Orbax's closed asyncio
    loop, and Python would print each ``RuntimeError: Event loop is closed`` as a
    traceback after the one-line error.  Those reports are dropped (others are not)."""
    sys.unraisablehook = _drop_closed_loop_reports


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def load_discriminator(path: str) -> dict | None:
    directory, step = resolve(path)
    if not os.path.isdir(os.path.join(directory, str(step), "discriminator")):
        return None
    mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                item_names=ITEMS)
    try:
        return jax.tree_util.tree_map(np.asarray, mgr.restore(step, args=ocp.args.Composite(
            discriminator=ocp.args.StandardRestore())).discriminator)
    finally:
        mgr.close()
