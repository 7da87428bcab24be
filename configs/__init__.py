"""The recipes, read as files (``--config=configs/step3.py``); installed as ``progsr_jax.configs``."""
