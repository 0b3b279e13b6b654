"""Each parameter-free formula of attn.pe against a float64 NumPy version written from its paper.

Sinusoidal (Vaswani 2017), RoPE (Su 2021; both layouts, partial rotation, linear / NTK /
YaRN scalings), ALiBi (Press 2022; slopes for 1..64 heads, bias), T5 buckets (Raffel 2020),
and the learned-parameter formulas on tiny inputs with their parameters read back.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn.pe
from attn.pe import alibi, base, rope, sinusoidal, t5, xpos

RNG = np.random.default_rng(0)


# --- sinusoidal -------------------------------------------------------------------------


def np_sinusoid(pos, dim, max_timescale=1e4):
    out = np.zeros((len(pos), dim))
    for p, x in enumerate(pos):
        for j in range(dim):
            angle = x / max_timescale ** (2 * (j // 2) / dim)
            out[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out


@pytest.mark.parametrize("dim", [8, 7])
def test_sinusoidal_encode(dim):
    pos = np.array([0, 1, 5, 37, 1000, 2.5])
    got = sinusoidal.encode(jnp.asarray(pos, jnp.float32), dim)
    np.testing.assert_allclose(got, np_sinusoid(pos, dim), atol=2e-4)
    got = sinusoidal.encode(jnp.asarray(pos[:5], jnp.int32), dim, max_timescale=100.0)
    np.testing.assert_allclose(got, np_sinusoid(pos[:5], dim, 100.0), atol=2e-4)


# --- RoPE -------------------------------------------------------------------------------


def np_frequencies(rot, base, scaling):
    theta = np.array([base ** (-2 * i / rot) for i in range(rot // 2)])
    kind = scaling["type"] if scaling else "none"
    s = scaling["factor"] if scaling else 1.0
    if kind == "ntk":
        theta = np.array(
            [(base * s ** (rot / (rot - 2))) ** (-2 * i / rot) for i in range(rot // 2)]
        )
    if kind == "linear":
        theta = theta / s
    mscale = 1.0
    if kind == "yarn":
        wavelength = 2 * np.pi / theta
        r = scaling["original_max_len"] / wavelength
        a, b = scaling["alpha"], scaling["beta"]
        gamma = np.where(r < a, 0.0, np.where(r > b, 1.0, (r - a) / (b - a)))
        theta = (1 - gamma) * theta / s + gamma * theta
        mscale = 0.1 * np.log(s) + 1
    return theta, mscale


def np_rope(x, pos, base=1e4, fraction=1.0, layout="half", scaling=None):
    """x: (B, L, H, K) float64, pos (B, L): rotate pairs by pos * theta_i, pair by pair."""
    K = x.shape[-1]
    rot = int(K * fraction)
    theta, mscale = np_frequencies(rot, base, scaling)
    out = x.copy()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(rot // 2):
                a, c = (i, i + rot // 2) if layout == "half" else (2 * i, 2 * i + 1)
                ang = pos[b, t] * theta[i]
                x1, x2 = x[b, t, :, a], x[b, t, :, c]
                out[b, t, :, a] = x1 * np.cos(ang) - x2 * np.sin(ang)
                out[b, t, :, c] = x2 * np.cos(ang) + x1 * np.sin(ang)
    return out * mscale


SCALINGS = [
    None,
    {"type": "linear", "factor": 4.0},
    {"type": "ntk", "factor": 4.0},
    {"type": "yarn", "factor": 4.0, "original_max_len": 64, "alpha": 1.0, "beta": 32.0},
]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["type"] if s else "none")
def test_rope_rotate(layout, fraction, scaling):
    x = RNG.normal(size=(2, 5, 3, 16))
    pos = np.array([[0, 1, 2, 3, 4], [0, 7, 100, 513, 2047]], np.float64)
    got = rope.rotate(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(pos, jnp.int32),
        max_wavelength=1e4,
        fraction=fraction,
        layout=layout,
        scaling=scaling,
    )
    want = np_rope(x, pos, 1e4, fraction, layout, scaling)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_rope_float_positions_and_relative_property():
    x = RNG.normal(size=(1, 4, 2, 8))
    pos = np.array([[0.0, 0.5, 1.25, 9.75]])
    got = rope.rotate(jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.float32))
    np.testing.assert_allclose(got, np_rope(x, pos), rtol=1e-5, atol=1e-5)
    q = jnp.asarray(RNG.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(1, 1, 1, 8)), jnp.float32)

    def dot(m, n):
        qm = rope.rotate(q, jnp.array([[m]]))
        kn = rope.rotate(k, jnp.array([[n]]))
        return float(jnp.sum(qm * kn))

    assert dot(10, 3) == pytest.approx(dot(110, 103), rel=1e-4)


def test_rope_bfloat16_tells_256_from_257():
    x = jnp.ones((1, 2, 1, 64), jnp.bfloat16)
    out = rope.rotate(x, jnp.array([[256, 257]], jnp.int32))
    assert out.dtype == jnp.bfloat16
    assert not bool(jnp.array_equal(out[0, 0], out[0, 1]))
    # ... and the bf16 result is the float32 rotation rounded once, not a bf16 angle.
    ref = rope.rotate(x.astype(jnp.float32), jnp.array([[256, 257]], jnp.int32))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=1e-2)


# --- ALiBi ------------------------------------------------------------------------------


def closed_form_slopes(n):
    """Paper: power of two p = 2^floor(log2 n): 2^(-8k/p), k = 1..p, then the odd-indexed
    slopes of the 2p set, 2^(-8(2j-1)/(2p)), j = 1..n-p."""
    p = 2 ** math.floor(math.log2(n))
    return [2 ** (-8 * k / p) for k in range(1, p + 1)] + [
        2 ** (-8 * (2 * j - 1) / (2 * p)) for j in range(1, n - p + 1)
    ]


@pytest.mark.parametrize("n", range(1, 65))
def test_alibi_slopes(n):
    np.testing.assert_allclose(alibi.slopes(n), closed_form_slopes(n), rtol=1e-12)


def test_alibi_slopes_paper_examples():
    np.testing.assert_allclose(alibi.slopes(8), [2.0**-k for k in range(1, 9)])
    np.testing.assert_allclose(alibi.slopes(16)[:2], [2**-0.5, 2**-1.0])


def np_alibi(qpos, kpos, m, causal, offset=0.0):
    B, L, S, H = len(qpos), len(qpos[0]), len(kpos[0]), len(m)
    out = np.zeros((B, H, L, S))
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    d = qpos[b][i] - kpos[b][j]
                    if causal and d >= 0:
                        out[b, h, i, j] = -m[h] * d  # the paper's bias on visible keys
                    else:
                        out[b, h, i, j] = -m[h] * abs(d) + (not causal) * offset * m[h] * (d > 0)
    return out


@pytest.mark.parametrize("causal,offset", [(True, 0.0), (True, 0.5), (False, 0.0), (False, 0.5)])
def test_alibi_bias(causal, offset):
    qpos = np.array([[0, 1, 2, 3], [4, 9, 10, 30]])
    m = alibi.slopes(3)
    got = alibi.bias(jnp.asarray(qpos), jnp.asarray(qpos), m, causal=causal, lower_offset=offset)
    assert got.shape == (2, 3, 4, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_alibi(qpos, qpos, m, causal, offset), rtol=1e-6)


def test_alibi_deletang_reference_matrix():
    """The reference code's encoder matrix: -|i-j| + 0.5 below the diagonal, times slope."""
    n = 5
    ref = np.zeros((n, n))
    ref -= sum(np.tri(n, n, k=-i) for i in range(1, n))
    ref -= sum(np.tri(n, n, k=-i).T for i in range(1, n))
    ref += 0.5 * np.tri(n, n, k=-1)
    pos = jnp.arange(n)[None]
    got = alibi.bias(pos, pos, np.array([1.0]), causal=False, lower_offset=0.5)
    np.testing.assert_allclose(got[0, 0], ref)


