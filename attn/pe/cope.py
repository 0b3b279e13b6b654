"""CoPE: contextual position encoding, positions counted by learned gates.

Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's Important"
(arXiv 2405.18719): for query i, each key t gets a gate g_it = sigmoid(q_i . k_t / sqrt(K))
(the scaled logit, as in the paper's code); the contextual position of key j is
p_ij = sum_{t=j..i} g_it, clamped to max_positions - 1; its embedding e[p_ij] is the linear
interpolation of the learned integer-position embeddings e[floor p] and e[ceil p] (shared
across heads, head_dim wide), and the bias is q_i . e[p_ij] (unscaled, as in the paper).

p_ij sums over every key between j and i, so a block of keys is not enough: the class sets
`needs_materialized_logits` and the layer passes the full rows. Causality and direction
come from the positions (key position <= query position is "past"), which also handles the
bottom-right alignment of a KV cache; a cache must therefore give slots not yet written a
position after every query (`attn.pe.base.UNWRITTEN_POSITION`), or their gates count as
past. The paper is causal; for bidirectional attention keys after the query count gates
from i up to j and use a second embedding table (our choice), so left and right stay
distinct. Positions enter only through comparisons, so the encoding is shift invariant.
Embeddings start at zero as in the paper (`init_std` = 0).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn.pe.base import PositionalEncoding, param, repeat_kv


def contextual_positions(
    gates_BHLS: jax.Array, qpos_BL: jax.Array, kpos_BS: jax.Array, causal: bool
) -> jax.Array:
    """p_ij = sum of gates from key j to the query (inclusive), per direction: B H L S."""
    past = (kpos_BS[:, None, :] <= qpos_BL[:, :, None])[:, None]
    g_past = jnp.where(past, gates_BHLS, 0.0)
    p_past = jnp.flip(jnp.cumsum(jnp.flip(g_past, -1), axis=-1), -1)
    if causal:
        return p_past
    future = (kpos_BS[:, None, :] >= qpos_BL[:, :, None])[:, None]
    p_future = jnp.cumsum(jnp.where(future, gates_BHLS, 0.0), axis=-1)
    return jnp.where(past, p_past, p_future)


def interpolated_logits(q_BLHK: jax.Array, emb_PK: jax.Array, p_BHLS: jax.Array) -> jax.Array:
    """q_i . e[p_ij] with e interpolated between integer positions, p clamped to the table."""
    p = jnp.clip(p_BHLS, 0.0, emb_PK.shape[0] - 1)
    logits_BHLP = jnp.einsum("BLHK,PK->BHLP", q_BLHK.astype(jnp.float32), emb_PK)
    lo = jnp.floor(p)
    w = p - lo
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, emb_PK.shape[0] - 1)
    at = lambda i: jnp.take_along_axis(logits_BHLP, i, axis=-1)
    return at(lo) * (1 - w) + at(hi) * w


class CoPE(PositionalEncoding):
    """Gated contextual positions with interpolated learned embeddings (past [, future])."""

    DEFAULTS = {"max_positions": 64, "init_std": 0.0}
    supports_cross_attention = False
    needs_materialized_logits = True
    shift_invariant = True

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        init = jax.nn.initializers.normal(self.cfg["init_std"])
        shape = (self.cfg["max_positions"], head_dim)
        self.past = param(rngs, init, shape, (None, "head_dim"))
        if not causal:
            self.future = param(rngs, init, shape, (None, "head_dim"))

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        if q_BLHK is None or k_BSGK is None:
            raise ValueError("cope: the bias hook needs the queries and keys (q_BLHK, k_BSGK)")
        q = q_BLHK.astype(jnp.float32)
        k = repeat_kv(k_BSGK, q.shape[2]).astype(jnp.float32)
        gates = jax.nn.sigmoid(jnp.einsum("BLHK,BSHK->BHLS", q, k) / math.sqrt(q.shape[-1]))
        p = contextual_positions(gates, qpos_BL, kpos_BS, self.causal)
        past: nnx.Param = self.past
        out = interpolated_logits(q, past[...], p)
        if self.causal:
            return out
        future: nnx.Param = self.future
        is_past = (kpos_BS[:, None, :] <= qpos_BL[:, :, None])[:, None]
        return jnp.where(is_past, out, interpolated_logits(q, future[...], p))
