"""FoX: the Forgetting Transformer's forget gate, a data-dependent ALiBi.

Lin et al. 2025, "Forgetting Transformer: Softmax Attention with a Forget Gate" (ICLR 2025):
every head h computes a scalar forget gate per token, f_l = sigmoid(w_h . x_l + b_h), and the
logit of query i and key j <= i gets the bias
    D_ij = sum_{l = j+1 .. i} log f_l,
so attention decays with the gates of the tokens in between (constant gates give ALiBi's
linear decay). FoX uses no other positional encoding. As in the paper's code, w starts at
N(0, 0.02) and b at 0 (every gate 1/2) and each layer has its own gate (`per_layer`).

Deviation, to keep the hook contract (`bias` sees positions, q and k, not the layer input x):
the gate of head h reads that head's key, f_l = sigmoid(w_h . k_l + b_h) with k_l = W_k x_l
the key of head h's KV group. That is a gate on x restricted to the K-dim row space of W_k
(the paper's reads all of x), trained through W_k as well; in exchange the keys a KV cache
holds carry their gates, so cached decoding needs nothing new.

Positions: D_ij = sum of log f_l over the keys l with kpos_j < kpos_l <= qpos_i, computed as
A_i - C_j with A_i = sum_l log f_l [kpos_l <= qpos_i] and C_j = sum_l log f_l [kpos_l <= kpos_j]
(masked sums over keys: no assumption on key order; a KV cache's unwritten slots, placed after
every query, never count). Positions enter only through comparisons, so the encoding is shift
invariant. The sum needs every key of a row, so the class sets `needs_materialized_logits`:
the layer runs it materialised (the paper's Triton kernel, which carries the cumulative gate
along key blocks, is not reproduced), and impl="chunked" is a ConfigError.

Bidirectional attention (ours; the paper is causal): keys after the query use a second gate
g (own w, b) and the mirror image, D_ij = sum of log g_l over qpos_i <= kpos_l < kpos_j.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attn.pe.base import PositionalEncoding, param, repeat_kv


def log_gates(k_BSGK, w_HK, b_H) -> jax.Array:
    """log sigmoid(w_h . k_l + b_h), float32 B H S; head h reads its KV group's key."""
    k = repeat_kv(k_BSGK, w_HK.shape[0]).astype(jnp.float32)
    return jax.nn.log_sigmoid(jnp.einsum("BSHK,HK->BHS", k, w_HK) + b_H[None, :, None])


def _masked_sums(log_g_BHS, upto_BXS) -> jax.Array:
    """sum_l log_g[b, h, l] * upto[b, x, l] -> B H X."""
    return jnp.einsum("BXS,BHS->BHX", upto_BXS.astype(jnp.float32), log_g_BHS)


def decay_bias(qpos_BL, kpos_BS, log_f_BHS, log_g_BHS=None) -> jax.Array:
    """D_ij, float32 B H L S: sum of log f over kpos_j < kpos_l <= qpos_i for keys at or before
    the query; with log_g (bidirectional) sum of log g over qpos_i <= kpos_l < kpos_j after it.

    For a causal encoding the entries of keys after the query are masked by attention; they
    are finite (minus the gates between the query and the key).
    """
    q, k = qpos_BL[:, :, None], kpos_BS[:, None, :]
    a = _masked_sums(log_f_BHS, k <= q)  # B H L
    c = _masked_sums(log_f_BHS, kpos_BS[:, None, :] <= kpos_BS[:, :, None])  # B H S
    past = a[..., None] - c[:, :, None, :]
    if log_g_BHS is None:
        return past
    a_g = _masked_sums(log_g_BHS, k < q)
    c_g = _masked_sums(log_g_BHS, kpos_BS[:, None, :] < kpos_BS[:, :, None])
    future = c_g[:, :, None, :] - a_g[..., None]
    return jnp.where((k <= q)[:, None], past, future)


class FoX(PositionalEncoding):
    """Forget-gate decay bias from each head's keys; one gate per layer (per_layer)."""

    DEFAULTS = {"init_std": 0.02, "init_bias": 0.0}
    supports_cross_attention = False
    needs_materialized_logits = True
    shift_invariant = True
    per_layer = True

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        w_init = jax.nn.initializers.normal(self.cfg["init_std"])
        b_init = jax.nn.initializers.constant(self.cfg["init_bias"])
        shape, axes = (num_heads, head_dim), ("heads", "head_dim")
        self.w_forget = param(rngs, w_init, shape, axes)
        self.b_forget = param(rngs, b_init, (num_heads,), ("heads",))
        if not causal:
            self.w_future = param(rngs, w_init, shape, axes)
            self.b_future = param(rngs, b_init, (num_heads,), ("heads",))

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        if k_BSGK is None:
            raise ValueError("fox: the bias hook needs the keys (k_BSGK) for its forget gates")
        w: nnx.Param = self.w_forget
        b: nnx.Param = self.b_forget
        log_f = log_gates(k_BSGK, w[...], b[...])
        if self.causal:
            return decay_bias(qpos_BL, kpos_BS, log_f)
        w_g: nnx.Param = self.w_future
        b_g: nnx.Param = self.b_future
        return decay_bias(qpos_BL, kpos_BS, log_f, log_gates(k_BSGK, w_g[...], b_g[...]))
