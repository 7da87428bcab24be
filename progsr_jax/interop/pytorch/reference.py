"""PyTorch reference of the official architecture and training iteration.

Written from the paper's facts (``shared/docs/PAPER_FACTS.md``), with the
official module and key layout, so that

* the tests can check the Flax models and the weight conversion against
  PyTorch, and
* ``progsr_jax.bench --torch`` can time the same training iteration in
  PyTorch eager on the same machine.

Needs ``torch`` (the ``torch`` extra); nothing else in the package imports it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EqualConv2d(nn.Module):
    def __init__(self, cin, cout, k=3, p=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, p)
        w = self.conv.weight
        del self.conv._parameters["weight"]
        self.conv.weight_orig = nn.Parameter(torch.randn_like(w))
        nn.init.zeros_(self.conv.bias)
        self.scale = math.sqrt(2.0 / (cin * k * k))
        self.padding = p

    def forward(self, x):
        return F.conv2d(x, self.conv.weight_orig * self.scale, self.conv.bias, padding=self.padding)


class ResBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.conv = nn.Sequential(EqualConv2d(d, d), nn.BatchNorm2d(d), nn.ReLU(),
                                  EqualConv2d(d, d), nn.BatchNorm2d(d), nn.ReLU())

    def forward(self, x):
        return self.conv(x) + x


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(EqualConv2d(cin, cout), nn.LeakyReLU(0.2),
                                  EqualConv2d(cout, cout), nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.conv(x)


def _c(n, width):
    return max(1, int(round(n * width)))


class Generator(nn.Module):
    def __init__(self, width=1.0):
        super().__init__()
        c = lambda n: _c(n, width)  # noqa: E731
        self.step1 = nn.Sequential(nn.Conv2d(3, c(512), 3, 1, 1), nn.BatchNorm2d(c(512)), nn.ReLU(),
                                   ResBlock(c(512)), nn.ConvTranspose2d(c(512), c(256), 4, 2, 1),
                                   nn.BatchNorm2d(c(256)), nn.ReLU())
        self.step2 = nn.Sequential(ResBlock(c(256)), nn.ConvTranspose2d(c(256), c(128), 4, 2, 1),
                                   nn.BatchNorm2d(c(128)), nn.ReLU())
        self.step3 = nn.Sequential(ResBlock(c(128)), nn.ConvTranspose2d(c(128), c(64), 4, 2, 1),
                                   nn.BatchNorm2d(c(64)), nn.ReLU())
        self.to_rgb = nn.ModuleList([nn.Conv2d(c(256), 3, 1), nn.Conv2d(c(128), 3, 1),
                                     nn.Conv2d(c(64), 3, 1)])

    def forward(self, x, stage=3, alpha=-1.0):
        blocks = [self.step1, self.step2, self.step3]
        h = x
        for k in range(stage - 1):
            h = blocks[k](h)
        out = self.to_rgb[stage - 1](blocks[stage - 1](h))
        if stage > 1 and 0 <= alpha < 1:
            skip = F.interpolate(self.to_rgb[stage - 2](h), scale_factor=2, mode="nearest")
            out = (1 - alpha) * skip + alpha * out
        return out


class Discriminator(nn.Module):
    def __init__(self, width=1.0):
        super().__init__()
        c = lambda n: _c(n, width)  # noqa: E731
        self.from_rgb = nn.ModuleList([nn.Conv2d(3, c(256), 1), nn.Conv2d(3, c(128), 1),
                                       nn.Conv2d(3, c(64), 1)])
        self.step1 = nn.Sequential(ConvBlock(c(256), c(512)), nn.AvgPool2d(2))
        self.step2 = nn.Sequential(ConvBlock(c(128), c(256)), nn.AvgPool2d(2))
        self.step3 = nn.Sequential(ConvBlock(c(64), c(128)), nn.AvgPool2d(2))
        self.equal_conv = EqualConv2d(c(512) + 1, c(512))
        self.linear = nn.Linear(c(512), c(2048))
        self.linear2 = nn.Linear(c(2048), 1)

    def forward(self, x, stage=3, alpha=-1.0):
        blocks = [self.step1, self.step2, self.step3]
        out = blocks[stage - 1](self.from_rgb[stage - 1](x))
        if stage > 1:
            if 0 <= alpha < 1:
                skip = self.from_rgb[stage - 2](F.avg_pool2d(x, 2))
                out = (1 - alpha) * skip + alpha * out
            for k in range(stage - 2, -1, -1):
                out = blocks[k](out)
        std = x.std(0).mean().expand(x.size(0), 1, out.size(2), out.size(3))
        out = self.equal_conv(torch.cat([out, std], 1))
        out = out.mean(dim=(2, 3))
        return self.linear2(self.linear(out)).squeeze(1)


class VGG16Features(nn.Module):
    """torchvision VGG16 features up to relu4_3 (same layer order as torchvision)."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
    TAPS = (1, 4, 8, 12)

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(nn.Conv2d(cin, v, 3, 1, 1))
                cin = v
        self.convs = nn.ModuleList(layers)

    def forward(self, x):
        feats = []
        for i, layer in enumerate(self.convs):
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                x = F.relu(x)
                if i in self.TAPS:
                    feats.append(x)
        return feats


