"""Sinusoidal absolute positional encoding.

Vaswani et al. 2017, "Attention Is All You Need" (arXiv 1706.03762), section 3.5:
PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)),
added to the token embeddings. We keep the paper's interleaved sin/cos order. Positions may
be floats (interpolated sampler); the table is computed in float32 and cast to x's dtype.
"""

import jax
import jax.numpy as jnp

from attn.pe.base import PositionalEncoding


def encode(pos: jax.Array, dim: int, max_timescale: float = 1e4) -> jax.Array:
    """Sinusoids for positions `pos` (any shape, int or float): pos.shape + (dim,), float32.

    An odd `dim` drops the last cosine.
    """
    half = (dim + 1) // 2
    inv_timescale = max_timescale ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / dim)
    angle = pos.astype(jnp.float32)[..., None] * inv_timescale
    table = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)
    return table.reshape(*pos.shape, 2 * half)[..., :dim]


class Sinusoidal(PositionalEncoding):
    """x + encode(pos, d_model): fixed, parameter-free, defined at every position."""

    DEFAULTS = {"max_timescale": 1e4}

    def embed(self, x_BLD, pos_BL):
        pe_BLD = encode(pos_BL, x_BLD.shape[-1], self.cfg["max_timescale"])
        return x_BLD + pe_BLD.astype(x_BLD.dtype)
