"""attn experiments: tasks, data, training, evaluation, sweeps, comparison and benchmarks."""

import logging

# JAX logs at INFO, on every start, each backend it could not initialise ("Unable to
# initialize backend 'tpu': ... libtpu.so"): on a CPU or GPU machine that is noise, not news.
# `python -c "import jax; print(jax.devices())"` still says what JAX sees (README).
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
