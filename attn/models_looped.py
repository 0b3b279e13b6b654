"""Looped (weight-tied) Transformer whose number of steps grows with the input length:
`looped` in attn.models.REGISTRY.

Fan et al. 2025, "Looped Transformers for Length Generalization" (ICLR 2025, arXiv
2409.15647): one block (here a small stack of `num_layers` blocks, the "recurrent block") is
applied k times with shared weights, k a function of the input length, and the embedded input
is added to the block's input at every step ("input injection"; also the looped models of
McLeish et al. 2024, "Transformers Can Do Arithmetic with the Right Embeddings", arXiv
2405.17399, and Yang et al. 2024, "Looped Transformers are Better at Learning Learning
Algorithms"):
    h_0 = 0,   h_t = Body(h_{t-1} + x),   logits = Head(Norm(h_k)),   x = Embed(tokens).

Steps (`loop` block): `steps` > 0 fixes k; `steps` = 0 makes it per example,
k_b = clip(ceil(alpha * n_b), min_steps, max_steps) with n_b the example's real tokens (its
token mask), so a right-padded batch gives each example the steps of its own length. The loop
runs K = clip(ceil(alpha * T), min_steps, max_steps) steps for the batch's padded length T
(static: one compile per shape, as everywhere) under jax.lax.scan, so the step compiles the
body once whatever K is; an example whose k_b < K keeps its state h_{k_b} (later steps are
masked out, and get no gradient). `causal` picks the layout: True (default) is a decoder
(Fan et al. and the Abacus looped models are decoders), False an encoder.

Everything else is the Transformer's: encodings (model.pe, model.layers and per-layer
encodings apply to the body's layers), samplers, scorers, logit scales, normalisers. Attention
maps (`return_attention`, body layer indices) are each example's last step. Not supported,
each a ConfigError: scan_layers (the loop already scans) and KV-cache decoding (the step count
changes with the length, so earlier tokens' cached states would need recomputing).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn.models import TRANSFORMER_DEFAULTS, Stack, TransformerBase, _result, _token_mask
from attn.registry import ConfigError, require

LOOP_DEFAULTS = {"steps": 0, "alpha": 1.0, "min_steps": 1, "max_steps": 64}


def loop_steps(cfg, n):
    """k for n real tokens (an int or an int array): steps, or clip(ceil(alpha n), min, max)."""
    if cfg["steps"]:
        return jnp.full(jnp.shape(n), cfg["steps"], jnp.int32) if jnp.ndim(n) else cfg["steps"]
    if jnp.ndim(n):
        k = jnp.ceil(cfg["alpha"] * n.astype(jnp.float32)).astype(jnp.int32)
        return jnp.clip(k, cfg["min_steps"], cfg["max_steps"])
    return min(max(math.ceil(cfg["alpha"] * n), cfg["min_steps"]), cfg["max_steps"])


class Looped(TransformerBase):
    """A weight-tied stack applied k(length) times with input injection."""

    DEFAULTS = {
        **TRANSFORMER_DEFAULTS,
        "num_layers": 1,
        "norm": "pre",
        "dropout": 0.0,
        "causal": True,
        "loop": dict(LOOP_DEFAULTS),
    }

    @classmethod
    def layout(cls, cfg=None) -> str:
        return "decoder" if (cfg or cls.DEFAULTS)["causal"] else "encoder"

    @classmethod
    def attention_kinds(cls, cfg) -> tuple[str, ...]:
        return ("causal",) if cfg["causal"] else ("bidirectional",)

    @classmethod
    def validate_config(cls, cfg, *, max_length=None) -> None:
        super().validate_config(cfg, max_length=max_length)
        require(
            isinstance(cfg["causal"], bool), "model.causal", f"true or false: {cfg['causal']!r}"
        )
        require(
            not cfg["scan_layers"],
            "model.scan_layers",
            "the looped model scans over its loop steps already; set scan_layers=False",
        )
        loop = cfg["loop"]
        unknown = sorted(set(loop) - set(LOOP_DEFAULTS))
        require(
            not unknown,
            f"model.loop.{unknown[0] if unknown else ''}",
            f"unknown field; allowed: {', '.join(LOOP_DEFAULTS)}",
        )
        for key in ("steps", "min_steps", "max_steps"):
            value = loop[key]
            require(
                isinstance(value, int) and value >= (0 if key == "steps" else 1),
                f"model.loop.{key}",
                f"must be an int >= {0 if key == 'steps' else 1}, got {value!r}",
            )
        require(
            loop["max_steps"] >= loop["min_steps"],
            "model.loop.max_steps",
            f"must be >= min_steps ({loop['min_steps']}), got {loop['max_steps']}",
        )
        require(
            loop["steps"] or loop["alpha"] > 0,
            "model.loop.alpha",
            f"must be > 0 when steps = 0 (k = ceil(alpha * length)), got {loop['alpha']}",
        )

    def __init__(self, cfg, *, vocab_size, rngs):
        self.CAUSAL = bool(cfg.get("causal", self.DEFAULTS["causal"]))
        super().__init__(cfg, vocab_size=vocab_size, rngs=rngs)
        self.body = Stack(self.cfg, causal=self.CAUSAL, cross=False, rngs=rngs)

    def __call__(self, batch, *, train: bool, return_attention=()):
        tokens_BL = batch["inputs"]
        mask_BL = _token_mask(batch)
        B, L = tokens_BL.shape
        pos_BL = self.positions(B, L, train=train, mask_BL=mask_BL, base_BL=batch.get("positions"))
        x_BLD = self._embed(tokens_BL, pos_BL, train)
        wanted = sorted({i for i in return_attention if 0 <= i < self.body.num_layers})
        require(
            len(wanted) == len(set(return_attention)),
            "return_attention",
            f"the looped model's layers are 0..{self.body.num_layers - 1} (its body)",
        )
        steps_B = loop_steps(self.cfg["loop"], jnp.sum(mask_BL, axis=-1, dtype=jnp.int32))
        K = loop_steps(self.cfg["loop"], L)
        h_BLD, maps = self._loop(x_BLD, pos_BL, mask_BL, steps_B, K, train, wanted)
        logits = self.embedder.logits(self.body.finish(h_BLD))
        return _result(logits, maps, return_attention)

    def _loop(self, x_BLD, pos_BL, mask_BL, steps_B, K, train, wanted):
        """h_t = body(h_{t-1} + x) for t < K under lax.scan; example b stops after steps_B[b].

        The body's parameters enter the scan as constants; its other state (dropout rng
        counts) is carried, so every step draws new dropout masks.
        """
        graphdef, params, rest = nnx.split(self.body.blocks, nnx.Param, ...)
        B, L, _ = x_BLD.shape
        H = self.cfg["num_heads"]

        def step(carry, t):
            h_BLD, rest, maps = carry
            blocks = nnx.merge(graphdef, params, rest)
            y_BLD = h_BLD + x_BLD
            new_maps = {}
            for i, block in enumerate(blocks):
                y_BLD, w = block(
                    y_BLD,
                    pos_BL=pos_BL,
                    mask_BL=mask_BL,
                    pe=self.pe,
                    train=train,
                    return_weights=i in wanted,
                )
                if i in wanted:
                    new_maps[i] = w
            active_B = t < steps_B
            h_BLD = jnp.where(active_B[:, None, None], y_BLD, h_BLD)
            last_B = t == steps_B - 1
            maps = {i: jnp.where(last_B[:, None, None, None], new_maps[i], maps[i]) for i in maps}
            return (h_BLD, nnx.state(blocks, nnx.Not(nnx.Param)), maps), None

        maps0 = {i: jnp.zeros((B, H, L, L), jnp.float32) for i in wanted}
        init = (jnp.zeros_like(x_BLD), rest, maps0)
        (h_BLD, rest, maps), _ = jax.lax.scan(step, init, jnp.arange(K))
        if train:  # evaluation draws no dropout, so it mutates nothing (plain jax.grad works)
            nnx.update(self.body.blocks, rest)
        return h_BLD, maps

    def init_cache(self, *args, **kwargs):
        raise ConfigError(
            "model.name: 'looped' has no KV-cache decoding (its step count depends on the "
            "length, so every new token would change the earlier steps); evaluate it with "
            "teacher forcing"
        )

    decode = init_cache
