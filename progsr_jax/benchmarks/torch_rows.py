"""PyTorch eager rows: the authors' training iteration and the generator, timed like the
JAX rows (``cudnn.benchmark`` on, no wait inside the timed loop)."""

from __future__ import annotations

import numpy as np

from progsr_jax.benchmarks.jax_rows import JaxTrain, host_faces, timed
from progsr_jax.errors import UserError
from progsr_jax.nets import gan, vgg
from progsr_jax.training import config as config_files
from progsr_jax.training.sr import config as sr_config

# --------------------------------------------------------------------------- PyTorch


def load_torch():
    """The torch module (an optional, heavy dependency: imported only here)."""
    try:
        import torch  # optional dependency (the torch extra)
    except ImportError:
        raise UserError("--torch needs PyTorch: pip install 'progsr_jax[torch]'") from None
    return torch


def _torch_device(torch, wanted: str):
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError(f"PyTorch {torch.__version__} has no CUDA device (a CPU-only build, or "
                        "no GPU visible): the PyTorch rows are skipped; install a CUDA build "
                        "of torch to compare")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    return torch.device(wanted)


class _TorchRow:
    """What the PyTorch rows share: device, autocast, waits, memory and the report."""

    def __init__(self, torch, dev, dtype: str):
        self.torch, self.dev, self.dtype = torch, dev, dtype
        self.cuda = dev.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(dev)

    def autocast(self):
        return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16,
                                   enabled=self.dtype == "bfloat16")

    def wait(self, _=None):
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def host_uint8(self, faces: np.ndarray):
        """NHWC uint8 faces in host memory (pinned when copying to a GPU)."""
        t = self.torch.from_numpy(faces)
        return t.pin_memory() if self.cuda else t

    def to_device_float(self, u8):
        """Host uint8 NHWC -> device float NCHW in [-1, 1], without blocking the host."""
        x = u8.to(self.dev, non_blocking=True).permute(0, 3, 1, 2)
        return x.float() / 127.5 - 1.0

    def fields(self, precision_name: str) -> dict:
        torch = self.torch
        return {"framework": "torch", "dtype": self.dtype, "precision": precision_name,
                "device": (f"gpu:{torch.cuda.get_device_name(self.dev)}" if self.cuda
                           else "cpu"),
                "num_devices": 1, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(self.dev) if self.cuda
                else None, "compile_s": 0.0}

    def precision(self) -> str:
        if self.dtype == "bfloat16":
            return "bfloat16"
        torch = self.torch
        if (self.cuda and torch.cuda.get_device_capability(self.dev)[0] >= 8
                and torch.backends.cudnn.allow_tf32):
            return "tf32"
        return "float32"


class TorchTrain(_TorchRow):
    """The authors' iteration in PyTorch eager at one stage, measured both ways."""

    POOL = JaxTrain.POOL

    def __init__(self, stage: int, batch_size: int, dtype: str, width: float, use_fan: bool,
                 device: str = "auto"):
        torch = load_torch()
        # PyTorch modules of the reference (they need torch, an optional dependency).
        from progsr_jax.interop.pytorch import reference as tr
        from progsr_jax.interop.pytorch.fan4 import FanSqueeze

        super().__init__(torch, _torch_device(torch, device), dtype)
        self.tr, self.stage, self.batch_size, self.width = tr, stage, batch_size, width
        self.use_fan = use_fan
        dev = self.dev
        torch.manual_seed(0)
        self.G, self.D = tr.Generator(width).to(dev), tr.Discriminator(width).to(dev)
        self.vgg = tr.VGG16Features().to(dev)
        tr.load_flax_vgg_into(self.vgg, vgg.load_vgg16_features_params())
        self.fan = FanSqueeze().to(dev).eval() if use_fan else None
        for net in (self.vgg, self.fan):
            for p in (net.parameters() if net is not None else ()):
                p.requires_grad_(False)
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=1e-3, betas=(0.0, 0.99))
        self.d_opt = torch.optim.Adam(self.D.parameters(), lr=1e-3, betas=(0.0, 0.99))
        paper = config_files.load("step3.py")
        self.weights = {k: sr_config.loss_weights(paper, k) for k in (1, 2, 3)}
        self.res = gan.output_size(stage)
        self.alpha = 0.5 if stage > 1 else 1.0
        self.pool = {"lr": self.host_uint8(host_faces(self.POOL * batch_size, 16, 0)),
                     "hr": self.host_uint8(host_faces(self.POOL * batch_size, self.res, 1))}
        self.batch = (self.to_device_float(self.pool["lr"][:batch_size]),
                      self.to_device_float(self.pool["hr"][:batch_size]))

    def _step(self, lr_img, hr_img):
        with self.autocast():
            return self.tr.train_iteration(self.G, self.D, self.vgg, self.fan, self.g_opt,
                                           self.d_opt, lr_img, hr_img, self.stage, self.alpha,
                                           self.weights)

    def _host_step(self, i):
        rows = slice((i % self.POOL) * self.batch_size, (i % self.POOL + 1) * self.batch_size)
        return self._step(self.to_device_float(self.pool["lr"][rows]),
                          self.to_device_float(self.pool["hr"][rows]))

    def measure(self, io: str, steps: int, warmup: int) -> dict:
        run = (lambda i: self._step(*self.batch)) if io == "device" else self._host_step
        dt, (g_loss, _) = timed(run, steps, warmup, self.wait)
        return {**self.fields(self.precision()), "mode": "train", "io": io, "stage": self.stage,
                "batch_size": self.batch_size, "width": self.width, "fan": self.use_fan,
                "images_per_sec": self.batch_size / dt, "step_time_s": dt,
                "finite": bool(self.torch.isfinite(g_loss.float()).item())}


class TorchInference(_TorchRow):
    """The step-3 generator in PyTorch eager (no grad), measured both ways."""

    def __init__(self, batch_size: int, dtype: str, width: float, device: str = "auto"):
        torch = load_torch()
        # The reference generator needs torch, an optional dependency.
        from progsr_jax.interop.pytorch import reference as tr

        super().__init__(torch, _torch_device(torch, device), dtype)
        self.batch_size, self.width = batch_size, width
        torch.manual_seed(0)
        self.G = tr.Generator(width).to(self.dev).eval()
        self.x = self.to_device_float(self.host_uint8(host_faces(batch_size, 16, 2)))

    def _forward(self, x):
        with self.torch.inference_mode(), self.autocast():
            return self.G(x, 3, 1.0)

    def measure(self, io: str, steps: int, warmup: int) -> dict:
        torch, b = self.torch, self.batch_size
        if io == "device":
            dt, _ = timed(lambda i: self._forward(self.x), steps, warmup, self.wait)
        else:
            faces = self.host_uint8(host_faces((warmup + steps) * b, 16, 3))
            out = torch.empty(((warmup + steps) * b, 128, 128, 3), dtype=torch.uint8)
            out = out.pin_memory() if self.cuda else out

            def run(i):
                rows = slice(i * b, (i + 1) * b)
                y = self._forward(self.to_device_float(faces[rows]))
                y = ((y.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
                out[rows].copy_(y.permute(0, 2, 3, 1), non_blocking=True)
                return y

            dt, _ = timed(run, steps, warmup, self.wait)
        return {**self.fields(self.precision()), "mode": "inference", "io": io,
                "batch_size": b, "width": self.width, "faces_per_sec": b / dt,
                "images_per_sec": b / dt, "step_time_s": dt}


# --------------------------------------------------------------------------- other modes
