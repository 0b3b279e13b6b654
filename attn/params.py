"""Parameters with logical axis names: the one constructor every module uses.

Each parameter carries the logical name of each of its dimensions ("embed", "heads", "mlp",
...) as `out_sharding` metadata, with eager sharding off, so a module builds without a mesh;
experiments/mesh.py maps the names onto a device mesh.
"""

from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from attn.registry import require


def param(
    rngs: nnx.Rngs,
    init: Callable,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype=jnp.float32,
) -> nnx.Param:
    """An nnx.Param initialised by init(key, shape, dtype) with logical axis names."""
    require(len(shape) == len(axes), "param", f"shape {shape} vs logical axes {axes}")
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)
