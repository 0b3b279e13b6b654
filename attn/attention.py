"""Scaled dot-product attention with masks, biases, GQA, and interchangeable implementations.

Attention is Vaswani et al. 2017 ("Attention Is All You Need"): softmax(scale * q.k + bias) v,
with scale = 1/sqrt(K) by default. Grouped-query attention (Ainslie et al. 2023, GQA; Shazeer
2019, MQA) shares each key/value head among H // G contiguous query heads: query head h reads
kv head h // (H // G), as in JAX, Flax and MaxText.

Contract (DESIGN.md section 3): causal and window masks are aligned bottom-right (query i is
at key position S - L + i), logits and softmax are float32 whatever the input dtype, masking
uses `where` with a finite large negative, and a fully masked query row returns zeros. `bias`
is an array broadcastable to BHLS or a callable `bias_fn(q_idx, k_idx)` on int32 row/column
indices of the block being computed.

Implementations, selected by `impl`:
- "reference": materialises the B x H x L x S logits; the oracle every other one is tested
  against.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attn import masks as masks_lib
from attn.registry import ConfigError, lookup

# Finite so that fully masked rows and bf16 never meet -inf or inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _check_shapes(q_BLHK, k_BSGK, v_BSGK) -> None:
    if q_BLHK.ndim != 4 or k_BSGK.ndim != 4 or v_BSGK.ndim != 4:
        raise ValueError(
            f"attention: q, k, v must be rank 4 (BLHK, BSGK, BSGK), got shapes "
            f"{q_BLHK.shape}, {k_BSGK.shape}, {v_BSGK.shape}"
        )
    B, _, H, K = q_BLHK.shape
    if k_BSGK.shape != v_BSGK.shape or k_BSGK.shape[0] != B or k_BSGK.shape[3] != K:
        raise ValueError(
            f"attention: k and v must be BSGK with q's B and K, got q {q_BLHK.shape}, "
            f"k {k_BSGK.shape}, v {v_BSGK.shape}"
        )
    G = k_BSGK.shape[2]
    if H % G:
        raise ValueError(f"attention: query heads H={H} must be a multiple of kv heads G={G}")


def _default_scale(scale, K: int) -> float:
    return 1.0 / math.sqrt(K) if scale is None else scale


def _block_bias(bias, q_idx, k_idx):
    """The bias for rows q_idx and columns k_idx, float32, or None."""
    if bias is None:
        return None
    if callable(bias):
        return jnp.asarray(bias(q_idx, k_idx), jnp.float32)
    return jnp.asarray(bias, jnp.float32)


def _full_mask(L: int, S: int, mask, causal: bool, window):
    """The user mask AND the causal/window mask (LS), or None when nothing is masked."""
    positional = (
        masks_lib.window_mask(L, S, window, causal) if (causal or window is not None) else None
    )
    return masks_lib.combine(mask, positional)


def _grouped_logits(q_BLHK, k_BSGK, scale) -> jax.Array:
    """float32 scale * q.k as BHLS, with contiguous query-head groups per kv head."""
    B, L, H, K = q_BLHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    q = q_BLHK.reshape(B, L, G, H // G, K).astype(jnp.float32)
    logits = jnp.einsum("BLGRK,BSGK->BGRLS", q, k_BSGK.astype(jnp.float32))
    return scale * logits.reshape(B, H, L, S)


def _masked_softmax(logits_BHLS, allowed) -> jax.Array:
    """float32 softmax over keys; masked entries and fully masked rows get exactly 0."""
    if allowed is None:
        return jax.nn.softmax(logits_BHLS, axis=-1)
    logits = jnp.where(allowed, logits_BHLS, MASK_VALUE)
    # A fully masked row is uniform after softmax; the second `where` turns it into zeros
    # (and every other masked entry is already exactly 0 since exp underflows).
    return jnp.where(allowed, jax.nn.softmax(logits, axis=-1), 0.0)


def attention_weights(
    q_BLHK, k_BSGK, *, bias=None, mask=None, causal=False, window=None, scale=None
) -> jax.Array:
    """BHLS float32 attention probabilities (materialised; for attention maps and the oracle)."""
    _check_shapes(q_BLHK, k_BSGK, k_BSGK)
    masks_lib.check_window(window)
    B, L, H, K = q_BLHK.shape
    S = k_BSGK.shape[1]
    logits = _grouped_logits(q_BLHK, k_BSGK, _default_scale(scale, K))
    b = _block_bias(bias, jnp.arange(L, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32))
    if b is not None:
        logits = logits + b
    probs = _masked_softmax(logits, _full_mask(L, S, mask, causal, window))
    return jnp.broadcast_to(probs, (B, H, L, S))


def _apply_weights(probs_BHLS, v_BSGK, dtype) -> jax.Array:
    B, H, L, S = probs_BHLS.shape
    G = v_BSGK.shape[2]
    p = probs_BHLS.reshape(B, G, H // G, L, S)
    out = jnp.einsum("BGRLS,BSGK->BLGRK", p, v_BSGK.astype(jnp.float32))
    return out.reshape(B, L, H, v_BSGK.shape[-1]).astype(dtype)


def _reference(q_BLHK, k_BSGK, v_BSGK, *, bias, mask, causal, window, scale) -> jax.Array:
    probs = attention_weights(
        q_BLHK, k_BSGK, bias=bias, mask=mask, causal=causal, window=window, scale=scale
    )
    return _apply_weights(probs, v_BSGK, q_BLHK.dtype)


def _auto(q_BLHK, k_BSGK, v_BSGK, **kw) -> jax.Array:
    # Only the reference exists so far; the shape-based choice arrives with the other impls.
    return _reference(q_BLHK, k_BSGK, v_BSGK, **kw)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "reference": _reference,
    "auto": _auto,
}
IMPLS = ("reference", "chunked", "xla", "cudnn", "auto")


def dot_product_attention(
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
) -> jax.Array:
    """softmax(scale * q.k + bias, masked) v -> BLHK in q's dtype. See the module docstring."""
    _check_shapes(q_BLHK, k_BSGK, v_BSGK)
    masks_lib.check_window(window)
    fn = lookup(IMPLEMENTATIONS, impl, "model.impl")
    return fn(
        q_BLHK,
        k_BSGK,
        v_BSGK,
        bias=bias,
        mask=mask,
        causal=causal,
        window=window,
        scale=scale,
    )


__all__ = ["IMPLS", "MASK_VALUE", "ConfigError", "attention_weights", "dot_product_attention"]
