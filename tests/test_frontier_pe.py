"""The 2024-25 encodings and attention choices against float64 formulas written from their papers.

p-RoPE (Barbero et al. 2025), PoPE (Gopalakrishnan et al. 2025), FoX's forget-gate bias (Lin
et al. 2025), DAPE (Zheng et al. 2024), stick-breaking attention (Tan et al. 2025) and the
logit scales log n (Chiang & Cholak 2022), SSMax (Nakanishi 2025) and per-head temperatures
(Wang et al. 2024), each on small inputs in NumPy float64, plus: the logit scale through every
attention implementation, KV-cache decoding == the full forward pass with a logit scale (every
encoding) and with stick-breaking, and the one-line ConfigErrors. The registry-driven contract
tests (tests/test_pe.py, tests/test_layers.py) cover the new encodings by themselves.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_layers import full_and_incremental  # the KV-cache oracle, shared

import attn.pe
from attn import attention, layers, scoring
from attn.models import EncoderDecoder
from attn.pe import alibi, dape, fox, pope, prope, rope
from attn.registry import ConfigError

RNG = np.random.default_rng(0)
# The KV-cache check with a logit scale runs for these encodings in the default suite (one per
# hook kind and every new one); the others run with the slow tests.
FAST_CACHE_PES = ("alibi", "dape", "fox", "p_rope", "pope", "rope")


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """These graphs are tiny: XLA's optimisation passes cost more time than they save."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_softplus(x):
    return np.log1p(np.exp(np.asarray(x, np.float64)))