def load_flax_vgg_into(model: VGG16Features, flax_params) -> None:
    convs = [m for m in model.convs if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            p = flax_params[f"Conv_{i}"]
            conv.weight.copy_(torch.from_numpy(p["kernel"].transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(p["bias"].copy()))


def normalise_heatmaps(hm, ref):
    """Per-sample min-max over (68, H, W) (own statistics)."""
    lo = hm.amin(dim=(1, 2, 3), keepdim=True)
    hi = hm.amax(dim=(1, 2, 3), keepdim=True)
    return (hm - lo) / (hi - lo)


def train_iteration(G, D, vgg, fan, g_opt, d_opt, lr_img, hr_img, stage, alpha, weights):
    """One official training iteration (G update, then D update on a fresh G(x)).

    Returns the G and D losses as detached tensors on the inputs' device: nothing
    waits for the device (``bench --torch`` times many iterations, one sync at the end).
    """
    for p in D.parameters():
        p.requires_grad_(False)
    g_opt.zero_grad(set_to_none=True)
    fake = G(lr_img, stage, alpha)
    pixel = (fake - hr_img).abs().mean()
    adv = -D(fake, stage, alpha).mean()
    ff, fr = vgg(0.5 * fake + 0.5), vgg(0.5 * hr_img + 0.5)
    perceptual = sum(F.mse_loss(a, b) for a, b in zip(ff, fr))
    w = weights[stage]
    loss = w["pixel"] * pixel + w["perceptual"] * perceptual + w["adversarial"] * adv
    if stage > 1 and fan is not None:
        hm_f = normalise_heatmaps(fan(0.5 * fake + 0.5), None)
        with torch.no_grad():
            hm_r = normalise_heatmaps(fan(0.5 * hr_img + 0.5), None)
            m = hm_r.amax(dim=1, keepdim=True)
            m = (m - m.min()) / (m.max() - m.min())
        loss = loss + w["heatmap"] * F.mse_loss(hm_f, hm_r)
        loss = loss + w["attention"] * (m * (fake - hr_img).abs()).mean()
    loss.backward()
    g_opt.step()
    for p in D.parameters():
        p.requires_grad_(True)

    d_opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake = G(lr_img, stage, alpha)
    real_score = D(hr_img, stage, alpha)
    real_term = real_score.mean() - 0.001 * (real_score ** 2).mean()
    fake_term = D(fake, stage, alpha).mean()
    eps = torch.rand(hr_img.size(0), 1, 1, 1, device=hr_img.device)
    x_hat = (eps * hr_img + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(x_hat, stage, alpha).sum(), x_hat, create_graph=True)
    gp = ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    d_loss = fake_term - real_term + 10 * gp
    d_loss.backward()
    d_opt.step()
    return loss.detach(), d_loss.detach()
