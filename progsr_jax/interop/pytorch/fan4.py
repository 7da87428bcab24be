"""PyTorch modules for the one-off teacher pass (``tools/convert_fan_weights.py``).

* :class:`FAN4`: the 4-stack hourglass face-alignment network of Bulat &
  Tzimiropoulos (the paper's teacher), with the state-dict layout of
  face-alignment's ``2DFAN4-11f355bf06.pth.tar`` (1,129 keys including
  ``num_batches_tracked``; 23,820,176 parameters).  Input: (N, 3, 256, 256) RGB
  in [0, 1]; output: a list of 4 heatmap tensors (N, 68, 64, 64), one per stack.
* :class:`FanSqueeze`: the distilled student with the released file's key
  names (``conv.*``, ``layers.{0..10}``); input (N, 3, H, W) in [0, 1].

Written from the architecture description, not copied.  Importing this module
needs torch; the rest of the package does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from progsr_jax.errors import UserError

FAN4_NUM_KEYS = 1129
FAN4_NUM_PARAMS = 23_820_176


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Hierarchical, parallel & multi-scale residual block (pre-activation).

    Three chained 3x3 convs with out/2, out/4 and out/4 channels, each preceded
    by BN + ReLU; their outputs are concatenated (= out channels) and added to
    the input, which goes through BN-ReLU-conv1x1 when the widths differ.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half, quarter = cout // 2, cout // 4
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = _conv3x3(half, quarter)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = _conv3x3(quarter, quarter)
        if cin != cout:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(cin), nn.ReLU(True), nn.Conv2d(cin, cout, 1, stride=1, bias=False))
        else:
            self.downsample = None

    def forward(self, x):
        a = self.conv1(F.relu(self.bn1(x)))
        b = self.conv2(F.relu(self.bn2(a)))
        c = self.conv3(F.relu(self.bn3(b)))
        out = torch.cat((a, b, c), 1)
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class HourGlass(nn.Module):
    """Recursive hourglass; level L has ``b1_L`` (skip), ``b2_L`` (down), ``b3_L`` (up),
    and the deepest level (1) an extra ``b2_plus_1``."""

    def __init__(self, depth: int = 4, features: int = 256):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            if level == 1:
                self.add_module(f"b2_plus_{level}", ConvBlock(features, features))
            self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _level(self, level: int, x):
        up1 = getattr(self, f"b1_{level}")(x)
        low = getattr(self, f"b2_{level}")(F.avg_pool2d(x, 2, stride=2))
        if level > 1:
            low = self._level(level - 1, low)
        else:
            low = getattr(self, f"b2_plus_{level}")(low)
        low = getattr(self, f"b3_{level}")(low)
        return up1 + F.interpolate(low, scale_factor=2, mode="nearest")

    def forward(self, x):
        return self._level(self.depth, x)


class FAN4(nn.Module):
    """Face Alignment Network with ``num_stacks`` hourglasses (the teacher uses 4)."""

    def __init__(self, num_stacks: int = 4, num_landmarks: int = 68):
        super().__init__()
        self.num_stacks = num_stacks
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, 256)
        for i in range(num_stacks):
            self.add_module(f"m{i}", HourGlass(4, 256))
            self.add_module(f"top_m_{i}", ConvBlock(256, 256))
            self.add_module(f"conv_last{i}", nn.Conv2d(256, 256, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(256))
            self.add_module(f"l{i}", nn.Conv2d(256, num_landmarks, 1))
            if i < num_stacks - 1:
                self.add_module(f"bl{i}", nn.Conv2d(256, 256, 1))
                self.add_module(f"al{i}", nn.Conv2d(num_landmarks, 256, 1))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(self.conv2(x), 2, stride=2)
        x = self.conv4(self.conv3(x))
        previous, outputs = x, []
        for i in range(self.num_stacks):
            h = getattr(self, f"top_m_{i}")(getattr(self, f"m{i}")(previous))
            h = F.relu(getattr(self, f"bn_end{i}")(getattr(self, f"conv_last{i}")(h)))
            heat = getattr(self, f"l{i}")(h)
            outputs.append(heat)
            if i < self.num_stacks - 1:
                previous = previous + getattr(self, f"bl{i}")(h) + getattr(self, f"al{i}")(heat)
        return outputs


class FanSqueeze(nn.Module):
    """The distilled student with the released file's layout (``fan_model.fan_squeeze``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 5, 1, 2)
        self.layers = nn.Sequential(
            nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.01),
            nn.Conv2d(64, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.01),
            nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.01),
            nn.Conv2d(128, 68, 3, 1, 1), nn.LeakyReLU(0.01))

    def forward(self, x):
        return self.layers(self.conv(x))


def load_state_dict_strict(module: nn.Module, state_dict, what: str) -> nn.Module:
    """Loads numpy/torch arrays into ``module`` refusing missing/unexpected keys or shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{what} does not match {type(module).__name__} ({len(expected)} keys expected): "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    tensors = {}
    for k, ref in expected.items():
        v = torch.as_tensor(state_dict[k])
        if tuple(v.shape) != tuple(ref.shape):
            raise UserError(f"{what}: {k} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
        tensors[k] = v.to(ref.dtype)
    module.load_state_dict(tensors, strict=True)
    return module
