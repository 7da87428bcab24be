r"""Export a trained generator to files that run without this package: ONNX and StableHLO.

Usage::

    python -m progsr_jax.export --checkpoint=PATH --output=DIR \
        [--format=onnx,stablehlo] [--batch_size=dynamic|N] [--partial]

``--checkpoint`` is anything :func:`progsr_jax.inference.load` reads (a
training workdir, a checkpoint directory, a converted official checkpoint).
The generator is exported in eval mode at the checkpoint's stage and alpha:
BatchNorm uses its running statistics, and the weights, the statistics and
alpha are constants of the exported function, which is one map

    lr (N, 16, 16, 3) float32 NHWC in [-1, 1]  ->  sr (N, S, S, 3) float32 NHWC

with S = 128 for a step-3 model (64 at stage 2, 32 at stage 1).  The output
is the generator's, not clipped; 8-bit pixels are
``clip(round((sr + 1) * 127.5), 0, 255)`` and the input is ``u8 / 127.5 - 1``.

``--output=DIR`` gets, per format, the artefact and its contract (JSON):

``model.onnx`` + ``model.onnx.json``
    An ONNX model (opset 23; input ``lr``, output ``sr``) made by jax2onnx;
    runs in onnxruntime (``pip install 'progsr_jax[export]'`` for the converter).
``model.stablehlo`` + ``model.stablehlo.json``
    ``jax.export``'s serialized StableHLO (lowered for ``--platforms``), run with
    ``jax.export.deserialize(open(f, 'rb').read()).call(x)`` by the JAX that
    wrote it or a newer one; this package is not needed.

``--batch_size=dynamic`` (default) accepts any N; ``--batch_size=N`` fixes it.

A finished step-3 model (stage 3, fade-in done) is what the command expects;
a checkpoint stopped earlier (stage 1 or 2, or inside a fade-in) is an error
unless ``--partial`` is given, and then it is exported as it is (its contract
records the stage, alpha and output size).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import flags

from progsr_jax import __version__, cli, inference
from progsr_jax.data import writing
from progsr_jax.errors import UserError

FORMATS = ("onnx", "stablehlo")
FILES = {"onnx": "model.onnx", "stablehlo": "model.stablehlo"}
INPUT_NAME, OUTPUT_NAME = "lr", "sr"
ONNX_OPSET = 23
PLATFORMS = ("cpu", "cuda", "tpu")
NEEDS_CONVERTER = ("exporting ONNX needs jax2onnx, onnx and onnxruntime: "
                   "pip install 'progsr_jax[export]' && pip install --no-deps jax2onnx==0.17.1")


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "training workdir, checkpoint directory or "
                        "converted checkpoint", flag_values=fv)
    flags.DEFINE_string("output", None, "folder for the artefacts and their JSON contracts",
                        flag_values=fv)
    flags.DEFINE_list("format", list(FORMATS), f"comma-separated: {', '.join(FORMATS)}",
                      flag_values=fv)
    flags.DEFINE_string("batch_size", "dynamic", "'dynamic' (any batch) or a fixed batch N",
                        flag_values=fv)
    flags.DEFINE_list("platforms", list(PLATFORMS), "StableHLO: platforms to lower for "
                      f"(any of {', '.join(PLATFORMS)})", flag_values=fv)
    flags.DEFINE_boolean("partial", False, "export a model stopped before the end of step 3 "
                         "(stage 1 or 2, or inside a fade-in) as it is", flag_values=fv)


def parse_formats(formats: Sequence[str]) -> list[str]:
    out = [f.strip().lower() for f in formats if f.strip()]
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise UserError(f"unknown --format={','.join(formats)}; expected a comma-separated "
                        f"list of {', '.join(FORMATS)}")
    return list(dict.fromkeys(out))


def parse_batch(batch: str | int | None) -> int | None:
    """``None`` for a dynamic batch, else the fixed batch size."""
    if batch is None or str(batch).strip().lower() == "dynamic":
        return None
    try:
        n = int(str(batch))
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--batch_size must be 'dynamic' or a positive integer, got {batch!r}")
    return n


def finished(sr) -> bool:
    """Stage 3 with the fade-in done (alpha outside [0, 1), as :func:`models.fading`)."""
    return sr.stage == 3 and not 0 <= sr.alpha < 1


def generator_fn(sr):
    """``lr -> sr`` of a loaded :class:`~progsr_jax.inference.SuperResolver` in eval mode,
    with its variables, stage and alpha as constants."""
    variables, stage, alpha = sr.variables, sr.stage, sr.alpha

    def generate(x):
        return sr.model.apply(variables, x, stage=stage, alpha=jnp.float32(alpha), train=False)

    return generate


def contract(sr, fmt: str, batch: int | None, checkpoint: str, extra: dict) -> dict:
    """The JSON contract that sits beside an artefact."""
    n = "batch" if batch is None else batch
    size = sr.output_size
    return {
        "format": fmt,
        "file": FILES[fmt],
        "input": {"name": INPUT_NAME, "layout": "NHWC", "shape": [n, 16, 16, 3],
                  "dtype": "float32", "range": [-1.0, 1.0], "from_uint8": "u8 / 127.5 - 1"},
        "output": {"name": OUTPUT_NAME, "layout": "NHWC", "shape": [n, size, size, 3],
                   "dtype": "float32", "range": "about [-1, 1], not clipped",
                   "to_uint8": "clip(round((sr + 1) * 127.5), 0, 255)"},
        "batch": "dynamic" if batch is None else batch,
        "output_size": size,
        "stage": sr.stage,
        "alpha": sr.alpha,
        "finished_step3": finished(sr),
        "width": sr.width,
        "compute_dtype": jnp.dtype(sr.model.dtype).name,
        "checkpoint": os.path.abspath(checkpoint),
        "iteration": sr.iteration,
        **extra,
        "versions": {"progsr_jax": __version__, "jax": jax.__version__,
                     "python": platform.python_version()},
    }


def onnx_converter():
    """``(onnx, jax2onnx.to_onnx)``; a one-line UserError saying how to install them."""
    try:  # optional: the `export` extra and jax2onnx, needed for ONNX only
        import onnx
        from jax2onnx import to_onnx
    except ImportError:
        raise UserError(NEEDS_CONVERTER) from None
    return onnx, to_onnx


def export_onnx(fn, batch: int | None) -> tuple[bytes, dict]:
    """``fn`` as a serialized ONNX model, and the contract's converter fields."""
    onnx, to_onnx = onnx_converter()

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # "value type ... not known" notes
    shape = ("batch" if batch is None else batch, 16, 16, 3)
    model = to_onnx(fn, [shape], model_name="progsr_generator", opset=ONNX_OPSET,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    return model.SerializeToString(), {
        "converter": {"name": "jax2onnx", "version": importlib.metadata.version("jax2onnx")},
        "opset": ONNX_OPSET, "onnx": onnx.__version__}


def export_stablehlo(fn, batch: int | None, platforms: Sequence[str]) -> tuple[bytes, dict]:
    """``jax.export(jax.jit(fn))`` serialized, and the contract's fields."""
    shape = jax.export.symbolic_shape("batch, 16, 16, 3") if batch is None else (batch, 16, 16, 3)
    exp = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct(shape, jnp.float32))
    return bytes(exp.serialize()), {
        "converter": {"name": "jax.export", "version": jax.__version__},
        "platforms": list(exp.platforms),
        "calling_convention_version": exp.calling_convention_version,
        "run_with": "jax.export.deserialize(open(file, 'rb').read()).call(x)"}


