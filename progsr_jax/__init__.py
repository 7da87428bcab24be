"""progsr_jax: Progressive Face Super-Resolution (Kim et al., BMVC 2019) in JAX/Flax."""

from progsr_jax import xla_flags

xla_flags.apply()  # before JAX starts its backends; see progsr_jax/xla_flags.py

__version__ = "0.1.0"
