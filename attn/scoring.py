"""Attention scorers: how a query meets a key before the softmax.

- "dot": scaled dot product, Vaswani et al. 2017 ("Attention Is All You Need"); runs through
  `attn.attention.dot_product_attention`, so every implementation (chunked, cuDNN, ...) applies.
- "luong": Luong et al. 2015 ("Effective Approaches to Attention-based Neural Machine
  Translation"), the "general" score q^T W k with one K x K matrix W per head (initialised
  near the identity so that it starts as the dot scorer).
- "additive": Bahdanau et al. 2015 ("Neural Machine Translation by Jointly Learning to Align
  and Translate"), v^T tanh(W q + U k) with a hidden size A per head. No 1/sqrt(K) scale.
- "hard": top-k attention (k=1 is hard argmax attention, as in Hahn 2020 and Yao et al. 2021
  on formal languages), trained with a straight-through estimator (Bengio et al. 2013): the
  forward pass uses the top-k weights renormalised, the backward pass the softmax's gradient.
All scorers take the same masks, causal/window flags and biases as dot_product_attention,
and return BLHK (plus BHLS float32 weights with return_weights=True). Every scorer but "dot"
materialises the B x H x L x S logits, so it cannot run with impl="chunked" or "cudnn".

Normalisers (`NORMALISERS`, config `model.normaliser`) turn logits into weights: "softmax"
(the default: each scorer's own `weights`) or
- "stick_breaking": Tan et al. 2025, "Scaling Stick-Breaking Attention: An Efficient
  Implementation and In-depth Study" (arXiv 2410.17980). Not a softmax: with
  beta_ij = sigmoid(z_ij), z the scaled logit plus any positional bias, query i gives key j
  the weight A_ij = beta_ij prod_{j<k<i} (1 - beta_ik), breaking its unit stick from the
  nearest earlier key backwards; the rest of the stick is dropped (rows sum to <= 1). By
  default the query does not attend to itself (the paper's j < i; `attend_current=True`
  includes it). It breaks two contracts of dot_product_attention: rows are not normalised
  (so it is a normaliser, not an attention implementation that the oracle tests could compare
  with `reference`), and a weight depends on every key between the key and the query, so the
  online-softmax combine of the chunked and flash kernels does not apply. A blockwise version
  would visit key blocks from the query backwards carrying the log of the remaining stick;
  it is not implemented: stick-breaking runs materialised (any scorer but "hard", whose
  weights are a top-k of the softmax), and impl="chunked"/"cudnn"/"flash" is a ConfigError
  before anything compiles. Keys are ordered by slot, which is position order in causal
  self-attention and in a KV cache, so the models accept it only where every attention is
  causal self-attention (a decoder; attn.models checks it).

Logit scales (`LOGIT_SCALES`, config `model.logit_scale`) multiply each query row's logits by
a factor s (per row and head) before the normaliser, for every scorer and implementation:
- "none": no factor (the default; nothing is computed).
- "log_n": s = log n (Chiang & Cholak 2022, "Overcoming a Theoretical Limitation of
  Self-Attention"), n the number of keys the query row may attend to.
- "ssmax": s = s_h log n with s_h learned per head and layer (Nakanishi 2025, "Scalable-Softmax
  Is Superior for Attention", arXiv 2501.19399: softmax((s log n) z); `init` 0.43, the value of
  the paper's Figure 1).
- "temperature": s = lambda_h, a per-head multiplier (the inverse of a temperature), fixed or
  learned (Wang et al. 2024, "Length Generalization of Causal Transformers without Position
  Encoding", arXiv 2404.12224, scale NoPE's attention logits per head).
n counts the keys visible under the causal and window masks and the key padding mask (at
least 1): for a bidirectional unpadded encoder it is the key length, Chiang & Cholak's n; in a
causal decoder it is i + 1 for query i, which is what SSMax's argument (the softmax's
denominator grows with the number of terms it sums) asks for; and it keeps padded batches,
KV-cache decoding and the full forward pass in agreement. Both papers define the factor on
the softmax's input z, so by default it also multiplies a positional bias (`scale_bias=True`);
with `scale_bias=False` it multiplies q.k only, which is SSMax's "multiply the query by
s log n" implementation and keeps a bias encoding's slope fixed. For the dot scorer the factor
is folded into q (one number per query row and head) and, with `scale_bias`, the bias (an
array, or a callable evaluated per block), so chunked, dense, xla and cuDNN run it unchanged;
a scaled in-kernel bias is no longer an `attn.kernels.PositionalBias`, so impl="flash" then
runs the chunked path. The other scorers multiply their materialised logits.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from attn import attention
from attn.params import param
from attn.registry import ConfigError, as_dict, lookup, merge_defaults, require

# Implementations that a materialising scorer accepts (they all mean "compute it here").
MATERIALISED_IMPLS = ("auto", "reference", "dense", "xla")


class Scorer(nnx.Module):
    """Base: subclasses define `logits` (float32 BHLS before bias and mask) and DEFAULTS."""

    DEFAULTS: dict = {}
    NAME = ""
    materialises_logits = True

    def __init__(self, cfg: dict, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = head_dim

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        raise NotImplementedError

    def weights(self, logits_BHLS, allowed) -> jax.Array:
        """float32 BHLS weights from float32 logits (masked entries and rows get 0)."""
        return attention.masked_softmax(logits_BHLS, allowed)

    def __call__(
        self,
        q_BLHK,
        k_BSGK,
        v_BSGK,
        *,
        bias=None,
        mask=None,
        causal=False,
        window=None,
        scale=None,
        impl="auto",
        return_weights=False,
        logit_scale=None,
        scale_bias=True,
        normaliser=None,
    ):
        """`logit_scale`: None or a float32 factor broadcastable to BHL1 that multiplies each
        query row's logits (with the bias too when `scale_bias`); `normaliser`: None (softmax)
        or a `Normaliser` that replaces `weights`. See the module docstring."""
        if not self.materialises_logits and normaliser is None:
            if logit_scale is not None:
                q_BLHK, bias = fold_logit_scale(q_BLHK, bias, logit_scale, scale_bias)
            kw = dict(bias=bias, mask=mask, causal=causal, window=window, scale=scale)
            out = attention.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, impl=impl, **kw)
            if not return_weights:
                return out
            return out, attention.attention_weights(q_BLHK, k_BSGK, **kw)
        if impl not in MATERIALISED_IMPLS:
            what = (
                f"model.scorer.name={self.NAME!r}"
                if normaliser is None
                else f"model.normaliser.name={normaliser.NAME!r}"
            )
            raise ConfigError(
                f"model.impl: {impl!r} cannot run {what}, which needs materialised logits; "
                f"use one of {', '.join(MATERIALISED_IMPLS)}"
            )
        B, L, H, _ = q_BLHK.shape
        S = k_BSGK.shape[1]
        logits = self.logits(q_BLHK, k_BSGK, scale)
        b = attention.full_bias(bias, L, S)
        if logit_scale is not None and (b is None or not scale_bias):
            logits = logits * logit_scale
        if b is not None:
            logits = logits + b
            if logit_scale is not None and scale_bias:
                logits = logits * logit_scale
        allowed = attention.combined_mask(L, S, mask, causal, window)
        weights = self.weights if normaliser is None else normaliser
        probs = weights(logits, allowed)
        probs = jnp.broadcast_to(probs, (B, H, L, S))
        out = attention.apply_weights(probs, v_BSGK, q_BLHK.dtype)
        return (out, probs) if return_weights else out


class DotScorer(Scorer):
    """Scaled dot product; no parameters; any attention implementation (the fused ones too)."""

    NAME = "dot"
    materialises_logits = False

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        return attention.grouped_logits(
            q_BLHK, k_BSGK, attention.default_scale(scale, q_BLHK.shape[-1])
        )


class LuongScorer(Scorer):
    """Luong "general": scale * q^T W_h k, W_h a K x K matrix per query head."""

    NAME = "luong"
    DEFAULTS = {"init_std": 0.02}

    def __init__(self, cfg: dict, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, rngs=rngs)
        noise = cfg["init_std"] * jax.random.normal(rngs.params(), (num_heads, head_dim, head_dim))
        self.w_HKK = nnx.Param(jnp.eye(head_dim) + noise)

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        qw = jnp.einsum("BLHK,HKJ->BLHJ", q_BLHK.astype(jnp.float32), self.w_HKK[...])
        return attention.grouped_logits(qw, k_BSGK, attention.default_scale(scale, self.head_dim))


class AdditiveScorer(Scorer):
    """Bahdanau: scale * v_h^T tanh(W_h q + U_h k); scale defaults to 1 (none in the paper)."""

    NAME = "additive"
    DEFAULTS = {"hidden": 64}

    def __init__(self, cfg: dict, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, rngs=rngs)
        A = cfg["hidden"]
        require(isinstance(A, int) and A > 0, "model.scorer.hidden", f"must be > 0, got {A!r}")
        normal = jax.nn.initializers.normal
        self.w_HKA = nnx.Param(normal(head_dim**-0.5)(rngs.params(), (num_heads, head_dim, A)))
        self.u_HKA = nnx.Param(normal(head_dim**-0.5)(rngs.params(), (num_heads, head_dim, A)))
        self.v_HA = nnx.Param(normal(A**-0.5)(rngs.params(), (num_heads, A)))

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        H = self.num_heads
        G = k_BSGK.shape[2]
        wq = jnp.einsum("BLHK,HKA->BHLA", q_BLHK.astype(jnp.float32), self.w_HKA[...])
        u = self.u_HKA[...].reshape(G, H // G, *self.u_HKA.shape[1:])
        uk = jnp.einsum("BSGK,GRKA->BGRSA", k_BSGK.astype(jnp.float32), u)
        uk = uk.reshape(uk.shape[0], H, *uk.shape[3:])
        hidden = jnp.tanh(wq[:, :, :, None, :] + uk[:, :, None, :, :])  # BHLSA
        logits = jnp.einsum("BHLSA,HA->BHLS", hidden, self.v_HA[...])
        return logits if scale is None else scale * logits


class HardScorer(Scorer):
    """Top-k of the scaled dot-product softmax, renormalised; straight-through gradient."""

    NAME = "hard"
    DEFAULTS = {"k": 1}

    def __init__(self, cfg: dict, *, num_heads: int, head_dim: int, rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, rngs=rngs)
        k = cfg["k"]
        require(isinstance(k, int) and k >= 1, "model.scorer.k", f"must be an int >= 1, got {k!r}")
        self.k = k

    def logits(self, q_BLHK, k_BSGK, scale) -> jax.Array:
        return attention.grouped_logits(
            q_BLHK, k_BSGK, attention.default_scale(scale, q_BLHK.shape[-1])
        )

    def weights(self, logits_BHLS, allowed) -> jax.Array:
        soft = attention.masked_softmax(logits_BHLS, allowed)
        return soft + jax.lax.stop_gradient(top_k_weights(soft, self.k) - soft)


def stick_breaking_weights(logits_BHLS, allowed=None, *, attend_current=False) -> jax.Array:
    """A_ij = sigmoid(z_ij) prod_k (1 - sigmoid(z_ik)) over the allowed keys k after j in slot
    order; masked entries and fully masked rows are 0. Without `attend_current` each row's
    last allowed key (the query itself in causal self-attention) is dropped first.

    Computed in log space: log A_ij = log sigmoid(z_ij) + sum_{k > j} log sigmoid(-z_ik), the
    sum a reverse cumulative sum over keys, so no product of many small factors underflows
    before the end.
    """
    z = logits_BHLS.astype(jnp.float32)
    S = z.shape[-1]
    ok = jnp.ones(z.shape, bool) if allowed is None else jnp.broadcast_to(allowed, z.shape)
    if not attend_current:
        idx = jnp.arange(S, dtype=jnp.int32)
        last = jnp.max(jnp.where(ok, idx, -1), axis=-1, keepdims=True)
        ok = ok & (idx != last)
    log_keep = jnp.where(ok, jax.nn.log_sigmoid(-z), 0.0)
    later = jnp.flip(jnp.cumsum(jnp.flip(log_keep, -1), axis=-1), -1) - log_keep
    return jnp.where(ok, jnp.exp(jax.nn.log_sigmoid(z) + later), 0.0)


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """Logits -> weights in place of a scorer's softmax; DEFAULTS are its config fields."""

    NAME: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict] = {}
    requires_causal: ClassVar[bool] = False  # meaningful only in causal self-attention

    def __call__(self, logits_BHLS, allowed) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SoftmaxNormaliser(Normaliser):
    """The scorer's own weights (softmax; top-k of it for "hard"); layers pass None."""

    NAME: ClassVar[str] = "softmax"


