"""Registry-driven contract tests for every positional encoding in attn.pe.REGISTRY.

Shapes and dtypes of every hook, jit equals no-jit, causality by
gradient through a tiny attention, shift invariance of the encodings that declare
`shift_invariant`, finite outputs at 16x the training length, validate's one-line errors.
Cases are enumerated from the registries at collection time (`contract_cases`), and the
checks are plain functions, so an encoding registered later, including the dummy one
registered inside `test_dummy_encoding_is_covered`, gets the same tests with no new code.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn.pe
import attn.positions
from attn.attention import dot_product_attention
from attn.pe.base import UNWRITTEN_POSITION, PositionalEncoding, relative_positions
from attn.registry import ConfigError

B, L, D, H, G, K = 2, 6, 16, 4, 2, 8
TRAIN_LENGTH = 8
# Checks that need no tiny length run at 16x the training length, so that one compiled
# attention per (encoding, mode, position dtype) serves jit == no-jit, shift invariance and
# finiteness; compiling is what these tests spend their time on.
LONG = 16 * TRAIN_LENGTH
GQA_LAYOUTS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
SAMPLER_CONFIGS = {
    "identity": {"name": "identity"},
    "randomized": {"name": "randomized", "max_len": 256},
    "interpolated": {"name": "interpolated", "factor": 0.5},
}


def contract_cases(names=None) -> list[tuple[str, str, bool]]:
    """(encoding, sampler, causal) for every registered encoding and sampler."""
    names = sorted(attn.pe.REGISTRY) if names is None else names
    samplers = sorted(attn.positions.REGISTRY)
    return [(n, s, c) for n in names for s in samplers for c in (True, False)]


def sampler_config(name: str) -> dict:
    return SAMPLER_CONFIGS.get(name, {"name": name})


_PES: dict = {}


def make_pe(name: str, causal: bool, *, num_heads=H) -> PositionalEncoding:
    """Build with defaults, then move every parameter off its init so that no hook is
    trivially zero (CoPE starts at 0). Cached: the checks never modify an encoding."""
    cls = attn.pe.get(name)
    key = (cls, name, causal, num_heads)
    if key not in _PES:
        pe = cls(
            attn.pe.default_config(name),
            d_model=D,
            num_heads=num_heads,
            head_dim=K,
            causal=causal,
            rngs=nnx.Rngs(0),
        )
        rng = np.random.default_rng(1)
        params = nnx.state(pe, nnx.Param)
        nnx.update(pe, jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape), params))
        _PES[key] = pe
    return _PES[key]


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """These graphs are tiny: XLA's optimisation passes cost more time than they save."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def positions(sampler: str, length: int, *, train=True, seed=0) -> jax.Array:
    s = attn.positions.build(sampler_config(sampler))
    return s(B, length, train=train, rng=jax.random.key(seed))


def projections(num_kv_heads=G, seed=0):
    kq, kk, kv, kx = jax.random.split(jax.random.key(seed), 4)
    w = {
        "q": jax.random.normal(kq, (D, H, K)) / np.sqrt(D),
        "k": jax.random.normal(kk, (D, num_kv_heads, K)) / np.sqrt(D),
        "v": jax.random.normal(kv, (D, num_kv_heads, K)) / np.sqrt(D),
    }
    return w, kx


def attend(pe, x_BLD, pos_BL, w, causal):
    """A one-layer self-attention that calls all three hooks, as the layers do."""
    x = pe.embed(x_BLD, pos_BL)
    q = jnp.einsum("BLD,DHK->BLHK", x, w["q"])
    k = jnp.einsum("BSD,DGK->BSGK", x, w["k"])
    v = jnp.einsum("BSD,DGK->BSGK", x, w["v"])
    q, k = pe.rotate(q, k, pos_BL, pos_BL)
    bias = pe.bias(pos_BL, pos_BL, q, k)
    return dot_product_attention(q, k, v, bias=bias, causal=causal, impl="reference")