def perturbed(name, causal, num_heads=3, head_dim=8, **fields):
    """An encoding with every parameter moved off its init (zero inits would hide terms)."""
    pe = attn.pe.build(
        {**attn.pe.default_config(name), **fields},
        d_model=8,
        num_heads=num_heads,
        head_dim=head_dim,
        causal=causal,
        rngs=nnx.Rngs(0),
    )
    state = nnx.state(pe, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    noisy = [x + 0.5 * RNG.normal(size=x.shape).astype(np.float32) for x in leaves]
    nnx.update(pe, jax.tree.unflatten(treedef, noisy))
    return pe


def group(h, H, G):
    return h // (H // G)


# --- p-RoPE -----------------------------------------------------------------------------


def np_prope(x, pos, p, base=1e4, layout="half"):
    """Pair i turns by pos * base^(-2i/K) for the floor(p K/2) highest frequencies, else not."""
    K = x.shape[-1]
    kept = math.floor(p * (K // 2) + 1e-9)
    out = x.copy()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(kept):
                a, c = (i, i + K // 2) if layout == "half" else (2 * i, 2 * i + 1)
                ang = pos[b, t] * base ** (-2 * i / K)
                x1, x2 = x[b, t, :, a], x[b, t, :, c]
                out[b, t, :, a] = x1 * np.cos(ang) - x2 * np.sin(ang)
                out[b, t, :, c] = x2 * np.cos(ang) + x1 * np.sin(ang)
    return out


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("p", [0.0, 0.25, 0.75, 1.0])
def test_prope_rotate(p, layout):
    x = RNG.normal(size=(2, 5, 3, 16))
    pos = np.array([[0, 1, 2, 3, 4], [0, 7, 100, 513, 2047]])
    got = prope.rotate(jnp.asarray(x, jnp.float32), jnp.asarray(pos), p=p, layout=layout)
    np.testing.assert_allclose(got, np_prope(x, pos, p, layout=layout), rtol=1e-4, atol=1e-3)


def test_prope_is_not_partial_rotary():
    """p=1 is RoPE, p=0 is NoPE; p=0.5 keeps RoPE's 4 highest of 8 frequencies and leaves the
    other 8 dims as they are, while rope.fraction=0.5 rotates 8 dims by a respread spectrum."""
    x = jnp.asarray(RNG.normal(size=(1, 4, 2, 16)), jnp.float32)
    pos = jnp.array([[0, 3, 50, 900]])
    np.testing.assert_allclose(prope.rotate(x, pos, p=1.0), rope.rotate(x, pos), atol=1e-5)
    np.testing.assert_array_equal(prope.rotate(x, pos, p=0.0), x)
    half = np.asarray(prope.rotate(x, pos, p=0.5))
    np.testing.assert_array_equal(half[..., 4:8], np.asarray(x)[..., 4:8])  # lowest 4 pairs:
    np.testing.assert_array_equal(half[..., 12:], np.asarray(x)[..., 12:])  # dims 4-7, 12-15
    partial = np.asarray(rope.rotate(x, pos, fraction=0.5))
    assert not np.allclose(half, partial, atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(prope.frequencies(16, 0.5)), [1e4 ** (-i / 8) for i in range(4)] + [0] * 4
    )


# --- PoPE -------------------------------------------------------------------------------


def np_pope_logits(q, k, qpos, kpos, delta, base=1e4):
    """sum_c softplus(q_c) softplus(k_c) cos((i - j) theta_c - delta_hc), d = K/2 components
    (the first K/2 dims), theta_c = base^(-c/d); delta clamped to [-2 pi, 0]."""
    B, L, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    d = K // 2
    theta = np.array([base ** (-c / d) for c in range(d)])
    delta = np.clip(delta, -2 * np.pi, 0)
    out = np.zeros((B, H, L, S))
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    mq = np_softplus(q[b, i, h, :d])
                    mk = np_softplus(k[b, j, group(h, H, G), :d])
                    phase = (qpos[b, i] - kpos[b, j]) * theta - delta[h]
                    out[b, h, i, j] = np.sum(mq * mk * np.cos(phase))
    return out


def test_pope_logits():
    pe = perturbed("pope", True, num_heads=4)
    delta = RNG.uniform(-9.0, 2.0, size=(4, 4))  # some outside [-2 pi, 0]: clamped
    pe.phase_bias[...] = jnp.asarray(delta, jnp.float32)
    q = RNG.normal(size=(2, 4, 4, 8))
    k = RNG.normal(size=(2, 5, 2, 8))  # GQA: 2 kv heads for 4 query heads
    qpos = np.array([[1, 2, 3, 4], [10, 30, 31, 60]])
    kpos = np.array([[0, 1, 2, 3, 4], [3, 10, 30, 31, 60]])
    q2, k2 = pe.rotate(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), qpos, kpos)
    got = np.einsum("blhk,bshk->bhls", q2, np.repeat(np.asarray(k2), 2, axis=2))
    want = np_pope_logits(q, k, qpos, kpos, delta)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- FoX --------------------------------------------------------------------------------


def np_fox(k, w, b, qpos, kpos, H, w_g=None, b_g=None):
    """D_ij = sum_{l: kpos_j < kpos_l <= qpos_i} log f_l, f_l = sigmoid(w_h . k_l + b_h) (head
    h's key), for keys at or before the query; after it (bidirectional, w_g given) the sum of
    log g_l over qpos_i <= kpos_l < kpos_j. Causal future entries are left at 0 (masked)."""
    B, S, G, _ = k.shape
    L = qpos.shape[1]
    out = np.zeros((B, H, L, S))
    for bb in range(B):
        for h in range(H):
            kh = k[bb, :, group(h, H, G)]
            log_f = np.log(np_sigmoid(kh @ w[h] + b[h]))
            for i in range(L):
                for j in range(S):
                    qi, kj = qpos[bb, i], kpos[bb, j]
                    if kj <= qi:
                        out[bb, h, i, j] = sum(log_f[l] for l in range(S) if kj < kpos[bb, l] <= qi)
                    elif w_g is not None:
                        log_g = np.log(np_sigmoid(kh @ w_g[h] + b_g[h]))
                        out[bb, h, i, j] = sum(log_g[l] for l in range(S) if qi <= kpos[bb, l] < kj)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_fox_bias(causal):
    H = 4
    pe = perturbed("fox", causal, num_heads=H)
    w, b = (np.asarray(getattr(pe, n)[...], np.float64) for n in ("w_forget", "b_forget"))
    w_g = b_g = None
    if not causal:
        w_g, b_g = (np.asarray(getattr(pe, n)[...], np.float64) for n in ("w_future", "b_future"))
    k = RNG.normal(size=(2, 6, 2, 8))
    pos = np.array([[0, 1, 2, 3, 4, 5], [2, 3, 7, 8, 20, 21]])
    got = np.asarray(pe.bias(jnp.asarray(pos), jnp.asarray(pos), None, jnp.asarray(k, jnp.float32)))
    want = np_fox(k, w, b, pos, pos, H, w_g, b_g)
    if causal:  # future keys are masked by attention; compare the visible entries
        visible = np.tril(np.ones((6, 6), bool))
        got, want = got[..., visible], want[..., visible]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # A KV-cache step (the last 2 queries) sees the same rows.
    k = jnp.asarray(k, jnp.float32)
    full = pe.bias(jnp.asarray(pos), jnp.asarray(pos), None, k)
    step = pe.bias(jnp.asarray(pos[:, 4:]), jnp.asarray(pos), None, k)
    np.testing.assert_allclose(step, np.asarray(full)[:, :, 4:], rtol=1e-5, atol=1e-5)


def test_fox_with_constant_gates_is_alibi():
    """w = 0: every gate is sigmoid(b_h), so D_ij = -(i - j) * (-log sigmoid(b_h)): ALiBi with
    slope m_h = -log sigmoid(b_h) (the paper's data-independent special case)."""
    H = 4
    pe = perturbed("fox", True, num_heads=H)
    pe.w_forget[...] = jnp.zeros_like(pe.w_forget[...])
    slopes = -np.log(np_sigmoid(np.asarray(pe.b_forget[...], np.float64)))
    pos = jnp.arange(7)[None]
    k = jnp.asarray(RNG.normal(size=(1, 7, H, 8)), jnp.float32)
    got = np.asarray(pe.bias(pos, pos, None, k))
    want = np.asarray(alibi.bias(pos, pos, slopes, causal=True))
    visible = np.tril(np.ones((7, 7), bool))
    np.testing.assert_allclose(got[..., visible], want[..., visible], rtol=1e-5, atol=1e-5)


# --- DAPE -------------------------------------------------------------------------------


def np_leaky_relu(x, slope=0.01):
    return np.where(x >= 0, x, slope * x)


@pytest.mark.parametrize("base_name", ["alibi", "kerple", "rope"])
def test_dape_bias(base_name):
    """Z + B + f([Z; B]), Z = q.k / sqrt(K), f: Dense(2H -> F), LeakyReLU, Dense(F -> H); the
    hook returns B + f (attention adds Z)."""
    H, K = 4, 8
    pe = perturbed("dape", True, num_heads=H, head_dim=K, base=base_name)
    p = {n: np.asarray(getattr(pe, n)[...], np.float64) for n in ("w1", "b1", "w2", "b2")}
    q = RNG.normal(size=(2, 5, H, K))
    k = RNG.normal(size=(2, 5, 2, K))
    pos = np.array([[0, 1, 2, 3, 4], [3, 9, 10, 17, 40]])
    qj, kj = pe.rotate(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), pos, pos)
    base_bias = pe.base.bias(jnp.asarray(pos), jnp.asarray(pos), qj, kj)
    B_ = np.zeros((2, H, 5, 5)) if base_bias is None else np.asarray(base_bias, np.float64)
    qr, kr = np.asarray(qj, np.float64), np.asarray(kj, np.float64)
    want = np.zeros((2, H, 5, 5))
    for b in range(2):
        for i in range(5):
            for j in range(5):
                z = np.array(
                    [qr[b, i, h] @ kr[b, j, group(h, H, 2)] / np.sqrt(K) for h in range(H)]
                )
                x = np.concatenate([z, B_[b, :, i, j]])
                f = np_leaky_relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
                want[b, :, i, j] = B_[b, :, i, j] + f
    got = pe.bias(jnp.asarray(pos), jnp.asarray(pos), qj, kj)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert pe.shift_invariant == attn.pe.get(base_name).shift_invariant


def test_dape_refuses_absolute_and_recursive_bases():
    cls = attn.pe.get("dape")
    for base_name, match in [("sinusoidal", "absolute encoding"), ("dape", "its own base")]:
        with pytest.raises(ConfigError, match=rf"^model\.pe\.base: .*{match}"):
            cls.validate(
                {"name": "dape", "base": base_name}, max_eval_position=8, num_heads=4, head_dim=8
            )


# --- stick-breaking ---------------------------------------------------------------------


def np_stick_breaking(z, allowed, attend_current):
    """A_ij = beta_ij prod_{j<k<i} (1 - beta_ik) over allowed keys, beta = sigmoid(z); query i
    is the last allowed key of its row (causal), dropped unless attend_current."""
    out = np.zeros_like(z, dtype=np.float64)
    for idx in np.ndindex(*z.shape[:-1]):
        keys = [j for j in range(z.shape[-1]) if allowed[idx + (j,)]]
        if not attend_current and keys:
            keys = keys[:-1]
        beta = np_sigmoid(z[idx])
        for n, j in enumerate(keys):
            out[idx + (j,)] = beta[j] * np.prod([1 - beta[k] for k in keys[n + 1 :]])
    return out


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_stick_breaking_weights(attend_current, window):
    z = RNG.normal(size=(2, 3, 6, 6)) * 3
    allowed = np.asarray(attention.combined_mask(6, 6, None, True, window))
    allowed = np.broadcast_to(allowed, z.shape).copy()
    allowed[1, :, :, 4:] = False  # right padding of the second example
    got = scoring.stick_breaking_weights(
        jnp.asarray(z, jnp.float32), allowed, attend_current=attend_current
    )
    want = np_stick_breaking(z, allowed, attend_current)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got).sum(-1) <= 1 + 1e-6)