@dataclasses.dataclass(frozen=True)
class StickBreaking(Normaliser):
    """Stick-breaking attention (Tan et al. 2025), `stick_breaking_weights`."""

    NAME: ClassVar[str] = "stick_breaking"
    DEFAULTS: ClassVar[dict] = {"attend_current": False}
    requires_causal: ClassVar[bool] = True
    attend_current: bool = False

    def __call__(self, logits_BHLS, allowed) -> jax.Array:
        return stick_breaking_weights(logits_BHLS, allowed, attend_current=self.attend_current)


NORMALISERS = {cls.NAME: cls for cls in (SoftmaxNormaliser, StickBreaking)}


def build_normaliser(cfg) -> Normaliser | None:
    """The normaliser named cfg["name"], or None for "softmax" (the scorer's own weights)."""
    cfg = as_dict(cfg or {"name": "softmax"})
    cls = lookup(NORMALISERS, cfg.get("name", "softmax"), "model.normaliser.name")
    merged = merge_defaults(cls.DEFAULTS, cfg, "model.normaliser")
    for key, value in merged.items():
        require(
            isinstance(value, bool),
            f"model.normaliser.{key}",
            f"must be true or false, got {value!r}",
        )
    return None if cls is SoftmaxNormaliser else cls(**merged)