def export(checkpoint: str, output: str, formats: Sequence[str] = FORMATS,
           batch_size: str | int | None = "dynamic", partial: bool = False,
           platforms: Sequence[str] = PLATFORMS, log=print) -> dict[str, str]:
    """Exports the generator at ``checkpoint`` into ``output``; returns ``{format: file}``.

    Everything is checked and converted before ``output`` is created; each
    file is written atomically (:mod:`progsr_jax.data.writing`).
    """
    formats = parse_formats(formats)
    batch = parse_batch(batch_size)
    platforms = [p.strip().lower() for p in platforms if p.strip()]
    if not platforms or any(p not in PLATFORMS for p in platforms):
        raise UserError(f"unknown --platforms={','.join(platforms)}; expected any of "
                        f"{', '.join(PLATFORMS)}")
    if not checkpoint:
        raise UserError("--checkpoint=PATH is required (a training workdir, a checkpoint "
                        "directory or a converted official checkpoint)")
    if not output:
        raise UserError("--output=DIR is required")
    if not os.path.exists(checkpoint):
        raise UserError(f"checkpoint not found: {checkpoint}")
    writing.check_not_input(output, writing.checkpoint_inputs(checkpoint))
    out = writing.check_output(output)
    if "onnx" in formats:  # a missing converter stops before the slow load
        onnx_converter()

    sr = inference.load(checkpoint)
    if not finished(sr) and not partial:
        raise UserError(f"{checkpoint} holds a stage-{sr.stage} model at alpha {sr.alpha:g} "
                        f"({sr.output_size}x{sr.output_size} outputs), not a finished step-3 "
                        "model; add --partial to export it as it is")
    fn = generator_fn(sr)
    log(f"exporting the stage-{sr.stage} generator (alpha {sr.alpha:g}, width {sr.width:g}, "
        f"16x16 -> {sr.output_size}x{sr.output_size}, batch "
        f"{'dynamic' if batch is None else batch}) from {checkpoint}")
    artefacts = {}
    for fmt in formats:
        payload, extra = (export_onnx(fn, batch) if fmt == "onnx"
                          else export_stablehlo(fn, batch, platforms))
        artefacts[fmt] = payload, contract(sr, fmt, batch, checkpoint, extra)
    written = {}
    for fmt in FORMATS:
        if fmt not in artefacts and os.path.isfile(os.path.join(out, FILES[fmt])):
            log(f"note: {out} also holds an older {FILES[fmt]}; infer --exported runs "
                f"{FILES['onnx']} when both are there (--exported_format picks one)")
    for fmt, (payload, terms) in artefacts.items():
        path = os.path.join(out, FILES[fmt])
        writing.write_bytes(path, payload)
        writing.write_json(path + ".json", terms, indent=1)
        log(f"wrote {path} ({len(payload) / 2 ** 20:.1f} MiB) and {FILES[fmt]}.json")
        written[fmt] = path
    return written


def main(argv: Sequence[str] | None = None) -> int:
    fv = cli.parse(argv, define, __doc__)
    export(fv.checkpoint, fv.output, fv.format, fv.batch_size, fv.partial, fv.platforms)
    return 0


if __name__ == "__main__":
    cli.run(main)
