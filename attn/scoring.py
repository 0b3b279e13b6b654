"""Attention scorers: how a query meets a key before the softmax.

- "dot": scaled dot product, Vaswani et al. 2017 ("Attention Is All You Need"); runs through
  `attn.attention.dot_product_attention`, so every implementation (chunked, cuDNN, ...) applies.
- "luong": Luong et al. 2015 ("Effective Approaches to Attention-based Neural Machine
  Translation"), the "general" score q^T W k with one K x K matrix W per head (initialised
  near the identity so that it starts as the dot scorer).
- "additive": Bahdanau et al. 2015 ("Neural Machine Translation by Jointly Learning to Align
  and Translate"), v^T tanh(W q + U k) with a hidden size A per head. No 1/sqrt(K) scale.
- "hard": top-k attention (k=1 is hard argmax attention, as in Hahn 2020 and Yao et al. 2021
  on formal languages), trained with a straight-through estimator (Bengio et al. 2013): the
  forward pass uses the top-k weights renormalised, the backward pass the softmax's gradient.

All scorers take the same masks, causal/window flags and biases as dot_product_attention,
and return BLHK (plus BHLS float32 weights with return_weights=True). Every scorer but "dot"
materialises the B x H x L x S logits, so it cannot run with impl="chunked" or "cudnn".
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attn import attention
from attn.registry import ConfigError, as_dict, lookup, merge_defaults, require

# Implementations that a materialising scorer accepts (they all mean "compute it here").
MATERIALISED_IMPLS = ("auto", "reference", "dense", "xla")


class Scorer(nnx.Module):
    """Base: subclasses define `logits` (float32 BHLS before bias and mask) and DEFAULTS."""

    DEFAULTS: dict = {}
    NAME = ""
    materialises_logits = True

    def __init__(self, cfg: dict, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = head_dim

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        raise NotImplementedError

    def weights(self, logits_BHLS, allowed) -> jax.Array:
        """float32 BHLS weights from float32 logits (masked entries and rows get 0)."""
        return attention.masked_softmax(logits_BHLS, allowed)

    def __call__(
        self,
        q_BLHK,
        k_BSGK,
        v_BSGK,
        *,
        bias=None,
        mask=None,
        causal=False,
        window=None,
        scale=None,
        impl="auto",
        return_weights=False,
    ):
        kw = dict(bias=bias, mask=mask, causal=causal, window=window, scale=scale)
        if not self.materialises_logits:
            out = attention.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, impl=impl, **kw)
            if not return_weights:
                return out
            return out, attention.attention_weights(q_BLHK, k_BSGK, **kw)
        if impl not in MATERIALISED_IMPLS:
            raise ConfigError(
                f"model.impl: {impl!r} cannot run model.scorer.name={self.NAME!r}, which needs "
                f"materialised logits; use one of {', '.join(MATERIALISED_IMPLS)}"
            )
        B, L, H, _ = q_BLHK.shape
        S = k_BSGK.shape[1]
        logits = self.logits(q_BLHK, k_BSGK, scale)
        b = attention.full_bias(bias, L, S)
        if b is not None:
            logits = logits + b
        probs = self.weights(logits, attention.combined_mask(L, S, mask, causal, window))
        probs = jnp.broadcast_to(probs, (B, H, L, S))
        out = attention.apply_weights(probs, v_BSGK, q_BLHK.dtype)
        return (out, probs) if return_weights else out


class DotScorer(Scorer):
    """Scaled dot product; no parameters; any attention implementation (the fused ones too)."""

    NAME = "dot"
    materialises_logits = False


class LuongScorer(Scorer):
    """Luong "general": scale * q^T W_h k, W_h a K x K matrix per query head."""

    NAME = "luong"
    DEFAULTS = {"init_std": 0.02}

    def __init__(self, cfg: dict, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, rngs=rngs)
        noise = cfg["init_std"] * jax.random.normal(rngs.params(), (num_heads, head_dim, head_dim))
        self.w_HKK = nnx.Param(jnp.eye(head_dim) + noise)

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        qw = jnp.einsum("BLHK,HKJ->BLHJ", q_BLHK.astype(jnp.float32), self.w_HKK[...])
        return attention.grouped_logits(qw, k_BSGK, attention.default_scale(scale, self.head_dim))


class AdditiveScorer(Scorer):
    """Bahdanau: scale * v_h^T tanh(W_h q + U_h k); scale defaults to 1 (none in the paper)."""

    NAME = "additive"
    DEFAULTS = {"hidden": 64}

    def __init__(self, cfg: dict, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, rngs=rngs)
        A = cfg["hidden"]
        require(isinstance(A, int) and A > 0, "model.scorer.hidden", f"must be > 0, got {A!r}")
        normal = jax.nn.initializers.normal
        self.w_HKA = nnx.Param(normal(head_dim**-0.5)(rngs.params(), (num_heads, head_dim, A)))
        self.u_HKA = nnx.Param(normal(head_dim**-0.5)(rngs.params(), (num_heads, head_dim, A)))
        self.v_HA = nnx.Param(normal(A**-0.5)(rngs.params(), (num_heads, A)))

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        H = self.num_heads
        G = k_BSGK.shape[2]
        wq = jnp.einsum("BLHK,HKA->BHLA", q_BLHK.astype(jnp.float32), self.w_HKA[...])
        u = self.u_HKA[...].reshape(G, H // G, *self.u_HKA.shape[1:])
        uk = jnp.einsum("BSGK,GRKA->BGRSA", k_BSGK.astype(jnp.float32), u)
        uk = uk.reshape(uk.shape[0], H, *uk.shape[3:])
        hidden = jnp.tanh(wq[:, :, :, None, :] + uk[:, :, None, :, :])  # BHLSA
        logits = jnp.einsum("BHLSA,HA->BHLS", hidden, self.v_HA[...])
        return logits if scale is None else scale * logits


class HardScorer(Scorer):
    """Top-k of the scaled dot-product softmax, renormalised; straight-through gradient."""

    NAME = "hard"
    DEFAULTS = {"k": 1}

    def __init__(self, cfg: dict, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, rngs=rngs)
        k = cfg["k"]
        require(isinstance(k, int) and k >= 1, "model.scorer.k", f"must be an int >= 1, got {k!r}")
        self.k = k

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        return attention.grouped_logits(
            q_BLHK, k_BSGK, attention.default_scale(scale, q_BLHK.shape[-1])
        )

    def weights(self, logits_BHLS, allowed) -> jax.Array:
        soft = attention.masked_softmax(logits_BHLS, allowed)
        return soft + jax.lax.stop_gradient(top_k_weights(soft, self.k) - soft)


def top_k_weights(probs, k: int) -> jax.Array:
    """Keep each row's k largest probabilities (k=1: one-hot argmax), renormalised to sum 1.

    Rows of zeros (fully masked) stay zeros. Exactly k entries are kept even with ties.
    """
    k = min(k, probs.shape[-1])
    values, idx = jax.lax.top_k(probs, k)
    keep = jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype).sum(axis=-2)
    kept = probs * keep
    total = values.sum(axis=-1, keepdims=True)
    return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 0.0)


REGISTRY = {cls.NAME: cls for cls in (DotScorer, LuongScorer, AdditiveScorer, HardScorer)}


def default_config(name: str) -> dict:
    """The scorer config block {"name": name, **DEFAULTS}."""
    return {"name": name, **lookup(REGISTRY, name, "model.scorer.name").DEFAULTS}


def build(cfg, *, num_heads: int, head_dim: int, rngs: nnx.Rngs) -> Scorer:
    """Build the scorer named by cfg["name"]; missing fields take DEFAULTS, unknown ones fail."""
    cfg = as_dict(cfg)
    cls = lookup(REGISTRY, cfg.get("name", "dot"), "model.scorer.name")
    merged = merge_defaults(cls.DEFAULTS, cfg, "model.scorer")
    return cls(merged, num_heads=num_heads, head_dim=head_dim, rngs=rngs)
