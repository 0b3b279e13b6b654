"""NNX building blocks: multi-head attention (MHA/GQA/MQA, self/cross, KV cache), MLPs, blocks.

- Multi-head attention: Vaswani et al. 2017, "Attention Is All You Need"; grouped-query
  attention (GQA) Ainslie et al. 2023 and multi-query attention (MQA) Shazeer 2019 share each
  key/value head among H // G contiguous query heads.
- QK-norm (RMS-normalised queries and keys): Dehghani et al. 2023, "Scaling Vision
  Transformers to 22 Billion Parameters".
- Post-LN blocks `layer_norm(h + sublayer(h))` as Vaswani et al. and Deletang et al. 2023
  ("Neural Networks and the Chomsky Hierarchy"); pre-LN `h + sublayer(layer_norm(h))` as
  Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture").
- SwiGLU MLP: Shazeer 2020, "GLU Variants Improve Transformer".
- Cross attention carries no positional information by default, as in T5 (Raffel et al.
  2020); `cross_pe=True` applies the self-attention PE's hooks to it.

Every parameter carries logical axis names in its `out_sharding` metadata (with eager sharding
off, so modules build without a mesh: attn/params.py); experiments/mesh.py maps them onto a
device mesh.

Positional encodings are passed to the attention call, not owned by it, so one PE instance is
shared by every layer (T5 shares its relative bias across layers) and by the embedding hook.
The layer calls all three hooks unconditionally: `rotate` on q and k, `bias` wrapped into a
per-block callable that gathers positions by index (the chunked implementation never builds an
L x S bias), and the model calls `embed`.

KV cache: an explicit pytree per layer, `{"k": BSGK, "v": BSGK, "pos": BS, "length": B}`, with
S the fixed maximum length. `decode` writes the new keys at slots `length .. length + L - 1`
of each example (keys are stored rotated, with their positions, so `rotate` and `bias` see the
right key positions), attends causally over the slots written so far and advances `length` by
the number of valid new tokens. A right-padded prompt can therefore be prefilled in one call:
the padding slots are overwritten by the next tokens.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import attn.kernels
import attn.pe
import attn.positions
import attn.scoring
from attn.params import param
from attn.registry import ConfigError, as_dict, lookup, merge_defaults, require

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORM_PLACEMENTS = {"pre": False, "post": True}  # value: whether the norm follows the residual


def sub_config(registry, block, field: str) -> dict:
    """A registry block with the entry's DEFAULTS filled in under the user's values."""
    name = as_dict(block)["name"]
    cls = lookup(registry, name, f"{field}.name")
    return {"name": name, **merge_defaults(getattr(cls, "DEFAULTS", {}), block, field)}


SUB_REGISTRIES = {
    "pe": attn.pe.REGISTRY,
    "positions": attn.positions.REGISTRY,
    "scorer": attn.scoring.REGISTRY,
    "logit_scale": attn.scoring.LOGIT_SCALES,
    "normaliser": attn.scoring.NORMALISERS,
}


def resolve(model_cls, cfg) -> dict:
    """The model block restricted to model_cls's fields, DEFAULTS filled in (recursively)."""
    cfg = as_dict(cfg)
    out = {}
    for key, default in model_cls.DEFAULTS.items():
        value = cfg.get(key, default)
        if key in SUB_REGISTRIES:
            value = sub_config(SUB_REGISTRIES[key], value, f"model.{key}")
        elif isinstance(default, Mapping):
            value = {**default, **as_dict(value)}
        out[key] = value
    return out


def fan_in_init(fan_in: int):
    """Truncated normal with std 1/sqrt(fan_in) (LeCun; haiku's Linear default)."""
    std = 1.0 / math.sqrt(fan_in)
    # 0.8796 is the std of a standard normal truncated to [-2, 2].
    return lambda key, shape, dtype: (
        std / 0.87962566 * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)
    )


@jax.custom_vjp
def matmul(x_NI, w_IO):
    """x @ w whose weight gradient is einsum("ni,no->io"): XLA's CPU backend then transposes
    the thin input x instead of the wide output gradient (which a fused, transposed backward
    of the activation and dropout made ~5x slower than the matmul itself)."""
    return x_NI @ w_IO


def _matmul_fwd(x_NI, w_IO):
    return x_NI @ w_IO, (x_NI, w_IO)


