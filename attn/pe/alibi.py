"""ALiBi: attention with linear biases.

Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input
Length Extrapolation" (arXiv 2108.12409): no position embeddings; head h adds
-m_h * (i - j) to the logit of query i and key j (j <= i). For n heads a power of two,
m_k = 2^(-8k/n), k = 1..n; otherwise the slopes of the closest power of two below n,
followed by every other slope of the doubled set (the paper's recipe, `slopes`).

Bidirectional (encoder) variant: -m_h * |i - j| + lower_offset * m_h * [j < i]. The
Deletang et al. 2023 / Ruoss et al. 2023 reference code adds 0.5 * m_h on the lower
triangle to break the left/right symmetry; we follow the code that produced the published
numbers, so `bidirectional_offset` defaults to 0.5; set it to 0 for
the purely symmetric -m_h * |i - j|. With causal attention the offset is unused.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from attn import kernels
from attn.pe.base import PositionalEncoding, relative_positions


def slopes(num_heads: int) -> np.ndarray:
    """Per-head slopes (float64 [num_heads]), the paper's recipe for any head count."""
    if num_heads & (num_heads - 1) == 0:
        return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = slopes(2 * closest)[0::2][: num_heads - closest]
    return np.concatenate([slopes(closest), extra])


def bias(
    qpos_BL: jax.Array,
    kpos_BS: jax.Array,
    slopes_H: jax.Array,
    causal: bool = True,
    lower_offset: float = 0.0,
) -> jax.Array:
    """ALiBi logits bias, float32 BHLS: -m |i - j|, plus lower_offset * m where j < i unless
    causal.

    On the keys a causal query sees this is the paper's -m (i - j); on the masked future
    keys it stays negative instead of growing positive, so no masked entry holds a large
    logit (a KV cache's unwritten slots may carry far-away positions).
    """
    rel = relative_positions(qpos_BL, kpos_BS).astype(jnp.float32)  # j - i
    dist = -jnp.abs(rel)
    if not causal:
        dist = dist + lower_offset * (rel < 0)
    return jnp.asarray(slopes_H, jnp.float32)[None, :, None, None] * dist[:, None]


class ALiBi(PositionalEncoding):
    """Fixed per-head linear distance penalty; no parameters."""

    DEFAULTS = {"bidirectional_offset": 0.5}
    supports_cross_attention = False
    shift_invariant = True

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        return bias(
            qpos_BL,
            kpos_BS,
            slopes(self.num_heads),
            causal=self.causal,
            lower_offset=self.cfg["bidirectional_offset"],
        )

    def kernel_bias(self):
        return kernels.alibi(
            slopes(self.num_heads),
            causal=self.causal,
            lower_offset=self.cfg["bidirectional_offset"],
        )
