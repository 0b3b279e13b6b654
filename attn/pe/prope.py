"""p-RoPE: RoPE with its lowest frequencies removed.

Barbero et al. 2025, "Round and Round We Go! What makes Rotary Positional Encodings useful?"
(ICLR 2025, arXiv 2410.06205): trained models use RoPE's highest frequencies for positional
attention patterns and its lowest ones as (not quite position-free) semantic channels, so
p-RoPE keeps only the fraction p of the frequencies that are highest and leaves the
dimensions of the others unrotated. With K the head dim, pair i < K/2 turns by
pos * theta_i, theta_i = max_wavelength^(-2i/K) for i < floor(p * K/2) and theta_i = 0 for
the rest; p = 1 is RoPE, p = 0 is NoPE. The paper's Gemma runs keep p = 0.75 (our default).

This is not rope's `fraction` (GPT-NeoX partial rotary), which squeezes the whole spectrum
max_wavelength^(-2i/R) into the first R = fraction * K dims: there the lowest frequency stays
and the rotated pairs are spaced further apart. Here the kept frequencies are exactly RoPE's
highest ones at the full head dim. Pairs follow rope's `layout` (half-split or interleaved);
angles and the rotation are float32 whatever x's dtype.
"""

import math

import jax
import jax.numpy as jnp

from attn.pe.rope import LAYOUTS, RoPE
from attn.registry import require


def kept_pairs(head_dim: int, p: float) -> int:
    """How many of the head_dim / 2 frequency pairs p-RoPE rotates: floor(p * head_dim / 2)."""
    return math.floor(p * (head_dim // 2) + 1e-9)


def frequencies(head_dim: int, p: float, max_wavelength: float = 1e4) -> jax.Array:
    """float32 [head_dim / 2]: RoPE's theta_i for the kept (highest) pairs, 0 for the rest."""
    i = jnp.arange(head_dim // 2, dtype=jnp.float32)
    theta = max_wavelength ** (-2.0 * i / head_dim)
    return jnp.where(i < kept_pairs(head_dim, p), theta, 0.0)


def rotate_pairs(x_BLHK: jax.Array, angle_BLP: jax.Array, layout: str = "half") -> jax.Array:
    """Turn pair i of every head of x by angle[..., i] (P = K/2 pairs); float32 math, x's dtype.

    Pairs are (i, i + K/2) with layout "half", (2i, 2i + 1) with "interleaved".
    """
    P = x_BLHK.shape[-1] // 2
    cos = jnp.cos(angle_BLP)[:, :, None, :]
    sin = jnp.sin(angle_BLP)[:, :, None, :]
    x = x_BLHK.astype(jnp.float32)
    if layout == "half":
        x1, x2 = x[..., :P], x[..., P:]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if layout == "half":
        out = jnp.concatenate([r1, r2], axis=-1)
    else:
        out = jnp.stack([r1, r2], axis=-1).reshape(x.shape)
    return out.astype(x_BLHK.dtype)


def rotate(
    x_BLHK: jax.Array,
    pos_BL: jax.Array,
    *,
    p: float = 0.75,
    max_wavelength: float = 1e4,
    layout: str = "half",
) -> jax.Array:
    """p-RoPE rotation of x by its positions; same shape and dtype."""
    theta = frequencies(x_BLHK.shape[-1], p, max_wavelength)
    return rotate_pairs(x_BLHK, pos_BL.astype(jnp.float32)[:, :, None] * theta, layout)


def check(c, head_dim: int) -> None:
    """ConfigErrors of a p-RoPE block (merged with DEFAULTS)."""
    require(0.0 <= c["p"] <= 1.0, "pe.p", f"the kept fraction must be in [0, 1], got {c['p']}")
    require(
        c["layout"] in LAYOUTS,
        "pe.layout",
        f"unknown layout {c['layout']!r}; allowed: {', '.join(LAYOUTS)}",
    )
    require(
        head_dim % 2 == 0,
        "model.head_dim",
        f"p-RoPE rotates pairs of dims; head_dim {head_dim} is odd",
    )
    require(c["max_wavelength"] > 0, "pe.max_wavelength", f"must be > 0: {c['max_wavelength']}")


class PRoPE(RoPE):
    """RoPE on the highest floor(p * K/2) frequencies; the lowest-frequency pairs unrotated."""

    DEFAULTS = {"p": 0.75, "max_wavelength": 1e4, "layout": "half"}
    check = staticmethod(check)

    def _rotate(self, x, pos):
        c = self.cfg
        return rotate(x, pos, p=c["p"], max_wavelength=c["max_wavelength"], layout=c["layout"])
