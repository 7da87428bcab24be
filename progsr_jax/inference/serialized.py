"""Run a model written by :mod:`progsr_jax.export` with the interface of a SuperResolver.

    from progsr_jax.inference import serialized
    sr = serialized.load("exported/")    # model.onnx (onnxruntime), else model.stablehlo
                                         # (or serialized.load(folder, "stablehlo"))
    y = sr(x)    # x: float32 (N, 16, 16, 3) in [-1, 1] -> (N, S, S, 3), S = sr.output_size
    sr.stage, sr.alpha, sr.output_size, sr.backend

``infer --exported=DIR`` uses it.  The ONNX model runs in onnxruntime on the
CPU (imported only here; a one-line error says how to install it), the
StableHLO one through ``jax.export.deserialize``.  A model exported with a
fixed batch N runs any number of faces in chunks of N, the last one padded.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import jax
import numpy as np

from progsr_jax.errors import UserError
from progsr_jax.inference import batching

ONNX, STABLEHLO = "model.onnx", "model.stablehlo"
BACKENDS = ("onnx", "stablehlo")
FILES = {"onnx": ONNX, "stablehlo": STABLEHLO}
#: What a contract must hold, with the type of each value.
CONTRACT_FIELDS = {"stage": int, "alpha": (int, float), "output_size": int, "batch": (int, str)}


def _read_contract(path: str) -> dict:
    """The contract ``<model file>.json``, checked; UserError naming what is wrong."""
    name = path + ".json"
    try:
        with open(name) as f:
            contract = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the contract {name}: {getattr(e, 'strerror', None) or e} "
                        "(export the model again with python -m progsr_jax.export)") from None
    if not isinstance(contract, dict):
        raise UserError(f"the contract {name} is not a JSON object")
    for key, kind in CONTRACT_FIELDS.items():
        if not isinstance(contract.get(key), kind) or isinstance(contract.get(key), bool):
            raise UserError(f"the contract {name} has no valid {key!r} (got "
                            f"{contract.get(key)!r}); export the model again")
    if contract["stage"] not in (1, 2, 3) or contract["output_size"] != 16 << contract["stage"]:
        raise UserError(f"the contract {name} says stage {contract['stage']} with "
                        f"{contract['output_size']}x{contract['output_size']} outputs; "
                        "export the model again")
    batch = contract["batch"]
    if batch != "dynamic" and not (isinstance(batch, int) and batch >= 1):
        raise UserError(f"the contract {name} has batch {batch!r}; expected 'dynamic' or N >= 1")
    return contract


def _has_onnxruntime() -> bool:
    """Whether onnxruntime (an optional dependency) is installed."""
    try:
        importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def choose_backend(folder: str, backend: str | None = None, log=None) -> str:
    """The backend that runs ``folder``: ``backend`` when given, else ONNX when
    ``model.onnx`` is there and onnxruntime is installed, else StableHLO.  With both
    files present, ``log`` is told which one runs and how to pick the other."""
    present = [b for b in BACKENDS if os.path.isfile(os.path.join(folder, FILES[b]))]
    if backend is not None:
        if backend not in BACKENDS:
            raise UserError(f"unknown exported backend {backend!r}; expected onnx or stablehlo")
        if backend not in present:
            raise UserError(f"no {FILES[backend]} in {folder}"
                            + (f" (it holds {', '.join(FILES[b] for b in present)})"
                               if present else ""))
        return backend
    if not present:
        raise UserError(f"no exported model in {folder} (expected {ONNX} or {STABLEHLO}; "
                        "make one with python -m progsr_jax.export)")
    if len(present) == 1:
        return present[0]
    chosen = "onnx" if _has_onnxruntime() else "stablehlo"
    other = "stablehlo" if chosen == "onnx" else "onnx"
    if log is not None:
        log(f"{folder} holds {ONNX} and {STABLEHLO}: running {FILES[chosen]} "
            f"({'onnxruntime' if chosen == 'onnx' else 'jax.export'}); "
            f"--exported_format={other} runs the other")
    return chosen


class ExportedModel:
    """An exported generator: ``__call__(x) -> array``, ``output_size``, ``stage``, ``alpha``."""

    def __init__(self, folder: str, backend: str | None = None, log=None):
        folder = os.path.abspath(os.path.expanduser(folder))
        backend = choose_backend(folder, backend, log)
        path = os.path.join(folder, FILES[backend])
        self.path, self.backend = path, backend
        self.contract = _read_contract(path)
        self.stage = int(self.contract["stage"])
        self.alpha = float(self.contract["alpha"])
        self.output_size = int(self.contract["output_size"])
        batch = self.contract["batch"]
        self.batch = None if batch == "dynamic" else int(batch)
        self._run = self._onnx_runner(path) if backend == "onnx" else self._stablehlo_runner(path)

    def _check_shapes(self, inputs: list, outputs: list) -> None:
        """One input (N, 16, 16, 3) and one output (N, S, S, 3) as the contract says."""
        size = self.output_size
        want_in, want_out = [(16, 16, 3)], [(size, size, 3)]
        got_in = [tuple(s[1:]) for s in inputs]
        got_out = [tuple(s[1:]) for s in outputs]
        if got_in != want_in or got_out != want_out:
            raise UserError(f"{self.path} maps {inputs} to {outputs}, not (N, 16, 16, 3) to "
                            f"(N, {size}, {size}, 3) as its contract says; export it again")

    def _onnx_runner(self, path: str):
        try:
            import onnxruntime as ort  # optional dependency: only for ONNX models
        except ImportError:
            raise UserError("running an exported ONNX model needs onnxruntime: "
                            "pip install onnxruntime (or --exported_format=stablehlo)") from None
        try:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise UserError(f"cannot load {path} in onnxruntime (truncated or not an ONNX "
                            f"model?): {_first_line(e)}") from None
        self._check_shapes([i.shape for i in session.get_inputs()],
                           [o.shape for o in session.get_outputs()])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    def _stablehlo_runner(self, path: str):
        try:
            with open(path, "rb") as f:
                exp = jax.export.deserialize(bytearray(f.read()))
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 - a corrupt flatbuffer fails in many ways
            raise UserError(f"cannot load {path} (truncated or not a jax.export file?): "
                            f"{_first_line(e)}") from None
        self._check_shapes([a.shape for a in exp.in_avals], [a.shape for a in exp.out_avals])
        platform = jax.default_backend()
        if platform not in exp.platforms:
            raise UserError(f"{path} was exported for {', '.join(exp.platforms)}, not for this "
                            f"machine's {platform}; export it with --platforms={platform}")
        return lambda x: np.asarray(exp.call(x))

    def __call__(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim != 4 or x.shape[1:] != (16, 16, 3):
            raise UserError(f"expected inputs of shape (N, 16, 16, 3), got {tuple(x.shape)}")
        if self.batch is None or x.shape[0] == self.batch:
            return self._run(x)
        # A fixed-batch model: the one batched path, every call padded to that batch.

        return batching.super_resolve(self, x, self.batch, min_batch=self.batch)

    def __repr__(self):
        return (f"ExportedModel(stage={self.stage}, alpha={self.alpha}, backend={self.backend!r}, "
                f"path={self.path!r})")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def load(folder: str, backend: str | None = None, log=None) -> ExportedModel:
    """The exported model in ``folder`` (:func:`choose_backend`); ``log`` hears which one runs
    when the folder holds both."""
    if not folder or not os.path.isdir(os.path.expanduser(folder)):
        raise UserError(f"exported model folder not found: {folder}")
    return ExportedModel(folder, backend, log)