# --- logit scales -----------------------------------------------------------------------


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, None), (False, 2)])
@pytest.mark.parametrize("L,S", [(6, 6), (2, 6)])
def test_visible_keys_counts_the_mask(causal, window, L, S):
    def allowed(mask):
        m = attention.combined_mask(L, S, mask, causal, window)
        return np.broadcast_to(True if m is None else np.asarray(m), (2, 1, L, S))

    pad = np.ones((2, 1, 1, S), bool)
    pad[1, ..., 4:] = False
    for mask in (None, pad):
        want = allowed(mask).sum(-1, keepdims=True)
        got = scoring.visible_keys(L, S, mask, causal, window)
        np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)
    explicit = allowed(pad)  # a KV cache's explicit mask, causal/window already in it
    got = scoring.visible_keys(L, S, explicit, False, None)
    np.testing.assert_array_equal(got, explicit.sum(-1, keepdims=True))


SCALES = {
    "log_n": {"name": "log_n"},
    "ssmax": {"name": "ssmax", "init": 0.7},
    "ssmax_q_only": {"name": "ssmax", "init": 0.7, "scale_bias": False},
    "temperature": {"name": "temperature", "scale": [0.5, 1.0, 2.0, 3.0]},
}


def np_scale(cfg, n_B1L1, H):
    """The factor s, B H L 1 (or 1 H 1 1), of a logit-scale config for n visible keys."""
    log_n = np.log(np.maximum(n_B1L1, 1.0))
    if cfg["name"] == "log_n":
        return log_n
    if cfg["name"] == "ssmax":
        return cfg["init"] * log_n * np.ones((1, H, 1, 1))
    return np.asarray(cfg["scale"], np.float64)[None, :, None, None]


