"""MTCNN's three networks (P-Net, R-Net, O-Net) in Flax, with facenet-pytorch's weights.

Why this detector: the photo pipeline needs a pretrained face detector with
five landmarks whose weights arrive with a registry package, so nothing is
downloaded at run time.  The wheel of ``facenet-pytorch`` 2.6.0 carries the
three MTCNN networks (Zhang et al., 2016; ported from the original Caffe
models through David Sandberg's TensorFlow facenet) as plain state dicts,
``facenet_pytorch/data/{pnet,rnet,onet}.pt`` (28 KB, 403 KB, 1.6 MB; MIT).
Its metadata pins ``torch<2.3`` and ``numpy<2``, so it cannot be a dependency
of this package; it is installed for its files only::

    pip install --no-deps facenet-pytorch==2.6.0

and never imported: :func:`weights_dir` finds the files through
``importlib.metadata``, :func:`load_variables` reads them with the restricted,
torch-free reader :func:`progsr_jax.interop.torch_pickle.load_torch_file` and
maps them one-to-one onto the Flax trees below
(:func:`progsr_jax.interop.state_dict.state_dict_to_variables`: OIHW -> HWIO,
(out, in) -> (in, out), missing or extra keys refused).

Layouts (all convolutions unpadded, stride 1; every pooling is max pooling
with ``ceil_mode=True``, i.e. a last, partial window where the size does not
divide)::

    P-Net  conv1 3->10 k3, prelu1, pool 2/2, conv2 10->16 k3, prelu2,
           conv3 16->32 k3, prelu3, conv4_1 32->2 k1 (softmax), conv4_2 32->4 k1
    R-Net  conv1 3->28 k3, prelu1, pool 3/2, conv2 28->48 k3, prelu2, pool 3/2,
           conv3 48->64 k2, prelu3, dense4 576->128, prelu4,
           dense5_1 128->2 (softmax), dense5_2 128->4            (input 24x24)
    O-Net  conv1 3->32 k3, prelu1, pool 3/2, conv2 32->64 k3, prelu2, pool 3/2,
           conv3 64->64 k3, prelu3, pool 2/2, conv4 64->128 k2, prelu4,
           dense5 1152->256, prelu5, dense6_1 256->2 (softmax),
           dense6_2 256->4, dense6_3 256->10                     (input 48x48)

The dense layers flatten in PyTorch's ``permute(0, 3, 2, 1)`` order (width,
height, channel), which is what the weights expect.  Inputs are NHWC RGB
normalised as ``(pixel - 127.5) / 128``.

P-Net is fully convolutional; :class:`PNet` takes an optional validity mask
so that several pyramid levels packed into one canvas give exactly the
outputs each level would give alone (see ``progsr_jax.photo.detection``): one
compiled shape per canvas size instead of one per level.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from progsr_jax.errors import UserError
from progsr_jax.interop.torch_pickle import load_torch_file

PACKAGE = "facenet-pytorch"
PIP_COMMAND = "pip install --no-deps facenet-pytorch==2.6.0"
NET_NAMES = ("pnet", "rnet", "onet")
INPUT_SIZES = {"rnet": 24, "onet": 48}


def normalise(pixels):
    """uint8-range RGB -> the networks' input range, as MTCNN was trained."""
    return (pixels - 127.5) * 0.0078125


# ---------------------------------------------------------------------------
# Layers with PyTorch's parameter names (weight/bias), so that the state dict
# maps onto them key for key.


class _Conv(nn.Module):
    features: int
    kernel: int

    @nn.compact
    def __call__(self, x):
        k = self.kernel
        w = self.param("weight", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + b


class _Dense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return x @ w + b


class _PReLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = self.param("weight", nn.initializers.constant(0.25), (x.shape[-1],))
        return jnp.where(x >= 0, x, a * x)


def max_pool_ceil(x, k: int, s: int):
    """``nn.MaxPool2d(k, s, ceil_mode=True)`` on NHWC: the last window may be partial."""
    pads = []
    for n in x.shape[1:3]:
        out = -(-(n - k) // s) + 1
        if (out - 1) * s >= n:  # PyTorch drops a window that would start in the padding
            out -= 1
        pads.append((0, max(0, (out - 1) * s + k - n)))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1),
                                 ((0, 0), pads[0], pads[1], (0, 0)))


