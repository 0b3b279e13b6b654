"""Tests for attn.kernels: the Pallas flash kernel against impl="reference", on the CPU.

On the CPU the kernels run in Pallas' interpret mode (the same kernel code, executed as JAX
ops), so these tests check the algorithm: masks, block skipping, GQA, L != S, padding,
positions, every in-kernel bias and every gradient. Whether the kernels also lower for the
accelerators is checked by exporting them for "cuda" (Triton) and "tpu" (Mosaic) from the
CPU; compiling and running them there needs the hardware (attn/kernels/benchmark.py).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn.pe
from attn import attention, kernels
from attn.kernels import flash
from attn.layers import MultiHeadAttention
from attn.pe.base import UNWRITTEN_POSITION
from attn.pe.t5 import relative_position_bucket

K = 8
BLOCKS = dict(block_q=8, block_k=8)  # several blocks per axis at these lengths


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Interpret-mode kernels are many tiny ops: XLA's optimisations cost more than they save."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def _t5_buckets(bidirectional: bool, num_buckets=8, max_distance=8):
    rel = jnp.arange(-max_distance, max_distance + 1)
    return np.asarray(
        relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
    )


def _make_bias(kind: str, causal: bool, H: int):
    """(parameters, function parameters -> KernelBias | None) for one bias kind."""
    rng = np.random.default_rng(3)
    if kind == "none":
        return jnp.zeros(()), lambda p: None
    if kind == "alibi":
        slopes = attn.pe.alibi.slopes(H)
        return jnp.zeros(()), lambda p: kernels.alibi(slopes, causal=causal, lower_offset=0.5)
    if kind in ("kerple_log", "kerple_power"):
        r = jnp.asarray(rng.uniform(0.2, 1.5, size=(2, H)), jnp.float32)
        return r, lambda p: kernels.kerple(kind.removeprefix("kerple_"), p[0], p[1])
    if kind == "t5":
        buckets = _t5_buckets(bidirectional=not causal)
        table = jnp.asarray(rng.normal(size=(H, 8)), jnp.float32)
        return table, lambda p: kernels.bucketed_table(p, buckets, 8)
    if kind == "table":
        values = jnp.asarray(rng.normal(size=(H, 2 * 6 + 1)), jnp.float32)
        return values, lambda p: kernels.table(p, 6)
    raise ValueError(kind)


def _positions(kind: str, B: int, L: int, S: int, rng):
    """Integer (qpos, kpos): identity, sorted random subsets (the randomized sampler), or
    identity keys whose last slots are unwritten KV-cache positions."""
    if kind == "identity":
        return None, None
    if kind == "random":
        draw = lambda n: np.sort(rng.choice(64, size=(B, n), replace=False), axis=-1)
        return jnp.asarray(draw(L), jnp.int32), jnp.asarray(draw(S), jnp.int32)
    kpos = np.tile(np.arange(S), (B, 1))
    kpos[:, S - 3 :] = UNWRITTEN_POSITION
    return jnp.asarray(np.arange(S - L, S)[None].repeat(B, 0), jnp.int32), jnp.asarray(kpos)


def _run(flash_impl: bool, case, q, k, v, w, params):
    _, kind, causal, window, _, _, _, pad, pos_kind = case
    B, L, H, _ = q.shape
    S = k.shape[1]
    rng = np.random.default_rng(7)
    qpos, kpos = _positions(pos_kind, B, L, S, rng)
    lengths = jnp.asarray([S, max(S - pad, 0)][:B], jnp.int32) if pad else None
    make = _make_bias(kind, causal, H)[1]

    def loss(q, k, v, params):
        kb = make(params)
        if flash_impl:
            out = kernels.flash_attention(
                q, k, v, bias=kb, qpos_BL=qpos, kpos_BS=kpos, kv_lengths_B=lengths,
                causal=causal, window=window, platform="cpu", **BLOCKS,
            )  # fmt: skip
        else:
            qp = jnp.arange(L)[None] if qpos is None else qpos
            kp = jnp.arange(S)[None] if kpos is None else kpos
            bias = None if kb is None else kb.evaluate(kp[:, None, :] - qp[:, :, None])
            mask = None
            if lengths is not None:
                mask = (jnp.arange(S)[None] < lengths[:, None])[:, None, None, :]
            out = attention.dot_product_attention(
                q, k, v, bias=bias, mask=mask, causal=causal, window=window, impl="reference"
            )
        return jnp.sum(out * w), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, params)


# (id, bias kind, causal, window, (H, G), L, S, keys padded off the second row, positions)
CASES = [
    ("none-causal-gqa", "none", True, None, (4, 2), 24, 24, 0, "identity"),
    ("alibi-bidir-mqa-LneS-pad", "alibi", False, None, (4, 1), 13, 21, 5, "identity"),
    ("alibi-causal-window-cache", "alibi", True, 5, (2, 2), 6, 19, 0, "cache"),
    ("t5-causal-LneS-pad-random", "t5", True, None, (4, 2), 20, 29, 7, "random"),
    ("t5-bidir-window", "t5", False, 6, (2, 1), 17, 17, 0, "identity"),
    ("kerple_log-causal-window-pad", "kerple_log", True, 7, (4, 2), 17, 17, 4, "random"),
    ("kerple_power-bidir-LgtS", "kerple_power", False, None, (2, 2), 24, 9, 0, "identity"),
    ("table-causal-random-pad", "table", True, None, (4, 4), 16, 23, 9, "random"),
    ("table-bidir-window-LgtS", "table", False, 9, (4, 2), 22, 12, 3, "identity"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_matches_reference(case):
    _, kind, causal, _, (H, G), L, S, _, _ = case
    rng = np.random.default_rng(0)
    B = 2
    q, w = (jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, S, G, K)), jnp.float32) for _ in range(2))
    params = _make_bias(kind, causal, H)[0]
    (_, got), got_grads = _run(True, case, q, k, v, w, params)
    (_, want), want_grads = _run(False, case, q, k, v, w, params)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for name, g, wg in zip(("dq", "dk", "dv", "dparams"), got_grads, want_grads, strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), name
        np.testing.assert_allclose(g, wg, rtol=5e-5, atol=5e-5, err_msg=name)


@pytest.mark.parametrize(
    "L,S,causal,window,length",
    [
        (40, 40, True, None, 40),
        (17, 45, True, 9, 30),
        (45, 17, False, 6, 17),
        (33, 33, False, None, 20),
    ],
)
def test_block_ranges_are_exactly_the_visible_blocks(L, S, causal, window, length):
    """Both passes visit exactly the blocks that hold a visible (query, key) pair: skipping
    is complete (no visible block missed) and tight (no hidden block visited)."""
    bq, bk = 8, 4
    c = flash._Config(
        platform="cpu", B=1, H=1, G=1, L=L, S=S, bq=bq, bk=bk,
        scale=1.0, causal=causal, window=window, kind=None, offset=0.0, num_params=1,
        padded_params=1, max_distance=0, num_segments=0,
    )  # fmt: skip
    pos = np.arange(L)[:, None] + S - L
    key = np.arange(S)[None, :]
    visible = np.broadcast_to(key < length, (L, S)).copy()
    if causal:
        visible &= pos >= key
    if window is not None:
        visible &= (pos - key < window) & (causal | (key - pos < window))
    for i in range(c.nq):
        lo, hi = (int(x) for x in c.key_blocks(i, length))
        want = [
            j for j in range(c.nk) if visible[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].any()
        ]
        assert list(range(lo, hi)) == want, ("query block", i)
    for j in range(c.nk):
        lo, hi = (int(x) for x in c.query_blocks(j, length))
        want = [
            i for i in range(c.nq) if visible[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].any()
        ]
        assert list(range(lo, hi)) == want, ("key block", j)


def test_bfloat16_inputs():
    """bf16 q/k/v: logits, softmax and the bias stay float32; only the matmul inputs (and
    the probabilities fed to p @ v) are bf16, so the output is within bf16 rounding."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(1, 19, 2, K)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(1, 19, 2, K)), jnp.bfloat16)
    params, make = _make_bias("t5", True, 2)
    kb = make(params)
    got = kernels.flash_attention(q, k, k, bias=kb, causal=True, platform="cpu", **BLOCKS)
    rel = jnp.arange(19)[None, None, :] - jnp.arange(19)[None, :, None]
    want = attention.dot_product_attention(
        q, k, k, bias=kb.evaluate(rel), causal=True, impl="reference"
    )
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2)


