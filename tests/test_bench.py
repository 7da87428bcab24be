"""The benchmark's FLOP count against a count by hand, its peak table, and the GPU suite's rehearsal.

The hand count below is made from the layer shapes alone (it shares no code
with the package).  A convolution costs 2 FLOPs per multiply-add, and it
multiplies only where the kernel tap falls inside the input: a 3x3 "same"
convolution on an n x n map has (3n - 2)^2 tap positions, not 9 n^2 (XLA's
cost analysis counts the same way; counting the zero padding too adds 1% at
128x128 and 8% at 16x16).  The transposed convolutions are what the code
computes: one 2x2 convolution with 4x the output channels on the input
padded by one.  Per image of the batch:

* forward F(net); the backward to the input ("data gradients") costs F again,
  less the layers whose input needs no gradient (the images the networks
  read, except where they are the generator's output or the critic's
  interpolated input); the weight gradients cost F;
* G step: G forward, G's weight and data gradients (none into the 16x16
  input); the critic on G(x): forward and data gradients; VGG16 (to relu4_3)
  on G(x): forward and data gradients, and on the real image: forward only;
  the FAN likewise (stages 2-3);
* critic step: a fresh G forward; the critic on the real and on the fake
  image (forward, weight and data gradients); the gradient penalty: the
  critic's forward on the interpolated image, its data gradient down to that
  image, and the double backward through that gradient, which costs one
  data-gradient-like and one weight-gradient-like pass: 2 F.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from progsr_jax.benchmarks import accounting, jax_rows, torch_rows

REPO = pathlib.Path(__file__).resolve().parents[1]


def _taps(n: int, k: int, pad: int) -> int:
    """(output position, kernel tap) pairs along one axis whose input lies inside the map."""
    return sum(1 for o in range(n + 2 * pad - k + 1) for t in range(k) if 0 <= o + t - pad < n)


def _conv(n, cin, cout, k=3, pad=1, reads_image=False):
    return {"macs": _taps(n, k, pad) ** 2 * cin * cout, "reads_image": reads_image}


def _conv_transpose(n, cin, cout):
    return {"macs": _taps(n + 2, 2, 0) ** 2 * cin * 4 * cout, "reads_image": False}


def _dense(cin, cout):
    return {"macs": cin * cout, "reads_image": False}


def _c(n, width):
    return max(1, int(round(n * width)))


def hand_generator(stage, width=1.0):
    c = lambda n: _c(n, width)  # noqa: E731
    layers = [_conv(16, 3, c(512)), _conv(16, c(512), c(512)), _conv(16, c(512), c(512)),
              _conv_transpose(16, c(512), c(256))]
    if stage >= 2:
        layers += [_conv(32, c(256), c(256)), _conv(32, c(256), c(256)),
                   _conv_transpose(32, c(256), c(128))]
    if stage >= 3:
        layers += [_conv(64, c(128), c(128)), _conv(64, c(128), c(128)),
                   _conv_transpose(64, c(128), c(64))]
    to_rgb = [(32, c(256)), (64, c(128)), (128, c(64))]
    layers.append(_conv(*to_rgb[stage - 1], 3, 1, 0))
    if stage > 1:  # the fade-in's skip path
        layers.append(_conv(*to_rgb[stage - 2], 3, 1, 0))
    return layers


def hand_critic(stage, width=1.0):
    c = lambda n: _c(n, width)  # noqa: E731
    blocks = {1: (c(256), c(512)), 2: (c(128), c(256)), 3: (c(64), c(128))}
    n = 16 * 2 ** stage
    cin, cout = blocks[stage]
    layers = [_conv(n, 3, cin, 1, 0, reads_image=True), _conv(n, cin, cout), _conv(n, cout, cout)]
    n //= 2
    if stage > 1:  # from_rgb of the pooled image (fade-in), then the earlier blocks
        layers.append(_conv(n, 3, blocks[stage - 1][0], 1, 0, reads_image=True))
        for k in range(stage - 1, 0, -1):
            cin, cout = blocks[k]
            layers += [_conv(n, cin, cout), _conv(n, cout, cout)]
            n //= 2
    return layers + [_conv(16, c(512) + 1, c(512)), _dense(c(512), c(2048)), _dense(c(2048), 1)]


def hand_vgg(n):
    shapes = [(1, 3, 64), (1, 64, 64), (2, 64, 128), (2, 128, 128), (4, 128, 256),
              (4, 256, 256), (4, 256, 256), (8, 256, 512), (8, 512, 512), (8, 512, 512)]
    return [_conv(n // d, a, b, reads_image=(i == 0)) for i, (d, a, b) in enumerate(shapes)]


def hand_fan(n):
    return [_conv(n, 3, 32, 5, 2, reads_image=True), _conv(n, 32, 64), _conv(n, 64, 128),
            _conv(n, 128, 128), _conv(n, 128, 68)]


def _f(layers):
    return sum(layer["macs"] for layer in layers)


def _data_grads(layers, into_image):
    return sum(layer["macs"] for layer in layers if into_image or not layer["reads_image"])


def hand_step_flops(stage, width=1.0):
    """FLOPs per image of one training iteration (the paper's losses, the FAN on)."""
    n = 16 * 2 ** stage
    g, d, v, fan = hand_generator(stage, width), hand_critic(stage, width), hand_vgg(n), hand_fan(n)
    g_step = 3 * _f(g) - g[0]["macs"]  # forward, weight gradients, data gradients but the input's
    g_step += _f(d) + _data_grads(d, True)  # adversarial term: no weight gradients
    g_step += 2 * _f(v) + _data_grads(v, True)  # perceptual: fake forward and back, real forward
    if stage > 1:
        g_step += 2 * _f(fan) + _data_grads(fan, True)  # heatmap and attention terms
    d_step = _f(g)  # a fresh G(x)
    d_step += 2 * (2 * _f(d) + _data_grads(d, False))  # real and fake
    d_step += 4 * _f(d) - (_f(d) - _data_grads(d, True))  # gradient penalty
    return 2 * (g_step + d_step)


def test_hand_count_per_network_matches_the_issue_figures():
    """GFLOP per 128x128 image (forward): G ~10.4, critic ~22.4, VGG ~8.7, FAN ~10.4."""
    got = [2 * _f(layers) / 1e9 for layers in (hand_generator(3), hand_critic(3), hand_vgg(128),
                                                hand_fan(128))]
    assert got == pytest.approx([10.4, 22.4, 8.7, 10.4], rel=0.01)
    assert hand_step_flops(3) / 1e9 == pytest.approx(367, rel=0.01)  # 390 before issue 26
    assert hand_step_flops(1) / 1e9 == pytest.approx(112, rel=0.01)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bench_flops_match_the_hand_count(stage):
    flops = jax_rows.train_flops(stage, batch_size=2)
    assert flops / 2 == pytest.approx(hand_step_flops(stage), rel=0.05)


def test_bench_inference_flops_match_the_hand_count():
    flops = jax_rows.inference_flops(batch_size=2)
    assert flops / 2 == pytest.approx(2 * _f(hand_generator(3)), rel=0.05)


def test_peak_table_and_precision():
    import jax

    assert accounting.peak_tflops("NVIDIA H200", "tf32") == pytest.approx(494.7)
    assert accounting.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756.0)
    assert accounting.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert accounting.peak_tflops("TPU v5 lite", "bfloat16") == pytest.approx(197.0)
    assert accounting.peak_tflops("cpu", "float32") is None
    assert accounting.peak_tflops("cpu", "float32", override=1.5) == 1.5
    cpu = jax.devices("cpu")[0]
    assert accounting.precision("float32", cpu) == "float32"
    assert accounting.precision("bfloat16", cpu) == "bfloat16"
    out = accounting.with_rates({"flops_per_step": 4e12, "step_time_s": 0.5, "precision": "tf32",
                             "device": "gpu:NVIDIA H200"}, None)
    assert out["achieved_tflops"] == pytest.approx(8.0)
    assert out["fraction_of_peak"] == pytest.approx(8.0 / 494.7)


