"""Models for length-generalisation experiments, and the model REGISTRY.

- `encoder`: bidirectional Transformer for transduction in the layout of Deletang et al. 2023
  ("Neural Networks and the Chomsky Hierarchy"): the input followed by |y| blanks, logits at
  every position (the batch's loss mask picks the outputs). Post-LN, embeddings scaled by
  sqrt(d) and initialised with std 0.02 by default, as in their code.
- `decoder`: causal decoder-only LM (Kazemnejad et al. 2023, "The Impact of Positional
  Encoding on Length Generalization in Transformers"); the batch's loss mask picks the answer.
- `encoder_decoder`: Vaswani et al. 2017 with teacher forcing; cross attention carries no PE
  by default (T5).
- `rnn_seq2seq`, `rnn_attention`: see attn/models_rnn.py. `ssm`: see attn/models_ssm.py.
- `looped`: one weight-tied stack applied k(length) times with input injection (Fan et al.
  2025); see attn/models_looped.py.

Every Transformer takes a logit scale and a normaliser (attn.scoring), and a per-layer
pattern of encodings and windows, `layers` (attn/models_pattern.py).

Every model is built as `REGISTRY[name](cfg, *, vocab_size, rngs)` from one model config
block (each class's `DEFAULTS` lists its fields) and is called as
`model(batch, *, train, return_attention=())`, returning float32 logits BTV, or
`(logits, {layer: weights_BHLS})` when attention maps of some layers are requested. Random
positions and dropout draw from the model's own nnx.Rngs streams ("positions", "dropout").

Decoding (experiments/generate.py) uses an explicit cache pytree:
`cache = model.init_cache(batch_size, max_length[, src=..., src_mask=...])` and
`logits_BLV, cache = model.decode(tokens_BL, cache, pos_BL=..., valid_BL=...)`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import attn.attention
import attn.pe
import attn.positions
import attn.scoring
from attn import layers, models_pattern
from attn.layers import Embedder, as_dict, resolve
from attn.registry import ConfigError, lookup, require

TRANSFORMER_DEFAULTS = {
    "num_layers": 5,
    "d_model": 64,
    "num_heads": 8,
    "num_kv_heads": 0,  # 0: num_heads (MHA); 1: MQA; else GQA
    "head_dim": 0,  # 0: d_model // num_heads
    "mlp_dim": 256,
    "mlp": "relu",
    "norm": "post",
    "dropout": 0.1,
    "dropout_rng": "hash",  # dropout masks: "hash" (fast) or "threefry" (nnx.Dropout)
    "tied_embeddings": False,
    "embed_scale": True,
    "init_std": 0.02,
    "qk_norm": False,
    "window": 0,  # 0: no window
    "impl": "auto",
    "dtype": "float32",
    "scan_layers": False,
    "remat": "none",  # activation rematerialisation of each block: none, block, dots
    "pe": {"name": "none"},
    "positions": {"name": "identity"},
    "scorer": {"name": "dot"},
    "logit_scale": {"name": "none"},  # attn.scoring.LOGIT_SCALES: none, log_n, ssmax, temperature
    "normaliser": {"name": "softmax"},  # attn.scoring.NORMALISERS: softmax, stick_breaking
    "layers": "",  # per-layer encoding and window, e.g. "rope:window=128,none" (models_pattern)
}


def validate_transformer(
    cfg: Mapping[str, Any], *, max_length: int | None = None, kinds: tuple[str, ...] = ()
) -> None:
    """ConfigError for impossible Transformer settings (cfg already resolved).

    kinds: the model's attention kinds ("causal", "bidirectional", "cross"), for choices that
    only some kinds can run (stick-breaking needs causal self-attention only); () skips that.
    """
    H, D = cfg["num_heads"], cfg["d_model"]
    G = cfg["num_kv_heads"] or H
    for field in ("num_layers", "d_model", "mlp_dim"):
        require(cfg[field] > 0, f"model.{field}", f"must be positive, got {cfg[field]}")
    require(cfg["head_dim"] >= 0, "model.head_dim", "must be >= 0 (0: d_model / num_heads)")
    require(H > 0 and G > 0, "model.num_heads", f"heads must be positive, got {H}, {G}")
    require(H % G == 0, "model.num_kv_heads", f"num_heads={H} must be a multiple of {G}")
    if not cfg["head_dim"]:
        require(
            D % H == 0,
            "model.d_model",
            f"d_model={D} is not divisible by num_heads={H}; set head_dim explicitly",
        )
    K = cfg["head_dim"] or D // H
    lookup(layers.NORM_PLACEMENTS, cfg["norm"], "model.norm")
    lookup(layers.MLP_KINDS, cfg["mlp"], "model.mlp")
    lookup(layers.DTYPES, cfg["dtype"], "model.dtype")
    require(cfg["window"] >= 0, "model.window", f"must be >= 0 (0: none), got {cfg['window']}")
    require(
        cfg["impl"] in attn.attention.IMPLS,
        "model.impl",
        f"unknown {cfg['impl']!r}; valid: {', '.join(attn.attention.IMPLS)}",
    )
    layers.check_dropout(cfg)
    pe_cls = lookup(attn.pe.REGISTRY, cfg["pe"]["name"], "model.pe.name")
    sampler = lookup(attn.positions.REGISTRY, cfg["positions"]["name"], "model.positions.name")(
        cfg["positions"]
    )
    scorer_cls = lookup(attn.scoring.REGISTRY, cfg["scorer"]["name"], "model.scorer.name")
    if scorer_cls.materialises_logits and cfg["impl"] not in attn.scoring.MATERIALISED_IMPLS:
        raise ConfigError(
            f"model.impl: {cfg['impl']!r} cannot run scorer {cfg['scorer']['name']!r}, which "
            f"needs materialised logits; use one of {', '.join(attn.scoring.MATERIALISED_IMPLS)}"
        )
    if getattr(pe_cls, "needs_materialized_logits", False) and cfg["impl"] == "chunked":
        raise ConfigError(
            f"model.impl: pe {cfg['pe']['name']!r} needs materialised logits; "
            "use impl='reference' or 'auto'"
        )
    if cfg.get("cross_pe") and not pe_cls.supports_cross_attention:
        raise ConfigError(
            f"model.cross_pe: pe {cfg['pe']['name']!r} does not support cross attention; "
            "set cross_pe=False"
        )
    if max_length is not None and hasattr(pe_cls, "validate"):
        pe_cls.validate(
            cfg["pe"],
            max_eval_position=sampler.max_position(max_length),
            num_heads=H,
            head_dim=K,
        )
    _validate_frontier(cfg, scorer_cls, sampler, max_length, kinds, H, K)


def _validate_frontier(cfg, scorer_cls, sampler, max_length, kinds, H, K) -> None:
    """The logit scale, the normaliser and the per-layer pattern (attn.models_pattern)."""
    scale = as_dict(cfg.get("logit_scale") or {"name": "none"})
    lookup(attn.scoring.LOGIT_SCALES, scale["name"], "model.logit_scale.name").validate(
        scale, num_heads=H
    )
    normaliser = attn.scoring.build_normaliser(cfg.get("normaliser"))
    if normaliser is not None:
        name = normaliser.NAME
        if cfg["impl"] not in attn.scoring.MATERIALISED_IMPLS:
            raise ConfigError(
                f"model.impl: {cfg['impl']!r} cannot run normaliser {name!r}, which needs "
                f"materialised logits; use one of {', '.join(attn.scoring.MATERIALISED_IMPLS)}"
            )
        require(
            scorer_cls.NAME != "hard",
            "model.normaliser.name",
            f"{name!r} replaces the softmax, and scorer 'hard' is a top-k of the softmax; "
            "use another scorer or normaliser 'softmax'",
        )
        if normaliser.requires_causal and kinds and set(kinds) != {"causal"}:
            raise ConfigError(
                f"model.normaliser.name: {name!r} breaks the stick from the query back over "
                f"earlier keys, so it needs causal self-attention only; this model has "
                f"{', '.join(kinds)} attention (use a decoder)"
            )
    models_pattern.validate(
        cfg,
        max_eval_position=None if max_length is None else sampler.max_position(max_length),
        num_heads=H,
        head_dim=K,
        materialised_ok=cfg["impl"] != "chunked",
    )


class Stack(nnx.Module):
    """num_layers blocks applied in order, collecting attention maps of the layers asked for.

    With scan_layers the blocks' parameters are stacked on a leading "layers" axis and run
    under nnx.scan, so the step compiles one block instead of num_layers. With `remat`
    ("block" or "dots", REMAT_POLICIES) each block runs under nnx.remat (jax.checkpoint,
    Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): activations inside a
    block are recomputed in the backward pass instead of stored, so activation memory grows
    with the number of blocks times the block's inputs only; gradients are unchanged.
    """

    # model.remat: what a block keeps for the backward pass (jax.checkpoint policies). "block"
    # keeps only each block's input and recomputes the rest; "dots" also keeps the outputs of
    # matmuls without batch dimensions (the projections and the MLP), recomputing attention and
    # the elementwise work (the "save dots" policy of MaxText and PaLM).
    REMAT_POLICIES = {
        "none": None,
        "block": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }

    def __init__(self, cfg, *, causal: bool, cross: bool, rngs):
        n = cfg["num_layers"]
        own_pe = models_pattern.owns_pe(cfg)  # per-layer pattern or per-layer encoding
        block = lambda r, i: layers.Block(
            models_pattern.layer_config(cfg, i),
            d_model=cfg["d_model"],
            causal=causal,
            cross=cross,
            rngs=r,
            own_pe=own_pe,
        )
        make = lambda r: block(r, 0)
        self.num_layers = n
        self.scanned = bool(cfg["scan_layers"])
        self.remat = cfg.get("remat", "none")
        lookup(self.REMAT_POLICIES, self.remat, "model.remat")
        if self.scanned:
            stacked = nnx.split_rngs(splits=n)(
                nnx.vmap(
                    make, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
                )
            )
            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([block(rngs, i) for i in range(n)])
        self.final_norm = (
            nnx.data(None)
            if layers.NORM_PLACEMENTS[cfg["norm"]]
            else layers.LayerNorm(cfg["d_model"], rngs=rngs)
        )

    def _block_fn(self, **kw):
        """fn(block, x_BLD, pe) -> (x_BLD, weights), under nnx.remat unless remat is "none"."""

        def fn(block, x_BLD, pe):
            return block(x_BLD, pe=pe, **kw)

        if self.remat == "none":
            return fn
        return nnx.remat(fn, policy=self.REMAT_POLICIES[self.remat])

    def __call__(
        self, x_BLD, *, pos_BL, mask_BL, pe, memory=None, train, return_attention=(), offset=0
    ):
        wanted = [i for i in return_attention if offset <= i < offset + self.num_layers]
        if self.scanned:
            return self._scanned(x_BLD, pos_BL, mask_BL, pe, memory, train, wanted, offset)
        maps = {}
        for i, block in enumerate(self.blocks):
            want = i + offset in return_attention
            fn = self._block_fn(
                pos_BL=pos_BL, mask_BL=mask_BL, memory=memory, train=train, return_weights=want
            )
            x_BLD, w = fn(block, x_BLD, pe)
            if want:
                maps[i + offset] = w
        return self.finish(x_BLD), maps

    def _scanned(self, x_BLD, pos_BL, mask_BL, pe, memory, train, wanted, offset):
        fn = self._block_fn(
            pos_BL=pos_BL, mask_BL=mask_BL, memory=memory, train=train, return_weights=bool(wanted)
        )

        @nnx.scan(
            in_axes=(0, nnx.Carry, None),
            out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def body(block, x_BLD, pe):
            return fn(block, x_BLD, pe)

        x_BLD, ws = body(self.blocks, x_BLD, pe)
        return self.finish(x_BLD), {i: ws[i - offset] for i in wanted}

    def finish(self, x_BLD):
        return x_BLD if self.final_norm is None else self.final_norm(x_BLD)


class TransformerBase(nnx.Module):
    """Embedding + shared PE + position sampler; subclasses add stacks."""

    DEFAULTS = TRANSFORMER_DEFAULTS
    CAUSAL = False

    @classmethod
    def layout(cls, cfg=None) -> str:
        return cls.FORMAT

    @classmethod
    def attention_kinds(cls, cfg) -> tuple[str, ...]:
        """Which attentions the model runs: "causal", "bidirectional" and/or "cross"."""
        return ("causal",) if cls.CAUSAL else ("bidirectional",)

    @classmethod
    def validate_config(cls, cfg, *, max_length: int | None = None) -> None:
        validate_transformer(cfg, max_length=max_length, kinds=cls.attention_kinds(cfg))

    def __init__(self, cfg, *, vocab_size: int, rngs: nnx.Rngs):
        cfg = resolve(type(self), cfg)
        type(self).validate_config(cfg)
        self.cfg = cfg
        self.embedder = Embedder(cfg, vocab_size=vocab_size, rngs=rngs)
        H = cfg["num_heads"]
        # Per-layer encodings live in the blocks; the shared one brings the embedding hook.
        self.pe = attn.pe.build(
            models_pattern.shared_pe_config(cfg),
            d_model=cfg["d_model"],
            num_heads=H,
            head_dim=cfg["head_dim"] or cfg["d_model"] // H,
            causal=self.CAUSAL,
            rngs=rngs,
        )
        self.sampler = lookup(attn.positions.REGISTRY, cfg["positions"]["name"], "model.positions")(
            cfg["positions"]
        )
        self.position_rng = rngs["positions"].fork()
        self.dropout = layers.Dropout(cfg["dropout"], rng=cfg["dropout_rng"], rngs=rngs)

    def positions(self, batch_size: int, length: int, *, train: bool, mask_BL=None, base_BL=None):
        """Positions from the sampler; the rng stream advances only in training, so an
        evaluation call mutates nothing (plain jax.jit / grad over a closed-over model work).
        `mask_BL` (right padding) tells the sampler how many tokens of each row are real;
        `base_BL` are the task's position ids (a batch's "positions"), which the sampler
        transforms instead of 0..L-1 (attn/positions.py).
        """
        stream = self.position_rng
        if train:
            rng = stream()
        else:
            rng = jax.random.fold_in(stream.key[...], stream.count[...])
        valid_B = None if mask_BL is None else jnp.sum(mask_BL, axis=-1, dtype=jnp.int32)
        return self.sampler(
            batch_size, length, train=train, rng=rng, valid_B=valid_B, base_BL=base_BL
        )

    def _embed(self, tokens, pos, train):
        x = self.pe.embed(self.embedder.embed(tokens), pos)
        return self.dropout(x, deterministic=not train)

    def _decode(self, stack, tokens_BL, cache, *, pos_BL, valid_BL):
        """Logits for L new tokens appended to the cache, and the new cache.

        pos_BL defaults to the slot indices (identity positions); valid_BL marks real tokens
        of a right-padded prefill.
        """
        if pos_BL is None:
            pos_BL = cache[0]["self"]["length"][:, None] + jnp.arange(tokens_BL.shape[1])
        x = self._embed(tokens_BL, pos_BL, False)
        require(
            not stack.scanned,
            "model.scan_layers",
            "KV-cache decoding runs the unscanned layers; build the model with scan_layers=False",
        )
        new_cache = []
        for block, c in zip(stack.blocks, cache, strict=True):
            x, c = block.decode(x, c, pos_BL=pos_BL, pe=self.pe, valid_BL=valid_BL)
            new_cache.append(c)
        return self.embedder.logits(stack.finish(x)), new_cache

    def _pos_dtype(self):
        probe = lambda: self.sampler(1, 1, train=False, rng=jax.random.key(0))
        return jax.eval_shape(probe).dtype


def _token_mask(batch, key="token_mask", tokens="inputs"):
    mask = batch.get(key)
    return jnp.ones(batch[tokens].shape, bool) if mask is None else mask.astype(bool)


def _result(logits, maps, return_attention):
    return (logits, maps) if return_attention else logits


class SingleStack(TransformerBase):
    """One stack of self-attention blocks over `inputs`; CAUSAL says which way it looks."""

    def __init__(self, cfg, *, vocab_size, rngs):
        super().__init__(cfg, vocab_size=vocab_size, rngs=rngs)
        self.stack = Stack(self.cfg, causal=self.CAUSAL, cross=False, rngs=rngs)

    def __call__(self, batch, *, train: bool, return_attention=()):
        tokens_BL = batch["inputs"]
        mask_BL = _token_mask(batch)
        pos_BL = self.positions(
            *tokens_BL.shape, train=train, mask_BL=mask_BL, base_BL=batch.get("positions")
        )
        x_BLD, maps = self.stack(
            self._embed(tokens_BL, pos_BL, train),
            pos_BL=pos_BL,
            mask_BL=mask_BL,
            pe=self.pe,
            train=train,
            return_attention=tuple(return_attention),
        )
        return _result(self.embedder.logits(x_BLD), maps, return_attention)


class Encoder(SingleStack):
    """Bidirectional Transformer encoder for transduction (Deletang layout)."""

    FORMAT = "encoder"


class Decoder(SingleStack):
    """Causal decoder-only Transformer LM."""

    FORMAT = "decoder"
    CAUSAL = True
    DEFAULTS = {**TRANSFORMER_DEFAULTS, "norm": "pre", "dropout": 0.0}

    def init_cache(self, batch_size: int, max_length: int):
        dtype = self.embedder.dtype
        pos_dtype = self._pos_dtype()
        return [
            {"self": b.attn.init_cache(batch_size, max_length, dtype=dtype, pos_dtype=pos_dtype)}
            for b in self.stack.blocks
        ]

    def decode(self, tokens_BL, cache, *, pos_BL=None, valid_BL=None):
        return self._decode(self.stack, tokens_BL, cache, pos_BL=pos_BL, valid_BL=valid_BL)


class EncoderDecoder(TransformerBase):
    """Encoder-decoder Transformer with teacher forcing (seq2seq layout); shared embedding.

    Attention maps: indices 0..num_layers-1 are encoder self attention, num_layers.. decoder
    self attention.
    """

    FORMAT = "seq2seq"
    CAUSAL = True
    DEFAULTS = {**TRANSFORMER_DEFAULTS, "norm": "pre", "cross_pe": False}

    @classmethod
    def attention_kinds(cls, cfg) -> tuple[str, ...]:
        return ("bidirectional", "causal", "cross")

    def __init__(self, cfg, *, vocab_size, rngs):
        super().__init__(cfg, vocab_size=vocab_size, rngs=rngs)
        self.encoder = Stack(self.cfg, causal=False, cross=False, rngs=rngs)
        self.decoder = Stack(self.cfg, causal=True, cross=True, rngs=rngs)

    def encode(self, src_BS, src_mask_BS, *, train, return_attention=()):
        pos_BS = self.positions(*src_BS.shape, train=train, mask_BL=src_mask_BS)
        x_BSD, maps = self.encoder(
            self._embed(src_BS, pos_BS, train),
            pos_BL=pos_BS,
            mask_BL=src_mask_BS,
            pe=self.pe,
            train=train,
            return_attention=return_attention,
        )
        return {"x": x_BSD, "pos": pos_BS, "mask": src_mask_BS}, maps

    def __call__(self, batch, *, train: bool, return_attention=()):
        return_attention = tuple(return_attention)
        memory, maps = self.encode(
            batch["src"],
            _token_mask(batch, "src_mask", "src"),
            train=train,
            return_attention=return_attention,
        )
        tokens_BL = batch["inputs"]
        mask_BL = _token_mask(batch)
        pos_BL = self.positions(
            *tokens_BL.shape, train=train, mask_BL=mask_BL, base_BL=batch.get("positions")
        )
        x_BLD, dec_maps = self.decoder(
            self._embed(tokens_BL, pos_BL, train),
            pos_BL=pos_BL,
            mask_BL=mask_BL,
            pe=self.pe,
            memory=memory,
            train=train,
            return_attention=return_attention,
            offset=len(self.encoder.blocks),
        )
        return _result(self.embedder.logits(x_BLD), {**maps, **dec_maps}, return_attention)

    def init_cache(self, batch_size: int, max_length: int, *, src, src_mask=None):
        src_mask = jnp.ones(src.shape, bool) if src_mask is None else src_mask.astype(bool)
        memory, _ = self.encode(src, src_mask, train=False)
        dtype = self.embedder.dtype
        pos_dtype = self._pos_dtype()
        return [
            {
                "self": b.attn.init_cache(batch_size, max_length, dtype=dtype, pos_dtype=pos_dtype),
                "cross": b.cross.init_cross_cache(
                    memory["x"], pos_BS=memory["pos"], mask_BS=memory["mask"]
                ),
            }
            for b in self.decoder.blocks
        ]

    def decode(self, tokens_BL, cache, *, pos_BL=None, valid_BL=None):
        return self._decode(self.decoder, tokens_BL, cache, pos_BL=pos_BL, valid_BL=valid_BL)


from attn.models_looped import Looped  # noqa: E402
from attn.models_rnn import RNNAttention, RNNSeq2Seq  # noqa: E402
from attn.models_ssm import SSM  # noqa: E402

REGISTRY = {
    "encoder": Encoder,
    "decoder": Decoder,
    "encoder_decoder": EncoderDecoder,
    "rnn_seq2seq": RNNSeq2Seq,
    "rnn_attention": RNNAttention,
    "ssm": SSM,
    "looped": Looped,
}


def default_config(name: str) -> dict:
    """The model block `{"name": name, **DEFAULTS}` for a registered model."""
    cls = lookup(REGISTRY, name, "model.name")
    return {"name": name, **resolve(cls, {})}


def batch_format(name: str, cfg=None) -> str:
    """Which batch layout ("encoder", "decoder", "seq2seq") the model eats."""
    cls = lookup(REGISTRY, name, "model.name")
    return cls.layout(None if cfg is None else resolve(cls, cfg))


def validate(cfg, *, vocab_size: int | None = None, max_length: int | None = None) -> None:
    """Raise ConfigError for an impossible model block before anything compiles.

    max_length: the longest sequence the model will see (for PE table limits).
    """
    cfg = as_dict(cfg)
    cls = lookup(REGISTRY, cfg.get("name"), "model.name")
    if vocab_size is not None:
        require(vocab_size > 0, "task.vocab_size", f"must be positive, got {vocab_size}")
    cls.validate_config(resolve(cls, cfg), max_length=max_length)


def build(cfg, *, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
    cls = lookup(REGISTRY, as_dict(cfg).get("name"), "model.name")
    return cls(cfg, vocab_size=vocab_size, rngs=rngs)