# --- T5 buckets -------------------------------------------------------------------------


def np_bucket(rel, bidirectional, num_buckets, max_distance):
    """Raffel et al. 2020 / Mesh TF `_relative_position_bucket`, scalar, in float64."""
    n = -rel
    ret = 0
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + int(n)
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20), (64, 256)])
def test_t5_buckets(bidirectional, num_buckets, max_distance):
    rel = np.arange(-3 * max_distance, 3 * max_distance + 1)
    got = t5.relative_position_bucket(
        jnp.asarray(rel, jnp.int32),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    want = [np_bucket(r, bidirectional, num_buckets, max_distance) for r in rel]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == jnp.int32
    half = num_buckets // 2 if bidirectional else num_buckets
    past = rel <= -max_distance
    assert np.all(np.asarray(got)[past] == half - 1)  # distances >= max_distance share one
    if bidirectional:
        assert np.all(np.asarray(got)[rel >= max_distance] == num_buckets - 1)
        assert np.all(np.asarray(got)[rel > 0] >= half)
    else:
        assert np.all(np.asarray(got)[rel >= 0] == 0)  # every future key is bucket 0


def test_t5_bucket_boundaries_32_128():
    """Bidirectional T5 defaults: 8 exact buckets, then logarithmic ones up to 128."""
    rel = -np.array([0, 7, 8, 11, 12, 15, 16, 22, 23, 31, 32, 45, 46, 63, 64, 90, 91, 127, 128])
    want = [0, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 15]
    got = t5.relative_position_bucket(
        jnp.asarray(rel), bidirectional=True, num_buckets=32, max_distance=128
    )
    np.testing.assert_array_equal(got, want)
    got = t5.relative_position_bucket(
        jnp.asarray(-rel), bidirectional=True, num_buckets=32, max_distance=128
    )
    np.testing.assert_array_equal(got, np.where(rel == 0, 0, np.array(want) + 16))


def test_t5_float_distances_truncate():
    rel = jnp.array([-0.5, -7.9, -8.0, 2.5])
    got = t5.relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(got, [0, 7, 8, 18])


@pytest.mark.parametrize("causal", [True, False])
def test_t5_integer_lookup_equals_bucket_formula(causal):
    """The integer-position path (precomputed rows per clipped distance) is the formula."""
    from flax import nnx

    cfg = {"name": "t5", "num_buckets": 16, "max_distance": 40}
    pe = t5.T5Bias(cfg, d_model=8, num_heads=3, head_dim=4, causal=causal, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    qpos = jnp.asarray(rng.integers(0, 200, (2, 7)), jnp.int32)
    kpos = jnp.asarray(rng.integers(0, 200, (2, 9)), jnp.int32)
    got = pe.bias(qpos, kpos)
    rel = np.asarray(kpos)[:, None, :] - np.asarray(qpos)[:, :, None]
    buckets = np.vectorize(lambda r: np_bucket(r, not causal, 16, 40))(rel)
    want = np.moveaxis(np.asarray(pe.table[...])[buckets], -1, 1)
    assert np.abs(rel).max() > 40  # distances past max_distance are covered
    np.testing.assert_array_equal(got, want)


def test_formulas_are_jittable():
    pos = jnp.arange(6)[None]
    x = jnp.ones((1, 6, 2, 8))
    np.testing.assert_allclose(jax.jit(rope.rotate)(x, pos), rope.rotate(x, pos), atol=1e-6)


# --- xPos -------------------------------------------------------------------------------


def np_softplus(x):
    return np.log1p(np.exp(np.asarray(x, np.float64)))


def learned_pe(name, causal, num_heads=3, head_dim=8, seed=0, **fields):
    """An encoding with its parameters perturbed (so zero inits do not hide terms)."""
    pe = attn.pe.build(
        {**attn.pe.default_config(name), **fields},
        d_model=8,
        num_heads=num_heads,
        head_dim=head_dim,
        causal=causal,
        rngs=nnx.Rngs(seed),
    )
    state = nnx.state(pe, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    noisy = [x + 0.3 * RNG.normal(size=x.shape).astype(np.float32) for x in leaves]
    nnx.update(pe, jax.tree.unflatten(treedef, noisy))
    return pe


def np_xpos_scale(pos, rot, gamma, scale_base):
    zeta = np.array([(2 * i / rot + gamma) / (1 + gamma) for i in range(rot // 2)])
    return zeta[None, None, :] ** (np.asarray(pos, np.float64)[..., None] / scale_base)


def test_xpos_scales():
    pos = np.array([[0, 1, 100, 1000]])
    got = xpos.scales(jnp.asarray(pos), 8, gamma=0.4, scale_base=512.0)
    np.testing.assert_allclose(got, np_xpos_scale(pos, 8, 0.4, 512.0), rtol=1e-5)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_xpos_rotate_hook(layout):
    pe = learned_pe("xpos", True, layout=layout, scale_base=16.0)
    q = RNG.normal(size=(1, 4, 3, 8))
    k = RNG.normal(size=(1, 4, 3, 8))
    pos = np.array([[0, 3, 9, 30]])
    q2, k2 = pe.rotate(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), pos, pos)
    s = np_xpos_scale(pos, 8, 0.4, 16.0)[:, :, None, :]
    s = np.concatenate([s, s], -1) if layout == "half" else np.repeat(s, 2, -1)
    np.testing.assert_allclose(q2, np_rope(q, pos, layout=layout) * s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(k2, np_rope(k, pos, layout=layout) / s, rtol=1e-4, atol=1e-5)


# --- KERPLE -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_bias(variant):
    pe = learned_pe("kerple", True, variant=variant)
    r1 = np_softplus(pe.raw_r1[...])
    raw2 = np.asarray(pe.raw_r2[...], np.float64)
    r2 = 2 / (1 + np.exp(-raw2)) if variant == "power" else np_softplus(raw2)
    assert np.all(r1 > 0) and np.all(r2 > 0) and (variant == "log" or np.all(r2 <= 2))
    pos = np.array([[0, 1, 4, 9, 20]])
    d = np.abs(pos[0][:, None] - pos[0][None, :])[None, None]
    a, b = r1[None, :, None, None], r2[None, :, None, None]
    want = -a * np.log1p(b * d) if variant == "log" else -a * d**b
    got = pe.bias(jnp.asarray(pos), jnp.asarray(pos))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # d^r2 at d = 0 must not turn the gradient wrt r2 into NaN.
    g = nnx.grad(lambda m: m.bias(jnp.asarray(pos), jnp.asarray(pos)).sum())(pe)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


# --- FIRE -------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_fire_bias(causal):
    pe = learned_pe("fire", causal, init_threshold=6.0)
    p = {n: np.asarray(getattr(pe, n)[...], np.float64) for n in ("w1", "b1", "w2", "b2")}
    c = np_softplus(pe.raw_c[...])
    threshold = np_softplus(pe.raw_threshold[...])
    pos = np.array([[0, 1, 2, 5, 9, 14.5]])
    n = pos.shape[1]
    want = np.zeros((1, 3, n, n))
    for i in range(n):
        for j in range(n):
            qi, kj = pos[0, i], pos[0, j]
            x = np.log(c * abs(qi - kj) + 1) / np.log(c * max(threshold, qi) + 1)
            feats = [x] if causal else [x, float(kj > qi)]
            h = np.maximum(np.array(feats) @ p["w1"] + p["b1"], 0)
            want[0, :, i, j] = h @ p["w2"] + p["b2"]
    got = pe.bias(jnp.asarray(pos, jnp.float32), jnp.asarray(pos, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --- Shaw -------------------------------------------------------------------------------


@pytest.mark.parametrize("float_positions", [False, True])
def test_shaw_bias(float_positions):
    k_max = 3
    pe = learned_pe("shaw", False, max_distance=k_max)
    table = np.asarray(pe.table[...], np.float64)
    q = RNG.normal(size=(2, 5, 3, 8))
    pos = np.array([[0, 1, 2, 6, 7], [0, 2, 3, 4, 12]], np.float64)
    if float_positions:
        pos = pos * 0.75
    want = np.zeros((2, 3, 5, 5))
    for b in range(2):
        for i in range(5):
            for j in range(5):
                r = np.clip(pos[b, j] - pos[b, i], -k_max, k_max) + k_max
                lo = int(np.floor(r))
                hi = min(lo + 1, 2 * k_max)
                a = table[lo] * (1 - (r - lo)) + table[hi] * (r - lo)
                want[b, :, i, j] = q[b, i] @ a / np.sqrt(8)
    dtype = jnp.float32 if float_positions else jnp.int32
    p = jnp.asarray(pos, dtype)
    got = pe.bias(p, p, jnp.asarray(q, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --- CoPE -------------------------------------------------------------------------------


def np_cope(q, k, past, future, qpos, kpos, causal):
    B, L, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    P = past.shape[0]
    out = np.zeros((B, H, L, S))
    for b in range(B):
        for h in range(H):
            kh = k[b, :, h // (H // G)]
            for i in range(L):
                g = 1 / (1 + np.exp(-(kh @ q[b, i, h]) / np.sqrt(K)))
                for j in range(S):
                    before = kpos[b, j] <= qpos[b, i]
                    if before:
                        ts = [t for t in range(j, S) if kpos[b, t] <= qpos[b, i]]
                    else:
                        ts = [t for t in range(0, j + 1) if kpos[b, t] >= qpos[b, i]]
                    p = min(sum(g[t] for t in ts), P - 1)
                    e = past if (before or causal) else future
                    lo = int(np.floor(p))
                    hi = min(lo + 1, P - 1)
                    emb = e[lo] * (1 - (p - lo)) + e[hi] * (p - lo)
                    out[b, h, i, j] = q[b, i, h] @ emb
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_cope_bias(causal):
    pe = learned_pe("cope", causal, num_heads=4, max_positions=3)
    past = np.asarray(pe.past[...], np.float64)
    future = None if causal else np.asarray(pe.future[...], np.float64)
    q = RNG.normal(size=(2, 5, 4, 8))
    k = RNG.normal(size=(2, 5, 2, 8))  # GQA: 2 kv heads for 4 query heads
    pos = np.array([[0, 1, 2, 3, 4], [3, 10, 11, 40, 41]])
    got = pe.bias(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(q), jnp.asarray(k))
    want = np_cope(q, k, past, future, pos, pos, causal)
    if causal:  # future keys are masked by attention; compare the visible entries
        visible = np.tril(np.ones((5, 5), bool))
        got, want = np.asarray(got)[..., visible], want[..., visible]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cope_kv_cache_step_matches_full_rows():
    pe = learned_pe("cope", True, num_heads=2)
    q = jnp.asarray(RNG.normal(size=(1, 6, 2, 8)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(1, 6, 2, 8)), jnp.float32)
    pos = jnp.arange(6)[None]
    full = pe.bias(pos, pos, q, k)
    step = pe.bias(pos[:, -2:], pos, q[:, -2:], k)
    np.testing.assert_allclose(step, full[:, :, -2:], rtol=1e-6)


def test_inverse_softplus_round_trips_small_and_large():
    y = jnp.array([1e-3, 0.1, 1.0, 20.0, 512.0, 1e6])
    x = base.inverse_softplus(y)
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(jax.nn.softplus(x), y, rtol=1e-5)