def _flatten_torch_order(x):
    """NHWC -> (N, W*H*C) in the order of PyTorch's ``x.permute(0, 3, 2, 1).view(N, -1)``."""
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: (N, H, W, 3) -> (box regression (N, H', W', 4), probabilities (N, H', W', 2)).

    ``H' = ceil((H - 2) / 2) - 4``: one output per 12x12 window at stride 2.
    ``mask`` (N, H - 2, W - 2), True where conv1's output lies inside a real
    image: other positions are left out of the max pooling (as PyTorch's
    partial ceil-mode windows leave out what lies past the border) and
    zeroed after it.  Outputs whose window is inside a masked region are then
    exactly those of the image alone.
    """

    @nn.compact
    def __call__(self, x, mask=None):
        x = _PReLU(name="prelu1")(_Conv(10, 3, name="conv1")(x))
        if mask is not None:
            m = mask[..., None]
            x = jnp.where(m, x, -jnp.inf)
            x = max_pool_ceil(x, 2, 2)
            x = jnp.where(max_pool_ceil(m.astype(x.dtype), 2, 2) > 0, x, 0.0)
        else:
            x = max_pool_ceil(x, 2, 2)
        x = _PReLU(name="prelu2")(_Conv(16, 3, name="conv2")(x))
        x = _PReLU(name="prelu3")(_Conv(32, 3, name="conv3")(x))
        probs = jax.nn.softmax(_Conv(2, 1, name="conv4_1")(x), axis=-1)
        reg = _Conv(4, 1, name="conv4_2")(x)
        return reg, probs


class RNet(nn.Module):
    """Refinement net: (N, 24, 24, 3) -> (box regression (N, 4), probabilities (N, 2))."""

    @nn.compact
    def __call__(self, x):
        x = max_pool_ceil(_PReLU(name="prelu1")(_Conv(28, 3, name="conv1")(x)), 3, 2)
        x = max_pool_ceil(_PReLU(name="prelu2")(_Conv(48, 3, name="conv2")(x)), 3, 2)
        x = _PReLU(name="prelu3")(_Conv(64, 2, name="conv3")(x))
        x = _PReLU(name="prelu4")(_Dense(128, name="dense4")(_flatten_torch_order(x)))
        probs = jax.nn.softmax(_Dense(2, name="dense5_1")(x), axis=-1)
        return _Dense(4, name="dense5_2")(x), probs


class ONet(nn.Module):
    """Output net: (N, 48, 48, 3) -> (box regression (N, 4), landmarks (N, 10), probabilities (N, 2)).

    Landmarks are fractions of the input box: five x values, then five y
    values, in the order left eye, right eye, nose, left and right mouth
    corner (left/right as seen in the image).
    """

    @nn.compact
    def __call__(self, x):
        x = max_pool_ceil(_PReLU(name="prelu1")(_Conv(32, 3, name="conv1")(x)), 3, 2)
        x = max_pool_ceil(_PReLU(name="prelu2")(_Conv(64, 3, name="conv2")(x)), 3, 2)
        x = max_pool_ceil(_PReLU(name="prelu3")(_Conv(64, 3, name="conv3")(x)), 2, 2)
        x = _PReLU(name="prelu4")(_Conv(128, 2, name="conv4")(x))
        x = _PReLU(name="prelu5")(_Dense(256, name="dense5")(_flatten_torch_order(x)))
        probs = jax.nn.softmax(_Dense(2, name="dense6_1")(x), axis=-1)
        return _Dense(4, name="dense6_2")(x), _Dense(10, name="dense6_3")(x), probs


MODULES = {"pnet": PNet, "rnet": RNet, "onet": ONet}
_INIT_SIZES = {"pnet": 12, "rnet": 24, "onet": 48}


def abstract_variables(name: str) -> dict:
    """Shapes of one net's variables (``{'params': ...}``), computing nothing."""
    size = _INIT_SIZES[name]
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: MODULES[name]().init(jax.random.PRNGKey(0), x))


# ---------------------------------------------------------------------------
# Finding and loading the weights


def _missing_message(where: str) -> str:
    return (f"the MTCNN face detector needs pnet.pt, rnet.pt and onet.pt, {where}; install the "
            f"package that ships them (weights only, it is never imported): {PIP_COMMAND}  "
            "-- or pass the folder that holds the three files")


