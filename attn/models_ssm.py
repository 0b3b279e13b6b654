"""Diagonal state-space model (S4D), registered in attn.models as `ssm`.

Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space Models"
(S4D). Per channel, a diagonal linear recurrence x_t = Abar x_{t-1} + Bbar u_t,
y_t = Re(C x_t) + D u_t with zero-order-hold discretisation Abar = exp(dt A),
Bbar = (exp(dt A) - 1) / A (B = 1, folded into C). A is complex (S4D-Lin init:
-1/2 + i pi n, with the conjugate pair counted by a factor 2) or real (S4D-Real: -(n + 1)).

Training uses the convolution view y = K * u with K_l = Re(C Bbar Abar^l), computed with an
FFT of length 2L; generation uses the recurrence, one step per token. The two agree (tested).
Layers are SSM -> GELU -> linear, then an MLP, each as a residual sublayer with pre- or
post-LN. Causal by default (decoder layout); `ssm.bidirectional=True` adds a second kernel run
right-to-left for the encoder layout (padding is zeroed, so it never leaks into real tokens).
The SSM takes no positional encoding: its recurrence already knows the order.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn import layers
from attn.params import param
from attn.registry import ConfigError, lookup, require

SSM_DEFAULTS = {
    "num_layers": 2,
    "d_model": 64,
    "mlp_dim": 256,
    "mlp": "gelu",
    "norm": "pre",
    "dropout": 0.0,
    "dropout_rng": "hash",  # dropout masks: "hash" (fast) or "threefry" (nnx.Dropout)
    "tied_embeddings": False,
    "embed_scale": False,
    "init_std": 0.02,
    "dtype": "float32",
    "pe": {"name": "none"},
    "ssm": {
        "state": 32,
        "complex": True,
        "dt_min": 1e-3,
        "dt_max": 1e-1,
        "bidirectional": False,
    },
}


class DiagonalSSM(nnx.Module):
    """One S4D kernel: D independent channels with N-dimensional diagonal state each."""

    def __init__(self, d_model: int, cfg, *, rngs):
        N = cfg["state"]
        self.complex = bool(cfg["complex"])
        lo, hi = math.log(cfg["dt_min"]), math.log(cfg["dt_max"])
        self.log_dt = param(
            rngs,
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, lo, hi),
            (d_model,),
            ("embed",),
        )
        n = jnp.arange(N, dtype=jnp.float32)
        if self.complex:
            re, im = jnp.full((N,), math.log(0.5)), math.pi * n
        else:
            re, im = jnp.log(n + 1.0), jnp.zeros((N,))
        self.log_neg_a_re = param(
            rngs, lambda *_: jnp.tile(re, (d_model, 1)), (d_model, N), ("embed", "state")
        )
        self.a_im = nnx.Param(
            jnp.tile(im, (d_model, 1)), out_sharding=("embed", "state"), eager_sharding=False
        )
        c_std = math.sqrt(0.5) if self.complex else 1.0
        self.c = param(
            rngs, nnx.initializers.normal(c_std), (d_model, N, 2), ("embed", "state", None)
        )
        self.d = param(rngs, nnx.initializers.ones, (d_model,), ("embed",))

    def discretize(self):
        """(dt A, C Bbar) as complex64 DN arrays, the output scale folded into C Bbar."""
        a = -jnp.exp(self.log_neg_a_re[...]) + 1j * self.a_im[...] * self.complex
        dt_a = jnp.exp(self.log_dt[...])[:, None] * a
        a_bar = jnp.exp(dt_a)
        b_bar = (a_bar - 1.0) / a
        c = self.c[...][..., 0] + 1j * self.c[...][..., 1] * self.complex
        # The complex spectrum stands for conjugate pairs: Re(sum over both) = 2 Re(one).
        return dt_a, (2.0 if self.complex else 1.0) * c * b_bar

    def kernel(self, length: int):
        """K_DL = Re(C Bbar Abar^l), l = 0..length-1."""
        dt_a, cb = self.discretize()
        powers = jnp.exp(dt_a[..., None] * jnp.arange(length))
        return jnp.real(jnp.einsum("DN,DNL->DL", cb, powers))

    def __call__(self, u_BLD):
        """Convolution view (training)."""
        L = u_BLD.shape[1]
        u = jnp.swapaxes(u_BLD.astype(jnp.float32), 1, 2)
        k = self.kernel(L)
        y = jnp.fft.irfft(jnp.fft.rfft(u, n=2 * L) * jnp.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        return jnp.swapaxes(y, 1, 2) + u_BLD.astype(jnp.float32) * self.d[...]

    def init_state(self, batch_size: int):
        return jnp.zeros((batch_size, *self.c.shape[:2]), jnp.complex64)

    def step(self, state_BDN, u_BD):
        """Recurrence view: one token; returns (new state, y_BD)."""
        dt_a, cb = self.discretize()
        state = jnp.exp(dt_a) * state_BDN + u_BD.astype(jnp.float32)[..., None]
        y = jnp.real(jnp.sum(cb * state, axis=-1)) + u_BD.astype(jnp.float32) * self.d[...]
        return state, y

    def recurrent(self, u_BLD, state_BDN=None, valid_BL=None):
        """Recurrence view over a sequence; the state only advances on valid tokens."""
        B, L, _ = u_BLD.shape
        state = self.init_state(B) if state_BDN is None else state_BDN
        valid = jnp.ones((B, L), bool) if valid_BL is None else valid_BL

        def body(state, inputs):
            u_t, v_t = inputs
            new, y = self.step(state, u_t)
            return jnp.where(v_t[:, None, None], new, state), y

        state, ys = jax.lax.scan(body, state, (jnp.swapaxes(u_BLD, 0, 1), valid.T))
        return jnp.swapaxes(ys, 0, 1), state


class SSMBlock(nnx.Module):
    """SSM (+ optional reverse SSM) -> GELU -> linear, then an MLP; residual, pre/post-LN."""

    def __init__(self, cfg, *, rngs):
        d = cfg["d_model"]
        self.post = lookup(layers.NORM_PLACEMENTS, cfg["norm"], "model.norm")
        dtype = lookup(layers.DTYPES, cfg["dtype"], "model.dtype")
        self.ssm = DiagonalSSM(d, cfg["ssm"], rngs=rngs)
        self.reverse = (
            DiagonalSSM(d, cfg["ssm"], rngs=rngs) if cfg["ssm"]["bidirectional"] else nnx.data(None)
        )
        self.proj = layers.Dense((d,), (d,), ("embed", None), rngs=rngs, dtype=dtype, use_bias=True)
        self.ssm_norm = layers.LayerNorm(d, rngs=rngs)
        self.mlp = layers.MLP(
            cfg["mlp"],
            d_model=d,
            mlp_dim=cfg["mlp_dim"],
            dropout=cfg["dropout"],
            dropout_rng=cfg["dropout_rng"],
            dtype=dtype,
            rngs=rngs,
        )
        self.mlp_norm = layers.LayerNorm(d, rngs=rngs)
        self.dropout = layers.Dropout(cfg["dropout"], rng=cfg["dropout_rng"], rngs=rngs)

    def _residual(self, x, norm, fn, train):
        h = x + self.dropout(fn(x if self.post else norm(x)), deterministic=not train)
        return norm(h) if self.post else h

    def _mix(self, y, x):
        return self.proj(jax.nn.gelu(y).astype(x.dtype))

    def __call__(self, x, *, mask, train):
        def mix(h):
            h = jnp.where(mask[..., None], h, 0)
            y = self.ssm(h)
            if self.reverse is not None:
                y = y + jnp.flip(self.reverse(jnp.flip(h, 1)), 1)
            return self._mix(y, h)

        x = self._residual(x, self.ssm_norm, mix, train)
        return self._residual(x, self.mlp_norm, lambda h: self.mlp(h, train=train), train)

    def decode(self, x, state, *, valid):
        out = {}

        def mix(h):
            y, out["state"] = self.ssm.recurrent(h, state, valid)
            return self._mix(y, h)

        x = self._residual(x, self.ssm_norm, mix, False)
        x = self._residual(x, self.mlp_norm, lambda h: self.mlp(h, train=False), False)
        return x, out["state"]


def validate_ssm(cfg, *, max_length=None) -> None:
    if cfg["pe"]["name"] != "none":
        raise ConfigError(
            f"model.pe.name: the ssm model takes no positional encoding (its recurrence orders "
            f"the tokens), got {cfg['pe']['name']!r}; use 'none'"
        )
    lookup(layers.NORM_PLACEMENTS, cfg["norm"], "model.norm")
    lookup(layers.MLP_KINDS, cfg["mlp"], "model.mlp")
    lookup(layers.DTYPES, cfg["dtype"], "model.dtype")
    layers.check_dropout(cfg)
    s = cfg["ssm"]
    require(s["state"] >= 1, "model.ssm.state", f"must be >= 1, got {s['state']}")
    require(
        0 < s["dt_min"] <= s["dt_max"],
        "model.ssm.dt_min",
        f"need 0 < dt_min <= dt_max, got {s['dt_min']}, {s['dt_max']}",
    )


class SSM(nnx.Module):
    """Stack of diagonal SSM blocks; a causal LM (decoder layout) or bidirectional encoder."""

    FORMAT = "decoder"
    DEFAULTS = SSM_DEFAULTS
    validate_config = staticmethod(validate_ssm)

    @classmethod
    def layout(cls, cfg=None) -> str:
        return "encoder" if cfg is not None and cfg["ssm"]["bidirectional"] else cls.FORMAT

    def __init__(self, cfg, *, vocab_size: int, rngs: nnx.Rngs):
        cfg = layers.resolve(type(self), cfg)
        validate_ssm(cfg)
        self.cfg = cfg
        self.embedder = layers.Embedder(cfg, vocab_size=vocab_size, rngs=rngs)
        self.dropout = layers.Dropout(cfg["dropout"], rng=cfg["dropout_rng"], rngs=rngs)
        self.blocks = nnx.List([SSMBlock(cfg, rngs=rngs) for _ in range(cfg["num_layers"])])
        self.final_norm = (
            nnx.data(None)
            if layers.NORM_PLACEMENTS[cfg["norm"]]
            else layers.LayerNorm(cfg["d_model"], rngs=rngs)
        )

    def _finish(self, x):
        return self.embedder.logits(x if self.final_norm is None else self.final_norm(x))

    def __call__(self, batch, *, train: bool, return_attention=()):
        require(not return_attention, "return_attention", "the ssm model has no attention maps")
        tokens = batch["inputs"]
        mask = batch.get("token_mask")
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
        x = self.dropout(self.embedder.embed(tokens), deterministic=not train)
        for block in self.blocks:
            x = block(x, mask=mask, train=train)
        return self._finish(x)

    def init_cache(self, batch_size: int, max_length: int):
        del max_length  # the state has a fixed size
        require(
            not self.cfg["ssm"]["bidirectional"],
            "model.ssm.bidirectional",
            "a bidirectional SSM cannot decode step by step",
        )
        return [
            {"state": b.ssm.init_state(batch_size), "length": jnp.zeros((batch_size,), jnp.int32)}
            for b in self.blocks
        ]

    def decode(self, tokens_BL, cache, *, pos_BL=None, valid_BL=None):
        """Recurrence view over L new tokens; pos_BL is ignored (no PE)."""
        del pos_BL
        valid = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
        x = self.embedder.embed(tokens_BL)
        new = []
        for block, c in zip(self.blocks, cache, strict=True):
            x, state = block.decode(x, c["state"], valid=valid)
            new.append({"state": state, "length": c["length"] + jnp.sum(valid, 1, dtype=jnp.int32)})
        return self._finish(x), new
