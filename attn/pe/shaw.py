"""Shaw et al. relative position representations (key term).

Shaw, Uszkoreit and Vaswani 2018, "Self-Attention with Relative Position Representations"
(arXiv 1803.02155): learned vectors a_{clip(j - i, -k, k)} (2k + 1 of them, head_dim wide,
shared across heads) enter the logits as e_ij = q_i . (k_j + a_ij) / sqrt(K); here the
relative part is returned as the bias q_i . a_ij / sqrt(K), in logit units. The paper also
adds a_ij^V to the values but found it unnecessary (their Table 3: no loss without it), and
a bias hook cannot change values, so only the key term is implemented. Float distances
(interpolated sampler) interpolate linearly between neighbouring vectors.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn.pe.base import PositionalEncoding, param, relative_positions


def clipped_index(rel: jax.Array, max_distance: int) -> jax.Array:
    """clip(j - i, -k, k) + k: the row of the relative table (float if rel is float)."""
    return jnp.clip(rel, -max_distance, max_distance) + max_distance


def relative_logits(q_BLHK: jax.Array, table_RK: jax.Array, idx_BLS: jax.Array) -> jax.Array:
    """q_i . table[idx_ij] / sqrt(K) as B H L S float32 (idx may be float: interpolation)."""
    K = q_BLHK.shape[-1]
    qa_BHLR = jnp.einsum("BLHK,RK->BHLR", q_BLHK.astype(jnp.float32), table_RK) / math.sqrt(K)
    shape = (qa_BHLR.shape[0], qa_BHLR.shape[1], *idx_BLS.shape[1:])

    def gather(i_BLS):
        return jnp.take_along_axis(qa_BHLR, jnp.broadcast_to(i_BLS[:, None], shape), axis=-1)

    if jnp.issubdtype(idx_BLS.dtype, jnp.integer):
        return gather(idx_BLS)
    lo = jnp.floor(idx_BLS)
    w = (idx_BLS - lo)[:, None]
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, table_RK.shape[0] - 1)
    return gather(lo) * (1 - w) + gather(hi) * w


class Shaw(PositionalEncoding):
    """Learned clipped relative key vectors dotted with the query."""

    DEFAULTS = {"max_distance": 16, "init_std": 0.02}
    supports_cross_attention = False
    shift_invariant = True

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        rows = 2 * self.cfg["max_distance"] + 1
        init = jax.nn.initializers.normal(self.cfg["init_std"])
        self.table = param(rngs, init, (rows, head_dim), (None, "head_dim"))

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        if q_BLHK is None:
            raise ValueError("shaw: the bias hook needs the queries (q_BLHK)")
        idx = clipped_index(relative_positions(qpos_BL, kpos_BS), self.cfg["max_distance"])
        table: nnx.Param = self.table
        return relative_logits(q_BLHK, table[...], idx)