def top_k_weights(probs, k: int) -> jax.Array:
    """Keep each row's k largest probabilities (k=1: one-hot argmax), renormalised to sum 1.

    Rows of zeros (fully masked) stay zeros. Exactly k entries are kept even with ties.
    """
    k = min(k, probs.shape[-1])
    values, idx = jax.lax.top_k(probs, k)
    keep = jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype).sum(axis=-2)
    kept = probs * keep
    total = values.sum(axis=-1, keepdims=True)
    return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 0.0)


REGISTRY = {cls.NAME: cls for cls in (DotScorer, LuongScorer, AdditiveScorer, HardScorer)}


def default_config(name: str) -> dict:
    """The scorer config block {"name": name, **DEFAULTS}."""
    return {"name": name, **lookup(REGISTRY, name, "model.scorer.name").DEFAULTS}


def build(cfg, *, num_heads: int, head_dim: int, rngs: nnx.Rngs) -> Scorer:
    """Build the scorer named by cfg["name"]; missing fields take DEFAULTS, unknown ones fail."""
    cfg = as_dict(cfg)
    cls = lookup(REGISTRY, cfg.get("name", "dot"), "model.scorer.name")
    merged = merge_defaults(cls.DEFAULTS, cfg, "model.scorer")
    return cls(merged, num_heads=num_heads, head_dim=head_dim, rngs=rngs)