attend_jit = nnx.jit(attend, static_argnames="causal")
bias_jit = nnx.jit(lambda pe, q, k, qpos, kpos: pe.bias(qpos, kpos, q, k))


def hook_outputs(pe, x_BLD, q_BLHK, k_BSGK, qpos_BL, kpos_BS):
    q, k = pe.rotate(q_BLHK, k_BSGK, qpos_BL, kpos_BS)
    return pe.embed(x_BLD, qpos_BL), q, k, pe.bias(qpos_BL, kpos_BS, q, k)


def abstract_hooks(pe, *args):
    """Shapes and dtypes of the three hooks' outputs, traced but never compiled."""
    graphdef, state = nnx.split(pe)
    return jax.eval_shape(lambda st, *a: hook_outputs(nnx.merge(graphdef, st), *a), state, *args)


def check_hooks(name, sampler, causal, num_heads=H, num_kv_heads=G):
    """Hook shapes and dtypes (bf16 activations): self-attention with L == S and L < S (a
    KV-cache step, bottom-right aligned), and cross attention where it is supported."""
    pe = make_pe(name, causal, num_heads=num_heads)
    S = L
    kpos = positions(sampler, S)
    qpos_cases = [kpos, kpos[:, S - 2 :]]
    if pe.supports_cross_attention:
        qpos_cases.append(positions(sampler, 3))
    for qpos in qpos_cases:
        qlen = qpos.shape[1]
        x = jax.ShapeDtypeStruct((B, qlen, D), jnp.bfloat16)
        q = jax.ShapeDtypeStruct((B, qlen, num_heads, K), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((B, S, num_kv_heads, K), jnp.bfloat16)
        out, q2, k2, bias = abstract_hooks(pe, x, q, k, qpos, kpos)
        assert (out.shape, out.dtype) == (x.shape, x.dtype)
        assert (q2.shape, q2.dtype, k2.shape, k2.dtype) == (q.shape, q.dtype, k.shape, k.dtype)
        if bias is not None:
            assert bias.dtype == jnp.float32
            full = (B, num_heads, qlen, S)
            assert jnp.broadcast_shapes(bias.shape, full) == full


def check_jit(name, sampler, causal):
    pe = make_pe(name, causal)
    w, kx = projections()
    x = jax.random.normal(kx, (B, LONG, D))
    pos = positions(sampler, LONG)
    eager = attend(pe, x, pos, w, causal)
    jitted = attend_jit(pe, x, pos, w, causal=causal)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-4, atol=1e-5)


@nnx.jit(static_argnames="causal")
def jacobian(pe, x_BLD, pos_BL, w, causal):
    return jax.jacrev(lambda x: attend(pe, x, pos_BL, w, causal))(x_BLD)


def check_causality(name, sampler):
    """No output row depends on a later input row (and each depends on itself)."""
    pe = make_pe(name, True)
    w, kx = projections()
    x = jax.random.normal(kx, (1, L, D))
    jac_LHKLD = jacobian(pe, x, positions(sampler, L)[:1], w, causal=True)[0, :, :, :, 0]
    jac = np.abs(np.asarray(jac_LHKLD)).sum(axis=(1, 2, 4))
    assert np.all(np.triu(jac, k=1) == 0), np.triu(jac, k=1)
    assert np.all(np.diag(jac) > 0)


def check_shift_invariance(name, sampler, causal):
    pe = make_pe(name, causal)
    if not pe.shift_invariant:
        return
    w, kx = projections()
    x = jax.random.normal(kx, (B, LONG, D))
    pos = positions(sampler, LONG)
    shifted = pos + jnp.asarray(37, pos.dtype)
    np.testing.assert_allclose(
        np.asarray(attend_jit(pe, x, shifted, w, causal=causal)),
        np.asarray(attend_jit(pe, x, pos, w, causal=causal)),
        rtol=1e-4,
        atol=1e-4,
    )
    q = jax.random.normal(jax.random.key(3), (B, LONG, H, K))
    k = jax.random.normal(jax.random.key(4), (B, LONG, G, K))
    bias = bias_jit(pe, q, k, pos, pos)
    if bias is not None:
        moved = bias_jit(pe, q, k, shifted, shifted)
        np.testing.assert_allclose(moved, bias, rtol=1e-5, atol=1e-5)


