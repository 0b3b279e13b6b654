"""PoPE: polar coordinate positional embeddings.

Gopalakrishnan, Csordás, Schmidhuber & Mozer 2025, "Decoupling the 'What' and 'Where' With
Polar Coordinate Positional Embeddings" (arXiv 2509.10534). RoPE mixes content and position
in each pair's angle; PoPE gives every query/key component c a complex number whose magnitude
is content only, mu = softplus(x_c), and whose phase is position only, pos * theta_c, with
theta_c = max_wavelength^(-c/d), c < d. Keys add a learned phase bias delta_{h,c} per head,
clamped to [-2 pi, 0] and initialised at 0. The logit is
    Re sum_c q~_c conj(k~_c) = sum_c mu(q_c) mu(k_c) cos((i - j) theta_c - delta_{h,c}),
a function of i - j (shift invariant) whose positional part cannot be cancelled by content.
This is the formula of the reference implementations that cite the paper (x-transformers'
PolarEmbedding, the PoPE-pytorch package): softplus magnitudes, d frequencies base^(-c/d),
the clamped, zero-initialised key bias; it was not checked against the paper's own code.

Deviation, forced by the hook contract: the polar form needs two real dims per component
([mu cos, mu sin]), and `rotate` returns q and k at head_dim K (values and every attention
implementation share K). We therefore use d = K/2 components: the first K/2 dims of each
projected q/k head feed the magnitudes and the last K/2 are unused (their projection columns
get no gradient), and the K/2 frequencies max_wavelength^(-2c/K) are exactly RoPE's. The
paper's PoPE at head dim K has K components and a 2K-wide dot product. The phase bias acts on
the query side (phase i theta - delta for query head h), which gives the same logit, works
with grouped KV heads (one bias per query head) and leaves cached keys bias-free.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn.pe.base import PositionalEncoding, param
from attn.registry import merge_defaults, require


def frequencies(components: int, max_wavelength: float = 1e4) -> jax.Array:
    """float32 [d]: theta_c = max_wavelength^(-c/d)."""
    c = jnp.arange(components, dtype=jnp.float32)
    return max_wavelength ** (-c / components)


def polar(x_BLHK, pos_BL, theta_D, phase_bias_HD=None) -> jax.Array:
    """[mu cos(phi), mu sin(phi)] with mu = softplus(x[..., :d]), phi = pos * theta - bias;
    d = K/2 components, same shape and dtype as x, float32 math."""
    d = theta_D.shape[0]
    mu = jax.nn.softplus(x_BLHK[..., :d].astype(jnp.float32))
    phase = pos_BL.astype(jnp.float32)[:, :, None, None] * theta_D
    if phase_bias_HD is not None:
        phase = phase - phase_bias_HD
    out = jnp.concatenate([mu * jnp.cos(phase), mu * jnp.sin(phase)], axis=-1)
    return out.astype(x_BLHK.dtype)


class PoPE(PositionalEncoding):
    """Softplus magnitudes, positional phases, a learned clamped phase bias per head."""

    DEFAULTS = {"max_wavelength": 1e4}
    supports_cross_attention = False
    shift_invariant = True

    @classmethod
    def validate(cls, cfg, *, max_eval_position, num_heads, head_dim):
        c = merge_defaults(cls.DEFAULTS, cfg, "model.pe")
        _check(c, head_dim)

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        _check(self.cfg, head_dim)
        zeros = jax.nn.initializers.zeros
        self.phase_bias = param(rngs, zeros, (num_heads, head_dim // 2), ("heads", "head_dim"))

    def rotate(self, q_BLHK, k_BSGK, qpos_BL, kpos_BS):
        theta = frequencies(q_BLHK.shape[-1] // 2, self.cfg["max_wavelength"])
        bias: nnx.Param = self.phase_bias
        delta = jnp.clip(bias[...], -2 * math.pi, 0.0)
        return polar(q_BLHK, qpos_BL, theta, delta), polar(k_BSGK, kpos_BS, theta)


def _check(c, head_dim: int) -> None:
    require(
        head_dim % 2 == 0,
        "model.head_dim",
        f"PoPE stores each component as two real dims; head_dim {head_dim} is odd",
    )
    require(c["max_wavelength"] > 0, "pe.max_wavelength", f"must be > 0: {c['max_wavelength']}")
