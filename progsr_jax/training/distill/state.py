"""The distillation trainer's state: the student, its optimiser state and the EMA of its weights.

:class:`DistillState` and its checkpoint serialisation (without EMA a
checkpoint holds exactly the fields of the first format), the moving
average's decay (:func:`ema_decay_at`), the student that validation and the
exported FAN folder use (:func:`student_variables`) and the initial state
(:func:`create_state`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import serialization

from progsr_jax.nets.fan import OUTPUT_LAYER
from progsr_jax.training.distill.optim import make_optimizer


@flax.struct.dataclass
class DistillState:
    step: jnp.ndarray  # completed iterations
    params: Any
    batch_stats: Any
    opt_state: Any
    # With ema_decay > 0: {"params", "batch_stats"}, the moving average of the
    # student that validation and the exported FAN folder use; None otherwise
    # (then the checkpoint holds exactly what it held before EMA existed).
    ema: Any = None


_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state")


def _state_to_dict(state: DistillState) -> dict:
    # Without EMA the checkpoint holds exactly the fields it held before EMA existed,
    # so those checkpoints (format progsr_jax/distill/1) still resume.
    fields = _STATE_FIELDS + (("ema",) if state.ema is not None else ())
    return {f: serialization.to_state_dict(getattr(state, f)) for f in fields}


def _state_from_dict(target: DistillState, d: dict) -> DistillState:
    fields = _STATE_FIELDS + (("ema",) if target.ema is not None else ())
    missing = [f for f in fields if f not in d]
    if missing:
        raise ValueError(f"the checkpoint has no {', '.join(missing)}")
    return target.replace(**{f: serialization.from_state_dict(getattr(target, f), d[f], name=f)
                             for f in fields})


serialization.register_serialization_state(DistillState, _state_to_dict, _state_from_dict,
                                           override=True)


def uses_ema(config) -> bool:
    return float(config.ema_decay) > 0


def student_variables(state: DistillState) -> dict:
    """The student to evaluate and export: the EMA weights when the run keeps them."""
    if state.ema is not None:
        return state.ema
    return {"params": state.params, "batch_stats": state.batch_stats}


def ema_decay_at(config, step):
    """The EMA decay used at (0-based) iteration ``step``: ``min(ema_decay, (1 + step) /
    (10 + step))``, so that the random initial weights are forgotten within the first
    iterations (the warm-up of tf.train.ExponentialMovingAverage with ``num_updates``)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(config.ema_decay), (1.0 + step) / (10.0 + step))


def create_state(config, module) -> DistillState:
    """The initial state: a random student, a fresh Adam state, step 0.

    The weights follow PyTorch's default initialisation (see
    :mod:`progsr_jax.nets.layers`), drawn from ``seed`` with JAX's ``rbg`` PRNG:
    with the default threefry generator the initialisation alone takes longer
    to compile on a CPU than the whole train step.

    ``model.output_init_scale`` multiplies the last convolution's initial
    weights and bias.  With the default init the untrained student's heatmaps
    are about 0.35 (std) everywhere while the teacher's are about 0 except at
    68 small peaks; the first iterations then have gradients about 100x larger
    than later ones, which Adam's second-moment estimate (b2 = 0.999) remembers
    for thousands of iterations, shrinking every later step.  Starting near
    zero (0.01) avoids that: on CelebA the student reaches in 150 iterations
    a validation NME (about 8%) that the default init does not reach in 200
    (about 27%).
    """
    shape = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    scale = float(config.model.output_init_scale)

    def init(key):
        variables = module.lazy_init(key, shape)  # no forward pass, only the variables
        params = dict(variables["params"])
        params[OUTPUT_LAYER] = jax.tree_util.tree_map(lambda p: p * scale, params[OUTPUT_LAYER])
        stats = variables["batch_stats"]
        ema = {"params": params, "batch_stats": stats} if uses_ema(config) else None
        return DistillState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                            opt_state=make_optimizer(config).init(params), ema=ema)

    return jax.jit(init)(jax.random.key(config.seed, impl="rbg"))
