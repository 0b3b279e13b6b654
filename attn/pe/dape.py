"""DAPE: data-adaptive positional encoding, an MLP over heads of the logits and a bias.

Zheng et al. 2024, "DAPE: Data-Adaptive Positional Encoding for Length Extrapolation"
(NeurIPS 2024): with Z = QK^T / sqrt(K) and B the bias of a base encoding, the logits are
    Z + B + f([Z; B]),
f an MLP applied at every (query, key) pair to the 2H-vector of all heads' logits and biases:
Dense(2H -> hidden) -> LeakyReLU (slope 0.01) -> Dense(hidden -> H), hidden 32 as the paper's
D_DAPE and its code (which feeds the scaled, unmasked scores, heads first, then the bias).
The base (`base`, default "alibi"; the paper pairs DAPE with ALiBi, KERPLE and FIRE) is built
with its own defaults; its `rotate` hook applies as well, so "dape over rope" is RoPE plus an
MLP of the logits (B = 0). Absolute bases (an `embed` hook) are refused: DAPE acts on logits.

The `bias` hook returns B + f([Z; B]); attention adds Z itself, which gives the formula. f
needs all heads' logits at each pair, so DAPE computes Z inside the hook (once more than the
attention does) and sets `needs_materialized_logits`. As in the paper's code (one module per
attention layer), each layer has its own MLP and base (`per_layer`). Shift invariance is the
base's.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

import attn.pe
from attn.pe.base import PositionalEncoding, param, repeat_kv
from attn.registry import ConfigError, lookup, merge_defaults, require


def scaled_logits(q_BLHK, k_BSGK) -> jax.Array:
    """Z = q.k / sqrt(K), float32 B H L S, contiguous KV groups."""
    q = q_BLHK.astype(jnp.float32)
    k = repeat_kv(k_BSGK, q.shape[2]).astype(jnp.float32)
    return jnp.einsum("BLHK,BSHK->BHLS", q, k) / math.sqrt(q.shape[-1])


def mlp_over_heads(z_BHLS, b_BHLS, w1, b1, w2, b2, slope: float = 0.01) -> jax.Array:
    """f([z; b]) per (query, key) pair: Dense(2H -> F), LeakyReLU, Dense(F -> H); B H L S."""
    x = jnp.concatenate([z_BHLS, jnp.broadcast_to(b_BHLS, z_BHLS.shape)], axis=1)
    h = jnp.einsum("BCLS,CF->BLSF", x, w1) + b1
    return jnp.einsum("BLSF,FH->BHLS", jax.nn.leaky_relu(h, slope), w2) + b2[:, None, None]


def base_class(name: str) -> type[PositionalEncoding]:
    cls = lookup(attn.pe.REGISTRY, name, "model.pe.base")
    require(name != "dape", "model.pe.base", "DAPE cannot be its own base")
    if cls.embed is not PositionalEncoding.embed:
        raise ConfigError(
            f"model.pe.base: {name!r} is an absolute encoding (embed hook); DAPE mixes "
            "logits with a relative bias: use a bias or rotary base (alibi, kerple, fire, ...)"
        )
    return cls


class DAPE(PositionalEncoding):
    """Base encoding plus a per-layer MLP over heads of [logits; bias]."""

    DEFAULTS = {"base": "alibi", "hidden": 32}
    supports_cross_attention = False
    needs_materialized_logits = True
    shift_invariant = True  # with the default base; instances take their base's
    per_layer = True

    @classmethod
    def validate(cls, cfg, *, max_eval_position, num_heads, head_dim):
        c = merge_defaults(cls.DEFAULTS, cfg, "model.pe")
        require(
            isinstance(c["hidden"], int) and c["hidden"] > 0,
            "pe.hidden",
            f"must be a positive int, got {c['hidden']!r}",
        )
        base_class(c["base"]).validate(
            {"name": c["base"]},
            max_eval_position=max_eval_position,
            num_heads=num_heads,
            head_dim=head_dim,
        )

    def __init__(self, cfg, *, d_model, num_heads, head_dim, causal, rngs):
        super().__init__(
            cfg, d_model=d_model, num_heads=num_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        name = self.cfg["base"]
        self.base = base_class(name)(
            attn.pe.default_config(name),
            d_model=d_model,
            num_heads=num_heads,
            head_dim=head_dim,
            causal=causal,
            rngs=rngs,
        )
        self.shift_invariant = self.base.shift_invariant
        H, F = num_heads, self.cfg["hidden"]
        dense = jax.nn.initializers.lecun_normal()
        zeros = jax.nn.initializers.zeros
        self.w1 = param(rngs, dense, (2 * H, F), (None, "mlp"))
        self.b1 = param(rngs, zeros, (F,), ("mlp",))
        self.w2 = param(rngs, dense, (F, H), ("mlp", "heads"))
        self.b2 = param(rngs, zeros, (H,), ("heads",))

    def rotate(self, q_BLHK, k_BSGK, qpos_BL, kpos_BS):
        return self.base.rotate(q_BLHK, k_BSGK, qpos_BL, kpos_BS)

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        if q_BLHK is None or k_BSGK is None:
            raise ValueError("dape: the bias hook needs the queries and keys (q_BLHK, k_BSGK)")
        z = scaled_logits(q_BLHK, k_BSGK)
        b = self.base.bias(qpos_BL, kpos_BS, q_BLHK, k_BSGK)
        b = jnp.zeros((), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
        p: dict[str, nnx.Param] = {n: getattr(self, n) for n in ("w1", "b1", "w2", "b2")}
        f = mlp_over_heads(z, b, p["w1"][...], p["b1"][...], p["w2"][...], p["b2"][...])
        return b + f