def check_unwritten_cache_slots(name, sampler):
    """Causal: keys at UNWRITTEN_POSITION (empty KV-cache slots) leave the bias of the real
    keys unchanged."""
    pe = make_pe(name, True)
    pos = positions(sampler, LONG)
    kpos = jnp.concatenate([pos, jnp.full((B, 3), UNWRITTEN_POSITION, pos.dtype)], axis=1)
    q = jax.random.normal(jax.random.key(3), (B, LONG, H, K))
    k = jax.random.normal(jax.random.key(4), (B, LONG, G, K))
    k_cache = jnp.concatenate([k, jnp.zeros((B, 3, G, K))], axis=1)
    bias = bias_jit(pe, q, k, pos, pos)
    if bias is not None:
        with_slots = bias_jit(pe, q, k_cache, pos, kpos)
        assert bool(jnp.all(jnp.isfinite(with_slots)))
        np.testing.assert_allclose(with_slots[..., :LONG], bias, rtol=1e-5, atol=1e-4)


def check_long_inputs_finite(name, sampler, causal):
    """16x the training length: validate passes with defaults and outputs stay finite."""
    length = LONG
    s = attn.positions.build(sampler_config(sampler))
    cls = attn.pe.get(name)
    cls.validate(
        attn.pe.default_config(name),
        max_eval_position=s.max_position(length),
        num_heads=H,
        head_dim=K,
    )
    pe = make_pe(name, causal)
    w, kx = projections()
    x = jax.random.normal(kx, (B, length, D))
    for train in (True, False):
        out = attend_jit(pe, x, positions(sampler, length, train=train), w, causal=causal)
        assert bool(jnp.all(jnp.isfinite(out)))


def check_contract(name, sampler, causal):
    check_hooks(name, sampler, causal)
    check_jit(name, sampler, causal)
    if causal:
        check_causality(name, sampler)
        check_unwritten_cache_slots(name, sampler)
    check_shift_invariance(name, sampler, causal)
    check_long_inputs_finite(name, sampler, causal)


@pytest.mark.parametrize("name,sampler,causal", contract_cases())
def test_contract(name, sampler, causal):
    check_contract(name, sampler, causal)


@pytest.mark.parametrize("name", sorted(attn.pe.REGISTRY))
@pytest.mark.parametrize("heads", GQA_LAYOUTS, ids=lambda hg: f"H{hg[0]}G{hg[1]}")
def test_gqa_layouts(name, heads):
    check_hooks(name, "identity", True, num_heads=heads[0], num_kv_heads=heads[1])


@pytest.mark.parametrize("name", sorted(attn.pe.REGISTRY))
def test_declared_attributes(name):
    cls = attn.pe.REGISTRY[name]
    assert issubclass(cls, PositionalEncoding)
    module_doc = sys.modules[cls.__module__].__doc__ or ""
    assert cls.__doc__ and re.search(r"(19|20)\d\d", module_doc), (
        f"{name}: the class needs a docstring and its module docstring the paper it implements "
        "(authors and year, e.g. 'Press et al. 2022'), as README 'Adding an encoding' says"
    )
    assert attn.pe.default_config(name) == {"name": name, **cls.DEFAULTS}
    for attr in ("supports_cross_attention", "needs_materialized_logits", "shift_invariant"):
        assert isinstance(getattr(cls, attr), bool)
    with pytest.raises(ConfigError, match=r"^model\.pe\.bogus: unknown field"):
        cls.validate({"name": name, "bogus": 1}, max_eval_position=10, num_heads=H, head_dim=K)
    cls.validate(attn.pe.default_config(name), max_eval_position=10, num_heads=H, head_dim=K)


LOGICAL_AXES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "state", None}


