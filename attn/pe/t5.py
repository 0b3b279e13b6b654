"""T5 relative position bias: a learned per-head scalar for each bucket of key - query.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (arXiv 1910.10683), section 2.1, bucketing as in the Mesh TensorFlow / T5X
code: half the buckets are exact distances, the rest grow logarithmically up to
`max_distance`; every distance past it shares the last bucket. Bidirectional attention
halves the buckets between keys before and after the query; causal attention maps every
future key to bucket 0. T5 shares one table across layers and uses no bias in cross
attention; here each attention layer owns its PE, and cross attention is unsupported.
Float distances (interpolated sampler) are truncated towards zero, as T5's int cast does.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn import kernels
from attn.pe.base import PositionalEncoding, param, relative_positions


def relative_position_bucket(
    rel: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """Bucket index (int32, same shape) of rel = key_position - query_position."""
    n = -rel.astype(jnp.float32)
    ret = jnp.zeros(rel.shape, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0.0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # T5X adds float32 eps so that exact bucket boundaries do not round down.
    log_ratio = jnp.log(jnp.maximum(n, 1.0) / max_exact + jnp.finfo(jnp.float32).eps)
    large = max_exact + (
        log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n.astype(jnp.int32), large)


class T5Bias(PositionalEncoding):
    """bias[b, h, i, j] = table[bucket(kpos_j - qpos_i), h]."""

    DEFAULTS = {"num_buckets": 32, "max_distance": 128}
    supports_cross_attention = False
    shift_invariant = True

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.table = param(rngs, init, (self.cfg["num_buckets"], num_heads), (None, "heads"))

    def bucket(self, rel):
        return relative_position_bucket(
            rel,
            bidirectional=not self.causal,
            num_buckets=self.cfg["num_buckets"],
            max_distance=self.cfg["max_distance"],
        )

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        rel_BLS = relative_positions(qpos_BL, kpos_BS)
        table: nnx.Param = self.table
        if jnp.issubdtype(rel_BLS.dtype, jnp.integer):
            # Every distance at or past max_distance shares the last bucket of its side, so
            # integer distances look up 2 * max_distance + 1 precomputed rows: no log per
            # element (w1 with T5 on CPU: the bucket arithmetic was recomputed in each layer).
            md = self.cfg["max_distance"]
            rows = jnp.take(table[...], self.bucket(jnp.arange(-md, md + 1)), axis=0)
            out_BLSH = jnp.take(rows, jnp.clip(rel_BLS, -md, md) + md, axis=0)
        else:
            out_BLSH = jnp.take(table[...], self.bucket(rel_BLS), axis=0)
        return jnp.moveaxis(out_BLSH, -1, 1)

    def kernel_bias(self):
        # The flash kernel sees one segment per run of equal bucket over the clipped
        # distances (num_buckets of them, not 2 * max_distance + 1 table entries).
        md = self.cfg["max_distance"]
        with jax.ensure_compile_time_eval():
            buckets = np.asarray(self.bucket(jnp.arange(-md, md + 1)))
        table: nnx.Param = self.table
        return kernels.bucketed_table(table[...].T, buckets, md)
