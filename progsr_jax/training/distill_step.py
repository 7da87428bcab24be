"""The distillation step: student state, optimiser (Adam or Muon), augmentation, loss and its
gradient, and the exponential moving average of the student's weights."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import serialization

from progsr_jax import xla_flags
from progsr_jax.fan import LEAKY_SLOPE, OUTPUT_LAYER
from progsr_jax.training import core

# Metrics whose finiteness every step checks, and the metric holding the bitmask.
CHECKED = ("loss", "grad_norm")
NONFINITE = "nonfinite_bits"


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


def learning_rate(config) -> optax.Schedule:
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.lr)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.steps,
                                              end_value=0.0)


def muon_dimensions(params) -> dict:
    """Which parameters Muon updates: the (kh, kw, in, out) weights of every convolution
    but the last (``OUTPUT_LAYER``), each as a (kh * kw * in, out) matrix; None: Adam."""
    from optax.contrib import MuonDimensionNumbers

    matrix = MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)

    def dims(layer, name, p):
        is_conv = name == "weight" and getattr(p, "ndim", 0) == 4
        return matrix if is_conv and layer != OUTPUT_LAYER else None

    return {layer: {name: dims(layer, name, p) for name, p in leaves.items()}
            for layer, leaves in params.items()}


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam (the paper's optimizer), or Muon for the convolution weights and Adam for the rest.

    Muon (Jordan et al. 2024; :func:`optax.contrib.muon`) replaces each weight
    matrix's momentum by the nearest semi-orthogonal matrix (5 Newton-Schulz
    iterations), so that every direction of the weight moves at the same rate
    instead of the few that dominate the gradient.  On CelebA it reaches in
    600 iterations of batch 4 a validation NME (1.5%) that Adam with the same
    schedule reaches only after about 2,000 (measured with the ``:cpu``
    settings; Adam at 600: 2.3%).  The Newton-Schulz iterations add about 5%
    to a CPU step.

    With ``optimizer='muon'`` the last convolution, the biases and the BatchNorm
    scales are updated by optax's Muon companion Adam (Nesterov momentum,
    ``lr`` with the same schedule).
    """
    schedule = learning_rate(config)
    if config.optimizer == "adam":
        return optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
    from optax.contrib import muon

    ratio = float(config.muon_lr) / float(config.lr)
    return muon(lambda step: schedule(step) * ratio, beta=config.muon_beta,
                adam_b1=config.b1, adam_b2=config.b2, eps=config.eps,
                adam_learning_rate=schedule, muon_weight_dimension_numbers=muon_dimensions)