def mha_with(scale=None, *, causal=True, scorer="dot", pe="alibi", impl="reference", **kw):
    cfg = layers.resolve(
        EncoderDecoder,
        {
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 4,
            "impl": impl,
            "pe": {"name": pe},
            "scorer": {"name": scorer},
            "logit_scale": scale or {"name": "none"},
            **kw,
        },
    )
    mha = layers.MultiHeadAttention(cfg, d_model=16, causal=causal, rngs=nnx.Rngs(0))
    enc = attn.pe.build(
        cfg["pe"], d_model=16, num_heads=4, head_dim=4, causal=causal, rngs=nnx.Rngs(1)
    )
    return mha, enc


@pytest.mark.parametrize("name", sorted(SCALES))
@pytest.mark.parametrize("causal", [True, False])
def test_logit_scale_formula(name, causal):
    """softmax(s * (z + b)) (or s * z + b without scale_bias), z = q.k / sqrt(K), b = ALiBi,
    n = visible keys (causal and key padding), in float64, against the layer's weights."""
    cfg = SCALES[name]
    mha, enc = mha_with(cfg, causal=causal)
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    pad = jnp.arange(6)[None] < jnp.array([[6], [4]])
    _, w = mha(x, pos_BL=pos, pe=enc, kv_mask_BS=pad, return_weights=True)
    q, k, _ = mha._project(x, x)
    z = np.einsum("blhk,bshk->bhls", np.asarray(q, np.float64), np.repeat(np.asarray(k), 2, 2))
    z = z / 2.0
    b = np.asarray(enc.bias(pos, pos), np.float64)
    allowed = np.broadcast_to(
        np.asarray(attention.combined_mask(6, 6, np.asarray(pad)[:, None, None], causal, None)),
        z.shape,
    )
    s = np_scale(cfg, allowed[:, :1].sum(-1, keepdims=True).astype(np.float64), 4)
    logits = s * (z + b) if cfg.get("scale_bias", True) else s * z + b
    logits = np.where(allowed, logits, -np.inf)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(w, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["chunked", "dense", "xla", "flash"])
