"""XLA:CPU settings that progsr_jax applies when it is imported.

XLA:CPU lowers the weight gradient of a convolution (and the second-order
terms of the gradient penalty, which are of the same kind) to a generic
loop that reaches 8-20 GFLOP/s on a 2-core AVX-512 VM, against 50-130
GFLOP/s for the forward convolution.  With YNNPACK handling XLA's dot
fusions (``--xla_cpu_experimental_ynn_fusion_type=dot``) the same gradients
run 3-6x faster, and the full training iteration about 1.2-1.8x faster
(``python -m progsr_jax.bench``).  The flag only concerns the CPU backend.

The flag is added to ``XLA_FLAGS`` unless ``XLA_FLAGS`` already sets it, or
``PROGSR_JAX_CPU_FLAGS=0`` is set.  It takes effect only if JAX has not yet
started its backends, i.e. when ``progsr_jax`` is imported before the first
JAX computation (the command-line tools always are).
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)


def ynn_flag_set(environ=None) -> bool:
    """Whether ``XLA_FLAGS`` sets the YNNPACK fusion flag (by :func:`apply` or the user)."""
    environ = os.environ if environ is None else environ
    return CPU_FLAGS[0].split("=", 1)[0] in environ.get("XLA_FLAGS", "")


def apply(environ=None) -> list[str]:
    """Append :data:`CPU_FLAGS` to ``XLA_FLAGS``; returns the flags it added."""
    environ = os.environ if environ is None else environ
    if environ.get("PROGSR_JAX_CPU_FLAGS", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=", 1)[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