def test_fully_masked_rows_are_zero_with_finite_grads():
    """L > S with causal masking leaves the first L - S queries no key; a zero-length row has
    no key at all. Both return zeros (not NaN) and zero gradients, as the reference does."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 12, 2, K)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 2, K)), jnp.float32)
    lengths = jnp.asarray([5, 0])

    def loss(q, k):
        out = kernels.flash_attention(
            q, k, k, kv_lengths_B=lengths, causal=True, platform="cpu", **BLOCKS
        )
        return jnp.sum(out**2), out

    (_, out), (dq, dk) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(q, k)
    assert bool(jnp.all(out[0, :7] == 0)) and bool(jnp.all(out[1] == 0))
    assert bool(jnp.all(jnp.abs(out[0, 7:]) > 0))
    assert bool(jnp.all(jnp.isfinite(dq))) and bool(jnp.all(jnp.isfinite(dk)))
    assert bool(jnp.all(dq[1] == 0)) and bool(jnp.all(dk[1] == 0))


@pytest.mark.parametrize("name", ["alibi", "t5", "kerple"])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_bias_equals_encoding_bias(name, causal):
    """Each encoding's kernel_bias states its `bias` exactly, at small and at far distances
    (past T5's max_distance, UNWRITTEN_POSITION)."""
    variants = [{"variant": "log"}, {"variant": "power"}] if name == "kerple" else [{}]
    qpos = jnp.asarray([[0, 3, 7, 300], [5, 6, 200, 1000]], jnp.int32)
    kpos = jnp.asarray([[0, 1, 2, 150, 299], [7, 40, 500, 999, UNWRITTEN_POSITION]], jnp.int32)
    for extra in variants:
        cfg = {**attn.pe.default_config(name), **extra}
        pe = attn.pe.build(
            cfg, d_model=16, num_heads=3, head_dim=K, causal=causal, rngs=nnx.Rngs(0)
        )
        want = pe.bias(qpos, kpos)
        got = pe.kernel_bias().evaluate(kpos[:, None, :] - qpos[:, :, None])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=str(cfg))


