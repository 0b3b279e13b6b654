"""Per-layer patterns (model.layers), per-layer encodings (FoX, DAPE), the looped model, and
the 2024-25 attention choices through the configs and the driver's train step.

The looped model is checked against a hand-unrolled loop (input injection, k steps, each
example its own k), for causality by gradient and padding invariance; patterns for the
encoding and window each layer gets, KV-cache decoding == the forward pass, and every
impossible combination for its one-line ConfigError before anything compiles. The registry
-driven tests of tests/test_models.py pick `looped` up by themselves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn.pe
from attn import models, models_pattern
from attn.models_looped import loop_steps
from attn.registry import ConfigError

VOCAB = 8
TINY = {"d_model": 16, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 32, "dropout": 0.0}


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def build(name, seed=0, **kw):
    return models.REGISTRY[name](
        {"name": name, **TINY, **kw}, vocab_size=VOCAB, rngs=nnx.Rngs(seed)
    )


def batch(B=2, T=6, lengths=None, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    mask = np.arange(T)[None] < lengths[:, None]
    return {
        "inputs": jnp.asarray(np.where(mask, rng.integers(1, VOCAB, (B, T)), 0)),
        "token_mask": jnp.asarray(mask),
    }


forward = nnx.jit(lambda m, b: m(b, train=False))


# --- per-layer pattern ------------------------------------------------------------------


def test_pattern_parse_and_layer_config():
    spec = "rope:window=4:max_wavelength=500,none+alibi:window=0"
    entries = models_pattern.parse(spec)
    assert [(pe["name"], w) for pe, w in entries] == [("rope", 4), ("none", None), ("alibi", 0)]
    assert entries[0][0]["max_wavelength"] == 500.0 and entries[0][0]["layout"] == "half"
    cfg = {"layers": spec, "window": 7, "pe": {"name": "none"}}
    got = [models_pattern.layer_config(cfg, i) for i in range(5)]
    assert [(c["pe"]["name"], c["window"]) for c in got] == [
        ("rope", 4),
        ("none", 7),  # no window given: model.window
        ("alibi", 0),
        ("rope", 4),
        ("none", 7),
    ]


def test_pattern_model_builds_each_layer_and_decodes_like_forward():
    """RNoPE-SWA: RoPE with a window of 2 on even layers, NoPE full attention on odd ones."""
    model = build("decoder", num_layers=3, layers="rope:window=2,none", pe={"name": "sinusoidal"})
    blocks = model.stack.blocks
    assert [type(b.layer_pe).__name__ for b in blocks] == ["RoPE", "NoPE", "RoPE"]
    assert [b.attn.window for b in blocks] == [2, None, 2]
    assert type(model.pe).__name__ == "Sinusoidal"  # the shared one: embeddings only
    b = batch(T=7)
    full = forward(model, b)
    cache = model.init_cache(2, 7)
    step = nnx.jit(lambda m, t, c, p: m.decode(t, c, pos_BL=p))
    logits, cache = step(model, b["inputs"][:, :4], cache, jnp.broadcast_to(jnp.arange(4), (2, 4)))
    outs = [logits]
    for t in range(4, 7):
        logits, cache = step(model, b["inputs"][:, t : t + 1], cache, jnp.full((2, 1), t))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


@pytest.mark.parametrize("pe", ["fox", "dape"])
def test_per_layer_encodings_have_parameters_per_layer(pe):
    model = build("decoder", num_layers=2, pe={"name": pe})
    p0, p1 = (nnx.state(b.layer_pe, nnx.Param) for b in model.stack.blocks)
    assert jax.tree.leaves(p0) and not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True)
    )
    assert type(model.pe).__name__ == "NoPE"  # no unused shared copy
    g = nnx.grad(lambda m: m(batch(), train=True).sum())(model)
    grads = jax.tree.leaves(nnx.state(g, nnx.Param)["stack"]["blocks"][1]["layer_pe"])
    assert (
        grads
        and all(np.isfinite(x).all() for x in grads)
        and any(np.abs(x).sum() > 0 for x in grads)
    )


def test_per_layer_encoding_under_scan_layers():
    model = build("encoder", num_layers=2, pe={"name": "fox"}, scan_layers=True)
    w = nnx.state(model)["stack"]["blocks"]["layer_pe"]["w_forget"]
    assert w.shape == (2, 4, 4) and w.get_metadata()["out_sharding"][0] == "layers"
    assert np.isfinite(np.asarray(forward(model, batch()))).all()


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"layers": "rope,nope"}, r"^model\.layers: unknown name 'nope'; valid names: "),
        ({"layers": "rope:stride=2"}, r"^model\.layers: 'rope:stride=2': unknown option 'stride'"),
        ({"layers": "rope:window=-1"}, r"^model\.layers: 'rope:window=-1': window must be >= 0"),
        ({"layers": "rope:window=x"}, r"^model\.layers: 'rope:window=x': window='x' is not a"),
        ({"layers": "rope:max_wavelength"}, r"^model\.layers: 'rope:max_wavelength': options are"),
        ({"layers": ","}, r"^model\.layers: ',' has no entries"),
        ({"layers": "sinusoidal,rope"}, r"^model\.layers: 'sinusoidal' is an absolute encoding"),
        ({"layers": "rope,none", "pe": {"name": "alibi"}}, r"^model\.pe\.name: 'alibi' acts on"),
        ({"layers": "rope,none", "scan_layers": True}, r"^model\.scan_layers: a per-layer pattern"),
        ({"layers": "fox,none", "impl": "chunked"}, r"^model\.impl: 'chunked' cannot run 'fox'"),
        ({"layers": "rope:fraction=0.3"}, r"^pe\.fraction: rope rotates 1 of head_dim 4"),
        (
            {"normaliser": {"name": "stick_breaking"}, "name": "encoder"},
            r"^model\.normaliser\.name: 'stick_breaking' breaks the stick .* bidirectional",
        ),
        (
            {"normaliser": {"name": "stick_breaking"}, "impl": "chunked"},
            r"^model\.impl: 'chunked' cannot run normaliser 'stick_breaking'",
        ),
        (
            {"normaliser": {"name": "stick_breaking"}, "scorer": {"name": "hard"}},
            r"^model\.normaliser\.name: 'stick_breaking' replaces the softmax",
        ),
        ({"logit_scale": {"name": "log_m"}}, r"^model\.logit_scale\.name: unknown name 'log_m'"),
        ({"name": "looped", "scan_layers": True}, r"^model\.scan_layers: the looped model"),
        ({"name": "looped", "loop": {"steps": -1}}, r"^model\.loop\.steps: must be an int >= 0"),
        ({"name": "looped", "loop": {"max_steps": 0}}, r"^model\.loop\.max_steps: must be an int"),
        ({"name": "looped", "loop": {"alpha": 0.0}}, r"^model\.loop\.alpha: must be > 0"),
        ({"name": "looped", "loop": {"step": 3}}, r"^model\.loop\.step: unknown field"),
    ],
)
def test_one_line_config_errors(cfg, message):
    block = {"name": "decoder", **TINY, "head_dim": 4, **cfg}
    with pytest.raises(ConfigError, match=message) as err:
        models.validate(block, max_length=16)
    assert "\n" not in str(err.value)


def test_configs_take_the_new_args():
    from configs import algorithmic, formal

    c = algorithmic.get_config(
        "layers=rope:window=8+none,logit_scale=ssmax,normaliser=stick_breaking,smoke=true"
    )
    assert c.model.layers == "rope:window=8+none"
    assert c.model.logit_scale.to_dict() == {"name": "ssmax", "init": 0.43, "scale_bias": True}
    assert c.model.normaliser.name == "stick_breaking"
    assert c.variant == "decoder:none/ssmax/stick_breaking/layers=rope:window=8+none"
    assert formal.get_config("model=looped,smoke=true").model.loop.alpha == 1.0
    with pytest.raises(ConfigError, match="config arg logit_scale: model 'ssm' has no"):
        algorithmic.get_config("model=ssm,logit_scale=log_n")


# --- looped -----------------------------------------------------------------------------


def unrolled(model, b, steps_B):
    """The loop by hand: h_0 = 0, h_t = body(h_{t-1} + x), each example stopping after its k."""
    tokens, mask = b["inputs"], b["token_mask"]
    pos = model.positions(*tokens.shape, train=False, mask_BL=mask)
    x = model._embed(tokens, pos, False)
    h = jnp.zeros_like(x)
    for t in range(int(max(steps_B))):
        y = h + x
        for block in model.body.blocks:
            y, _ = block(y, pos_BL=pos, mask_BL=mask, pe=model.pe, train=False)
        h = jnp.where(jnp.asarray(t < np.asarray(steps_B))[:, None, None], y, h)
    return model.embedder.logits(model.body.finish(h))


@pytest.mark.parametrize("loop", [{"steps": 3}, {"alpha": 0.5, "min_steps": 2, "max_steps": 3}])
def test_looped_equals_unrolled_loop(loop):
    model = build("looped", num_layers=2, pe={"name": "rope"}, loop=loop)
    b = batch(T=6, lengths=[6, 3])
    want_steps = [3, 3] if "steps" in loop else [3, 2]  # ceil(0.5 n) clipped to [2, 3]
    np.testing.assert_array_equal(loop_steps(model.cfg["loop"], jnp.array([6, 3])), want_steps)
    np.testing.assert_allclose(forward(model, b), unrolled(model, b, want_steps), atol=1e-5)


def test_looped_step_count_grows_with_length():
    cfg = {"steps": 0, "alpha": 1.0, "min_steps": 1, "max_steps": 64}
    assert [loop_steps(cfg, n) for n in (1, 8, 40, 200)] == [1, 8, 40, 64]
    assert loop_steps({**cfg, "alpha": 0.25}, 10) == 3


def test_looped_pads_and_is_causal():
    model = build("looped", num_layers=1, pe={"name": "alibi"}, loop={"alpha": 1.0})
    b = batch(T=6, lengths=[4, 4])
    noisy = dict(b, inputs=b["inputs"].at[:, 4:].set(7))
    np.testing.assert_allclose(forward(model, b)[:, :4], forward(model, noisy)[:, :4], atol=1e-5)
    x = model._embed(b["inputs"], jnp.broadcast_to(jnp.arange(6), (2, 6)), False)

    def f(delta):
        orig = model.embedder.embed
        object.__setattr__(model.embedder, "embed", lambda t: orig(t) + delta)
        try:
            return model(b, train=False)[:, 2].sum()
        finally:
            object.__setattr__(model.embedder, "embed", orig)

    g = np.abs(np.asarray(jax.grad(f)(jnp.zeros_like(x)))).sum(axis=(0, 2))
    assert (g[3:] == 0).all() and (g[:3] > 0).all()


def test_looped_encoder_layout_and_attention_maps():
    model = build("looped", causal=False, num_layers=2, loop={"steps": 2})
    assert models.batch_format("looped", {"causal": False}) == "encoder"
    assert models.batch_format("looped") == "decoder"
    logits, maps = nnx.jit(lambda m, b: m(b, train=False, return_attention=(1,)))(model, batch())
    assert set(maps) == {1} and maps[1].shape == (2, 4, 6, 6)
    np.testing.assert_allclose(np.asarray(maps[1]).sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="^model.name: 'looped' has no KV-cache decoding"):
        model.init_cache(2, 8)


def test_looped_dropout_differs_between_steps():
    """The body's dropout rng state is carried through the scan: two training calls differ and
    the rng counts advance by the number of steps."""
    model = build("looped", num_layers=1, dropout=0.5, loop={"steps": 3})
    step = nnx.jit(lambda m, b: m(b, train=True))
    a, b2 = step(model, batch()), step(model, batch())
    assert not np.allclose(a, b2)


# --- through the driver's train step ------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        "model=looped,smoke=true",
        "layers=fox+rope:window=4,logit_scale=ssmax,normaliser=stick_breaking,smoke=true",
        pytest.param("pe=dape,logit_scale=temperature,smoke=true", marks=pytest.mark.slow),
        pytest.param("pe=p_rope,logit_scale=log_n,smoke=true", marks=pytest.mark.slow),
        pytest.param("pe=pope,smoke=true", marks=pytest.mark.slow),
    ],
)
def test_driver_train_step(arg, tmp_path):
    from configs import algorithmic
    from experiments import mesh as mesh_lib
    from experiments import state as state_lib
    from experiments import train
    from experiments.validate import validate

    config = algorithmic.get_config(arg)
    config.model.num_layers = 2
    config.train.mesh.data, config.train.mesh.model = 1, 1
    validate(config, workdir=str(tmp_path / "run"))
    mesh = mesh_lib.make_mesh(config)
    graphdef, state, tx = state_lib.init_train_state(config, mesh=mesh)
    step_fn = train.make_train_step(config, graphdef, tx)
    for step, host_batch in zip(
        range(2), train.host_batches(config, seed=0, start=0), strict=False
    ):
        state, metrics = step_fn(state, mesh_lib.shard_batch(host_batch, mesh))
        assert np.isfinite(float(metrics["loss"])), (arg, step)
    assert int(state["step"]) == 2


def test_every_registered_encoding_is_in_a_pattern():
    """Every relative encoding can be a pattern entry; absolute ones are refused."""
    for name, cls in attn.pe.REGISTRY.items():
        block = {"name": "decoder", **TINY, "head_dim": 4, "layers": f"{name},none"}
        if cls.embed is attn.pe.base.PositionalEncoding.embed:
            models.validate(block, max_length=16)
        else:
            with pytest.raises(ConfigError, match="absolute encoding"):
                models.validate(block, max_length=16)
