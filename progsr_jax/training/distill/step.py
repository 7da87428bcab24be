"""The distillation step: the loss and its gradient, the optimiser update and the EMA.

The pieces it puts together live beside it:
the state and its EMA in :mod:`~progsr_jax.training.distill.state`, the
optimisers in :mod:`~progsr_jax.training.distill.optim`, the augmentation in
:mod:`~progsr_jax.training.distill.augment`, the tap-by-tap convolution
gradient in :mod:`~progsr_jax.training.distill.conv_taps` and the spatial-softmax KL
in :mod:`progsr_jax.nets.losses`.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from progsr_jax.nets.fan import LEAKY_SLOPE
from progsr_jax.nets.losses import spatial_softmax_kl
from progsr_jax.training import core
from progsr_jax.training.distill.augment import (
    augment,
    uses_augmentation,
)
from progsr_jax.training.distill.conv_taps import tap_grad_interceptor, use_tap_grad
from progsr_jax.training.distill.optim import learning_rate, make_optimizer
from progsr_jax.training.distill.state import (
    DistillState,
    ema_decay_at,
    uses_ema,
)

# Metrics whose finiteness every step checks, and the metric holding the bitmask.
CHECKED = ("loss", "grad_norm")
NONFINITE = "nonfinite_bits"


def make_train_step(config, module):
    """``step_fn(state, x, y) -> (state, metrics)``: one Adam step on the MSE to the heatmaps.

    The objective is the paper's mean squared error to the teacher heatmaps,
    plus ``kl_weight`` x :func:`spatial_softmax_kl` when ``kl_weight > 0``
    (metrics: ``loss`` = the objective, ``mse``, and ``kl``).

    ``output_grad="straight_through"`` keeps the loss (its value and its
    minimum) but back-propagates through the student's final LeakyReLU(0.01)
    as if it were the identity.  With the exact gradient, every output pixel
    whose pre-activation is negative -- soon almost all of them, since the
    teacher's heatmaps are about 0 except at 68 small peaks -- passes back only
    1% of its error, also at the peaks the student has not found yet; the
    straight-through gradient passes back all of it.  On CelebA it reaches in
    200 iterations a validation NME (3.5%) that the exact gradient reaches
    only after about 400.

    With ``config.augment`` set, the batch is first transformed by :func:`augment`
    with the key ``fold_in(key(seed), step)``: a function of the seed and the
    iteration only, so a resumed run sees the same augmented batches.  With
    ``ema_decay > 0`` the step also updates ``state.ema`` (decay
    :func:`ema_decay_at`) from the new weights and BatchNorm statistics.
    """
    tx = make_optimizer(config)
    augmenting = uses_augmentation(config)
    ema = uses_ema(config)
    seed = int(config.seed)
    schedule = learning_rate(config)
    taps = use_tap_grad(config)
    straight_through = config.output_grad == "straight_through"
    kl_weight = float(config.kl_weight)
    kl_temperature = float(config.kl_temperature)

    def loss_fn(params, batch_stats, x, y):
        out, upd = module.apply({"params": params, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
        out = out.astype(jnp.float32)
        if straight_through:
            # The last convolution's output z, recovered by inverting the final
            # LeakyReLU(0.01); z + stop_gradient(out - z) has the value of out and
            # the gradient of z.
            z = jnp.where(out >= 0, out, out * (1.0 / LEAKY_SLOPE))
            out = z + jax.lax.stop_gradient(out - z)
        terms = {"mse": jnp.mean(jnp.square(out - y))}
        loss = terms["mse"]
        if kl_weight:
            terms["kl"] = spatial_softmax_kl(y, out, kl_temperature)
            loss = loss + kl_weight * terms["kl"]
        return loss, (upd["batch_stats"], terms)

    def step_fn(state: DistillState, x, y):
        if augmenting:
            key = jax.random.fold_in(jax.random.key(seed), state.step)
            x, y = augment(config, key, x.astype(jnp.float32), y.astype(jnp.float32))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        with (nn.intercept_methods(tap_grad_interceptor) if taps
              else contextlib.nullcontext()):
            (loss, (stats, terms)), grads = grad_fn(state.params, state.batch_stats, x, y)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                            opt_state=opt_state)
        if ema:
            d = ema_decay_at(config, state.step)
            new = new.replace(ema=jax.tree_util.tree_map(
                lambda e, v: d * e + (1.0 - d) * v, state.ema,
                {"params": params, "batch_stats": stats}))
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        # A non-finite loss or gradient leaves the student as it was; the trainer
        # stops at the next log step with the terms named (see CHECKED).
        bits = core.nonfinite_bits(metrics, CHECKED)
        state = core.keep_if_finite(bits == 0, new, state.replace(step=state.step + 1))
        return state, {**metrics, NONFINITE: bits}

    return step_fn
