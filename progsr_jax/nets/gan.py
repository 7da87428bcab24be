"""The progressive generator and discriminator of Kim et al. (BMVC 2019).

Both follow the authors' ``model.py`` layer for layer, and their parameter
trees map one-to-one onto the official PyTorch state dicts (see
:mod:`progsr_jax.interop.state_dict`): ``step1.3.conv.0.conv.weight_orig`` is
``params['step1_3']['conv_0']['conv']['weight_orig']``.

``width`` scales every hidden channel count (1.0 = the paper: G 8,969,097 and
D 8,065,537 parameters).  ``stage`` (1, 2, 3) selects the output resolution (32, 64, 128,
:func:`output_size`) and is static; ``alpha`` is a traced scalar: for
0 <= alpha < 1 at stages 2 and 3 the new block is faded in, otherwise it is
used alone.  (An *iteration* is one optimiser update: ``TrainState.step``.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from progsr_jax.nets.layers import (
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    EqualConv2d,
    Linear,
    avg_pool2,
    safe_sqrt,
    upsample_nearest2,
)

Dtype = Any

#: The generator's input side (16x16 faces) and its stages (resolution steps).
INPUT_SIZE = 16
STAGES = (1, 2, 3)


def output_size(stage: int) -> int:
    """The generator's output side at ``stage`` (1, 2, 3 -> 32, 64, 128; 0 -> the 16x16 input)."""
    return INPUT_SIZE * 2 ** int(stage)


def stage_of_size(size: int) -> int:
    """The stage whose output is ``size`` x ``size`` (inverse of :func:`output_size`)."""
    for stage in (0,) + STAGES:
        if output_size(stage) == int(size):
            return stage
    raise ValueError(f"no stage makes {size}x{size} outputs (expected 16, 32, 64 or 128)")


# Names of the transposed convolutions (their PyTorch weights are (in, out, kh, kw)).
G_CONV_TRANSPOSE = ("step1_4", "step2_1", "step3_1")


