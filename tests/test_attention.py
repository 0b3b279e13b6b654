"""Tests for attn.attention: the reference against NumPy, every impl against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import attention
from attn.registry import ConfigError


def _qkv(key, B=2, L=5, S=7, H=4, G=2, K=8, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, L, H, K), dtype)
    k = jax.random.normal(kk, (B, S, G, K), dtype)
    v = jax.random.normal(kv, (B, S, G, K), dtype)
    return q, k, v


def _numpy_attention(q, k, v, *, bias=None, allowed=None, scale=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, L, H, K = q.shape
    G = k.shape[2]
    scale = 1 / np.sqrt(K) if scale is None else scale
    kh = np.repeat(k, H // G, axis=2)  # contiguous groups: head h -> kv head h // (H // G)
    vh = np.repeat(v, H // G, axis=2)
    logits = scale * np.einsum("blhk,bshk->bhls", q, kh)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    allowed = (
        np.ones(logits.shape, bool) if allowed is None else np.broadcast_to(allowed, logits.shape)
    )
    logits = np.where(allowed, logits, -np.inf)
    m = np.max(logits, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.where(allowed, np.exp(logits - m), 0)
    denom = e.sum(-1, keepdims=True)
    p = np.where(denom > 0, e / np.where(denom > 0, denom, 1), 0)
    return np.einsum("bhls,bshk->blhk", p, vh), p


def test_reference_matches_numpy_gqa_causal_bias():
    q, k, v = _qkv(jax.random.key(0))
    bias = jax.random.normal(jax.random.key(1), (1, 4, 5, 7))
    out = attention.dot_product_attention(q, k, v, bias=bias, causal=True, impl="reference")
    L, S = 5, 7
    allowed = (np.arange(L)[:, None] + S - L) >= np.arange(S)[None, :]
    expected, _ = _numpy_attention(q, k, v, bias=bias, allowed=allowed)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_unknown_impl_raises():
    q, k, v = _qkv(jax.random.key(0))
    with pytest.raises(ConfigError, match="model.impl"):
        attention.dot_product_attention(q, k, v, impl="nope")
