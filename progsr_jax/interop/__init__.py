"""Interoperability with the authors' PyTorch world.

* :mod:`~progsr_jax.interop.state_dict`: PyTorch state-dict keys and layouts
  <-> Flax variable trees (one-to-one, refusing missing or extra keys).
* :mod:`~progsr_jax.interop.safe_pickle`: a restricted unpickler that builds
  only numpy arrays and plain containers (never runs pickled code).
* :mod:`~progsr_jax.interop.torch_pickle`: PyTorch files (zip and legacy
  formats) read with that unpickler, without importing torch.
* :mod:`~progsr_jax.interop.pytorch`: PyTorch reference networks, for parity
  tests, the benchmark and the conversion tools; importing it needs the
  ``torch`` extra.
"""
