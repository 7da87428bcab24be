"""progsr_jax: Progressive Face Super-Resolution (Kim et al., BMVC 2019) in JAX/Flax."""

from progsr_jax import _xla_cpu

_xla_cpu.apply()  # before JAX starts its backends; see progsr_jax/_xla_cpu.py

__version__ = "0.1.0"
