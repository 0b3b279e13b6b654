"""FIRE: functional interpolation for relative positions.

Li et al. 2023, "Functional Interpolation for Relative Positions Improves Long Context
Transformers" (arXiv 2310.04418): the bias of query i and key j is a small learned MLP
applied to a progressively interpolated distance,
    b(i, j) = f_theta( psi(i - j) / psi(max(L, i)) ),   psi(x) = log(c x + 1),
with c > 0 and the threshold L > 0 learned (kept positive by softplus). Normalising by the
query position maps every distance into [0, 1], so longer inputs reuse the trained input
range; L keeps short contexts from being over-stretched. f_theta has one hidden ReLU layer
(`hidden` units) and one output per head. The initial c and L (`init_c`, `init_threshold`)
are our defaults, not checked against the paper's code. Because of the normalisation by the
query position, FIRE is not shift invariant.

The paper's bias is causal (i >= j). For bidirectional attention we feed |i - j| and a
second input, 1 for keys after the query, so the MLP can tell left from right (our choice).

FIRE has no `kernel_bias`, so `impl="flash"` runs it on the chunked implementation (which
evaluates `bias` per block, never L x S). The flash kernel's table path needs a bias that
is a function of key - query distance alone, and FIRE's normaliser psi(max(L, i)) depends
on the query position: a table would be indexed by (query position, distance), of size
L x Dmax, and computing the MLP per logit in the kernel (about 4 x hidden flops per logit
and head, plus its backward) costs more than the q.k product it is added to.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attn.pe.base import PositionalEncoding, inverse_softplus, param, relative_positions


def psi(x: jax.Array, c: jax.Array) -> jax.Array:
    """log(c x + 1)."""
    return jnp.log1p(c * x)


def fire_inputs(
    qpos_BL: jax.Array, kpos_BS: jax.Array, c: jax.Array, threshold: jax.Array, causal: bool
) -> jax.Array:
    """MLP inputs B L S F: psi(|i - j|) / psi(max(L, i)) [, 1 where j is after i]."""
    rel = relative_positions(qpos_BL, kpos_BS).astype(jnp.float32)  # j - i
    q = qpos_BL.astype(jnp.float32)[:, :, None]
    normalised = psi(jnp.abs(rel), c) / psi(jnp.maximum(threshold, q), c)
    if causal:
        return normalised[..., None]
    return jnp.stack([normalised, (rel > 0).astype(jnp.float32)], axis=-1)


def mlp(x_F: jax.Array, w1, b1, w2, b2) -> jax.Array:
    """f_theta: Dense -> ReLU -> Dense, applied on the last axis."""
    return jax.nn.relu(x_F @ w1 + b1) @ w2 + b2


class Fire(PositionalEncoding):
    """Learned MLP bias over the log-normalised distance; per-head outputs."""

    DEFAULTS = {"hidden": 32, "init_c": 0.1, "init_threshold": 512.0}
    supports_cross_attention = False

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        hidden = self.cfg["hidden"]
        inputs = 1 if causal else 2
        dense = jax.nn.initializers.lecun_normal()
        zeros = jax.nn.initializers.zeros
        self.w1 = param(rngs, dense, (inputs, hidden), (None, "mlp"))
        self.b1 = param(rngs, zeros, (hidden,), ("mlp",))
        self.w2 = param(rngs, dense, (hidden, num_heads), ("mlp", "heads"))
        self.b2 = param(rngs, zeros, (num_heads,), ("heads",))
        raw_c = inverse_softplus(self.cfg["init_c"])
        raw_threshold = inverse_softplus(self.cfg["init_threshold"])
        self.raw_c = param(rngs, jax.nn.initializers.constant(raw_c), (), ())
        self.raw_threshold = param(rngs, jax.nn.initializers.constant(raw_threshold), (), ())

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        p: dict[str, nnx.Param] = {
            n: getattr(self, n) for n in ("w1", "b1", "w2", "b2", "raw_c", "raw_threshold")
        }
        c = jax.nn.softplus(p["raw_c"][...])
        threshold = jax.nn.softplus(p["raw_threshold"][...])
        x = fire_inputs(qpos_BL, kpos_BS, c, threshold, self.causal)
        out_BLSH = mlp(x, p["w1"][...], p["b1"][...], p["w2"][...], p["b2"][...])
        return jnp.moveaxis(out_BLSH, -1, 1)
