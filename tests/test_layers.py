"""Tests of attn.layers: MLP kinds, attention (GQA, self/cross, PE hooks,
per-block bias callable, KV cache == full forward for every registered PE), blocks, logical
axis names (their mapping onto a mesh: tests/test_mesh.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn.pe
from attn import layers
from attn.models import Decoder, EncoderDecoder
from attn.registry import ConfigError

D = 16


def mha_cfg(**kw):
    cfg = layers.resolve(EncoderDecoder, {"num_heads": 4, "num_kv_heads": 2, "head_dim": 4, **kw})
    return cfg


def build_mha(pe="none", *, causal=True, cross=False, **kw):
    cfg = mha_cfg(pe={"name": pe}, **kw)
    rngs = nnx.Rngs(0)
    mha = layers.MultiHeadAttention(cfg, d_model=D, causal=causal, cross=cross, rngs=rngs)
    pe_mod = attn.pe.build(cfg["pe"], d_model=D, num_heads=4, head_dim=4, causal=causal, rngs=rngs)
    return mha, pe_mod


def x_and_pos(B=2, T=7, seed=1):
    x = jax.random.normal(jax.random.key(seed), (B, T, D))
    return x, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


@pytest.mark.parametrize("kind", sorted(layers.MLP_KINDS))
def test_mlp_kinds_shapes(kind):
    mlp = layers.MLP(kind, d_model=D, mlp_dim=32, rngs=nnx.Rngs(0))
    y = mlp(jnp.ones((2, 3, D)), train=False)
    assert y.shape == (2, 3, D) and y.dtype == jnp.float32
    assert (mlp.gate is not None) == layers.MLP_KINDS[kind][1]


def test_mlp_unknown_kind():
    with pytest.raises(ConfigError, match="model.mlp"):
        layers.MLP("tanh", d_model=D, mlp_dim=32, rngs=nnx.Rngs(0))


def test_gqa_shapes_and_bad_heads():
    mha, pe = build_mha()
    x, pos = x_and_pos()
    assert mha.k.kernel.shape == (D, 2, 4) and mha.q.kernel.shape == (D, 4, 4)
    assert mha(x, pos_BL=pos, pe=pe).shape == x.shape
    with pytest.raises(ConfigError, match="num_kv_heads"):
        build_mha(num_kv_heads=3)


def test_attention_weights_causal_rows_sum_to_one():
    mha, pe = build_mha("alibi")
    x, pos = x_and_pos()
    y, w = mha(x, pos_BL=pos, pe=pe, return_weights=True)
    assert w.shape == (2, 4, 7, 7)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.abs(jnp.triu(w, 1)).max()) == 0.0


@pytest.mark.parametrize("pe", sorted(attn.pe.REGISTRY))
def test_bias_callable_matches_materialised(pe):
    mha, pe_mod = build_mha(pe)
    x, pos = x_and_pos(T=5)
    qi, ki = jnp.array([1, 4], jnp.int32), jnp.array([0, 2, 3], jnp.int32)

    @nnx.jit
    def blocks(mha, pe_mod):
        q, k, _ = mha._project(x, x)
        fn = layers.positional_bias(pe_mod, q, k, pos, pos, materialize=False)
        if fn is None:
            return None
        full = layers.positional_bias(pe_mod, q, k, pos, pos, materialize=True)
        block = jnp.broadcast_to(fn(qi, ki), (2, 4, 2, 3))
        return block, jnp.broadcast_to(full, (2, 4, 5, 5))[:, :, qi][:, :, :, ki]

    out = blocks(mha, pe_mod)
    if out is not None:
        np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)


@functools.partial(nnx.jit, static_argnames="steps")
def full_and_incremental(mha, pe_mod, x, pos, lengths, steps=4):
    """Full forward; and a ragged right-padded prefill of 4 then `steps` single-token steps
    (tests/test_frontier_pe.py uses it too)."""
    full = mha(x, pos_BL=pos, pe=pe_mod)
    valid = jnp.arange(4)[None] < lengths[:, None]
    cache = mha.init_cache(2, 8, dtype=jnp.float32)
    prefill, cache = mha.decode(x[:, :4], cache, pos_BL=pos[:, :4], pe=pe_mod, valid_BL=valid)
    outs = []
    for step in range(steps):
        t = lengths + step
        xt = jnp.take_along_axis(x, t[:, None, None], 1)
        y, cache = mha.decode(xt, cache, pos_BL=t[:, None], pe=pe_mod)
        outs.append(y[:, 0])
    return full, prefill, jnp.stack(outs, 1), cache["length"]


@pytest.mark.parametrize("pe", sorted(attn.pe.REGISTRY))
def test_kv_cache_equals_full_forward(pe):
    """Every PE: cached decoding (GQA, window 3, ragged prefill) == the full forward pass.

    PE parameters are perturbed away from their initial values: CoPE starts at zero, and a
    zero encoding would hide a cache that feeds it wrong key positions.
    """
    mha, pe_mod = build_mha(pe, window=3)
    params = nnx.state(pe_mod, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), max(len(leaves), 1))
    noisy = [
        p + 0.5 * jax.random.normal(k, p.shape, p.dtype)
        for p, k in zip(leaves, keys[: len(leaves)], strict=True)
    ]
    nnx.update(pe_mod, jax.tree.unflatten(treedef, noisy))
    x, pos = x_and_pos(T=7)
    lengths = jnp.array([3, 2])
    full, prefill, steps, final = full_and_incremental(mha, pe_mod, x, pos, lengths)
    for b in range(2):
        n = int(lengths[b])
        np.testing.assert_allclose(prefill[b, :n], full[b, :n], atol=1e-5)
        np.testing.assert_allclose(steps[b], full[b, n : n + 4], atol=1e-5)
    np.testing.assert_array_equal(final, lengths + 4)


@pytest.mark.parametrize("pe", sorted(attn.pe.REGISTRY))
def test_cross_attention_pe_policy(pe):
    """Cross attention ignores the PE by default; cross_pe=True needs PE support."""
    mem = jax.random.normal(jax.random.key(5), (2, 5, D))
    mem_pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mha, pe_mod = build_mha(pe, causal=False, cross=True)
    x, pos = x_and_pos(T=3)
    y = mha(x, pos_BL=pos, pe=pe_mod, kv_BSD=mem, kv_pos_BS=mem_pos)
    assert y.shape == x.shape
    if attn.pe.REGISTRY[pe].supports_cross_attention:
        build_mha(pe, causal=False, cross=True, cross_pe=True)
    else:
        with pytest.raises(ConfigError, match="cross attention"):
            build_mha(pe, causal=False, cross=True, cross_pe=True)


def test_key_padding_mask_hides_padded_keys():
    mha, pe = build_mha(causal=False)
    x, pos = x_and_pos(T=6)
    mask = jnp.arange(6)[None].repeat(2, 0) < 4
    noisy = x.at[:, 4:].set(100.0)
    a = mha(x, pos_BL=pos, pe=pe, kv_mask_BS=mask)
    b = mha(noisy, pos_BL=pos, pe=pe, kv_mask_BS=mask)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_norm_placement(norm):
    cfg = mha_cfg(norm=norm, mlp_dim=32)
    block = layers.Block(cfg, d_model=D, causal=True, rngs=nnx.Rngs(0))
    x, pos = x_and_pos()
    y, _ = block(
        3.0 * x + 1.0,
        pos_BL=pos,
        mask_BL=None,
        pe=attn.pe.build(
            {"name": "none"}, d_model=D, num_heads=4, head_dim=4, causal=True, rngs=nnx.Rngs(0)
        ),
        train=False,
    )
    normalised = np.allclose(y.mean(-1), 0.0, atol=1e-4) and np.allclose(y.std(-1), 1.0, atol=1e-2)
    assert normalised == (norm == "post")


def test_every_param_has_logical_axes():
    model = Decoder(
        {
            "num_layers": 1,
            "d_model": D,
            "num_heads": 4,
            "num_kv_heads": 2,
            "qk_norm": True,
            "mlp": "swiglu",
            "pe": {"name": "t5"},
        },
        vocab_size=9,
        rngs=nnx.Rngs(0),
    )
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "state", None}
    params = jax.tree.leaves(
        nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Param)
    )
    assert params
    for p in params:
        axes = p.get_metadata()["out_sharding"]
        assert len(axes) == p.get_value().ndim and set(axes) <= allowed, (axes, p.shape)


def _dropout_masks(rate, shape, rng="hash", calls=1, seed=0):
    drop = layers.Dropout(rate, rng=rng, rngs=nnx.Rngs(dropout=seed))
    fn = nnx.jit(lambda d, x: d(x, deterministic=False))
    x = jnp.ones(shape, jnp.float32)
    return [np.asarray(fn(drop, x)) for _ in range(calls)]


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_hash_dropout_rate_scale_and_independence(rate):
    (out,) = _dropout_masks(rate, (64, 128, 128))
    keep = out != 0
    k = 1 - rate
    sd = np.sqrt(k * (1 - k) / keep.size)
    assert abs(keep.mean() - k) < 5 * sd
    np.testing.assert_allclose(out[keep], 1 / k, rtol=1e-6)  # inverted dropout keeps E[x]
    # Neighbours along each axis and far apart are kept independently: P(both) = k^2.
    pairs = {
        "last axis": (keep[..., 1:], keep[..., :-1]),
        "middle axis": (keep[:, 1:], keep[:, :-1]),
        "first axis": (keep[1:], keep[:-1]),
        "stride 4096": (keep.reshape(-1)[4096:], keep.reshape(-1)[:-4096]),
    }
    for name, (a, b) in pairs.items():
        both = (a & b).mean()
        assert abs(both - k * k) < 6 * np.sqrt(k * k * (1 - k * k) / a.size), name


def test_hash_dropout_masks_differ_between_calls_and_seeds():
    k = 0.9
    first, second = _dropout_masks(0.1, (256, 256), calls=2)
    (other_seed,) = _dropout_masks(0.1, (256, 256), seed=1)
    for other in (second, other_seed):
        agree = ((first != 0) == (other != 0)).mean()
        assert abs(agree - (k * k + (1 - k) ** 2)) < 0.01  # independent masks
    (again,) = _dropout_masks(0.1, (256, 256))
    np.testing.assert_array_equal(first, again)  # a pure function of the rng stream


def test_hash_bits_is_a_bijection_of_the_index():
    bits = np.asarray(layers.hash_bits(jax.random.key(3), (1 << 16,)))
    assert len(np.unique(bits)) == bits.size
    # Every output bit is close to fair.
    ones = np.unpackbits(bits.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(ones - 0.5) < 0.01)


def test_threefry_dropout_is_nnx_dropout_and_deterministic_is_identity():
    x = jnp.arange(1, 1 + 8 * 16, dtype=jnp.float32).reshape(8, 16)
    ours = layers.Dropout(0.3, rng="threefry", rngs=nnx.Rngs(dropout=5))
    theirs = nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=5))
    np.testing.assert_array_equal(ours(x, deterministic=False), theirs(x, deterministic=False))
    np.testing.assert_array_equal(layers.Dropout(0.3, rngs=nnx.Rngs(0))(x, deterministic=True), x)


def test_bad_dropout_rng_names_the_field():
    with pytest.raises(ConfigError, match="model.dropout_rng: 'philox'; allowed: hash, threefry"):
        Decoder({"dropout_rng": "philox"}, vocab_size=8, rngs=nnx.Rngs(0))
