"""KERPLE: kernelized relative positional embedding, a learned conditionally positive
definite distance penalty per head.

Chi et al. 2022, "KERPLE: Kernelized Relative Positional Embedding for Length
Extrapolation" (arXiv 2205.09921), section 4: with d = |i - j|,
- "log":   bias = -r1 * log(1 + r2 * d),  r1, r2 > 0;
- "power": bias = -r1 * d^r2,             r1 > 0, 0 < r2 <= 2.
The constraints are kept by parametrisation (r = softplus(raw); power r2 = 2 sigmoid(raw))
rather than by clamping after each step as the reference code does. The paper is causal;
bidirectional attention uses the same symmetric |i - j|, so by itself it cannot tell left
from right. Initial values are drawn per head from uniform ranges (`init_r1`, `init_r2`:
upper bounds; our choice) so heads start with different ranges.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attn import kernels
from attn.pe.base import (
    PositionalEncoding,
    inverse_softplus,
    param,
    relative_positions,
)
from attn.registry import merge_defaults, require

VARIANTS = ("log", "power")


def log_bias(dist: jax.Array, r1: jax.Array, r2: jax.Array) -> jax.Array:
    """-r1 * log(1 + r2 * dist), dist BLS >= 0, r1/r2 per head [H]: B H L S float32."""
    d = dist[:, None].astype(jnp.float32)
    return -r1[:, None, None] * jnp.log1p(r2[:, None, None] * d)


def power_bias(dist: jax.Array, r1: jax.Array, r2: jax.Array) -> jax.Array:
    """-r1 * dist^r2, with 0^r2 = 0 and a finite gradient there: B H L S float32."""
    d = dist[:, None].astype(jnp.float32)
    safe = jnp.where(d > 0, d, 1.0)
    return -r1[:, None, None] * jnp.where(d > 0, safe ** r2[:, None, None], 0.0)


class Kerple(PositionalEncoding):
    """Learned per-head logarithmic or power distance penalty."""

    DEFAULTS = {"variant": "log", "init_r1": 2.0, "init_r2": 1.0}
    supports_cross_attention = False
    shift_invariant = True

    @classmethod
    def validate(cls, cfg, *, max_eval_position, num_heads, head_dim):
        c = merge_defaults(cls.DEFAULTS, cfg, "model.pe")
        require(
            c["variant"] in VARIANTS,
            "pe.variant",
            f"unknown variant {c['variant']!r}; allowed: {', '.join(VARIANTS)}",
        )

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        self.validate(cfg, max_eval_position=0, num_heads=num_heads, head_dim=head_dim)
        power = self.cfg["variant"] == "power"

        def uniform(upper, to_raw):
            def init(key, shape, dtype):
                u = jax.random.uniform(key, shape, dtype, 0.05 * upper, upper)
                return to_raw(u)

            return init

        to_raw2 = (lambda r: jnp.log(r / (2 - r))) if power else inverse_softplus
        upper2 = min(self.cfg["init_r2"], 1.9) if power else self.cfg["init_r2"]
        self.raw_r1 = param(
            rngs, uniform(self.cfg["init_r1"], inverse_softplus), (num_heads,), ("heads",)
        )
        self.raw_r2 = param(rngs, uniform(upper2, to_raw2), (num_heads,), ("heads",))

    def coefficients(self) -> tuple[jax.Array, jax.Array]:
        """(r1, r2) per head after the positivity (and r2 <= 2) constraints."""
        raw1: nnx.Param = self.raw_r1
        raw2: nnx.Param = self.raw_r2
        r1 = jax.nn.softplus(raw1[...])
        if self.cfg["variant"] == "power":
            return r1, 2 * jax.nn.sigmoid(raw2[...])
        return r1, jax.nn.softplus(raw2[...])

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        dist = jnp.abs(relative_positions(qpos_BL, kpos_BS))
        r1, r2 = self.coefficients()
        fn = power_bias if self.cfg["variant"] == "power" else log_bias
        return fn(dist, r1, r2)

    def kernel_bias(self):
        return kernels.kerple(self.cfg["variant"], *self.coefficients())