def test_encodings_without_kernel_form():
    """Content- or query-position-dependent biases have no kernel form (FIRE: see its
    docstring); encodings without a bias need none."""
    for name in sorted(attn.pe.REGISTRY):
        pe = attn.pe.build(
            attn.pe.default_config(name),
            d_model=16,
            num_heads=2,
            head_dim=K,
            causal=True,
            rngs=nnx.Rngs(0),
        )
        has = pe.kernel_bias() is not None
        assert has == (name in ("alibi", "t5", "kerple")), name


def _layer(pe_name: str, impl: str, causal: bool):
    cfg = {
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": K,
        "qk_norm": False,
        "window": 0,
        "impl": impl,
        "dtype": "float32",
        "pe": {"name": pe_name},
        "scorer": {"name": "dot"},
    }
    layer = MultiHeadAttention(cfg, d_model=16, causal=causal, rngs=nnx.Rngs(0))
    pe = attn.pe.build(
        attn.pe.default_config(pe_name),
        d_model=16,
        num_heads=4,
        head_dim=K,
        causal=causal,
        rngs=nnx.Rngs(1),
    )
    return layer, pe


@pytest.mark.parametrize("pe_name,causal", [("t5", False), ("kerple", True)])
def test_layer_flash_matches_reference(pe_name, causal, caplog):
    """Through the attention layer: the PE's kernel_bias reaches the kernel, with a padding
    mask and random positions; values and the gradients of the encoding's own parameters
    match impl="reference"."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 11, 16)), jnp.float32)
    pos = jnp.asarray(np.sort(rng.choice(40, size=(2, 11), replace=False), -1), jnp.int32)
    kv_mask = jnp.arange(11)[None] < jnp.asarray([[11], [6]])

    def run(impl):
        layer, pe = _layer(pe_name, impl, causal)

        def loss(pe):
            y = layer(x, pos_BL=pos, pe=pe, kv_mask_BS=kv_mask)
            return jnp.sum(jnp.sin(y)), y

        (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(pe)
        return y, grads

    with caplog.at_level(logging.INFO, logger="attn.attention"):
        attention._logged_choices.clear()
        got, got_grads = run("flash")
    want, want_grads = run("reference")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=5e-5, atol=5e-5)
    assert not any("using chunked" in r.getMessage() for r in caplog.records)


def test_positional_bias_runs_on_the_other_impls_under_jit():
    """The wrapped bias is still the per-block callable of chunked/dense, also when the
    encoding's parameters are traced (jax.closure_convert hashes the callable)."""
    layer, pe = _layer("t5", "chunked", causal=True)
    x = jnp.ones((1, 5, 16))
    pos = jnp.arange(5)[None]
    graphdef, state = nnx.split(pe)

    @jax.jit
    def run(state):
        return layer(x, pos_BL=pos, pe=nnx.merge(graphdef, state))

    want = layer(x, pos_BL=pos, pe=pe)
    np.testing.assert_allclose(run(state), want, rtol=1e-5, atol=1e-6)


