"""Training runs' checkpoints: save, resume, the run-kind and config checks.

The one checkpoint and resume path of both trainers, on top of the
checkpoint format of :mod:`progsr_jax.inference.checkpoints` (the folder layout, its
items and ``meta``, reading generators and critics, converted checkpoints).  :func:`save` / :func:`save_state` write a run's whole
state at an iteration, :func:`restore_latest` resumes it,
:func:`init_from_pretrained` starts a run from another checkpoint's G (and
D), and :func:`check_config` / :func:`check_run_kind` refuse to
resume a workdir with another architecture or kind of run.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from progsr_jax.errors import UserError
from progsr_jax.inference.checkpoints import (
    load_discriminator,
    load_generator,
    quiet_closed_loop_reports,
)

# Config fields that must not change when a run is resumed.
ARCH_FIELDS = ("model.width", "model.d_width")


def save_state(mgr: ocp.CheckpointManager, state, step: int, meta: dict, **trees) -> None:
    """Saves the training ``state``, its ``meta`` JSON and any further item ``trees``.

    Every process calls it (Orbax's barriers); the replicated state is
    fetched as host arrays, which Orbax writes from process 0 alone.
    """
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    items["state"] = ocp.args.StandardSave(serialization.to_state_dict(jax.device_get(state)))
    items["meta"] = ocp.args.JsonSave(meta)
    mgr.save(step, args=ocp.args.Composite(**items), force=True)
    mgr.wait_until_finished()


def save(mgr: ocp.CheckpointManager, state, step: int, meta: dict) -> None:
    """A super-resolution checkpoint: the state plus the generator alone, for inference."""
    host = jax.device_get(state)
    gen = {"params": host.g_params, "batch_stats": host.g_stats}
    save_state(mgr, host, step, meta, generator=gen)


def check_run_kind(mgr: ocp.CheckpointManager, meta: dict, what: str,
                   same: tuple[str, ...]) -> None:
    """Refuses to resume a run of another kind (``meta['format']``) or with other ``same`` fields."""
    step = mgr.latest_step()
    if step is None:
        return
    try:
        old = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:  # noqa: BLE001 - a checkpoint without meta is reported by restore_latest
        return
    if not isinstance(old, dict) or old.get("format") != meta.get("format"):
        raise UserError(f"{mgr.directory} holds checkpoints of another kind of run "
                        f"(not {what}); use another --workdir")
    for key in same:
        if old.get(key) != meta.get(key):
            raise UserError(f"{mgr.directory} was trained with {key}={old.get(key)}; this "
                            f"command has {key}={meta.get(key)} (other teacher heatmaps or "
                            "images?). Use another --workdir or the same data")


def _abstract(tree):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def restore_latest(mgr: ocp.CheckpointManager, template_state):
    """The latest training state in ``mgr`` restored into ``template_state``'s structure, or None.

    Each array is restored straight into the sharding of its template leaf
    (the replicated state of :func:`progsr_jax.training.distributed.replicate`:
    with several processes each reads what its own devices hold).
    """
    step = mgr.latest_step()
    if step is None:
        return None
    template = serialization.to_state_dict(template_state)
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(template))))
    except (OSError, ValueError, KeyError, TypeError) as e:
        quiet_closed_loop_reports()
        raise UserError(f"cannot restore the checkpoint at {mgr.directory}/{step} (corrupt, or "
                        f"another architecture or width?): {str(e).splitlines()[0][:200]}"
                        ) from None
    if restored.state is None:
        raise UserError(f"{mgr.directory}/{step} holds no training state (a converted checkpoint?); "
                        "use --config.init_from=<it> in a fresh workdir instead")
    return serialization.from_state_dict(template_state, restored.state)


def init_from_pretrained(state, path: str):
    """Fine-tuning: G (and D if the checkpoint has one) from a converted/other checkpoint."""
    gen, meta = load_generator(path)
    state = _replace_checked(state, "g_params", gen["params"], path)
    state = _replace_checked(state, "g_stats", gen["batch_stats"], path)
    disc = load_discriminator(path)
    if disc is not None:
        state = _replace_checked(state, "d_params", disc["params"], path)
    return state


def _replace_checked(state, field: str, value, path: str):
    ref = getattr(state, field)
    ref_shapes = jax.tree_util.tree_map(np.shape, ref)
    got_shapes = jax.tree_util.tree_map(np.shape, value)
    if ref_shapes != got_shapes:
        raise UserError(f"{path}: {field} does not fit this model (other architecture or width?)")
    return state.replace(**{field: jax.tree_util.tree_map(lambda r, v: np.asarray(v, r.dtype),
                                                          ref, value)})


def check_config(workdir: str, config, arch_fields: tuple[str, ...] = ARCH_FIELDS) -> None:
    """Refuses to resume a workdir whose ``config.json`` names another architecture
    (every process checks)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        try:
            previous = json.load(f)
        except json.JSONDecodeError:
            return
    current = json.loads(config.to_json_best_effort())
    for dotted in arch_fields:
        a, b = _get(previous, dotted), _get(current, dotted)
        if a != b:
            raise UserError(f"{workdir} holds a run with {dotted}={a}; this command asks "
                            f"for {dotted}={b}. Use another --workdir or the same setting")


def write_config(workdir: str, config) -> None:
    """Writes ``config.json`` (process 0), once the run has really started: a run that
    fails before keeps the workdir's earlier one."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _get(tree: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree
