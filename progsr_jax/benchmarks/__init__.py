"""The measurements behind ``python -m progsr_jax.bench`` (the command and its suite
live in :mod:`progsr_jax.bench`): :mod:`.accounting` (FLOPs, peaks, memory),
:mod:`.jax_rows` and :mod:`.torch_rows` (one training or inference row timed in each
framework), :mod:`.input_and_export` (the input pipeline, the exported model)."""