@pytest.mark.parametrize("pe", ["alibi", "fire"])
def test_logit_scale_every_impl_matches_reference(impl, pe):
    """The factor folded into q (and the bias array or callable) gives what the materialised
    reference computes, in every implementation (flash falls back to chunked on a scaled
    bias: a scaled in-kernel bias is no longer a PositionalBias)."""
    x = jax.random.normal(jax.random.key(2), (2, 7, 16))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    pad = jnp.arange(7)[None] < jnp.array([[7], [5]])
    outs = []
    for which in ("reference", impl):
        mha, enc = mha_with(SCALES["ssmax"], pe=pe, impl=which, window=4)
        outs.append(np.asarray(mha(x, pos_BL=pos, pe=enc, kv_mask_BS=pad)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scorer", ["luong", "additive"])
def test_logit_scale_multiplies_materialised_scorers(scorer):
    """A materialising scorer multiplies its own logits: with a temperature multiplier of 2 on
    every head the weights are softmax(2 z) = softmax(z)^2, renormalised."""
    x = jax.random.normal(jax.random.key(3), (1, 5, 16))
    pos = jnp.arange(5)[None]
    one, enc = mha_with({"name": "temperature", "scale": 1.0}, scorer=scorer, pe="none")
    two, _ = mha_with({"name": "temperature", "scale": 2.0}, scorer=scorer, pe="none")
    _, w1 = one(x, pos_BL=pos, pe=enc, return_weights=True)
    _, w2 = two(x, pos_BL=pos, pe=enc, return_weights=True)
    sharpened = np.asarray(w1, np.float64) ** 2
    sharpened /= sharpened.sum(-1, keepdims=True)  # softmax(2 z) = softmax(z)^2 renormalised
    np.testing.assert_allclose(w2, sharpened, rtol=1e-4, atol=1e-6)


def check_cache(mha, pe_mod):
    x = jax.random.normal(jax.random.key(4), (2, 7, 16))
    pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    lengths = jnp.array([3, 2])
    full, prefill, steps, _ = full_and_incremental(mha, pe_mod, x, pos, lengths, steps=3)
    for b in range(2):
        n = int(lengths[b])
        np.testing.assert_allclose(prefill[b, :n], full[b, :n], atol=1e-5)
        np.testing.assert_allclose(steps[b], full[b, n : n + 3], atol=1e-5)


@pytest.mark.parametrize(
    "pe",
    [
        p if p in FAST_CACHE_PES else pytest.param(p, marks=pytest.mark.slow)
        for p in sorted(attn.pe.REGISTRY)
    ],
)
def test_kv_cache_with_ssmax_equals_full_forward(pe):
    """n counts visible keys the same way in a KV cache (explicit mask) and in the full pass."""
    mha, enc = mha_with(SCALES["ssmax"], pe=pe, impl="auto", window=3)
    check_cache(mha, enc)


@pytest.mark.parametrize("attend_current", [False, True])
def test_kv_cache_with_stick_breaking_equals_full_forward(attend_current):
    mha, enc = mha_with(
        SCALES["log_n"],
        pe="alibi",
        normaliser={"name": "stick_breaking", "attend_current": attend_current},
    )
    check_cache(mha, enc)


# --- one-line configuration errors ------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"name": "cube"}, r"^model\.logit_scale\.name: unknown name 'cube'; valid names: "),
        ({"name": "ssmax", "bogus": 1}, r"^model\.logit_scale\.bogus: unknown field"),
        (
            {"name": "temperature", "scale": [1.0, 2.0]},
            r"^model\.logit_scale\.scale: one number or a list of num_heads=4 numbers",
        ),
        ({"name": "temperature", "scale": -1.0}, r"^model\.logit_scale\.scale: must be > 0"),
    ],
)
def test_logit_scale_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        scoring.build_logit_scale(cfg, num_heads=4, rngs=nnx.Rngs(0))


