"""Base class of every positional encoding (PE), with its three hooks identity by default.

A PE acts through up to three hooks that attention layers call unconditionally
(README "Interfaces"):
- `embed(x_BLD, pos_BL) -> x_BLD` for absolute encodings added to the token embeddings;
- `rotate(q_BLHK, k_BSGK, qpos_BL, kpos_BS) -> (q, k)` for the rotary family;
- `bias(qpos_BL, kpos_BS, q_BLHK=None, k_BSGK=None) -> array broadcastable to BHLS, or None`
  for relative biases, in logit units added after the 1/sqrt(K) scaling. It receives
  positions, not indices; the attention layer wraps it into the per-block callable.

A relative bias that is a function of key - query position and a few per-head parameters
also declares that function through `kernel_bias() -> attn.kernels.KernelBias | None`
(default None), so that `impl="flash"` computes it inside the fused kernel from integer
positions instead of calling `bias`; the two must agree (tests/test_kernels.py checks it).

Positions may be int32 (identity, randomized samplers) or float32 (interpolated sampler);
every encoding accepts both. Parameters carry logical axis names experiments/mesh.py
("heads", "head_dim", ...) as `out_sharding` metadata; they are created with
`eager_sharding=False` so a PE builds with or without a mesh, and attn.sharding maps the
names to mesh axes when the model state is placed.

Each class's docstring names its paper. Class attributes:
- DEFAULTS: the encoding's own config fields (its config block is {"name": ..., **DEFAULTS}).
- supports_cross_attention: False when the hooks mean nothing between two different
  sequences (relative encodings); a cross-attention layer must then not apply this PE.
- needs_materialized_logits: True when `bias` needs every key of a row at once (CoPE), so
  the layer must use impl="reference" and pass the full position and q/k arrays.
- shift_invariant: True when adding one constant to all query and key positions leaves
  the attention logits unchanged (the relative encodings); the contract tests check it.
- per_layer: True when the paper gives every layer its own parameters (FoX's forget gate,
  DAPE's MLP): the models then build one instance per layer (attn.layers.Block's `own_pe`)
  instead of one shared by all layers. Such an encoding has no `embed` hook.

Data-dependent biases read the layer's keys through `bias`'s k argument (the hooks get no
other view of the layer input); FoX computes its forget gates from them.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from attn.kernels.bias import KernelBias
from attn.params import param  # noqa: F401  (the PEs import it from here)
from attn.registry import merge_defaults

# Position for KV-cache slots not yet written: after every real query, so that a causal
# encoding treats them as future keys (masked), and small enough that key - query positions
# neither overflow int32 nor make any bias non-finite. CoPE needs it: its gates sum over
# every "past" key.
UNWRITTEN_POSITION = 2**30


def relative_positions(qpos_BL: jax.Array, kpos_BS: jax.Array) -> jax.Array:
    """key - query position, BLS (T5's sign convention), in float32 for float positions."""
    return kpos_BS[:, None, :] - qpos_BL[:, :, None]


def lookup_rows(table_NX: jax.Array, idx: jax.Array) -> jax.Array:
    """table[idx] with rows clipped to the table; float indices interpolate linearly.

    Linear interpolation lets learned tables take the float positions of the
    "interpolated" sampler; for integer indices it is the plain lookup.
    """
    n = table_NX.shape[0]
    if jnp.issubdtype(idx.dtype, jnp.integer):
        return jnp.take(table_NX, jnp.clip(idx, 0, n - 1), axis=0)
    idx = jnp.clip(idx.astype(jnp.float32), 0, n - 1)
    lo = jnp.floor(idx)
    w = (idx - lo)[..., None]
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n - 1)
    return jnp.take(table_NX, lo, axis=0) * (1 - w) + jnp.take(table_NX, hi, axis=0) * w


def inverse_softplus(y):
    """x with softplus(x) = y > 0: the raw value of a parameter kept positive by softplus.

    Written as y + log(1 - exp(-y)), which stays finite for large y (log(expm1(y)) does not).
    """
    y = jnp.asarray(y, jnp.float32)
    return y + jnp.log(-jnp.expm1(-y))


def repeat_kv(k_BSGK: jax.Array, num_heads: int) -> jax.Array:
    """Expand G key heads to H query heads, contiguous groups (head h reads h // (H // G))."""
    return jnp.repeat(k_BSGK, num_heads // k_BSGK.shape[2], axis=2)


class PositionalEncoding(nnx.Module):
    """No-op positional encoding; subclasses override the hooks they need."""

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    supports_cross_attention: ClassVar[bool] = True
    needs_materialized_logits: ClassVar[bool] = False
    shift_invariant: ClassVar[bool] = False
    per_layer: ClassVar[bool] = False

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        d_model: int,
        num_heads: int,
        head_dim: int,
        causal: bool,
        rngs: nnx.Rngs,
    ):
        del rngs
        self.cfg = merge_defaults(self.DEFAULTS, cfg, "model.pe")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.causal = causal

    @classmethod
    def validate(
        cls, cfg: Mapping[str, Any], *, max_eval_position: int, num_heads: int, head_dim: int
    ) -> None:
        """Raise ConfigError for settings that cannot work; the base checks field names."""
        del max_eval_position, num_heads, head_dim
        merge_defaults(cls.DEFAULTS, cfg, "model.pe")

    def embed(self, x_BLD: jax.Array, pos_BL: jax.Array) -> jax.Array:
        del pos_BL
        return x_BLD

    def rotate(
        self, q_BLHK: jax.Array, k_BSGK: jax.Array, qpos_BL: jax.Array, kpos_BS: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        del qpos_BL, kpos_BS
        return q_BLHK, k_BSGK

    def bias(
        self,
        qpos_BL: jax.Array,
        kpos_BS: jax.Array,
        q_BLHK: jax.Array | None = None,
        k_BSGK: jax.Array | None = None,
    ) -> jax.Array | None:
        del qpos_BL, kpos_BS, q_BLHK, k_BSGK
        return None

    def kernel_bias(self) -> KernelBias | None:
        """`bias` as an in-kernel bias of key - query position (attn.kernels), or None."""
        return None
