"""Tests for attn.scoring: registry, shapes, masks, hard top-k, and NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn import attention, scoring
from attn.registry import ConfigError

B, L, S, H, G, K = 2, 3, 5, 4, 2, 8


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((B, L, H, K)), jnp.float32),
        jnp.asarray(rng.standard_normal((B, S, G, K)), jnp.float32),
        jnp.asarray(rng.standard_normal((B, S, G, K)), jnp.float32),
    )


def _build(name, **fields):
    cfg = {**scoring.default_config(name), **fields}
    return scoring.build(cfg, num_heads=H, head_dim=K, rngs=nnx.Rngs(0))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_registry_and_defaults():
    assert set(scoring.REGISTRY) == {"dot", "luong", "additive", "hard"}
    for name, cls in scoring.REGISTRY.items():
        assert scoring.default_config(name) == {"name": name, **cls.DEFAULTS}
    with pytest.raises(ConfigError, match="model.scorer.name"):
        scoring.default_config("bilinear")
    with pytest.raises(ConfigError, match="model.scorer.hidden"):
        _build("luong", hidden=3)
    with pytest.raises(ConfigError, match="model.scorer.k"):
        _build("hard", k=0)


@pytest.mark.parametrize("name", sorted(scoring.REGISTRY))
def test_shapes_and_masked_keys_get_zero_weight(name):
    q, k, v = _qkv()
    mask = np.ones((B, 1, L, S), bool)
    mask[0, 0, :, 1] = False  # a padded key
    mask[1, 0, 2, :] = False  # a fully masked query row
    out, w = _build(name)(q, k, v, mask=mask, causal=True, return_weights=True)
    assert out.shape == (B, L, H, K) and out.dtype == q.dtype
    assert w.shape == (B, H, L, S) and w.dtype == jnp.float32
    allowed = np.broadcast_to(
        mask & np.asarray(attention.combined_mask(L, S, None, True, None)), w.shape
    )
    np.testing.assert_array_equal(np.asarray(w)[~allowed], 0.0)
    np.testing.assert_allclose(np.asarray(w).sum(-1)[:, :, :2], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[1, 2], 0.0)
    np.testing.assert_allclose(out, attention.apply_weights(w, v, q.dtype), rtol=1e-5, atol=1e-6)


def test_dot_scorer_is_dot_product_attention():
    q, k, v = _qkv(1)
    bias = lambda qi, ki: -0.1 * jnp.abs(qi[:, None] - ki[None, :]).astype(jnp.float32)
    out, w = _build("dot")(q, k, v, bias=bias, causal=True, return_weights=True, impl="chunked")
    want = attention.dot_product_attention(q, k, v, bias=bias, causal=True, impl="reference")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, attention.attention_weights(q, k, bias=bias, causal=True))


@pytest.mark.parametrize("name", ["luong", "additive", "hard"])
@pytest.mark.parametrize("impl", ["chunked", "cudnn"])
def test_materialising_scorers_reject_chunked(name, impl):
    q, k, v = _qkv()
    with pytest.raises(ConfigError, match="model.impl.*model.scorer.name"):
        _build(name)(q, k, v, impl=impl)


def test_luong_matches_numpy():
    q, k, v = _qkv(2)
    scorer = _build("luong")
    _, w = scorer(q, k, v, return_weights=True, impl="reference")
    W = np.asarray(scorer.w_HKK[...])
    kh = np.repeat(np.asarray(k), H // G, axis=2)
    logits = np.einsum("blhk,hkj,bshj->bhls", np.asarray(q), W, kh) / np.sqrt(K)
    np.testing.assert_allclose(w, _softmax(logits), rtol=1e-5, atol=1e-6)


def test_additive_matches_numpy():
    q, k, v = _qkv(3)
    scorer = _build("additive", hidden=6)
    _, w = scorer(q, k, v, return_weights=True)
    Wq = np.einsum("blhk,hka->bhla", np.asarray(q), np.asarray(scorer.w_HKA[...]))
    kh = np.repeat(np.asarray(k), H // G, axis=2)
    Uk = np.einsum("bshk,hka->bhsa", kh, np.asarray(scorer.u_HKA[...]))
    logits = np.einsum(
        "bhlsa,ha->bhls", np.tanh(Wq[:, :, :, None] + Uk[:, :, None]), scorer.v_HA[...]
    )
    np.testing.assert_allclose(w, _softmax(logits), rtol=1e-5, atol=1e-6)


def test_hard_k1_is_one_hot_argmax_with_soft_gradient():
    q, k, v = _qkv(4)
    scorer = _build("hard")
    out, w = scorer(q, k, v, return_weights=True)
    logits = np.asarray(attention.grouped_logits(q, k, 1 / np.sqrt(K)))
    np.testing.assert_allclose(w, jax.nn.one_hot(logits.argmax(-1), S), atol=1e-6)
    vh = np.repeat(np.asarray(v), H // G, axis=2)
    picked = np.take_along_axis(vh.transpose(0, 2, 1, 3), logits.argmax(-1)[..., None], axis=2)
    np.testing.assert_allclose(out, picked.transpose(0, 2, 1, 3), rtol=1e-6)
    grad_q = jax.grad(lambda q: jnp.sum(scorer(q, k, v) * v[:, :L].repeat(2, axis=2)))(q)
    assert bool(jnp.all(jnp.isfinite(grad_q))) and float(jnp.abs(grad_q).max()) > 0


def test_hard_top2_renormalises():
    probs = jnp.array([[0.1, 0.5, 0.3, 0.1]])
    np.testing.assert_allclose(scoring.top_k_weights(probs, 2), [[0, 0.625, 0.375, 0]], rtol=1e-6)
    np.testing.assert_array_equal(scoring.top_k_weights(jnp.zeros((1, 3)), 1), 0.0)
    np.testing.assert_allclose(scoring.top_k_weights(probs, 9), probs, rtol=1e-6)
