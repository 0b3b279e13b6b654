"""Tests of attn.models: every registered model's shapes and dtypes, causality by gradient,
padding, attention maps, configuration errors, the SSM's convolution == recurrence (its
recurrent decoding == forward pass is in test_generate), scanned layers == the loop, and that
each model learns a tiny copy task; the recurrent model with attention beats the one without
at twice the training length (slow).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attn import models
from attn.models_ssm import DiagonalSSM
from attn.registry import ConfigError

PAD, BOS, SEP, BLANK, EOS = 0, 1, 2, 3, 2
VOCAB = 8  # 4 specials + 4 symbols
TINY = {
    "num_layers": 2,
    "d_model": 16,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mlp_dim": 32,
    "dropout": 0.0,
    "rnn": {"hidden": 32},
    "ssm": {"state": 8},
}


def tiny(name, **kw):
    block = {"name": name, **{k: v for k, v in TINY.items() if k in models.REGISTRY[name].DEFAULTS}}
    return {**block, **kw}


def build(name, seed=0, **kw):
    return models.REGISTRY[name](tiny(name, **kw), vocab_size=VOCAB, rngs=nnx.Rngs(seed))


@functools.cache
def _shared(name, overrides: str):
    return build(name, **eval(overrides))


def shared(name, **kw):
    """One model per (name, overrides) for the whole module, so forward passes compile once."""
    return _shared(name, repr(kw))


forward = nnx.jit(lambda m, b: m(b, train=False))


def copy_batch(rng, layout, batch_size, max_n, *, n=None):
    """Copy task in each layout, lengths 1..max_n per example, right-padded to a fixed T."""
    lengths = np.full(batch_size, n) if n else rng.integers(1, max_n + 1, batch_size)
    x = rng.integers(4, VOCAB, (batch_size, max_n))
    x = np.where(np.arange(max_n)[None] < lengths[:, None], x, PAD)
    if layout == "seq2seq":
        inputs = np.concatenate([np.full((batch_size, 1), BOS), x[:, :-1]], 1)
        mask = np.arange(max_n)[None] < lengths[:, None]
        return {
            "src": x,
            "src_mask": mask,
            "inputs": np.where(mask, inputs, PAD),
            "targets": x,
            "loss_mask": mask.astype(np.float32),
            "token_mask": mask,
        }
    extra = 1 if layout == "decoder" else 0
    T = 2 * max_n + extra
    inputs, targets = np.zeros((batch_size, T), int), np.zeros((batch_size, T), int)
    loss = np.zeros((batch_size, T), np.float32)
    for b, m in enumerate(lengths):
        xs = list(x[b, :m])
        if layout == "encoder":
            inputs[b, : 2 * m] = xs + [BLANK] * m
            targets[b, m : 2 * m] = xs
            loss[b, m : 2 * m] = 1
        else:
            seq = xs + [SEP] + xs + [EOS]
            inputs[b, : 2 * m + 1] = seq[:-1]
            targets[b, : 2 * m + 1] = seq[1:]
            loss[b, m : 2 * m + 1] = 1
    token_mask = np.arange(T)[None] < (2 * lengths + extra)[:, None]
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss,
        "token_mask": token_mask,
    }


def as_jax(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def fake_batch(layout, B=2, T=6, S=5):
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(1, VOCAB, (B, T)),
        "targets": rng.integers(1, VOCAB, (B, T)),
        "loss_mask": np.ones((B, T), np.float32),
        "token_mask": np.ones((B, T), bool),
    }
    if layout == "seq2seq":
        batch.update(src=rng.integers(1, VOCAB, (B, S)), src_mask=np.ones((B, S), bool))
    return as_jax(batch)


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_shapes_and_dtypes(name):
    model = shared(name)
    batch = fake_batch(models.batch_format(name))
    logits = nnx.jit(lambda m, b: m(b, train=True))(model, batch)
    assert logits.shape == (2, 6, VOCAB) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert set(tiny(name)) - {"name"} <= set(models.default_config(name))


def test_bfloat16_encoder():
    model = build("encoder", dtype="bfloat16", pe={"name": "rope"})
    logits = forward(model, fake_batch("encoder"))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_batch_formats():
    expected = {
        "encoder": "encoder",
        "decoder": "decoder",
        "encoder_decoder": "seq2seq",
        "rnn_seq2seq": "seq2seq",
        "rnn_attention": "seq2seq",
        "ssm": "decoder",
        "looped": "decoder",
    }
    assert {n: models.batch_format(n) for n in models.REGISTRY} == expected
    assert models.batch_format("ssm", {"ssm": {"bidirectional": True}}) == "encoder"


def _grad_wrt_embeddings(model, batch, t):
    """d logits[:, t] / d (per-position offsets added to the decoder-side embeddings)."""
    embedder = model.embedder
    orig = embedder.embed
    n = batch["inputs"].shape[1]

    def f(delta):
        def embed(tokens):
            out = orig(tokens)
            return out + delta if tokens.shape[1] == n else out

        object.__setattr__(embedder, "embed", embed)
        try:
            return model(batch, train=False)[:, t].sum()
        finally:
            object.__setattr__(embedder, "embed", orig)

    return jax.jit(jax.grad(f))(jnp.zeros((2, n, model.cfg["d_model"])))


@pytest.mark.parametrize("name, pe", [("decoder", "rope"), ("encoder_decoder", "alibi")])
def test_causal_by_gradient(name, pe):
    model = build(name, pe={"name": pe})
    batch = fake_batch(models.batch_format(name))
    t = 3
    g = _grad_wrt_embeddings(model, batch, t)
    per_pos = np.abs(np.asarray(g)).sum(axis=(0, 2))
    assert (per_pos[t + 1 :] == 0).all() and (per_pos[: t + 1] > 0).all()


def test_encoder_is_bidirectional():
    model = build("encoder", pe={"name": "rope"})
    g = _grad_wrt_embeddings(model, fake_batch("encoder"), 1)
    assert (np.abs(np.asarray(g)).sum(axis=(0, 2)) > 0).all()


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_right_padding_does_not_change_real_outputs(name):
    # The bidirectional SSM is the variant where padding could leak (right to left).
    model = shared(name, ssm={"bidirectional": True}) if name == "ssm" else shared(name)
    batch = fake_batch(models.batch_format(name))
    short = dict(batch, token_mask=batch["token_mask"].at[:, 4:].set(False))
    noisy = dict(short, inputs=short["inputs"].at[:, 4:].set(7))
    if "src" in batch:
        short["src_mask"] = short["src_mask"].at[:, 3:].set(False)
        noisy["src_mask"] = short["src_mask"]
        noisy["src"] = short["src"].at[:, 3:].set(7)
    np.testing.assert_allclose(
        forward(model, short)[:, :4], forward(model, noisy)[:, :4], atol=1e-5
    )


# encoder_decoder's layer 0 is encoder self attention over the 5 source tokens.
MAP_SHAPES = {
    "encoder": (2, 4, 6, 6),
    "decoder": (2, 4, 6, 6),
    "encoder_decoder": (2, 4, 5, 5),
    "rnn_attention": (2, 1, 6, 5),
}


@pytest.mark.parametrize("name", sorted(MAP_SHAPES))
def test_attention_maps_on_request(name):
    model = shared(name)
    batch = fake_batch(models.batch_format(name))
    logits, maps = nnx.jit(lambda m, b: m(b, train=False, return_attention=(0,)))(model, batch)
    assert set(maps) == {0}
    w = maps[0]
    assert w.shape == MAP_SHAPES[name]
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(logits, forward(model, batch), atol=1e-6)


@pytest.mark.parametrize("name", ["rnn_seq2seq", "ssm"])
def test_attention_maps_unavailable(name):
    model = shared(name)
    with pytest.raises(ConfigError, match="return_attention"):
        model(fake_batch(models.batch_format(name)), train=False, return_attention=(0,))


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "decoder", "num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"name": "encoder", "d_model": 30, "num_heads": 4}, "d_model"),
        ({"name": "encoder", "norm": "sandwich"}, "model.norm"),
        ({"name": "encoder", "mlp": "tanh"}, "model.mlp"),
        ({"name": "decoder", "pe": {"name": "nope"}}, "model.pe.name"),
        ({"name": "decoder", "positions": {"name": "nope"}}, "model.positions.name"),
        ({"name": "decoder", "impl": "magic"}, "model.impl"),
        ({"name": "ssm", "pe": {"name": "rope"}}, "model.pe.name"),
        ({"name": "encoder_decoder", "pe": {"name": "rope"}, "cross_pe": True}, "cross_pe"),
        ({"name": "rnn_seq2seq", "rnn": {"cell": "transformer"}}, "model.rnn.cell"),
        ({"name": "transformer"}, "model.name"),
    ],
)
def test_validate_rejects_impossible_configs(cfg, match):
    with pytest.raises(ConfigError, match=match):
        models.validate(cfg)


def test_validate_accepts_defaults():
    for name in models.REGISTRY:
        models.validate(models.default_config(name), max_length=64)


@pytest.mark.parametrize("complex_", [True, False])
def test_ssm_convolution_equals_recurrence(complex_):
    ssm = DiagonalSSM(
        6, {"state": 4, "complex": complex_, "dt_min": 1e-2, "dt_max": 0.5}, rngs=nnx.Rngs(0)
    )
    u = jax.random.normal(jax.random.key(1), (2, 11, 6))
    conv = ssm(u)
    rec, _ = ssm.recurrent(u)
    np.testing.assert_allclose(conv, rec, atol=1e-4, rtol=1e-4)


def train(model, layout, *, steps, lr, max_n, n=None, batch_size=32, seed=0):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, rest, opt, batch):
        model = nnx.merge(graphdef, params, rest)

        def loss_fn(m):
            logits = m(batch, train=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        updates, opt = tx.update(grads, opt, params)
        rest = nnx.split(model, nnx.Param, ...)[2]
        return optax.apply_updates(params, updates), rest, opt, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = as_jax(copy_batch(rng, layout, batch_size, max_n, n=n))
        params, rest, opt, _ = step(params, rest, opt, batch)
    return nnx.merge(graphdef, params, rest)


def accuracy(model, layout, *, max_n, n=None, batch_size=128, seed=123):
    """(token accuracy, sequence accuracy) on the scored positions."""
    batch = as_jax(copy_batch(np.random.default_rng(seed), layout, batch_size, max_n, n=n))
    logits = nnx.jit(lambda m, b: m(b, train=False))(model, batch)
    ok = (jnp.argmax(logits, -1) == batch["targets"]) | (batch["loss_mask"] == 0)
    mask = batch["loss_mask"]
    tok = float(((jnp.argmax(logits, -1) == batch["targets"]) * mask).sum() / mask.sum())
    return tok, float(jnp.all(ok, axis=1).mean())


COPY = {
    # name: (model overrides, steps, learning rate); one layer keeps compile time down.
    # Cross attention carries no PE, so the encoder-decoder needs absolute positions in the
    # encoder states (sinusoidal) to copy.
    "encoder": ({"pe": {"name": "rope"}, "norm": "pre", "num_layers": 1}, 150, 3e-3),
    "decoder": ({"pe": {"name": "rope"}, "num_layers": 1}, 150, 1e-2),
    "encoder_decoder": ({"pe": {"name": "sinusoidal"}, "num_layers": 1}, 250, 3e-3),
    "rnn_seq2seq": ({}, 300, 1e-2),
    "rnn_attention": ({"num_layers": 1}, 200, 1e-2),
    "ssm": ({}, 150, 1e-2),
}


# CPU seconds measured on 2 shared cores: encoder 10, decoder 5, the rest 6-13 each (compile
# dominates); the slower four run with the slow tests.
FAST_COPY = ("encoder", "decoder")


@pytest.mark.parametrize(
    "name",
    [n if n in FAST_COPY else pytest.param(n, marks=pytest.mark.slow) for n in sorted(COPY)],
)
def test_learns_copy(name):
    """Copy of length 6 over 4 symbols to >= 99% token accuracy on fresh examples."""
    overrides, steps, lr = COPY[name]
    layout = models.batch_format(name)
    model = train(build(name, **overrides), layout, steps=steps, lr=lr, max_n=6, n=6)
    tok, _ = accuracy(model, layout, max_n=6, n=6)
    assert tok > 0.99, (name, tok)


@functools.cache
def _rnn_copy_results():
    out = {}
    for name in ("rnn_seq2seq", "rnn_attention"):
        model = train(build(name, rnn={"hidden": 64}), "seq2seq", steps=600, lr=1e-2, max_n=6)
        out[name] = {
            "train": accuracy(model, "seq2seq", max_n=6),
            "2x": accuracy(model, "seq2seq", max_n=12, n=12),
        }
    return out


@pytest.mark.slow
def test_rnn_attention_beats_rnn_at_twice_the_length():
    """Copy, lengths 1..6, evaluated at 12 (seed 0, 600 steps, hidden 64, 2 layers).

    Measured on CPU: token accuracy at 2x 0.711 with attention vs 0.669 without (train 1.00
    vs 0.99). The margin is small: in this tiny setting the attention decoder also loses
    track of positions past the training length, so this only checks the ordering.
    """
    res = _rnn_copy_results()
    assert res["rnn_attention"]["train"][0] > 0.95, res
    assert res["rnn_attention"]["2x"][0] > res["rnn_seq2seq"]["2x"][0] + 0.02, res


def test_scan_layers_equals_loop():
    """Stacked layers under nnx.scan compute what the unrolled loop computes, same params."""
    cfg = {"pe": {"name": "t5"}}
    scanned, loop = build("encoder", scan_layers=True, **cfg), build("encoder", seed=1, **cfg)
    stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    params = nnx.state(loop, nnx.Param)
    pure = {k: v for k, v in stacked.items() if k != "stack"}
    pure["stack"] = {
        "blocks": {i: jax.tree.map(lambda a, i=i: a[i], stacked["stack"]["blocks"]) for i in (0, 1)}
    }
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(loop, params)
    batch = fake_batch("encoder")
    run = nnx.jit(lambda m, b: m(b, train=False, return_attention=(1,)))
    (a, maps_a), (b, maps_b) = run(scanned, batch), run(loop, batch)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(maps_a[1], maps_b[1], atol=1e-5)
    kernel = nnx.state(scanned)["stack"]["blocks"]["attn"]["q"]["kernel"]
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
