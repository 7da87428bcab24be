"""Convert the authors' PyTorch generator/discriminator checkpoints to an Orbax checkpoint.

    python tools/convert_pfsr_checkpoint.py --generator generator_checkpoint_singleGPU.ckpt \
        [--discriminator discriminator_checkpoint.ckpt] --output /weights/pfsr_flax

The official files are dicts ``{step, alpha, iteration, model_state_dict}``;
multi-GPU ones prefix every key with ``module.`` (both are accepted).  They are
read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers only.  Every key must match the model: missing or unexpected keys
are refused by name (the official evaluation's ``strict=False`` silently
ignored them and produced noise).  The result keeps ``step``, ``alpha`` and
``iteration`` and loads with ``progsr_jax.inference.load(DIR)``, the evaluation
and inference commands, or ``--config.init_from=DIR`` for fine-tuning.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import flags

from progsr_jax import cli
from progsr_jax.errors import UserError
from progsr_jax.inference import checkpoints as checkpoint
from progsr_jax.interop.state_dict import state_dict_to_variables
from progsr_jax.nets import gan


def read_official(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict as numpy, {step, alpha, iteration}) of an official checkpoint file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file {path} does not exist")
    try:
        import torch
    except ImportError:
        raise UserError("converting official checkpoints needs PyTorch: "
                        "pip install 'progsr_jax[torch]'") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"cannot read {path} as a PyTorch checkpoint "
                        f"(weights_only): {str(e).splitlines()[0][:200]}") from None
    info = {}
    if isinstance(obj, dict) and "model_state_dict" in obj:
        info = {k: obj[k] for k in ("step", "alpha", "iteration") if k in obj}
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} holds no state dict")
    sd = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise UserError(f"{path}: entry {k!r} is not a tensor")
        sd[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
    return sd, info


def _width(sd: dict, key: str, base: int) -> float:
    for k, v in sd.items():
        if k.endswith(key):
            return v.shape[0] / base
    raise UserError(f"the checkpoint has no {key!r}; is it a progressive face SR "
                    "generator/discriminator?")


def convert(generator: str, discriminator: str | None, output: str) -> dict:
    g_sd, info = read_official(generator)
    width = _width(g_sd, "step1.0.weight", 512)
    _, g_ref = gan.init_generator(0, width)
    g_vars = state_dict_to_variables(g_sd, jax.device_get(g_ref), gan.G_CONV_TRANSPOSE,
                                     what=f"generator checkpoint {generator}")
    d_vars = None
    if discriminator:
        d_sd, _ = read_official(discriminator)
        _, d_ref = gan.init_discriminator(0, _width(d_sd, "from_rgb.0.weight", 256))
        d_vars = state_dict_to_variables(d_sd, jax.device_get(d_ref),
                                         what=f"discriminator checkpoint {discriminator}")
    step = int(info.get("step", 3))
    if step not in (1, 2, 3):
        raise UserError(f"{generator}: step {step} is not 1, 2 or 3")
    meta = {"stage": step, "alpha": float(info.get("alpha", 1.0)),
            "iteration": int(info.get("iteration", 0)), "width": width, "dtype": "float32",
            "format": checkpoint.FORMAT, "converted_from": os.path.basename(generator)}
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {output}: {e.strerror}") from None
    checkpoint.save_converted(output, g_vars, d_vars, meta)
    return meta


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("generator", None, "official generator checkpoint (.ckpt)", flag_values=fv)
    flags.DEFINE_string("discriminator", None, "official discriminator checkpoint (optional)",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "output directory (Orbax checkpoint)", flag_values=fv)


def main(argv=None) -> int:
    fv = cli.parse(argv, define, __doc__)
    cli.require(fv, "generator", "output")
    meta = convert(fv.generator, fv.discriminator, fv.output)
    print(f"wrote {fv.output}: step {meta['stage']}, alpha {meta['alpha']}, "
          f"iteration {meta['iteration']}, width {meta['width']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
