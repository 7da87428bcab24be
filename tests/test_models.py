"""Model shapes, parameter counts, fade-in arithmetic and PyTorch parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from progsr_jax.errors import UserError
from progsr_jax.interop import state_dict as convert
from progsr_jax.nets import gan, vgg
from progsr_jax.nets.layers import ConvTranspose2d, count_params


@pytest.fixture(scope="module")
def paper_models():
    g, gv = gan.init_generator(jax.random.PRNGKey(0))
    d, dv = gan.init_discriminator(jax.random.PRNGKey(1))
    return g, gv, d, dv


def test_parameter_counts_match_paper(paper_models):
    _, gv, _, dv = paper_models
    assert count_params(gv["params"]) == 8_969_097
    assert count_params(dv["params"]) == 8_065_537
    # 76 official G keys = 66 + 10 num_batches_tracked; 24 official D keys.
    assert len(convert.variables_to_state_dict(gv, gan.G_CONV_TRANSPOSE)) == 66
    assert len(convert.variables_to_state_dict(dv)) == 24


def test_width_multiplier_scales_channels():
    _, gv = gan.init_generator(jax.random.PRNGKey(0), width=0.25)
    assert gv["params"]["step1_0"]["weight"].shape == (3, 3, 3, 128)
    assert gv["params"]["to_rgb_2"]["weight"].shape == (1, 1, 16, 3)


@pytest.fixture(scope="module")
def tiny_models():
    g, gv = gan.init_generator(jax.random.PRNGKey(0), width=0.125)
    d, dv = gan.init_discriminator(jax.random.PRNGKey(1), width=0.125)
    return g, gv, d, dv


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_shapes_at_every_stage(tiny_models, stage, alpha):
    g, gv, d, dv = tiny_models
    x = jnp.ones((2, 16, 16, 3))
    out, upd = g.apply(gv, x, stage=stage, alpha=alpha, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 16 * 2 ** stage, 16 * 2 ** stage, 3)
    assert set(upd) == {"batch_stats"}
    score = d.apply(dv, out, stage=stage, alpha=alpha)
    assert score.shape == (2,)


def test_fade_in_arithmetic(tiny_models):
    g, gv, _, _ = tiny_models
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
    # alpha = 0 is the nearest-upsampled previous stage; alpha = 1 the new block alone.
    prev = g.apply(gv, x, stage=1, train=False)
    at0 = g.apply(gv, x, stage=2, alpha=0.0, train=False)
    np.testing.assert_allclose(at0, jnp.repeat(jnp.repeat(prev, 2, 1), 2, 2), atol=1e-5)
    new = g.apply(gv, x, stage=2, alpha=1.0, train=False)
    mid = g.apply(gv, x, stage=2, alpha=0.25, train=False)
    np.testing.assert_allclose(mid, 0.75 * at0 + 0.25 * new, atol=1e-5)
    # Outside [0, 1) there is no fade (the official code's convention).
    np.testing.assert_allclose(g.apply(gv, x, stage=2, alpha=-1.0, train=False), new, atol=1e-6)


def test_conv_transpose_subpixel_equals_dilated_formulation():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 4))
    layer = ConvTranspose2d(3)
    v = layer.init(jax.random.PRNGKey(1), x)
    y = layer.apply(v, x)
    w = v["params"]["weight"]  # (kh, kw, in, out), PyTorch's (in, out, kh, kw) rearranged
    # Transposed conv = dilate the input by 2, pad by k-1-p = 2, correlate with the flipped kernel.
    ref = jax.lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), ((2, 2), (2, 2)),
                                       lhs_dilation=(2, 2),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = ref + v["params"]["bias"]
    assert y.shape == (2, 10, 14, 3)
    np.testing.assert_allclose(y, ref, atol=1e-5)


torch = pytest.importorskip("torch", reason="PyTorch parity needs the torch extra")


def _torch_to_flax(module, reference, conv_transpose=()):
    sd = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}  # no aliasing
    return convert.state_dict_to_variables(sd, reference, conv_transpose)


def _randomise_bn(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("stage,alpha", [(1, 1.0), (2, 0.7), (2, 1.0), (3, 0.4), (3, 1.0)])
def test_generator_matches_pytorch(stage, alpha):
    from progsr_jax.interop.pytorch import reference as tr
    torch.manual_seed(0)
    tg = tr.Generator(width=0.25)
    _randomise_bn(tg)
    g, ref = gan.init_generator(jax.random.PRNGKey(0), width=0.25)
    variables = _torch_to_flax(tg, ref, gan.G_CONV_TRANSPOSE)
    x = np.random.default_rng(0).standard_normal((3, 16, 16, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    # Eval mode: running statistics.
    tg.eval()
    with torch.no_grad():
        want = tg(xt, stage, alpha).numpy().transpose(0, 2, 3, 1)
    got = g.apply(variables, x, stage=stage, alpha=alpha, train=False)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Train mode: batch statistics, and the running statistics updated like PyTorch's.
    tg.train()
    with torch.no_grad():
        want = tg(xt, stage, alpha).numpy().transpose(0, 2, 3, 1)
    got, upd = g.apply(variables, x, stage=stage, alpha=alpha, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, atol=1e-4)
    new_stats = _torch_to_flax(tg, ref, gan.G_CONV_TRANSPOSE)["batch_stats"]
    for a, b in zip(jax.tree_util.tree_leaves(upd["batch_stats"]), jax.tree_util.tree_leaves(new_stats)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stage,alpha", [(1, 1.0), (2, 0.3), (3, 0.6), (3, 1.0)])
def test_discriminator_matches_pytorch(stage, alpha):
    from progsr_jax.interop.pytorch import reference as tr
    torch.manual_seed(1)
    td = tr.Discriminator(width=0.25)
    d, ref = gan.init_discriminator(jax.random.PRNGKey(0), width=0.25)
    variables = _torch_to_flax(td, ref)
    res = 16 * 2 ** stage
    x = np.random.default_rng(1).standard_normal((4, res, res, 3)).astype(np.float32)
    with torch.no_grad():
        want = td(torch.from_numpy(x.transpose(0, 3, 1, 2)), stage, alpha).numpy()
    got = d.apply(variables, x, stage=stage, alpha=alpha)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip_and_refusal(paper_models):
    g, gv, _, _ = paper_models
    sd = convert.variables_to_state_dict(gv, gan.G_CONV_TRANSPOSE)
    assert sd["step1.4.weight"].shape == (512, 256, 4, 4)  # PyTorch ConvTranspose2d layout
    assert sd["step1.0.weight"].shape == (512, 3, 3, 3)
    back = convert.state_dict_to_variables({"module." + k: v for k, v in sd.items()}, gv,
                                           gan.G_CONV_TRANSPOSE)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(gv)):
        np.testing.assert_array_equal(a, b)
    del sd["step2.0.conv.1.running_var"]
    with pytest.raises(UserError, match=r"step2\.0\.conv\.1\.running_var"):
        convert.state_dict_to_variables(sd, gv, gan.G_CONV_TRANSPOSE)


def test_vgg_features_and_input_gradient_match_torchvision_layout():
    """VGG16Features (reshape max-pool) vs torchvision-layout VGG16 on the same weights."""
    from progsr_jax.interop.pytorch import reference as tr

    params = vgg.load_vgg16_features_params()
    net = tr.VGG16Features()
    tr.load_flax_vgg_into(net, params)
    x = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    y = np.random.default_rng(4).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)

    def loss_jax(a):
        fa = vgg.VGG16Features().apply({"params": params}, a)
        fb = vgg.VGG16Features().apply({"params": params}, y)
        return sum(jnp.mean(jnp.square(p - q)) for p, q in zip(fa, fb)), fa

    (lj, feats), gj = jax.value_and_grad(loss_jax, has_aux=True)(x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    ft = net(xt)
    fr = net(torch.from_numpy(y.transpose(0, 3, 1, 2).copy()))
    lt = sum(torch.mean((p - q.detach()) ** 2) for p, q in zip(ft, fr))
    lt.backward()
    for a, b in zip(feats, ft):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy().transpose(0, 2, 3, 1),
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(lj), lt.item(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(gj), xt.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-3, atol=1e-6 * float(np.abs(gj).max()) + 1e-9)


def test_reference_iteration_keeps_tensors_on_the_inputs_device():
    """The PyTorch reference iteration (bench --torch on a GPU) leaves no tensor on the CPU.

    Everything runs on PyTorch's "meta" device (shapes only, no GPU needed) under
    a function mode that records every torch call returning a CPU tensor (the
    gradient penalty's epsilon once was one, which failed on CUDA with "Expected
    all tensors to be on the same device").  SGD keeps no CPU step counters.
    The losses come back as tensors on the same device (the iteration never
    waits for the device).
    """
    from torch.overrides import TorchFunctionMode

    from progsr_jax.interop.pytorch import reference as tr
    from progsr_jax.interop.pytorch.fan4 import FanSqueeze

    class CpuOutputs(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self.calls.append(getattr(func, "__name__", str(func)))
            return out

    dev = torch.device("meta")
    G, D = tr.Generator(0.0625).to(dev), tr.Discriminator(0.0625).to(dev)
    vgg_net, fan = tr.VGG16Features().to(dev), FanSqueeze().to(dev).eval()
    weights = {s: dict(pixel=1.0, perceptual=1.0, adversarial=1.0, heatmap=1.0, attention=1.0)
               for s in (1, 2, 3)}
    g_opt = torch.optim.SGD(G.parameters(), lr=1e-3)
    d_opt = torch.optim.SGD(D.parameters(), lr=1e-3)
    lr_img = torch.zeros(2, 3, 16, 16, device=dev)
    hr_img = torch.zeros(2, 3, 64, 64, device=dev)
    spy = CpuOutputs()
    with spy:
        losses = tr.train_iteration(G, D, vgg_net, fan, g_opt, d_opt, lr_img, hr_img, 2, 0.5,
                                    weights)
    assert spy.calls == [], f"torch calls that made CPU tensors: {spy.calls}"
    assert [t.device.type for t in losses] == ["meta", "meta"]