def _matmul_bwd(residuals, dy_NO):
    x_NI, w_IO = residuals
    dx = jnp.einsum("no,io->ni", dy_NO, w_IO).astype(x_NI.dtype)
    dw = jnp.einsum("ni,no->io", x_NI, dy_NO).astype(w_IO.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nnx.Module):
    """x[..., *in_shape] -> [..., *out_shape] with a kernel of shape in_shape + out_shape."""

    def __init__(
        self, in_shape, out_shape, axes, *, rngs, use_bias=False, dtype=jnp.float32, init=None
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.num_in = len(in_shape)
        self.dtype = dtype
        init = init or fan_in_init(math.prod(in_shape))
        self.kernel = param(rngs, init, in_shape + out_shape, axes)
        self.bias = (
            param(rngs, nnx.initializers.zeros, out_shape, axes[self.num_in :])
            if use_bias
            else nnx.data(None)
        )

    def __call__(self, x):
        w = self.kernel[...].astype(self.dtype)
        n_in = math.prod(w.shape[: self.num_in])
        lead = x.shape[: x.ndim - self.num_in]
        y = matmul(x.astype(self.dtype).reshape(-1, n_in), w.reshape(n_in, -1))
        y = y.reshape(*lead, *w.shape[self.num_in :])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embedder(nnx.Module):
    """Token embedding (scaled by sqrt(d) if asked) and the output head, tied or not."""

    def __init__(self, cfg, *, vocab_size: int, rngs):
        d = cfg["d_model"]
        self.dtype = lookup(DTYPES, cfg["dtype"], "model.dtype")
        self.scale = math.sqrt(d) if cfg["embed_scale"] else 1.0
        self.table = param(
            rngs, nnx.initializers.normal(cfg["init_std"]), (vocab_size, d), ("vocab", "embed")
        )
        self.head = (
            nnx.data(None)
            if cfg["tied_embeddings"]
            else Dense((d,), (vocab_size,), ("embed", "vocab"), rngs=rngs, use_bias=True)
        )

    def embed(self, tokens_BT):
        return (jnp.take(self.table[...], tokens_BT, axis=0) * self.scale).astype(self.dtype)

    def logits(self, x_BTD):
        x = x_BTD.astype(jnp.float32)
        if self.head is None:
            return x @ self.table[...].T
        return self.head(x)


class LayerNorm(nnx.Module):
    """Layer normalisation (Ba et al. 2016), statistics in float32."""

    def __init__(self, dim: int, *, rngs, axis_name="embed", eps=1e-5, use_bias=True):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,))
        self.bias = (
            param(rngs, nnx.initializers.zeros, (dim,), (axis_name,))
            if use_bias
            else nnx.data(None)
        )

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMS normalisation (Zhang & Sennrich 2019), statistics in float32."""

    def __init__(self, dim: int, *, rngs, axis_name="embed", eps=1e-6):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def _mix32(x):
    """lowbias32 (C. Wellons, "hash-prospector", 2018): a bijective 32-bit integer hash with
    full avalanche; xor-shift / multiply only, so XLA vectorises it."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(key, shape) -> jax.Array:
    """uint32 bits for `shape` from a JAX key: a keyed hash of each element's flat index.

    Counter-based like Philox or Threefry (Salmon et al. 2011), but two rounds of a 32-bit
    mixer instead of 20 rounds of Threefry-2x32: for a fixed key the map index -> bits is a
    bijection, so no two elements of one call share their bits. Meant for dropout masks,
    where the model reads one comparison per element; `jax.random` stays the source of keys.
    """
    k0, k1 = jax.random.key_data(key).reshape(-1)[:2]
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _mix32(_mix32(index ^ k0) + k1)


DROPOUT_RNGS = ("hash", "threefry")


def check_dropout(cfg: Mapping[str, Any]) -> None:
    """ConfigError for a dropout rate outside [0, 1) or an unknown model.dropout_rng."""
    rate = cfg["dropout"]
    require(0.0 <= rate < 1.0, "model.dropout", f"must be in [0, 1), got {rate}")
    rng = cfg.get("dropout_rng", "hash")
    require(
        rng in DROPOUT_RNGS, "model.dropout_rng", f"{rng!r}; allowed: {', '.join(DROPOUT_RNGS)}"
    )