def test_normaliser_errors():
    with pytest.raises(ConfigError, match=r"^model\.normaliser\.name: unknown name 'sparsemax'"):
        scoring.build_normaliser({"name": "sparsemax"})
    with pytest.raises(ConfigError, match=r"^model\.normaliser\.attend_current: must be true"):
        scoring.build_normaliser({"name": "stick_breaking", "attend_current": "yes"})
    mha, _ = mha_with(normaliser={"name": "stick_breaking"}, impl="chunked")
    x = jnp.ones((1, 3, 16))
    with pytest.raises(ConfigError, match=r"^model\.impl: 'chunked' cannot run model\.normaliser"):
        mha(
            x,
            pos_BL=jnp.arange(3)[None],
            pe=attn.pe.build(
                {"name": "none"}, d_model=16, num_heads=4, head_dim=4, causal=True, rngs=nnx.Rngs(0)
            ),
        )


@pytest.mark.parametrize(
    "name,head_dim,message",
    [
        ("p_rope", 7, r"^model\.head_dim: p-RoPE rotates pairs"),
        ("pope", 7, r"^model\.head_dim: PoPE stores each component as two real dims"),
    ],
)
def test_odd_head_dim_messages(name, head_dim, message):
    with pytest.raises(ConfigError, match=message):
        attn.pe.get(name).validate(
            {"name": name}, max_eval_position=8, num_heads=4, head_dim=head_dim
        )


def test_prope_p_out_of_range():
    with pytest.raises(ConfigError, match=r"^pe\.p: the kept fraction must be in \[0, 1\]"):
        attn.pe.get("p_rope").validate(
            {"name": "p_rope", "p": 1.5}, max_eval_position=8, num_heads=4, head_dim=8
        )


def test_fox_and_dape_are_per_layer_and_materialised():
    for name in ("fox", "dape"):
        cls = attn.pe.get(name)
        assert cls.per_layer and cls.needs_materialized_logits
        assert cls.embed is attn.pe.base.PositionalEncoding.embed
    assert fox.FoX.shift_invariant and pope.PoPE.shift_invariant and prope.PRoPE.shift_invariant
    assert dape.DAPE.DEFAULTS == {"base": "alibi", "hidden": 32}