def test_flash_impl_fallbacks_and_checks(caplog):
    """What the kernel cannot express runs on chunked, logged once per reason: a general
    mask, a bias without a kernel form (an array; FIRE's or Shaw's callables), float
    positions. A key mask that is not right padding is an error when it can be checked."""
    q = jnp.ones((2, 4, 2, K))
    general = jnp.tril(jnp.ones((4, 4), bool))
    reason = functools.partial(flash.unsupported_reason, q.shape, q.shape)
    assert "key padding" in reason(mask=general)
    assert "kernel_bias" in reason(bias=jnp.zeros((4, 4)))
    assert "kernel_bias" in reason(bias=lambda qi, ki: jnp.zeros((4, 4)))
    float_pos = jnp.zeros((2, 4), jnp.float32)
    kb = kernels.alibi(np.ones(2), causal=True)
    assert "integers" in reason(bias=kernels.PositionalBias(None, kb, float_pos, float_pos))
    assert reason(mask=jnp.ones((2, 1, 1, 4), bool)) is None
    with caplog.at_level(logging.INFO, logger="attn.attention"):
        attention._logged_choices.clear()
        got = attention.dot_product_attention(q, q, q, mask=general, impl="flash")
    assert sum("using chunked" in r.getMessage() for r in caplog.records) == 1
    want = attention.dot_product_attention(q, q, q, mask=general, impl="reference")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    left_padded = jnp.asarray([[True] * 4, [False, True, True, True]])[:, None, None, :]
    with pytest.raises(ValueError, match="right padding"):
        attention.dot_product_attention(q, q, q, mask=left_padded, impl="flash")


def test_auto_picks_flash_only_on_accelerators():
    shape = (1, 4096, 8, 64)
    assert attention.choose_impl(shape, shape, dtype=jnp.float32, flash=True) != "flash"
    for backend in ("gpu", "tpu"):
        kw = dict(dtype=jnp.float32, backend=backend, flash=True)
        assert attention.choose_impl(shape, shape, callable_bias=True, **kw) == "flash"
    # No bias at all: cuDNN first where it runs.
    gpu_bf16 = dict(dtype=jnp.bfloat16, backend="gpu", flash=True)
    assert attention.choose_impl(shape, shape, **gpu_bf16) == "cudnn"
    assert attention.choose_impl(shape, shape, callable_bias=True, **gpu_bf16) == "flash"


EXPORT_CUSTOM_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_kernels_lower_for_accelerators(target):
    """Forward and backward of the largest configuration (T5-style table and KERPLE, GQA,
    L != S, window, padding, positions, bf16), vmapped over seeds as the sweeps do, lower to
    Triton / Mosaic calls. Compiling those calls happens on the device, not here."""
    B, L, S, H, G, Kh = 2, 200, 300, 4, 2, 64
    platform = "gpu" if target == "cuda" else "tpu"
    buckets = _t5_buckets(bidirectional=True)

    def grads(q, k, v, qpos, kpos, lengths, table, r):
        def loss(q, k, v, table, r):
            out = 0.0
            for kb in (kernels.bucketed_table(table, buckets, 8), kernels.kerple("log", *r)):
                out += kernels.flash_attention(
                    q, k, v, bias=kb, qpos_BL=qpos, kpos_BS=kpos, kv_lengths_B=lengths,
                    causal=False, window=64, platform=platform,
                ).astype(jnp.float32).sum()  # fmt: skip
            return out

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, table, r)

    seeds = 2

    sd = jax.ShapeDtypeStruct
    args = (
        sd((seeds, B, L, H, Kh), jnp.bfloat16),
        sd((seeds, B, S, G, Kh), jnp.bfloat16),
        sd((seeds, B, S, G, Kh), jnp.bfloat16),
        sd((B, L), jnp.int32),
        sd((B, S), jnp.int32),
        sd((B,), jnp.int32),
        sd((seeds, H, 8), jnp.float32),
        sd((seeds, 2, H), jnp.float32),
    )
    exported = jax.export.export(
        jax.jit(jax.vmap(grads, in_axes=(0, 0, 0, None, None, None, 0, 0))),
        platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(EXPORT_CUSTOM_CALLS["cuda"])],
    )(*args)
    text = exported.mlir_module()
    # Two biases x (forward, dq, dk/dv).
    assert text.count(f"@{EXPORT_CUSTOM_CALLS[target]}(") == 6


def test_benchmark_runs_at_smoke_size():
    from attn.kernels import benchmark

    kw = dict(batch=1, heads=2, head_dim=K, dtype="float32", steps=1)
    rows = benchmark.run(impls=("chunked", "flash"), pes=("alibi",), lengths=(16,), **kw)
    assert [r["impl"] for r in rows] == ["chunked", "flash"]
    assert all("error" not in r and r["fwd_bwd_ms"] > 0 for r in rows)
    assert rows[1]["max_abs_diff"] < 1e-5
    assert "| alibi | 16 | flash |" in benchmark.table(rows)