# -------------------------------------------------------------------------------- logit scales


def visible_keys(L: int, S: int, mask=None, causal: bool = False, window=None) -> jax.Array:
    """float32 (B|1, H|1, L, 1): how many keys each query row may attend to.

    Causal and window masks are bottom-right aligned as in attn.masks. A mask without a query
    axis (key padding, B11S) is counted with a prefix sum over keys, never an L x S array; a
    mask with one (a KV cache's explicit mask) is summed.
    """
    m = None if mask is None else attention._as_4d(jnp.asarray(mask, bool))
    if m is not None and m.shape[2] != 1:
        allowed = attention.combined_mask(L, S, m, causal, window)
        return jnp.sum(allowed, axis=-1, keepdims=True, dtype=jnp.float32)
    pos = (S - L) + jnp.arange(L, dtype=jnp.int32)
    lo, hi = jnp.zeros_like(pos), jnp.full_like(pos, S - 1)
    if causal:
        hi = jnp.minimum(hi, pos)
    if window is not None:
        lo = jnp.maximum(lo, pos - window + 1)
        if not causal:
            hi = jnp.minimum(hi, pos + window - 1)
    lo, hi = jnp.clip(lo, 0, S), jnp.clip(hi, -1, S - 1)
    if m is None:
        return jnp.maximum(hi - lo + 1, 0).astype(jnp.float32)[None, None, :, None]
    counts = jnp.cumsum(m, axis=-1, dtype=jnp.int32)
    prefix = jnp.concatenate([jnp.zeros(counts.shape[:-1] + (1,), jnp.int32), counts], -1)
    n = jnp.take(prefix, hi + 1, axis=-1) - jnp.take(prefix, lo, axis=-1)  # (b, h, 1, L)
    return jnp.swapaxes(jnp.maximum(n, 0), 2, 3).astype(jnp.float32)


def fold_logit_scale(q_BLHK, bias, scale_BHL1, scale_bias: bool):
    """(q * s, s * bias): a per-row factor on the logits as inputs of any implementation.

    q is scaled in float32 and cast back; an array bias is multiplied, a bias callable is
    wrapped so that each block gathers its rows' factors.
    """
    s = jnp.asarray(scale_BHL1, jnp.float32)
    q = (q_BLHK.astype(jnp.float32) * jnp.moveaxis(s, 1, 2)).astype(q_BLHK.dtype)
    if bias is None or not scale_bias:
        return q, bias
    if callable(bias):
        block_bias = bias

        def scaled(q_idx, k_idx):
            rows = s if s.shape[2] == 1 else jnp.take(s, q_idx, axis=2)
            return rows * block_bias(q_idx, k_idx)

        return q, scaled
    return q, s * jnp.asarray(bias, jnp.float32)