@pytest.mark.slow
def test_gpu_suite_rehearsal_on_the_cpu_produces_every_row(tmp_path):
    """tools/bench_gpu.sh at tiny sizes: every row, timed torch, JAX, JAX, torch, and the table."""
    pytest.importorskip("torch", reason="the suite's PyTorch side needs torch")
    env = dict(os.environ, BENCH_GPU_REHEARSAL="1", OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=str(REPO))
    log = tmp_path / "bench_gpu.log"
    with open(log, "w") as f:
        proc = subprocess.run(["bash", str(REPO / "tools" / "bench_gpu.sh")], stdout=f,
                              stderr=subprocess.STDOUT, env=env, timeout=1500, cwd=tmp_path)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "bench_gpu.jsonl").read_text().splitlines()]
    assert not [x for x in lines if "error" in x], text[-3000:]
    rows = [x["table_row"] for x in lines if "table_row" in x]
    want = {(f"train stage {s}, batch 2, {d}", io) for s in (1, 2, 3)
            for d in ("float32", "bfloat16") for io in ("device", "end_to_end")}
    want |= {(f"inference 16->128, batch {b}, {d}", io) for b in (4, 8)
             for d in ("float32", "bfloat16") for io in ("device", "end_to_end")}
    assert {(r["row"], r["io"]) for r in rows} == want
    for r in rows:
        assert len(r["jax_runs"]) == 2 and len(r["torch_runs"]) == 2, r
        assert r["jax_over_torch"] > 0 and r["flops_per_image"] > 0, r
        assert f"| {r['row']} | {r['io']} |" in text
    measured = [x for x in lines if "images_per_sec" in x]
    # each row timed torch, JAX, JAX, torch: the JAX lines sit between the two PyTorch passes
    order = [x["framework"] for x in measured]
    assert order == ["torch"] * 20 + ["jax"] * 40 + ["torch"] * 20
    for x in measured:
        if x["framework"] == "jax":
            assert x["flops_per_step"] > 0 and x["memory_bytes"] > 0
            assert x.get("finite", True)
    assert "Paper schedule" in text


def test_pytorch_without_cuda_is_a_clear_reason():
    torch = pytest.importorskip("torch", reason="needs torch")
    if torch.cuda.is_available():
        pytest.skip("PyTorch has CUDA here")
    from progsr_jax.errors import UserError

    with pytest.raises(UserError, match="has no CUDA device.*PyTorch rows are skipped"):
        torch_rows.TorchInference(4, "float32", 0.0625, device="cuda")
