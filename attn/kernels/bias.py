"""Positional biases that the flash kernel computes in-kernel from integer positions.

A `KernelBias` names one bias family and holds its per-head parameters; the bias of query
position p_i and key position p_j is a function of d = p_j - p_i (T5's sign convention) and
of those parameters only, so the kernel builds each block's bias from the block's positions
and never holds an L x S array. Families:

- "alibi" (Press et al. 2022): slope_h * (-|d| + offset * [d < 0]); `offset` is the
  bidirectional variant's left/right tie-break (attn.pe.alibi), 0 for causal models.
- "kerple_log" / "kerple_power" (Chi et al. 2022): -r1_h log(1 + r2_h |d|) and -r1_h |d|^r2_h
  (0 at d = 0), with (r1, r2) already constrained by the encoding.
- "table": values_h[segment(clip(d, -D, D))] for a table over the clipped distances -D..D
  that is constant on contiguous runs ("segments"): any shift-invariant bias that saturates
  past a maximum distance. A plain per-distance table has one segment per distance; T5's
  buckets (Raffel et al. 2020) are runs of equal bucket index, so T5 keeps one value per
  bucket and its learned table gets its gradient through the gather that builds `values`.

`params` is the differentiable part (float32, heads first); everything else is static and
travels as pytree metadata. `evaluate` is the same bias in plain JAX on BLS distances, the
statement of what the kernel computes (tests compare it with each encoding's `bias`).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("alibi", "kerple_log", "kerple_power", "table")


def functional_bias(kind: str, rel, params, *, offset: float = 0.0):
    """The bias of the closed-form families at distances rel (int) for parameters `params`
    (a sequence of arrays broadcastable against rel): float32, rel's broadcast shape."""
    d = jnp.abs(rel).astype(jnp.float32)
    if kind == "alibi":
        (slope,) = params
        out = -d
        if offset:
            out = out + offset * (rel < 0).astype(jnp.float32)
        return slope * out
    r1, r2 = params
    if kind == "kerple_log":
        return -r1 * jnp.log1p(r2 * d)
    if kind == "kerple_power":
        # 0^r2 = 0 with a finite gradient in r2 there.
        safe = jnp.where(d > 0, d, 1.0)
        return -r1 * jnp.where(d > 0, safe**r2, 0.0)
    raise ValueError(f"functional_bias: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")


NUM_PARAMS = {"alibi": 1, "kerple_log": 2, "kerple_power": 2}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelBias:
    """One in-kernel bias: kind, per-head parameters (H, P) and static layout.

    For "table", `starts` are the first clipped distance of each segment (sorted, starting
    at -max_distance) and params[h, s] is segment s's value; distances are clipped to
    [-max_distance, max_distance]. `offset` is ALiBi's bidirectional tie-break.
    """

    params: jax.Array
    kind: str = dataclasses.field(metadata=dict(static=True))
    starts: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    max_distance: int = dataclasses.field(default=0, metadata=dict(static=True))
    offset: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"KernelBias: unknown kind {self.kind!r}; allowed: {KINDS}")

    @property
    def num_heads(self) -> int:
        return self.params.shape[0]

    def segment_of_distance(self) -> np.ndarray:
        """int32 (2D + 1,): the segment of each clipped distance -D..D ("table" only)."""
        d = np.arange(-self.max_distance, self.max_distance + 1)
        return (np.searchsorted(np.asarray(self.starts), d, side="right") - 1).astype(np.int32)

    def evaluate(self, rel_BLS) -> jax.Array:
        """float32 B H L S bias for integer distances rel = key position - query position."""
        rel = jnp.asarray(rel_BLS)[:, None]
        params = jnp.asarray(self.params, jnp.float32)
        if self.kind == "table":
            D = self.max_distance
            seg = jnp.asarray(self.segment_of_distance())[jnp.clip(rel, -D, D) + D]
            return jnp.take_along_axis(params[None, :, None, None, :], seg[..., None], -1)[..., 0]
        cols = [params[:, n][None, :, None, None] for n in range(params.shape[1])]
        return functional_bias(self.kind, rel, cols, offset=self.offset)


def alibi(slopes_H, *, causal: bool, lower_offset: float = 0.0) -> KernelBias:
    """ALiBi with fixed slopes; the offset applies to bidirectional models only."""
    slopes_H = jnp.asarray(slopes_H, jnp.float32)
    return KernelBias(
        slopes_H[:, None], kind="alibi", offset=0.0 if causal else float(lower_offset)
    )


def kerple(variant: str, r1_H, r2_H) -> KernelBias:
    """KERPLE "log" or "power" with constrained per-head (r1, r2)."""
    params = jnp.stack([jnp.asarray(r1_H, jnp.float32), jnp.asarray(r2_H, jnp.float32)], -1)
    return KernelBias(params, kind=f"kerple_{variant}")


def table(values_HN, max_distance: int) -> KernelBias:
    """Per-distance table over d = -D..D (N = 2D + 1); distances past D use the end values."""
    values_HN = jnp.asarray(values_HN, jnp.float32)
    if values_HN.shape[1] != 2 * max_distance + 1:
        raise ValueError(
            f"table: values must be (H, 2 * max_distance + 1) = (H, {2 * max_distance + 1}), "
            f"got {values_HN.shape}"
        )
    return KernelBias(
        values_HN,
        kind="table",
        starts=tuple(range(-max_distance, max_distance + 1)),
        max_distance=max_distance,
    )


def bucketed_table(values_HB, bucket_of_distance, max_distance: int) -> KernelBias:
    """A table whose distance -D..D maps to bucket `bucket_of_distance[d + D]` (a static
    int array) with per-head values_HB[:, bucket]: one segment per run of equal bucket."""
    buckets = np.asarray(bucket_of_distance)
    if buckets.shape != (2 * max_distance + 1,):
        raise ValueError(
            f"bucketed_table: bucket_of_distance must have 2 * max_distance + 1 = "
            f"{2 * max_distance + 1} entries, got shape {buckets.shape}"
        )
    first = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    values = jnp.take(jnp.asarray(values_HB, jnp.float32), jnp.asarray(buckets[first]), axis=1)
    starts = tuple(int(s) - max_distance for s in first)
    return KernelBias(values, kind="table", starts=starts, max_distance=max_distance)


# eq=False: hashed by identity like the closure it wraps (jax.closure_convert caches on it,
# and its fields may be tracers).
@dataclasses.dataclass(frozen=True, eq=False)
class PositionalBias:
    """A positional encoding's bias as attention's `bias` argument.

    Called as `bias(q_idx, k_idx)` it is the per-block bias callable of the chunked and
    materialising implementations (`fn`); `impl="flash"` instead reads `kernel` and the
    positions `qpos_BL` / `kpos_BS` and computes the bias inside the kernel.
    """

    fn: Callable
    kernel: KernelBias
    qpos_BL: jax.Array
    kpos_BS: jax.Array

    def __call__(self, q_idx, k_idx):
        return self.fn(q_idx, k_idx)


def positional_bias(bias_fn: Callable, pe, qpos_BL, kpos_BS):
    """`bias_fn` wrapped with the encoding's kernel bias when it declares one, else as is."""
    kernel = pe.kernel_bias()
    if kernel is None:
        return bias_fn
    return PositionalBias(bias_fn, kernel, qpos_BL, kpos_BS)
