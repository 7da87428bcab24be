"""progsr_jax: Progressive Face Super-Resolution (Kim et al., BMVC 2019) in JAX/Flax."""

__version__ = "0.1.0"
