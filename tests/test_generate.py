"""Tests of experiments/generate.py: cached generation == uncached step-by-step decoding
(same greedy tokens, same log-likelihoods), teacher-forced scoring == the sum of incremental
steps, ragged prompts, EOS handling, and the sampling filters (top-k, top-p, temperature).
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn import models
from experiments import generate as gen

VOCAB = 8
TINY = {"num_layers": 2, "d_model": 16, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 32}
CASES = {
    "decoder": {"pe": {"name": "rope"}},
    "encoder_decoder": {"pe": {"name": "t5"}},
    "ssm": {"ssm": {"state": 8}},
}


def build(name):
    cfg = {"name": name, **TINY, **CASES[name]}
    cfg = {k: v for k, v in cfg.items() if k == "name" or k in models.REGISTRY[name].DEFAULTS}
    return models.REGISTRY[name](cfg, vocab_size=VOCAB, rngs=nnx.Rngs(0))


def prompt_and_kw(name, B=2):
    prompt = jax.random.randint(jax.random.key(1), (B, 4), 3, VOCAB)
    if name != "encoder_decoder":
        return prompt, {}
    kw = {"src": prompt, "src_mask": jnp.ones(prompt.shape, bool)}
    return jnp.full((B, 1), gen.BOS, jnp.int32), kw


SLOW_CASES = {"encoder_decoder"}  # ~15 s on 2 cores (cross-attention decoding: -m slow)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in sorted(CASES)
    ],
)
def case(request):
    return request.param, build(request.param)


def test_cached_greedy_equals_uncached_decoding(case):
    name, model = case
    prompt, kw = prompt_and_kw(name)
    tokens, logliks = gen.generate(model, prompt, max_new_tokens=5, eos_id=99, **kw)
    forward = nnx.jit(lambda m, b: m(b, train=False))
    seq, ref_ll = prompt, []
    for _ in range(5):
        batch = {"inputs": seq}
        if kw:
            batch.update(kw)
        logp = jax.nn.log_softmax(forward(model, batch)[:, -1])
        nxt = jnp.argmax(logp, -1).astype(jnp.int32)
        ref_ll.append(jnp.take_along_axis(logp, nxt[:, None], 1)[:, 0])
        seq = jnp.concatenate([seq, nxt[:, None]], 1)
    np.testing.assert_array_equal(tokens, seq[:, prompt.shape[1] :])
    np.testing.assert_allclose(logliks, jnp.stack(ref_ll, 1), atol=1e-5)

    full = jnp.concatenate([prompt, tokens], 1)
    batch = {"inputs": full[:, :-1], "targets": full[:, 1:], **kw}
    teacher = gen.score(model, batch)
    np.testing.assert_allclose(teacher[:, prompt.shape[1] - 1 :], logliks, atol=1e-5)
    incremental = gen.score_incremental(model, full, **kw)
    np.testing.assert_allclose(incremental, teacher, atol=1e-5)
    np.testing.assert_allclose(incremental.sum(1), teacher.sum(1), rtol=1e-5)


def test_ragged_prompts_match_single_prompts():
    model = build("decoder")
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 3, VOCAB)
    mask = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
    tokens, logliks = gen.generate(model, prompt, prompt_mask_BP=mask, max_new_tokens=4, eos_id=99)
    alone, alone_ll = gen.generate(model, prompt[1:, :3], max_new_tokens=4, eos_id=99)
    np.testing.assert_array_equal(tokens[1], alone[0])
    np.testing.assert_allclose(logliks[1], alone_ll[0], atol=1e-5)


def test_eos_stops_and_pads():
    model = build("decoder")
    prompt, _ = prompt_and_kw("decoder")
    tokens, _ = gen.generate(model, prompt, max_new_tokens=5, eos_id=99)
    eos = int(tokens[0, 1])
    stopped, logliks = gen.generate(model, prompt, max_new_tokens=5, eos_id=eos)
    first = int(np.argmax(np.asarray(stopped[0]) == eos))
    assert first <= 1
    assert (np.asarray(stopped[0, first + 1 :]) == gen.PAD).all()
    assert (np.asarray(logliks[0, first + 1 :]) == 0).all()


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.split(jax.random.key(0), 2)
    greedy = gen.sample_logits(logits, keys[0])
    assert (np.asarray(greedy) == 0).all()
    top2 = gen.sample_logits(logits, keys[0], temperature=1.0, top_k=2)
    assert set(np.asarray(top2).tolist()) == {0, 1}
    # Nucleus 0.7: {0.5, 0.3} reach it; the third token is never drawn.
    nucleus = gen.sample_logits(logits, keys[1], temperature=1.0, top_p=0.7)
    assert set(np.asarray(nucleus).tolist()) == {0, 1}
    assert (np.asarray(gen.sample_logits(logits, keys[1], temperature=1.0, top_p=0.3)) == 0).all()
    free = np.asarray(gen.sample_logits(logits, keys[1], temperature=1.0))
    assert set(free.tolist()) == {0, 1, 2, 3}
    assert abs((free == 0).mean() - 0.5) < 0.08


def test_sampled_generation_is_seeded():
    model = build("decoder")
    prompt, _ = prompt_and_kw("decoder")
    kw = dict(max_new_tokens=5, eos_id=99, temperature=1.0, top_k=3, top_p=0.9)
    a, _ = gen.generate(model, prompt, rng=jax.random.key(3), **kw)
    b, _ = gen.generate(model, prompt, rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(a, b)


def test_generate_cli_restores_a_trained_run(tmp_path):
    """`./launch.sh generate` end to end: the driver trains a smoke decoder, the CLI samples."""
    root = Path(__file__).resolve().parents[1]
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    train_cmd = [sys.executable, "-m", "experiments.main", "--mode", "train"]
    train_cmd += ["--config", "configs/algorithmic.py:smoke=true", "--workdir", str(workdir)]
    subprocess.run(train_cmd, cwd=root, env=env, check=True, capture_output=True)
    gen_cmd = [sys.executable, "-m", "experiments.generate", "--workdir", str(workdir)]
    gen_cmd += ["--prompt", "1 2 3", "--max_new_tokens", "5"]
    out = subprocess.run(gen_cmd, cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "# step 3," in out.stdout
    assert "1 2 3 -> " in out.stdout
