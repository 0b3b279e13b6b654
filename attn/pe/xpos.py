"""xPos: RoPE with an exponential decay that makes attention fall off with distance.

Sun et al. 2022, "A Length-Extrapolatable Transformer" (arXiv 2212.10554): after the RoPE
rotation, the pair of dims i of the query at position m is multiplied by
zeta_i^(m / scale_base) and that of the key at position n by zeta_i^(-n / scale_base),
zeta_i = (2i/R + gamma) / (1 + gamma), so q.k gains zeta_i^((m - n) / scale_base): a decay
with distance for past keys (causal). In bidirectional attention future keys are amplified
instead (the paper targets causal LMs); the encoding still works, it is simply not damped.
The scales use absolute positions (no centring), so a key at position n carries
zeta_min^(-n / scale_base): `validate` rejects positions where that leaves float32's range.
Rotation fields (layout, fraction, scalings) are RoPE's (attn/pe/rope.py).
"""

import math

import jax
import jax.numpy as jnp

from attn.pe import rope
from attn.pe.base import PositionalEncoding
from attn.registry import merge_defaults, require

# exp(80) ~ 5.5e34: the largest key scale we allow, leaving headroom below float32's 3.4e38.
MAX_LOG_SCALE = 80.0


def zeta(rot: int, gamma: float = 0.4) -> jax.Array:
    """Per-pair decay bases (2i/R + gamma) / (1 + gamma), i < R/2, float32."""
    return (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot + gamma) / (1 + gamma)


def scales(pos_BL: jax.Array, rot: int, *, gamma: float = 0.4, scale_base: float = 512.0):
    """zeta_i^(pos / scale_base) as B L (R/2) float32 (the query's scale; the key's is 1/it)."""
    exponent = pos_BL.astype(jnp.float32)[..., None] / scale_base
    return jnp.exp(exponent * jnp.log(zeta(rot, gamma)))


def apply_scales(x_BLHK: jax.Array, scale_BLR: jax.Array, layout: str) -> jax.Array:
    """Multiply each rotated pair of x (float32) by its scale; the rest passes through."""
    rot = 2 * scale_BLR.shape[-1]
    s = scale_BLR[:, :, None, :]
    if layout == "half":
        s = jnp.concatenate([s, s], axis=-1)
    else:
        s = jnp.repeat(s, 2, axis=-1)
    return jnp.concatenate([x_BLHK[..., :rot] * s, x_BLHK[..., rot:]], axis=-1)


class XPos(PositionalEncoding):
    """RoPE rotation, then q * zeta^(m/B) and k * zeta^(-n/B); no parameters."""

    DEFAULTS = {**rope.ROTARY_DEFAULTS, "scale_base": 512.0, "gamma": 0.4}
    supports_cross_attention = False
    shift_invariant = True

    @classmethod
    def validate(cls, cfg, *, max_eval_position, num_heads, head_dim):
        c = merge_defaults(cls.DEFAULTS, cfg, "model.pe")
        rope.validate_rotary(c, head_dim)
        require(c["gamma"] > 0, "pe.gamma", f"must be > 0, got {c['gamma']}")
        log_scale = max_eval_position / c["scale_base"] * math.log((1 + c["gamma"]) / c["gamma"])
        require(
            log_scale <= MAX_LOG_SCALE,
            "pe.scale_base",
            f"position {max_eval_position} overflows float32 key scales with scale_base "
            f"{c['scale_base']}; raise scale_base above "
            f"{max_eval_position * math.log((1 + c['gamma']) / c['gamma']) / MAX_LOG_SCALE:.0f}",
        )

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        rope.validate_rotary(self.cfg, head_dim)
        self.rot = rope.rotated_dims(head_dim, self.cfg["fraction"])

    def _rotate(self, x, pos, sign):
        c = self.cfg
        y = rope.rotate(
            x.astype(jnp.float32),
            pos,
            max_wavelength=c["max_wavelength"],
            fraction=c["fraction"],
            layout=c["layout"],
            scaling=rope.scaling_spec(c),
        )
        s = scales(
            sign * pos.astype(jnp.float32), self.rot, gamma=c["gamma"], scale_base=c["scale_base"]
        )
        return apply_scales(y, s, c["layout"]).astype(x.dtype)

    def rotate(self, q_BLHK, k_BSGK, qpos_BL, kpos_BS):
        return self._rotate(q_BLHK, qpos_BL, 1.0), self._rotate(k_BSGK, kpos_BS, -1.0)