class Dropout(nnx.Dropout):
    """nnx.Dropout (same constructor, rng stream and scaling) with a cheap hashed mask.

    `rng="hash"` (default) draws the mask from `hash_bits` of the stream's next key: on the
    2-core CPU Threefry masks took about a third of a w1 training step (README "Performance").
    `rng="threefry"` is nnx.Dropout's `jax.random.bernoulli`, bit for bit.
    """

    def __init__(self, rate: float, *, rng: str = "hash", rngs: nnx.Rngs):
        check_dropout({"dropout": rate, "dropout_rng": rng})
        super().__init__(rate, rngs=rngs)
        self.rng = rng

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.rng == "threefry" or self.rate == 0.0 or deterministic:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        keep_prob = 1.0 - self.rate
        threshold = jnp.uint32(min(round(self.rate * 2.0**32), 2**32 - 1))
        keep = hash_bits(self.rngs(), inputs.shape) >= threshold
        return jax.lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))


# kind -> (activation, gated). Gated kinds multiply act(x W_gate) by x W_up (GLU family).
MLP_KINDS: dict[str, tuple[Callable, bool]] = {
    "relu": (jax.nn.relu, False),
    "gelu": (jax.nn.gelu, False),
    "swiglu": (jax.nn.silu, True),
}


class MLP(nnx.Module):
    """Position-wise feed-forward layer D -> F -> D (ReLU, GELU or SwiGLU)."""

    def __init__(
        self, kind: str, *, d_model, mlp_dim, dropout=0.0, dropout_rng="hash", dtype=jnp.float32,
        rngs,
    ):  # fmt: skip
        self.activation, gated = lookup(MLP_KINDS, kind, "model.mlp")
        self.up = Dense((d_model,), (mlp_dim,), ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.gate = (
            Dense((d_model,), (mlp_dim,), ("embed", "mlp"), rngs=rngs, dtype=dtype)
            if gated
            else nnx.data(None)
        )
        self.down = Dense((mlp_dim,), (d_model,), ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.dropout = Dropout(dropout, rng=dropout_rng, rngs=rngs)

    def __call__(self, x_BLD, *, train: bool):
        if self.gate is None:
            h_BLF = self.activation(self.up(x_BLD))
        else:
            h_BLF = self.activation(self.gate(x_BLD)) * self.up(x_BLD)
        return self.down(self.dropout(h_BLF, deterministic=not train))


def pe_class(cfg: Mapping[str, Any]):
    return lookup(attn.pe.REGISTRY, as_dict(cfg["pe"])["name"], "model.pe.name")


def _gather(x, idx):
    return None if x is None else jnp.take(x, idx, axis=1)


def _take_block(bias_BHLS, q_idx, k_idx):
    """Rows q_idx and columns k_idx of a bias broadcastable to BHLS (size-1 axes kept)."""
    if bias_BHLS.shape[2] != 1:
        bias_BHLS = jnp.take(bias_BHLS, q_idx, axis=2)
    if bias_BHLS.shape[3] != 1:
        bias_BHLS = jnp.take(bias_BHLS, k_idx, axis=3)
    return bias_BHLS


def positional_bias(pe, q, k, qpos, kpos, *, materialize: bool):
    """The PE's bias hook as attention's `bias` argument: None, a BHLS array or bias_fn.

    The hook is traced once on one row and one column to learn whether it returns None, so a
    PE without bias costs nothing; otherwise the callable gathers the block's positions (and
    q/k rows for content-dependent biases) by index; for an encoding that
    `needs_materialized_logits` it cuts its blocks from the full bias instead. A PE with a
    `kernel_bias` comes wrapped with it and the positions (attn.kernels.PositionalBias), which
    impl="flash" reads.
    """
    probe = jax.eval_shape(lambda: pe.bias(qpos[:, :1], kpos[:, :1], q[:, :1], k[:, :1]))
    if probe is None:
        return None
    if materialize or pe.needs_materialized_logits:
        full = pe.bias(qpos, kpos, q, k)
        if materialize:
            return full
        # A row of this bias depends on every key (CoPE, FoX, DAPE): blocks are cut from it.
        return lambda q_idx, k_idx: _take_block(full, q_idx, k_idx)

    def bias_fn(q_idx, k_idx):
        return pe.bias(
            _gather(qpos, q_idx), _gather(kpos, k_idx), _gather(q, q_idx), _gather(k, k_idx)
        )

    return attn.kernels.positional_bias(bias_fn, pe, qpos, kpos)


def _write(buffer_BS, new_BL, start_B):
    """Per-example dynamic_update_slice of new_BL... into buffer_BS... at row start_B."""

    def one(buf, new, start):
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=0)

    return jax.vmap(one)(buffer_BS, new_BL, start_B)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention over configurable scorers, PEs and attention implementations.

    cfg is the model block: num_heads, num_kv_heads, head_dim, qk_norm, window (0 = none),
    impl, dtype, pe {name}, scorer {name, ...}, cross_pe (cross attention only) and, when
    present, logit_scale {name, ...} (a per-row, per-head factor on the logits, computed from
    the number of keys each query row sees: attn.scoring) and normaliser {name, ...}.
    """

    def __init__(self, cfg: Mapping[str, Any], *, d_model: int, causal: bool, cross=False, rngs):
        H = cfg["num_heads"]
        G = cfg["num_kv_heads"] or H
        K = cfg["head_dim"] or d_model // H
        require(H % G == 0, "model.num_kv_heads", f"num_heads={H} is not a multiple of {G}")
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, K
        self.causal = causal
        self.cross = cross
        self.uses_pe = not cross or bool(cfg.get("cross_pe", False))
        pe_cls = pe_class(cfg)
        if cross and self.uses_pe and not pe_cls.supports_cross_attention:
            raise ConfigError(
                f"model.pe.name: {as_dict(cfg['pe'])['name']!r} does not support cross "
                "attention; set model.cross_pe=False (no PE in cross attention, the T5 "
                "convention) or pick a PE with supports_cross_attention"
            )
        self.window = cfg["window"] or None
        self.impl = cfg["impl"]
        dtype = lookup(DTYPES, cfg["dtype"], "model.dtype")
        self.q = Dense((d_model,), (H, K), ("embed", "heads", "head_dim"), rngs=rngs, dtype=dtype)
        self.k = Dense(
            (d_model,), (G, K), ("embed", "kv_heads", "head_dim"), rngs=rngs, dtype=dtype
        )
        self.v = Dense(
            (d_model,), (G, K), ("embed", "kv_heads", "head_dim"), rngs=rngs, dtype=dtype
        )
        self.o = Dense((H, K), (d_model,), ("heads", "head_dim", "embed"), rngs=rngs, dtype=dtype)
        if cfg["qk_norm"]:
            self.q_norm = RMSNorm(K, rngs=rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(K, rngs=rngs, axis_name="head_dim")
        else:
            self.q_norm = self.k_norm = nnx.data(None)
        self.scorer = attn.scoring.build(cfg["scorer"], num_heads=H, head_dim=K, rngs=rngs)
        self.logit_scale = attn.scoring.build_logit_scale(
            cfg.get("logit_scale"), num_heads=H, rngs=rngs
        )
        self.normaliser = attn.scoring.build_normaliser(cfg.get("normaliser"))

    def _project(self, x_q, x_kv):
        q, k, v = self.q(x_q), self.k(x_kv), self.v(x_kv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _attend(self, q, k, v, qpos, kpos, pe, *, mask, causal, window, return_weights):
        impl, bias = self.impl, None
        if self.uses_pe:
            materialize = bool(pe.needs_materialized_logits)
            if materialize:
                impl = "reference"
            bias = positional_bias(pe, q, k, qpos, kpos, materialize=materialize)
        res = self.scorer(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            causal=causal,
            window=window,
            impl=impl,
            return_weights=return_weights,
            **self._logit_options(q.shape[1], k.shape[1], mask, causal, window),
        )
        if return_weights:
            return self.o(res[0]), res[1]
        return self.o(res)

    def _logit_options(self, L, S, mask, causal, window) -> dict:
        """The scorer's logit_scale / normaliser arguments (none when both are defaults)."""
        kw = {}
        if self.logit_scale is not None:
            n = (
                attn.scoring.visible_keys(L, S, mask, causal, window)
                if self.logit_scale.uses_length
                else None
            )
            kw.update(logit_scale=self.logit_scale(n), scale_bias=self.logit_scale.scale_bias)
        if self.normaliser is not None:
            kw["normaliser"] = self.normaliser
        return kw

    def _rotate(self, pe, q, k, qpos, kpos):
        return pe.rotate(q, k, qpos, kpos) if self.uses_pe else (q, k)

    def __call__(
        self,
        x_BLD,
        *,
        pos_BL,
        pe,
        kv_BSD=None,
        kv_pos_BS=None,
        kv_mask_BS=None,
        return_weights: bool = False,
    ):
        """Full forward pass. Self attention when kv_BSD is None; kv_mask_BS pads keys.

        Returns y_BLD, or (y_BLD, weights_BHLS) with return_weights. Dropout is the caller's
        (the block's residual dropout).
        """
        if kv_BSD is None:
            kv_BSD, kv_pos_BS = x_BLD, pos_BL
        q, k, v = self._project(x_BLD, kv_BSD)
        q, k = self._rotate(pe, q, k, pos_BL, kv_pos_BS)
        mask = None if kv_mask_BS is None else kv_mask_BS[:, None, None, :]
        return self._attend(
            q,
            k,
            v,
            pos_BL,
            kv_pos_BS,
            pe,
            mask=mask,
            causal=self.causal,
            window=self.window,
            return_weights=return_weights,
        )

    def init_cache(self, batch_size: int, max_length: int, *, dtype, pos_dtype=jnp.int32):
        """An empty self-attention KV cache of max_length slots."""
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            # Unwritten slots sit after every query, so position-counting encodings (CoPE)
            # see them as future keys rather than as keys at position 0.
            "pos": jnp.full((batch_size, max_length), attn.pe.base.UNWRITTEN_POSITION, pos_dtype),
            "length": jnp.zeros((batch_size,), jnp.int32),
        }

    def decode(self, x_BLD, cache, *, pos_BL, pe, valid_BL=None):
        """Causal self attention of L new tokens over the cache; returns (y_BLD, new cache)."""
        require(self.causal and not self.cross, "model", "only causal self attention caches")
        L = x_BLD.shape[1]
        q, k, v = self._project(x_BLD, x_BLD)
        q, k = self._rotate(pe, q, k, pos_BL, pos_BL)
        start = cache["length"]
        k_all = _write(cache["k"], k, start)
        v_all = _write(cache["v"], v, start)
        kpos = _write(cache["pos"], pos_BL, start)
        slots_BL = start[:, None] + jnp.arange(L, dtype=jnp.int32)
        key_slots = jnp.arange(k_all.shape[1], dtype=jnp.int32)
        delta = slots_BL[:, :, None] - key_slots[None, None, :]
        allowed = delta >= 0
        if self.window is not None:
            allowed = allowed & (delta < self.window)
        y = self._attend(
            q,
            k_all,
            v_all,
            pos_BL,
            kpos,
            pe,
            mask=allowed[:, None],
            causal=False,
            window=None,
            return_weights=False,
        )
        new = L if valid_BL is None else jnp.sum(valid_BL, axis=1, dtype=jnp.int32)
        return y, {"k": k_all, "v": v_all, "pos": kpos, "length": start + new}

    def init_cross_cache(self, memory_BSD, *, pos_BS, mask_BS):
        """Keys and values of the encoder memory, computed once for all decoding steps."""
        _, k, v = self._project(memory_BSD[:, :1], memory_BSD)
        return {"k": k, "v": v, "pos": pos_BS, "mask": mask_BS}

    def decode_cross(self, x_BLD, cache, *, pos_BL, pe):
        """Cross attention of new decoder tokens over the cached memory (no causality)."""
        q = self.q(x_BLD)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k = cache["k"]
        q, k = self._rotate(pe, q, k, pos_BL, cache["pos"])
        return self._attend(
            q,
            k,
            cache["v"],
            pos_BL,
            cache["pos"],
            pe,
            mask=cache["mask"][:, None, None, :],
            causal=False,
            window=self.window,
            return_weights=False,
        )