def weights_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder holding ``pnet.pt``, ``rnet.pt`` and ``onet.pt``.

    ``path`` given: that folder.  Otherwise ``facenet_pytorch/data`` of the
    installed ``facenet-pytorch`` distribution, located through its metadata
    (importing the package would import torch and torchvision).
    """
    if path is not None:
        folder = pathlib.Path(path)
        if not folder.is_dir():
            raise UserError(_missing_message(f"but {folder} is not a folder"))
    else:
        try:
            dist = importlib.metadata.distribution(PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(_missing_message(f"and {PACKAGE} is not installed")) from None
        folder = pathlib.Path(dist.locate_file("facenet_pytorch/data"))
    lacking = [f"{n}.pt" for n in NET_NAMES if not (folder / f"{n}.pt").is_file()]
    if lacking:
        raise UserError(_missing_message(f"but {folder} lacks {', '.join(lacking)}"))
    return folder


def variables_from_state_dict(name: str, state_dict: Mapping[str, np.ndarray],
                              what: str | None = None) -> dict:
    """One net's state dict -> its Flax variables, key for key.

    ``conv4_1.weight`` <-> ``params/conv4_1/weight`` (the project's generic
    mapping in :mod:`progsr_jax.interop.state_dict` would read ``conv4_1`` as
    ``conv4.1``); conv weights OIHW -> HWIO, linear weights (out, in) -> (in,
    out).  A missing or extra key, or a shape that does not fit, is refused
    with a one-line :class:`UserError` naming it.
    """
    what = what or name
    expected = {f"{layer}.{param}": leaf.shape
                for layer, params in abstract_variables(name)["params"].items()
                for param, leaf in params.items()}
    for key in state_dict:
        if key not in expected:
            raise UserError(f"{what}: unexpected key {key!r} (not a facenet-pytorch MTCNN "
                            f"{name} state dict; expected {len(expected)} keys)")
    params: dict = {}
    for key, shape in expected.items():
        if key not in state_dict:
            raise UserError(f"{what}: missing key {key!r} (not a facenet-pytorch MTCNN "
                            f"{name} state dict)")
        arr = np.asarray(state_dict[key], dtype=np.float32)
        if arr.ndim == 4:
            arr = arr.transpose(2, 3, 1, 0)
        elif arr.ndim == 2:
            arr = arr.T
        if arr.shape != tuple(shape):
            raise UserError(f"{what}: key {key!r} has shape {np.shape(state_dict[key])}, "
                            f"which does not fit {name} (expected {tuple(shape)} in Flax layout)")
        layer, param = key.split(".")
        params.setdefault(layer, {})[param] = arr
    return {"params": params}


def load_variables(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """``{'pnet': variables, 'rnet': ..., 'onet': ...}`` read without torch or pickle code."""
    folder = weights_dir(path)
    out = {}
    for name in NET_NAMES:
        file = folder / f"{name}.pt"
        out[name] = variables_from_state_dict(name, load_torch_file(file), what=str(file))
    return out


# ---------------------------------------------------------------------------
# Compiled application with a bounded number of shapes


def batch_bucket(n: int, largest: int = 256) -> int:
    """Rows a batch of ``n`` is padded to: 8, 16, ..., ``largest`` (then chunks of it)."""
    b = 8
    while b < n and b < largest:
        b *= 2
    return b


class Nets:
    """The three nets with loaded weights, jitted; numpy in, numpy out.

    R-Net and O-Net batches are padded to :func:`batch_bucket` sizes and P-Net
    canvases come in a few sizes (see ``detection._canvas_bucket``), so a
    process compiles a handful of programs however many photos it sees.
    """

    CHUNK = 256

    def __init__(self, variables: Mapping[str, dict]):
        self.variables = {k: jax.device_put(v) for k, v in variables.items()}

        def pnet(v, x, m):
            reg, probs = PNet().apply(v, x, m)
            return probs[..., 1], reg

        def rnet(v, x):
            reg, probs = RNet().apply(v, x)
            return probs[:, 1], reg

        def onet(v, x):
            reg, points, probs = ONet().apply(v, x)
            return probs[:, 1], reg, points

        self._pnet = jax.jit(pnet)
        self._rnet = jax.jit(rnet)
        self._onet = jax.jit(onet)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Nets:
        return cls(load_variables(path))

    def pnet(self, canvas: np.ndarray, mask: np.ndarray):
        """(H, W, 3) normalised canvas, (H-2, W-2) mask -> face probability (H', W'), regression (H', W', 4)."""
        prob, reg = self._pnet(self.variables["pnet"], canvas[None], mask[None])
        return np.asarray(prob[0]), np.asarray(reg[0])

    def _batched(self, fn, params, x: np.ndarray):
        n = len(x)
        outs = []
        for start in range(0, n, self.CHUNK):
            part = x[start:start + self.CHUNK]
            rows = batch_bucket(len(part), self.CHUNK)
            padded = np.zeros((rows,) + x.shape[1:], np.float32)
            padded[:len(part)] = part
            outs.append([np.asarray(o)[:len(part)] for o in fn(params, padded)])
        return [np.concatenate(parts, axis=0) for parts in zip(*outs)]

    def rnet(self, x: np.ndarray):
        """(N, 24, 24, 3) -> face probability (N,), regression (N, 4)."""
        if len(x) == 0:
            return np.zeros((0,), np.float32), np.zeros((0, 4), np.float32)
        return tuple(self._batched(self._rnet, self.variables["rnet"], x))

    def onet(self, x: np.ndarray):
        """(N, 48, 48, 3) -> face probability (N,), regression (N, 4), landmarks (N, 10)."""
        if len(x) == 0:
            return (np.zeros((0,), np.float32), np.zeros((0, 4), np.float32),
                    np.zeros((0, 10), np.float32))
        return tuple(self._batched(self._onet, self.variables["onet"], x))
