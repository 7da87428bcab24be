"""Run a model written by :mod:`progsr_jax.export` with the interface of a SuperResolver.

    from progsr_jax.inference import serialized
    sr = serialized.load("exported/")      # model.onnx (onnxruntime), else model.stablehlo
    y = sr(x)    # x: float32 (N, 16, 16, 3) in [-1, 1] -> (N, S, S, 3), S = sr.output_size
    sr.stage, sr.alpha, sr.output_size, sr.backend

``infer --exported=DIR`` uses it.  The ONNX model runs in onnxruntime on the
CPU (imported only here; a one-line error says how to install it), the
StableHLO one through ``jax.export.deserialize``.  A model exported with a
fixed batch N runs any number of faces in chunks of N, the last one padded.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from progsr_jax.errors import UserError
from progsr_jax.inference import batching

ONNX, STABLEHLO = "model.onnx", "model.stablehlo"


def _read_contract(path: str) -> dict:
    try:
        with open(path + ".json") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the contract {path}.json: {getattr(e, 'strerror', None) or e}"
                        ) from None


class ExportedModel:
    """An exported generator: ``__call__(x) -> array``, ``output_size``, ``stage``, ``alpha``."""

    def __init__(self, folder: str, backend: str | None = None):
        folder = os.path.abspath(os.path.expanduser(folder))
        if backend is None:
            backend = "onnx" if os.path.isfile(os.path.join(folder, ONNX)) else "stablehlo"
        if backend not in ("onnx", "stablehlo"):
            raise UserError(f"unknown exported backend {backend!r}; expected onnx or stablehlo")
        path = os.path.join(folder, ONNX if backend == "onnx" else STABLEHLO)
        if not os.path.isfile(path):
            raise UserError(f"no exported model in {folder} (expected {ONNX} or {STABLEHLO}; "
                            "make one with python -m progsr_jax.export)")
        self.path, self.backend = path, backend
        self.contract = _read_contract(path)
        self.stage = int(self.contract["stage"])
        self.alpha = float(self.contract["alpha"])
        self.output_size = int(self.contract["output_size"])
        batch = self.contract["batch"]
        self.batch = None if batch == "dynamic" else int(batch)
        self._run = self._onnx_runner(path) if backend == "onnx" else self._stablehlo_runner(path)

    @staticmethod
    def _onnx_runner(path: str):
        try:  # optional: onnxruntime (the `export` extra), needed for ONNX models only
            import onnxruntime as ort
        except ImportError:
            raise UserError("running an exported ONNX model needs onnxruntime: "
                            "pip install onnxruntime") from None
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    @staticmethod
    def _stablehlo_runner(path: str):
        with open(path, "rb") as f:
            exp = jax.export.deserialize(f.read())
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


def load(folder: str, backend: str | None = None) -> ExportedModel:
    """The exported model in ``folder`` (ONNX when present, else StableHLO)."""
    if not folder or not os.path.isdir(os.path.expanduser(folder)):
        raise UserError(f"exported model folder not found: {folder}")
    return ExportedModel(folder, backend)