class LogitScale(nnx.Module):
    """Base of the logit scales: `__call__(n_B1L1)` -> factor broadcastable to BHL1."""

    NAME = ""
    DEFAULTS: dict = {"scale_bias": True}
    uses_length = True  # whether __call__ reads n (visible keys per row)

    def __init__(self, cfg: dict, *, num_heads: int, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.scale_bias = bool(cfg["scale_bias"])

    @classmethod
    def validate(cls, cfg: dict, *, num_heads: int) -> None:
        """ConfigError for settings that cannot work; the base checks field names."""
        c = merge_defaults(cls.DEFAULTS, cfg, "model.logit_scale")
        if "scale_bias" in c:
            require(
                isinstance(c["scale_bias"], bool),
                "model.logit_scale.scale_bias",
                f"must be true or false, got {c['scale_bias']!r}",
            )

    def __call__(self, n_B1L1):
        raise NotImplementedError


class NoLogitScale(LogitScale):
    """No factor (layers skip the scale entirely)."""

    NAME = "none"
    DEFAULTS: dict = {}
    uses_length = False

    def __init__(self, cfg: dict, *, num_heads: int, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.scale_bias = False

    def __call__(self, n_B1L1):
        return None


def _log_n(n_B1L1):
    return jnp.log(jnp.maximum(n_B1L1, 1.0))


class LogNScale(LogitScale):
    """log n (Chiang & Cholak 2022); no parameters."""

    NAME = "log_n"

    def __call__(self, n_B1L1):
        return _log_n(n_B1L1)


class SSMaxScale(LogitScale):
    """s_h log n with s_h learned per head (Nakanishi 2025, SSMax)."""

    NAME = "ssmax"
    DEFAULTS = {"init": 0.43, "scale_bias": True}

    def __init__(self, cfg: dict, *, num_heads: int, rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, rngs=rngs)
        init = jax.nn.initializers.constant(float(cfg["init"]))
        self.s = param(rngs, init, (num_heads,), ("heads",))

    def __call__(self, n_B1L1):
        return self.s[...][None, :, None, None] * _log_n(n_B1L1)


class TemperatureScale(LogitScale):
    """A per-head multiplier lambda_h (Wang et al. 2024), fixed or learned.

    `scale` is one number for every head or a list of num_heads numbers.
    """

    NAME = "temperature"
    DEFAULTS = {"scale": 1.0, "learned": False, "scale_bias": True}
    uses_length = False

    @classmethod
    def validate(cls, cfg: dict, *, num_heads: int) -> None:
        super().validate(cfg, num_heads=num_heads)
        c = merge_defaults(cls.DEFAULTS, cfg, "model.logit_scale")
        per_head = _per_head(c["scale"], num_heads)
        require(
            all(v > 0 for v in per_head),
            "model.logit_scale.scale",
            f"must be > 0 (a multiplier of the logits), got {c['scale']!r}",
        )
        require(
            isinstance(c["learned"], bool),
            "model.logit_scale.learned",
            f"must be true or false, got {c['learned']!r}",
        )

    def __init__(self, cfg: dict, *, num_heads: int, rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, rngs=rngs)
        values = _per_head(cfg["scale"], num_heads)
        if cfg["learned"]:
            init = lambda key, shape, dtype: jnp.asarray(values, dtype)
            self.scale = param(rngs, init, (num_heads,), ("heads",))
        else:
            self.scale = values  # a tuple: static, no parameter

    def __call__(self, n_B1L1):
        value = self.scale if isinstance(self.scale, tuple) else self.scale[...]
        return jnp.asarray(value, jnp.float32)[None, :, None, None]


def _per_head(scale, num_heads: int) -> tuple[float, ...]:
    if isinstance(scale, int | float) and not isinstance(scale, bool):
        return (float(scale),) * num_heads
    try:
        values = tuple(float(v) for v in scale)
    except (TypeError, ValueError):
        values = ()
    require(
        len(values) == num_heads,
        "model.logit_scale.scale",
        f"one number or a list of num_heads={num_heads} numbers, got {scale!r}",
    )
    return values


LOGIT_SCALES = {cls.NAME: cls for cls in (NoLogitScale, LogNScale, SSMaxScale, TemperatureScale)}


def build_logit_scale(cfg, *, num_heads: int, rngs: nnx.Rngs) -> LogitScale | None:
    """The logit scale named cfg["name"], or None for "none" (the layer then skips it)."""
    cfg = as_dict(cfg or {"name": "none"})
    cls = lookup(LOGIT_SCALES, cfg.get("name", "none"), "model.logit_scale.name")
    cls.validate(cfg, num_heads=num_heads)
    if cls is NoLogitScale:
        return None
    merged = merge_defaults(cls.DEFAULTS, cfg, "model.logit_scale")
    return cls(merged, num_heads=num_heads, rngs=rngs)