class Block(nnx.Module):
    """Transformer block: self attention, optional cross attention, MLP; pre- or post-LN.

    Post-LN is `layer_norm(h + dropout(sublayer(h)))` (Deletang et al.); pre-LN is
    `h + dropout(sublayer(layer_norm(h)))` and needs a final norm in the model.

    With `own_pe` the block builds its own encoding from cfg["pe"] (causal as the block) and
    uses it instead of the `pe` it is called with: a per-layer pattern (model.layers) or an
    encoding with per-layer parameters (`per_layer`, e.g. FoX's forget gate). The shared `pe`
    still carries the model's embedding hook.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        d_model: int,
        causal: bool,
        cross=False,
        rngs,
        own_pe: bool = False,
    ):
        self.post = lookup(NORM_PLACEMENTS, cfg["norm"], "model.norm")
        H = cfg["num_heads"]
        self.layer_pe = (
            attn.pe.build(
                cfg["pe"],
                d_model=d_model,
                num_heads=H,
                head_dim=cfg["head_dim"] or d_model // H,
                causal=causal,
                rngs=rngs,
            )
            if own_pe
            else nnx.data(None)
        )
        dtype = lookup(DTYPES, cfg["dtype"], "model.dtype")
        self.attn = MultiHeadAttention(cfg, d_model=d_model, causal=causal, rngs=rngs)
        self.attn_norm = LayerNorm(d_model, rngs=rngs)
        if cross:
            self.cross = MultiHeadAttention(
                cfg, d_model=d_model, causal=False, cross=True, rngs=rngs
            )
            self.cross_norm = LayerNorm(d_model, rngs=rngs)
        else:
            self.cross = self.cross_norm = nnx.data(None)
        self.mlp = MLP(
            cfg["mlp"],
            d_model=d_model,
            mlp_dim=cfg["mlp_dim"],
            dropout=cfg["dropout"],
            dropout_rng=cfg["dropout_rng"],
            dtype=dtype,
            rngs=rngs,
        )
        self.mlp_norm = LayerNorm(d_model, rngs=rngs)
        self.dropout = Dropout(cfg["dropout"], rng=cfg["dropout_rng"], rngs=rngs)

    def _residual(self, x_BLD, norm, fn, train):
        """Apply fn as a residual sublayer; fn may return (y, aux)."""
        out = fn(x_BLD if self.post else norm(x_BLD))
        y_BLD, aux = out if isinstance(out, tuple) else (out, None)
        h_BLD = x_BLD + self.dropout(y_BLD, deterministic=not train)
        return (norm(h_BLD) if self.post else h_BLD), aux

    def __call__(
        self, x_BLD, *, pos_BL, mask_BL, pe, memory=None, train: bool, return_weights=False
    ):
        """mask_BL: the key padding mask; memory: dict(x=BSD, pos=BS, mask=BS) for cross
        attention."""
        pe = pe if self.layer_pe is None else self.layer_pe
        x_BLD, weights = self._residual(
            x_BLD,
            self.attn_norm,
            lambda h_BLD: self.attn(
                h_BLD, pos_BL=pos_BL, pe=pe, kv_mask_BS=mask_BL, return_weights=return_weights
            ),
            train,
        )
        if self.cross is not None:
            x_BLD, _ = self._residual(
                x_BLD,
                self.cross_norm,
                lambda h_BLD: self.cross(
                    h_BLD,
                    pos_BL=pos_BL,
                    pe=pe,
                    kv_BSD=memory["x"],
                    kv_pos_BS=memory["pos"],
                    kv_mask_BS=memory["mask"],
                ),
                train,
            )
        mlp = lambda h_BLD: self.mlp(h_BLD, train=train)
        x_BLD, _ = self._residual(x_BLD, self.mlp_norm, mlp, train)
        return x_BLD, weights

    def decode(self, x_BLD, cache, *, pos_BL, pe, valid_BL=None):
        """One decoding call on the layer cache {"self": ..., "cross": ...}."""
        pe = pe if self.layer_pe is None else self.layer_pe
        new_cache = dict(cache)

        def self_attn(h_BLD):
            y_BLD, new_cache["self"] = self.attn.decode(
                h_BLD, cache["self"], pos_BL=pos_BL, pe=pe, valid_BL=valid_BL
            )
            return y_BLD

        x_BLD, _ = self._residual(x_BLD, self.attn_norm, self_attn, False)
        if self.cross is not None:
            x_BLD, _ = self._residual(
                x_BLD,
                self.cross_norm,
                lambda h_BLD: self.cross.decode_cross(h_BLD, cache["cross"], pos_BL=pos_BL, pe=pe),
                False,
            )
        mlp = lambda h_BLD: self.mlp(h_BLD, train=False)
        x_BLD, _ = self._residual(x_BLD, self.mlp_norm, mlp, False)
        return x_BLD, new_cache
