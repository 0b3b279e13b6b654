"""Sampling and scoring with the KV cache: greedy, temperature, top-k and top-p (nucleus).

Works for every model with `init_cache` / `decode` (attn.models: `decoder`,
`encoder_decoder`, and the recurrent view of `ssm`). One compile per shape: the prompt is
prefilled in one call, then a `lax.while_loop` decodes one token at a time into a fixed
buffer of `max_new_tokens`, stopping early when every row has produced `eos_id`.

- Top-k sampling: Fan et al. 2018, "Hierarchical Neural Story Generation".
- Top-p (nucleus) sampling: Holtzman et al. 2020, "The Curious Case of Neural Text
  Degeneration".

`score` is the teacher-forced log-likelihood of each target token (one forward pass);
`score_incremental` computes the same through the cache, token by token (a test oracle and
the building block of beam-free rescoring).

Command line (thin; the driver restores the model):
    ./launch.sh generate --workdir runs/lm --prompt "def " --max_new_tokens 64 --temperature 0.8
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.tasks.layouts import BOS, EOS, PAD


def _filter_logits(logits_BV, *, top_k: int, top_p: float):
    """Mask logits outside the top-k and outside the smallest set with mass >= top_p."""
    neg = jnp.finfo(logits_BV.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Mass strictly before each token; the token that crosses top_p is kept.
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), -1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff, neg, logits_BV)
    return logits_BV


def sample_logits(logits_BV, rng, *, temperature: float = 0.0, top_k: int = 0, top_p=1.0):
    """Next tokens B: argmax when temperature == 0, else a filtered softmax sample."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = _filter_logits(logits_BV / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _positions(model, batch_size: int, length: int):
    """Eval positions of the decoder side for every buffer slot (None: the slot index)."""
    if hasattr(model, "positions"):
        return model.positions(batch_size, length, train=False)
    return None


def _slot_positions(pos_BT, start_B, length: int):
    if pos_BT is None:
        return None
    idx = start_B[:, None] + jnp.arange(length)
    return jnp.take_along_axis(pos_BT, jnp.minimum(idx, pos_BT.shape[1] - 1), axis=1)


def _cache_length(cache):
    return cache[0]["length"] if "length" in cache[0] else cache[0]["self"]["length"]


@functools.partial(
    nnx.jit, static_argnames=("max_new_tokens", "eos_id", "temperature", "top_k", "top_p")
)
def _generate(
    model,
    prompt_BP,
    prompt_mask_BP,
    src,
    src_mask,
    rng,
    *,
    max_new_tokens,
    eos_id,
    temperature,
    top_k,
    top_p,
):
    B, P = prompt_BP.shape
    total = P + max_new_tokens
    extra = {} if src is None else {"src": src, "src_mask": src_mask}
    cache = model.init_cache(B, total, **extra)
    pos_all = _positions(model, B, total)
    zeros = jnp.zeros((B,), jnp.int32)
    logits, cache = model.decode(
        prompt_BP,
        cache,
        pos_BL=_slot_positions(pos_all, zeros, P),
        valid_BL=prompt_mask_BP,
    )
    last = jnp.sum(prompt_mask_BP, axis=1, dtype=jnp.int32) - 1
    next_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, next_logits, tokens, logliks, done, rng = carry
        rng, key = jax.random.split(rng)
        tok = sample_logits(next_logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(done, PAD, tok)
        ll = jnp.take_along_axis(jax.nn.log_softmax(next_logits), tok[:, None], axis=1)[:, 0]
        tokens = tokens.at[:, i].set(tok)
        logliks = logliks.at[:, i].set(jnp.where(done, 0.0, ll))
        done = done | (tok == eos_id)
        pos = _slot_positions(pos_all, _cache_length(cache), 1)
        logits, cache = model.decode(tok[:, None], cache, pos_BL=pos)
        return i + 1, cache, logits[:, 0], tokens, logliks, done, rng

    init = (
        jnp.zeros((), jnp.int32),
        cache,
        next_logits.astype(jnp.float32),
        jnp.full((B, max_new_tokens), PAD, jnp.int32),
        jnp.zeros((B, max_new_tokens), jnp.float32),
        jnp.zeros((B,), bool),
        rng,
    )
    _, _, _, tokens, logliks, done, _ = jax.lax.while_loop(cond, body, init)
    return tokens, logliks


def generate(
    model,
    prompt_BP,
    *,
    max_new_tokens: int,
    prompt_mask_BP=None,
    src=None,
    src_mask=None,
    eos_id: int = EOS,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng=None,
):
    """Continue right-padded prompts; returns (tokens_BN, logliks_BN), PAD after EOS.

    logliks are the model's log-probabilities (before temperature/filtering) of the tokens
    it emitted. For encoder_decoder, src/src_mask is the source and the prompt starts with
    BOS.
    """
    prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
    mask = jnp.ones(prompt_BP.shape, bool) if prompt_mask_BP is None else prompt_mask_BP
    if src is not None and src_mask is None:
        src_mask = jnp.ones(src.shape, bool)
    return _generate(
        model,
        prompt_BP,
        jnp.asarray(mask, bool),
        src,
        src_mask,
        jax.random.key(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )


@nnx.jit
def score(model, batch):
    """Teacher-forced log p(target_t | ...) per token, zero where loss_mask is 0. BT float32."""
    logits = model(batch, train=False).astype(jnp.float32)
    ll = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    mask = batch.get("loss_mask")
    return ll if mask is None else ll * mask


@nnx.jit
def score_incremental(model, tokens_BT, src=None, src_mask=None):
    """log p(tokens[t+1] | tokens[:t+1]) for t < T-1 through the cache, one token a step."""
    B, T = tokens_BT.shape
    extra = {} if src is None else {"src": src, "src_mask": src_mask}
    cache = model.init_cache(B, T, **extra)
    pos_all = _positions(model, B, T)

    def body(cache, t):
        pos = _slot_positions(pos_all, _cache_length(cache), 1)
        tok = jax.lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1)
        logits, cache = model.decode(tok, cache, pos_BL=pos)
        nxt = jax.lax.dynamic_slice_in_dim(tokens_BT, t + 1, 1, axis=1)
        ll = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), nxt, 1)
        return cache, ll[:, 0]

    _, lls = jax.lax.scan(body, cache, jnp.arange(T - 1))
    return lls.T