def create_state(config, module) -> DistillState:
    """The initial state: a random student, a fresh Adam state, step 0.

    The weights follow PyTorch's default initialisation (see
    :mod:`progsr_jax.layers`), drawn from ``seed`` with JAX's ``rbg`` PRNG:
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


# Convolution weight gradients as matrix products.  Without YNNPACK's dot
# fusions (see progsr_jax/xla_flags.py) XLA:CPU computes the weight gradient of
# a convolution (a convolution over the batch and image axes) about 4x slower
# than the forward convolution; written as one matrix product per kernel tap,
# sum_{n,h,w} x[n, h+i, w+j, :]^T g[n, h, w, :], it takes about as long as the
# forward pass.  With YNNPACK (progsr_jax's default) XLA's own gradient is the
# faster one on two or more cores (a train step of the student at batch 4 on 2
# cores: 0.31 s against 0.36 s with the taps) and the taps only win on a single
# core (0.61 s against 0.72 s), so conv_grad='auto' takes the taps on a CPU
# when the process may use only one core or YNNPACK is off.  The values are the
# same up to float32 summation order.


def _conv(x, w, padding: int):
    return jax.lax.conv_general_dilated(x, w, window_strides=(1, 1),
                                        padding=((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_tap_grad(x, w, padding: int):
    """Stride-1 NHWC x HWIO convolution whose weight gradient is computed tap by tap."""
    return _conv(x, w, padding)


def _conv_tap_grad_fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _conv_tap_grad_bwd(padding, residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda v: _conv(v, w, padding), x)[1](g)[0]
    kh, kw, cin, cout = w.shape
    _, h, wd, _ = g.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    g2 = g.reshape(-1, cout)
    taps = [xp[:, i:i + h, j:j + wd, :].reshape(-1, cin).T @ g2
            for i in range(kh) for j in range(kw)]
    return dx, jnp.stack(taps).reshape(kh, kw, cin, cout).astype(w.dtype)


conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


def tap_grad_interceptor(next_fun, args, kwargs, context):
    """Flax method interceptor: :class:`layers.Conv2d` calls go through :func:`conv_tap_grad`."""
    from progsr_jax.layers import Conv2d

    mod = context.module
    if isinstance(mod, Conv2d) and context.method_name == "__call__":
        x = args[0].astype(mod.dtype)
        w = mod.get_variable("params", "weight").astype(mod.dtype)
        b = mod.get_variable("params", "bias").astype(mod.dtype)
        return conv_tap_grad(x, w, mod.padding) + b
    return next_fun(*args, **kwargs)


def use_tap_grad(config) -> bool:
    """Whether the train step uses :func:`conv_tap_grad` (``conv_grad``: see above for auto)."""
    if config.conv_grad == "auto":
        return jax.default_backend() == "cpu" and (_cpu_cores() < 2 or not xla_flags.ynn_flag_set())
    return config.conv_grad == "taps"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def spatial_softmax_kl(target, pred, temperature: float):
    """Mean over images and landmarks of KL(softmax(target / T) || softmax(pred / T)).

    The softmax runs over the pixels of each (N, H, W, C) heatmap channel.  With
    a small temperature (0.02 for heatmaps whose peaks are about 0.5) the
    teacher's distribution sits on the few pixels within about 0.05 of its
    maximum, so the term measures whether the student puts its maximum -- the
    decoded landmark -- on the same pixels, including along the flat ridges of
    the jaw-line heatmaps where the MSE barely depends on it.
    """
    n, h, w, c = target.shape
    lt = jax.nn.log_softmax(target.reshape(n, h * w, c).astype(jnp.float32) / temperature, axis=1)
    lp = jax.nn.log_softmax(pred.reshape(n, h * w, c).astype(jnp.float32) / temperature, axis=1)
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - lp), axis=1))


# ---------------------------------------------------------------------------
# Augmentation (config.augment): the same geometric transform applied to the
# image and to its teacher heatmaps, drawn per example from (seed, step).

# The left-right correspondence of the 68 points (iBUG / 300-W order, 0-based):
# in a horizontally mirrored face, point k lies where point FLIP_PERMUTATION[k]
# of the original face lies, mirrored (jaw 0-16 reversed, brows 17-21 <-> 26-22,
# nose bridge 27-30 unchanged, nostrils 31-35 reversed, eyes 36-41 <-> 45-42/47-46,
# outer lips 48-54 reversed and 55-59 reversed, inner lips 60-64 and 65-67
# reversed).  It is its own inverse.
FLIP_PERMUTATION = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # eyebrows
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65],  # inner lips
    np.int32)


def uses_augmentation(config) -> bool:
    a = config.augment
    return bool(a.flip) or float(a.scale) > 0 or float(a.shift) > 0


def resampling_matrix(size: int, scale, shift, flip):
    """(B, size, size) bilinear resampling matrices of one image axis.

    Output pixel ``j`` reads the input at ``c + m (j - c) / scale - shift`` with ``c =
    (size - 1) / 2`` and ``m = -1`` where ``flip``, else 1 (positions clamped to the
    image: the border pixels extend outwards).  With scale 1 and shift 0 the matrix
    is the identity, or the exact mirror ``j -> size - 1 - j``.
    """
    c = (size - 1) / 2.0
    j = jnp.arange(size, dtype=jnp.float32)
    m = jnp.where(flip, -1.0, 1.0)[:, None]
    src = c + m * (j[None, :] - c) / scale[:, None] - shift[:, None]
    src = jnp.clip(src, 0.0, size - 1.0)
    i0 = jnp.floor(src)
    frac = src - i0
    i0 = i0.astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, size - 1)
    return ((1.0 - frac)[..., None] * jax.nn.one_hot(i0, size, dtype=jnp.float32)
            + frac[..., None] * jax.nn.one_hot(i1, size, dtype=jnp.float32))


def transform(x, y, scale, shift_x, shift_y, flip):
    """Applies per-example zoom ``scale`` (about the image centre), shift (pixels, + =
    right/down) and horizontal ``flip`` to images ``x`` (B, H, W, 3) and their
    heatmaps ``y`` (B, H, W, 68) alike; flipped heatmaps also swap the left and right
    points (:data:`FLIP_PERMUTATION`).  Separable, as two matrix products per array."""
    _, h, w, _ = x.shape
    ry = resampling_matrix(h, scale, shift_y, jnp.zeros_like(flip))
    rx = resampling_matrix(w, scale, shift_x, flip)
    y = jnp.where(flip[:, None, None, None], jnp.take(y, jnp.asarray(FLIP_PERMUTATION), axis=-1),
                  y)

    def apply(a):
        a = jnp.einsum("bip,bpqc->biqc", ry, a, precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum("bjq,biqc->bijc", rx, a, precision=jax.lax.Precision.HIGHEST)

    return apply(x), apply(y)


def augment(config, key, x, y):
    """Random :func:`transform` of a batch: each example flipped with probability 1/2
    (``augment.flip``), zoomed by a factor uniform in ``1 +- augment.scale`` and
    shifted by up to ``augment.shift`` pixels along each axis."""
    b = x.shape[0]
    kf, ks, kt = jax.random.split(key, 3)
    a = config.augment
    flip = jax.random.bernoulli(kf, 0.5, (b,)) if a.flip else jnp.zeros((b,), bool)
    scale = 1.0 + float(a.scale) * jax.random.uniform(ks, (b,), minval=-1.0, maxval=1.0)
    shift = float(a.shift) * jax.random.uniform(kt, (2, b), minval=-1.0, maxval=1.0)
    return transform(x, y, scale, shift[0], shift[1], flip)


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
