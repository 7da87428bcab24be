"""PyTorch reference of MTCNN's P-Net, R-Net and O-Net, for the parity tests of the Flax port.

Written from the architecture (layer list in :mod:`progsr_jax.photo.mtcnn`),
not copied; the module and parameter names are those of facenet-pytorch's
state dicts, so ``load_state_dict(strict=True)`` accepts its
``{pnet,rnet,onet}.pt`` unchanged.  Inputs are NCHW, normalised as
``(pixel - 127.5) / 128``; outputs are ordered as facenet-pytorch's
(regression first, probabilities last), which its ``detect_face`` expects.
"""

from __future__ import annotations

import torch
from torch import nn


def _stage(cin: int, cout: int, k: int, pool: tuple[int, int] | None, idx: int) -> list[tuple[str, nn.Module]]:
    layers = [(f"conv{idx}", nn.Conv2d(cin, cout, kernel_size=k)), (f"prelu{idx}", nn.PReLU(cout))]
    if pool:
        layers.append((f"pool{idx}", nn.MaxPool2d(pool[0], pool[1], ceil_mode=True)))
    return layers


class _Net(nn.Module):
    def __init__(self, stages, dense=(), heads=()):
        super().__init__()
        self.order = []
        for name, mod in [m for s in stages for m in _stage(*s)]:
            self.add_module(name, mod)
            self.order.append(name)
        self.dense = [d[0] for d in dense]
        for name, cin, cout in dense:
            self.add_module(name, nn.Linear(cin, cout))
            self.add_module(name.replace("dense", "prelu"), nn.PReLU(cout))
        self.heads = [h[0] for h in heads]
        for name, head in heads:
            self.add_module(name, head)

    def trunk(self, x):
        for name in self.order:
            x = getattr(self, name)(x)
        if self.dense:
            x = x.permute(0, 3, 2, 1).contiguous().flatten(1)  # (N, W, H, C) order
            for name in self.dense:
                x = getattr(self, name.replace("dense", "prelu"))(getattr(self, name)(x))
        return x


class PNet(_Net):
    def __init__(self):
        super().__init__([(3, 10, 3, (2, 2), 1), (10, 16, 3, None, 2), (16, 32, 3, None, 3)],
                         heads=[("conv4_1", nn.Conv2d(32, 2, 1)), ("conv4_2", nn.Conv2d(32, 4, 1))])

    def forward(self, x):
        x = self.trunk(x)
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(_Net):
    def __init__(self):
        super().__init__([(3, 28, 3, (3, 2), 1), (28, 48, 3, (3, 2), 2), (48, 64, 2, None, 3)],
                         dense=[("dense4", 576, 128)],
                         heads=[("dense5_1", nn.Linear(128, 2)), ("dense5_2", nn.Linear(128, 4))])

    def forward(self, x):
        x = self.trunk(x)
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(_Net):
    def __init__(self):
        super().__init__([(3, 32, 3, (3, 2), 1), (32, 64, 3, (3, 2), 2), (64, 64, 3, (2, 2), 3),
                          (64, 128, 2, None, 4)],
                         dense=[("dense5", 1152, 256)],
                         heads=[("dense6_1", nn.Linear(256, 2)), ("dense6_2", nn.Linear(256, 4)),
                                ("dense6_3", nn.Linear(256, 10))])

    def forward(self, x):
        x = self.trunk(x)
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


NETS = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def load(name: str, state_dict) -> nn.Module:
    """One net in eval mode with ``state_dict`` (numpy arrays or tensors) loaded strictly."""
    net = NETS[name]()
    sd = {k: torch.as_tensor(v) for k, v in state_dict.items()}
    net.load_state_dict(sd, strict=True)
    return net.eval()