def main(argv=None) -> int:
    from experiments.config_utils import ArgumentParser

    parser = ArgumentParser(prog="generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", required=True, help="text, or symbol indices for tasks")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parser.check(args.max_new_tokens >= 1, "--max_new_tokens", "must be >= 1")
    parser.check(args.temperature >= 0, "--temperature", "must be >= 0 (0: greedy)")
    parser.check(args.top_k >= 0, "--top_k", "must be >= 0 (0: no top-k filter)")
    parser.check(0 < args.top_p <= 1, "--top_p", "must be in (0, 1] (1: no nucleus filter)")
    parser.check(bool(args.prompt), "--prompt", "must not be empty")

    # The driver (and TFDS, orbax) load only here so the library part imports fast.
    import attn.models
    from attn.registry import ConfigError
    from experiments import config_utils, state, tasks
    from experiments.workdir import RunError

    try:
        path = os.path.join(args.workdir, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"--workdir: {path} not found; not a run directory (train it first)")
        config = config_utils.load_json(path)
        layout = attn.models.batch_format(config.model.name, config.model)
        if layout not in ("decoder", "seq2seq"):
            raise ConfigError(
                f"--workdir: model {config.model.name!r} ({layout} layout) cannot generate"
            )
        positions = config.task.get("positions", "none")
        if positions != "none":  # decode numbers positions by slot, not by the task's ids
            raise ConfigError(
                f"--workdir: the run's task supplies its own position ids (task.positions="
                f"{positions!r}); generate numbers positions by slot, so it cannot decode this run"
            )
        task = tasks.build(config.task)
        parser.check(args.top_k <= task.vocab_size, "--top_k", f"at most {task.vocab_size}")
        ids = task.encode(args.prompt)
        graphdef, train_state, step = state.load_state(config, os.path.abspath(args.workdir))
    except (ConfigError, RunError) as e:
        print(f"generate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    model = state.merge_model(graphdef, train_state)
    kw = {}
    if layout == "seq2seq":
        kw = {"src": jnp.asarray([ids], jnp.int32)}
        prompt = [BOS]
    else:
        prompt = task.decoder_prompt(ids)
    tokens, logliks = generate(
        model,
        jnp.asarray([prompt], jnp.int32),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        rng=jax.random.key(args.seed),
        **kw,
    )
    n = int(jnp.sum(tokens[0] != PAD))
    print(f"# step {step}, {n} tokens, log-likelihood {float(jnp.sum(logliks[0])):.3f}")
    print(task.render(args.prompt, task.decode(tokens[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
