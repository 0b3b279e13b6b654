"""Tests for attn.attention: the reference against NumPy, every impl against the reference."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import attention
from attn.registry import ConfigError

HAS_GPU = jax.default_backend() == "gpu"


def _normal(seed, shape, dtype=jnp.float32):
    # NumPy draws: jax.random would compile once per shape, which dominates these tiny tests.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _qkv(seed, B=2, L=5, S=7, H=4, G=2, K=8, dtype=jnp.float32):
    return (
        _normal(seed, (B, L, H, K), dtype),
        _normal(seed + 1000, (B, S, G, K), dtype),
        _normal(seed + 2000, (B, S, G, K), dtype),
    )


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
    allowed = np.broadcast_to(True if allowed is None else allowed, logits.shape)
    row_max = np.max(np.where(allowed, logits, -np.inf), -1, keepdims=True)
    e = np.exp(np.where(allowed, logits - np.where(np.isfinite(row_max), row_max, 0), -np.inf))
    denom = e.sum(-1, keepdims=True)
    p = e / np.where(denom > 0, denom, 1)
    return np.einsum("bhls,bshk->blhk", p, vh), p


def _bottom_right(L, S, causal, window):
    rel = (np.arange(L)[:, None] + S - L) - np.arange(S)[None, :]
    allowed = np.ones((L, S), bool)
    if causal:
        allowed &= rel >= 0
    if window is not None:
        allowed &= np.abs(rel) < window
    return allowed


@pytest.mark.parametrize(
    "L,S,H,G,causal,window",
    [
        (5, 7, 4, 2, True, None),
        (6, 3, 2, 1, True, 2),
        (7, 7, 2, 2, False, 3),
    ],
)
def test_reference_matches_numpy(L, S, H, G, causal, window):
    q, k, v = _qkv(0, L=L, S=S, H=H, G=G)
    bias = _normal(1, (1, H, L, S))
    out = jax.jit(
        lambda q, k, v, bias: attention.dot_product_attention(
            q, k, v, bias=bias, causal=causal, window=window, impl="reference"
        )
    )(q, k, v, bias)
    expected, probs = _numpy_attention(
        q, k, v, bias=bias, allowed=_bottom_right(L, S, causal, window)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    weights = jax.jit(
        lambda q, k, bias: attention.attention_weights(
            q, k, bias=bias, causal=causal, window=window
        )
    )(q, k, bias)
    assert weights.shape == (2, H, L, S) and weights.dtype == jnp.float32
    np.testing.assert_allclose(weights, probs, rtol=1e-5, atol=1e-6)


def _table_bias(H, L, S, seed=5):
    """A learned-relative-bias-like callable closing over a parameter table, and its table."""
    table = _normal(seed, (H, L + S))

    def make(table):
        def bias_fn(q_idx, k_idx):
            return table[:, k_idx[None, :] - q_idx[:, None] + L - 1]

        return bias_fn

    return make, table


# (name, B, L, S, H, G, causal, window, mask kind, bias kind)
CASES = [
    ("mha", 2, 8, 8, 2, 2, False, None, None, None),
    ("kv_cache_causal_gqa", 2, 3, 10, 4, 2, True, None, None, "full"),
    ("more_queries_mqa", 1, 10, 4, 4, 1, True, None, None, None),
    ("causal_window_gqa", 1, 11, 11, 4, 2, True, 3, None, "heads_keys"),
    ("window_bidirectional", 2, 7, 12, 2, 1, False, 4, "keys", None),
    ("padding_masks", 2, 9, 9, 2, 2, True, None, "pad", "full"),
    ("callable_bias_causal", 2, 9, 13, 2, 1, True, None, "keys", "callable"),
    ("fully_masked_rows", 2, 6, 5, 2, 2, False, None, "rows", "full"),
]


def _case_operands(B, L, S, H, G, mask_kind, bias_kind):
    q, k, v = _qkv(len(mask_kind or "") + L, B=B, L=L, S=S, H=H, G=G)
    rng = np.random.default_rng(L * S)
    mask = {
        None: None,
        "keys": rng.random((B, 1, 1, S)) < 0.8,
        "pad": (np.arange(L)[None, :, None] < np.array([L, L - 3])[:, None, None])[:, None]
        & (np.arange(S)[None, None, :] < np.array([S, S - 4])[:, None, None])[:, None],
        "rows": np.broadcast_to(np.arange(L)[:, None] % 3 != 1, (B, 1, L, S)),
    }[mask_kind]
    bias_shape = {"full": (B, H, L, S), "heads_keys": (1, H, 1, S)}.get(bias_kind)
    bias = None if bias_shape is None else _normal(7, bias_shape)
    return q, k, v, mask, bias


def _loss_and_grads(impl, causal, window, mask, bias_kind, **block):
    """jit(value_and_grad) of a weighted output sum w.r.t. q, k, v and the bias (array/table)."""

    def loss(q, k, v, bias_param):
        bias = bias_param
        if bias_kind == "callable":
            bias = _table_bias(q.shape[2], q.shape[1], k.shape[1])[0](bias_param)
        fn = attention.chunked_attention if impl == "chunked" else attention.dot_product_attention
        kw = block if impl == "chunked" else {"impl": impl}
        out = fn(q, k, v, bias=bias, mask=mask, causal=causal, window=window, **kw)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    argnums = (0, 1, 2) if bias_kind is None else (0, 1, 2, 3)
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_impls_match_reference(case):
    _, B, L, S, H, G, causal, window, mask_kind, bias_kind = case
    q, k, v, mask, bias = _case_operands(B, L, S, H, G, mask_kind, bias_kind)
    if bias_kind == "callable":
        bias = _table_bias(H, L, S)[1]
    args = (q, k, v, bias)
    (_, want), want_grads = _loss_and_grads("reference", causal, window, mask, bias_kind)(*args)
    for impl in ("chunked", "dense", "xla"):
        # Blocks of 4 x 3 make several blocks with ragged ends in every case.
        (_, got), grads = _loss_and_grads(
            impl, causal, window, mask, bias_kind, block_q=4, block_k=3
        )(*args)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=impl)
        for g, w in zip(grads, want_grads, strict=True):
            assert bool(jnp.all(jnp.isfinite(g))), impl
            np.testing.assert_allclose(g, w, rtol=5e-5, atol=5e-5, err_msg=impl)
        if mask_kind == "rows":
            np.testing.assert_array_equal(got[:, 1::3], 0.0)


def test_causal_row_blocks():
    assert attention.causal_row_blocks(256, 256, 128) == [(0, 128, 128), (128, 256, 256)]
    assert attention.causal_row_blocks(255, 255, 128) is None  # fewer than two blocks
    assert attention.causal_row_blocks(10, 14, 4) == [(0, 4, 8), (4, 8, 12), (8, 10, 14)]
    assert attention.causal_row_blocks(10, 4, 4) == [(0, 4, 1), (4, 8, 2), (8, 10, 4)]
    assert attention.causal_row_blocks(8, 100, 4) == [(0, 4, 96), (4, 8, 100)]


CAUSAL = [c for c in CASES if c[6]]


@pytest.mark.parametrize("case", CAUSAL, ids=[c[0] for c in CAUSAL])
def test_dense_in_causal_row_blocks_matches_reference(case, monkeypatch):
    """Blocks of 4 query rows, each against only the keys it can see (rows that see none: the
    more_queries case, whose first rows are fully masked), with masks, windows, GQA, array and
    callable biases: outputs and every gradient as the reference."""
    _, B, L, S, H, G, causal, window, mask_kind, bias_kind = case
    monkeypatch.setattr(attention, "DENSE_CAUSAL_BLOCK", 4)
    q, k, v, mask, bias = _case_operands(B, L, S, H, G, mask_kind, bias_kind)
    if bias_kind == "callable":
        bias = _table_bias(H, L, S)[1]
    args = (q, k, v, bias)
    (_, want), want_grads = _loss_and_grads("reference", causal, window, mask, bias_kind)(*args)
    (_, got), grads = _loss_and_grads("dense", causal, window, mask, bias_kind)(*args)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=5e-5, atol=5e-5)


def test_dense_causal_row_blocks_keep_causality_by_gradient(monkeypatch):
    monkeypatch.setattr(attention, "DENSE_CAUSAL_BLOCK", 2)
    B, L, S = 1, 7, 9
    q, k, v = _qkv(6, B=B, L=L, S=S)
    fn = lambda k: attention.dense_attention(q, k, v, causal=True)[0].sum(axis=(1, 2))  # noqa: E731
    dependence = np.abs(np.asarray(jax.jit(jax.jacrev(fn))(k))).sum(axis=(1, 3, 4))
    for i in range(L):
        pos = S - L + i
        assert np.all(dependence[i, pos + 1 :] == 0) and np.all(dependence[i, : pos + 1] > 0)


def test_bf16_inputs_close_to_float32_reference():
    q, k, v = _qkv(3, L=9, S=9)
    want = attention.dot_product_attention(q, k, v, causal=True, impl="reference")
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    for impl in ("chunked", "dense", "xla"):

        def loss(q, k, v, impl=impl):
            out = attention.dot_product_attention(q, k, v, causal=True, impl=impl)
            return out.astype(jnp.float32).sum(), out

        (_, got), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(qb, kb, vb)
        assert got.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, err_msg=impl)
        assert bool(jnp.all(jnp.isfinite(grad)))


def test_bf16_softmax_is_float32():
    # Two logits that bf16 rounds together (256 vs 257) must still get distinct weights.
    q = jnp.ones((1, 1, 1, 1), jnp.bfloat16)
    k = jnp.array([256.0, 257.0], jnp.float32).reshape(1, 2, 1, 1)
    bias = jnp.array([0.0, 1.0], jnp.float32)
    w = attention.attention_weights(q, jnp.zeros_like(k, jnp.bfloat16), bias=bias, scale=1.0)
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(w[0, 0, 0], jax.nn.softmax(bias), rtol=1e-6)


def test_chunked_default_blocks_with_undifferentiated_biases():
    # Default block sizes (one ragged block here), and biases that are constants of the
    # gradient: an array, and a callable closing over traced but undifferentiated slopes.
    q, k, v = _qkv(4, L=7, S=11)
    bias = _normal(9, (1, 4, 7, 11))
    slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])

    def grads(impl):
        def loss(q, slopes):
            alibi = lambda qi, ki: -slopes[:, None, None] * jnp.abs(qi[:, None] - ki[None, :])
            kw = dict(causal=True, window=5, impl=impl)
            out = attention.dot_product_attention(q, k, v, bias=bias, **kw)
            out2 = attention.dot_product_attention(q, k, v, bias=alibi, **kw)
            return jnp.sum(jnp.sin(out) + out2**2)

        return jax.jit(jax.value_and_grad(loss))(q, slopes)

    (got, got_dq), (want, want_dq) = grads("chunked"), grads("reference")
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(got_dq, want_dq, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("L,S,bq,bk", [(7, 12, 4, 3), (12, 7, 4, 3), (9, 9, 2, 5)])
@pytest.mark.parametrize(
    "causal,window", [(True, None), (True, 1), (True, 3), (False, 3), (False, 9)]
)
def test_chunked_block_skipping_and_partial_blocks_match_the_mask(L, S, bq, bk, causal, window):
    nq, nk = -(-L // bq), -(-S // bk)
    plan = attention._Plan(
        L=L, S=S, H=1, bq=bq, bk=bk, scale=1.0, causal=causal, window=window,
        bias_fn=None, bias_sliced=(False, False), mask_sliced=(False, False),
    )  # fmt: skip
    allowed = np.zeros((nq * bq, nk * bk), bool)
    allowed[:L, :S] = _bottom_right(L, S, causal, window)
    for i in range(nq):
        j_lo, j_hi = (int(x) for x in plan.key_blocks(i))
        for j in range(nk):
            block = allowed[i * bq : min((i + 1) * bq, L), j * bk : (j + 1) * bk]
            if not j_lo <= j < j_hi:
                assert not block.any(), (i, j)  # skipped blocks hide nothing visible
            elif not bool(plan.block_is_partial(i, j)):
                assert block.all(), (i, j)  # unmasked blocks are fully visible


@pytest.mark.parametrize("impl", ["reference", "chunked", "dense", "xla"])
def test_causality_by_gradient(impl):
    B, L, S = 1, 4, 7
    q, k, v = _qkv(5, B=B, L=L, S=S)
    kw = {"block_q": 2, "block_k": 3} if impl == "chunked" else {"impl": impl}
    fn = attention.chunked_attention if impl == "chunked" else attention.dot_product_attention
    jac = jax.jit(jax.jacrev(lambda k: fn(q, k, v, causal=True, **kw)[0].sum(axis=(1, 2))))(k)
    dependence = np.abs(np.asarray(jac)).sum(axis=(1, 3, 4))  # (L, S): d out[i] / d k[j]
    for i in range(L):
        pos = S - L + i
        assert np.all(dependence[i, pos + 1 :] == 0), (i, pos)
        assert np.all(dependence[i, : pos + 1] > 0), (i, pos)


def test_default_scale_keeps_logit_variance_near_one():
    # For unit-variance q, k the raw q.k has variance K; 1/sqrt(K) brings it back to 1. The
    # scaled logit difference of two keys, log(w0 / w1), then has variance 2.
    weights = jax.jit(lambda q, k: attention.attention_weights(q, k))
    rng = np.random.default_rng(0)
    for K in (8, 32, 128, 512):
        q = rng.standard_normal((4096, 1, 1, K)).astype(np.float32)
        k = rng.standard_normal((4096, 2, 1, K)).astype(np.float32)
        raw = np.einsum("nk,nk->n", q[:, 0, 0], k[:, 0, 0])
        assert abs(raw.var() / K - 1) < 0.15
        w = np.asarray(weights(q, k), np.float64)[:, 0, 0]
        assert abs(np.log(w[:, 0] / w[:, 1]).var() / 2 - 1) < 0.15


def test_unknown_impl_raises():
    q, k, v = _qkv(0)
    with pytest.raises(ConfigError, match="model.impl"):
        attention.dot_product_attention(q, k, v, impl="nope")


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU error")
def test_cudnn_without_gpu_raises_config_error():
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    k = v = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ConfigError, match="model.impl: 'cudnn' needs a GPU"):
        attention.dot_product_attention(q, k, v, impl="cudnn")


@pytest.mark.skipif(not HAS_GPU, reason="cuDNN needs a GPU")
@pytest.mark.parametrize(
    "L,S,causal,window", [(16, 16, True, None), (8, 24, True, 4), (16, 16, False, 5)]
)
def test_cudnn_matches_reference(L, S, causal, window):
    q, k, v = _qkv(0, L=L, S=S, K=64, dtype=jnp.bfloat16)
    want = attention.dot_product_attention(q, k, v, causal=causal, window=window, impl="reference")
    got = attention.dot_product_attention(q, k, v, causal=causal, window=window, impl="cudnn")
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=3e-2)


def test_bad_shapes_raise():
    q = jnp.zeros((1, 2, 4, 8))
    k = jnp.zeros((1, 2, 3, 8))
    with pytest.raises(ValueError, match="multiple"):
        attention.dot_product_attention(q, k, k, impl="reference")


def test_auto_choice():
    small = dict(dtype=jnp.float32, backend="cpu")
    assert attention.choose_impl((2, 128, 8, 64), (2, 128, 8, 64), **small) == "dense"
    # 1 x 8 x 16k x 16k float32 logits = 8 GiB: chunked.
    assert attention.choose_impl((1, 16384, 8, 64), (1, 16384, 8, 64), **small) == "chunked"
    assert (
        attention.choose_impl((1, 4096, 8, 64), (1, 4096, 8, 64), causal=True, **small) == "chunked"
    )
    assert attention.choose_impl((1, 1, 8, 64), (1, 4096, 8, 64), causal=True, **small) == "dense"
    gpu = dict(dtype=jnp.bfloat16, backend="gpu")
    assert attention.choose_impl((1, 4096, 8, 64), (1, 4096, 8, 64), **gpu) == "cudnn"
    assert attention.choose_impl((1, 64, 8, 12), (1, 64, 8, 12), **gpu) == "dense"
    # A bias callable would be materialised for cuDNN: too big at 16k, so chunked.
    long = ((1, 16384, 8, 64), (1, 16384, 8, 64))
    assert attention.choose_impl(*long, callable_bias=True, **gpu) == "chunked"
    assert attention.choose_impl(*long, **gpu) == "cudnn"


def test_auto_runs_and_logs_once(caplog):
    q, k, v = _qkv(8, L=3, S=5)
    with caplog.at_level(logging.INFO, logger="attn.attention"):
        attention._logged_choices.clear()
        out = attention.dot_product_attention(q, k, v, causal=True)
        attention.dot_product_attention(q, k, v, causal=True)
    want = attention.dot_product_attention(q, k, v, causal=True, impl="reference")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    picked = [r for r in caplog.records if "impl=auto picked" in r.getMessage()]
    assert len(picked) == 1 and "B=2,L=3,S=5" in picked[0].getMessage()


def test_impls_listed():
    assert set(attention.IMPLS) == {
        "reference",
        "chunked",
        "dense",
        "xla",
        "cudnn",
        "flash",
        "auto",
    }