def channels(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def fading(alpha) -> jnp.ndarray:
    """True where the official code fades (0 <= alpha < 1)."""
    return (alpha >= 0) & (alpha < 1)


def mix(alpha, old, new):
    """(1 - alpha) * old + alpha * new while fading, else new."""
    a = jnp.asarray(alpha, new.dtype)
    return jnp.where(fading(alpha), (1 - a) * old + a * new, new)


class ResBlock(nn.Module):
    """x + [EqualConv3x3, BN, ReLU, EqualConv3x3, BN, ReLU](x); keys ``conv.{0,1,3,4}``."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        d = x.shape[-1]
        h = EqualConv2d(d, dtype=self.dtype, name="conv_0")(x)
        h = nn.relu(BatchNorm2d(dtype=self.dtype, name="conv_1")(h, train))
        h = EqualConv2d(d, dtype=self.dtype, name="conv_3")(h)
        h = nn.relu(BatchNorm2d(dtype=self.dtype, name="conv_4")(h, train))
        return h + x


class ConvBlock(nn.Module):
    """[EqualConv3x3, LeakyReLU(0.2)] x 2; keys ``conv.{0,2}``."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.leaky_relu(EqualConv2d(self.features, dtype=self.dtype, name="conv_0")(x), 0.2)
        return nn.leaky_relu(EqualConv2d(self.features, dtype=self.dtype, name="conv_2")(x), 0.2)


class Generator(nn.Module):
    """16x16 -> 32/64/128 progressive generator (no output activation)."""

    width: float = 1.0
    dtype: Dtype = jnp.float32

    def setup(self):
        c = lambda n: channels(n, self.width)  # noqa: E731
        dt = self.dtype
        self.step1_0 = Conv2d(c(512), 3, 1, dtype=dt)
        self.step1_1 = BatchNorm2d(dtype=dt)
        self.step1_3 = ResBlock(dtype=dt)
        self.step1_4 = ConvTranspose2d(c(256), dtype=dt)
        self.step1_5 = BatchNorm2d(dtype=dt)
        self.step2_0 = ResBlock(dtype=dt)
        self.step2_1 = ConvTranspose2d(c(128), dtype=dt)
        self.step2_2 = BatchNorm2d(dtype=dt)
        self.step3_0 = ResBlock(dtype=dt)
        self.step3_1 = ConvTranspose2d(c(64), dtype=dt)
        self.step3_2 = BatchNorm2d(dtype=dt)
        self.to_rgb_0 = Conv2d(3, 1, 0, dtype=dt)
        self.to_rgb_1 = Conv2d(3, 1, 0, dtype=dt)
        self.to_rgb_2 = Conv2d(3, 1, 0, dtype=dt)

    def block1(self, x, train):
        x = nn.relu(self.step1_1(self.step1_0(x), train))
        x = self.step1_3(x, train)
        return nn.relu(self.step1_5(self.step1_4(x), train))

    def block2(self, x, train):
        x = self.step2_0(x, train)
        return nn.relu(self.step2_2(self.step2_1(x), train))

    def block3(self, x, train):
        x = self.step3_0(x, train)
        return nn.relu(self.step3_2(self.step3_1(x), train))

    def __call__(self, x, stage: int = 3, alpha=1.0, train: bool = False):
        if stage not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        blocks = (self.block1, self.block2, self.block3)
        to_rgb = (self.to_rgb_0, self.to_rgb_1, self.to_rgb_2)
        if self.is_initializing():  # to_rgb_0 is not on the stage-3 path; create it too
            self.to_rgb_0(jnp.zeros((1, 1, 1, channels(256, self.width)), self.dtype))
        h = x.astype(self.dtype)
        for k in range(stage - 1):
            h = blocks[k](h, train)
        new = to_rgb[stage - 1](blocks[stage - 1](h, train))
        if stage == 1:
            return new.astype(jnp.float32)
        skip = upsample_nearest2(to_rgb[stage - 2](h))
        return mix(alpha, skip, new).astype(jnp.float32)


class Discriminator(nn.Module):
    """WGAN critic for 32/64/128 inputs; returns one score per image, shape (N,)."""

    width: float = 1.0
    dtype: Dtype = jnp.float32

    def setup(self):
        c = lambda n: channels(n, self.width)  # noqa: E731
        dt = self.dtype
        self.from_rgb_0 = Conv2d(c(256), 1, 0, dtype=dt)
        self.from_rgb_1 = Conv2d(c(128), 1, 0, dtype=dt)
        self.from_rgb_2 = Conv2d(c(64), 1, 0, dtype=dt)
        self.step1_0 = ConvBlock(c(512), dtype=dt)
        self.step2_0 = ConvBlock(c(256), dtype=dt)
        self.step3_0 = ConvBlock(c(128), dtype=dt)
        self.equal_conv = EqualConv2d(c(512), dtype=dt)
        self.linear = Linear(c(2048), dtype=dt)
        self.linear2 = Linear(1, dtype=dt)

    def __call__(self, x, stage: int = 3, alpha=1.0, groups: int = 1):
        """Scores of ``x`` (N, S, S, 3).

        ``groups``: the batch holds that many interleaved sets of images (row
        ``i`` in set ``i % groups``, e.g. ``[real_0, fake_0, real_1, fake_1,
        ...]``), and the minibatch standard deviation is taken over each set
        alone, so one call scores every set exactly as one call per set would.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        if groups < 1 or x.shape[0] % groups:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {groups} sets")
        if self.is_initializing():  # from_rgb_0 is not on the step-3 path; create it too
            self.from_rgb_0(jnp.zeros((1, 1, 1, 3), self.dtype))
        from_rgb = (self.from_rgb_0, self.from_rgb_1, self.from_rgb_2)
        blocks = (self.step1_0, self.step2_0, self.step3_0)
        img = x.astype(self.dtype)
        h = avg_pool2(blocks[stage - 1](from_rgb[stage - 1](img)))
        if stage > 1:
            skip = from_rgb[stage - 2](avg_pool2(img))
            h = mix(alpha, skip, h)
            for k in range(stage - 2, -1, -1):
                h = avg_pool2(blocks[k](h))
        # Minibatch standard deviation of the *input image* (unbiased, as torch.std),
        # averaged over channels and positions, as one extra constant channel; one
        # value per set of images (rows i, i + groups, i + 2 * groups, ...).
        n, hh, ww, _ = h.shape
        sets = x.astype(jnp.float32).reshape((n // groups, groups) + x.shape[1:])
        std = jnp.mean(safe_sqrt(jnp.var(sets, axis=0, ddof=1)), axis=(1, 2, 3))  # (groups,)
        std = jnp.tile(std.astype(h.dtype), n // groups)  # row i gets std[i % groups]
        h = jnp.concatenate([h, jnp.broadcast_to(std[:, None, None, None], (n, hh, ww, 1))],
                            axis=-1)
        h = self.equal_conv(h)
        h = jnp.mean(h, axis=(1, 2))  # avg_pool2d over the whole 16x16 map
        h = self.linear2(self.linear(h))
        return h[:, 0].astype(jnp.float32)


def _init_key(key):
    """An 'rbg' key derived from ``key`` (an int seed or any PRNG key).

    Initialisation runs through XLA once per model; with the default threefry
    generator that compile takes ~16 s on a CPU, with 'rbg' ~2 s.  The values are
    deterministic for a given key.
    """
    if isinstance(key, int):
        data = jnp.array([0, key & 0xFFFFFFFF], jnp.uint32)
    elif jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key).ravel().astype(jnp.uint32)
    else:
        data = jnp.ravel(key).astype(jnp.uint32)
    # jnp, not numpy: also under tracing (jax.eval_shape of an initialisation)
    return jax.random.wrap_key_data(jnp.resize(data, 4), impl="rbg")


def init_generator(key, width: float = 1.0, dtype=jnp.float32):
    model = Generator(width=width, dtype=dtype)
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3)), stage=3, alpha=1.0,
                                        train=False))  # jitted: eager init is slow
    variables = init(_init_key(key))
    return model, dict(variables)


def init_discriminator(key, width: float = 1.0, dtype=jnp.float32):
    model = Discriminator(width=width, dtype=dtype)
    init = jax.jit(lambda k: model.init(k, jnp.zeros((2, 128, 128, 3)), stage=3, alpha=1.0))
    variables = init(_init_key(key))
    return model, dict(variables)


def generator_shapes(width: float = 1.0) -> dict:
    """The generator's variable tree as ShapeDtypeStructs (no computation)."""
    model = Generator(width=width)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                             stage=3, alpha=1.0, train=False))