@pytest.mark.parametrize("name", sorted(attn.pe.REGISTRY))
def test_parameters_finite_with_logical_axes(name):
    for causal in (True, False):
        pe = attn.pe.build(
            attn.pe.default_config(name),
            d_model=D,
            num_heads=H,
            head_dim=K,
            causal=causal,
            rngs=nnx.Rngs(0),
        )
        params = nnx.state(pe, nnx.Param)
        for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            assert bool(jnp.all(jnp.isfinite(v.get_value())))
            axes = v.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == v.get_value().ndim
            assert set(axes) <= LOGICAL_AXES


class DistanceBias(PositionalEncoding):
    """A test-only relative encoding: -0.1 * |i - j| for every head."""

    shift_invariant = True
    supports_cross_attention = False

    def bias(self, qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None):
        rel = relative_positions(qpos_BL, kpos_BS).astype(jnp.float32)
        return -0.1 * jnp.abs(rel)[:, None]


def test_dummy_encoding_is_covered(monkeypatch):
    monkeypatch.setitem(attn.pe.REGISTRY, "dummy", DistanceBias)
    cases = contract_cases(["dummy"])
    assert {s for _, s, _ in cases} == set(attn.positions.REGISTRY)
    for case in cases:
        check_contract(*case)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match=r"^pe\.name: unknown name 'nope'; valid names: "):
        attn.pe.default_config("nope")


def test_learned_table_overflow_message():
    cfg = {"name": "learned", "max_len": 64}
    cls = attn.pe.get("learned")
    cls.validate(cfg, max_eval_position=63, num_heads=H, head_dim=K)
    msg = (
        "pe.max_len: position 64 is past the learned table of 64 rows; "
        "raise max_len or set pe.extension='clip'"
    )
    with pytest.raises(ConfigError) as err:
        cls.validate(cfg, max_eval_position=64, num_heads=H, head_dim=K)
    assert str(err.value) == msg
    cls.validate({**cfg, "extension": "clip"}, max_eval_position=10_000, num_heads=H, head_dim=K)


@pytest.mark.parametrize("name", ["rope", "xpos"])
def test_rotary_odd_dims_message(name):
    cls = attn.pe.get(name)
    with pytest.raises(ConfigError) as err:
        cls.validate({"name": name}, max_eval_position=10, num_heads=H, head_dim=7)
    assert str(err.value) == (
        "pe.fraction: rope rotates 7 of head_dim 7 dims (fraction 1.0); it must be even and > 0"
    )
    with pytest.raises(ConfigError, match=r"rotates 3 of head_dim 8"):
        cls.validate(
            {"name": name, "fraction": 0.375}, max_eval_position=10, num_heads=H, head_dim=8
        )


@pytest.mark.parametrize(
    "name,fields,head_dim,max_pos,message",
    [
        (
            "rope",
            {"layout": "pairs"},
            8,
            10,
            "pe.layout: unknown layout 'pairs'; allowed: half, interleaved",
        ),
        (
            "rope",
            {"scaling": "yarn"},
            8,
            10,
            "pe.original_max_len: must be the training context length (> 0) with scaling='yarn'",
        ),
        (
            "xpos",
            {},
            8,
            100_000,
            "pe.scale_base: position 100000 overflows float32 key scales "
            "with scale_base 512.0; raise scale_base above 1566",
        ),
        (
            "kerple",
            {"variant": "cubic"},
            8,
            10,
            "pe.variant: unknown variant 'cubic'; allowed: log, power",
        ),
        (
            "learned",
            {"extension": "wrap"},
            8,
            10,
            "pe.extension: unknown policy 'wrap'; allowed: error, clip",
        ),
    ],
)
def test_validate_messages(name, fields, head_dim, max_pos, message):
    with pytest.raises(ConfigError) as err:
        attn.pe.get(name).validate(
            {"name": name, **fields}, max_eval_position=max_pos, num_heads=H, head_dim=head_dim
        )
    assert str(err.value) == message
