"""Flash attention in Pallas with the positional bias computed inside the kernel.

FlashAttention-2 (Dao 2023; Dao et al. 2022): each program owns one block of queries, streams
the key blocks that its mask leaves visible and keeps an online softmax (running max, sum and
output, all float32); the backward recomputes each block's probabilities from the saved
logsumexp in two kernels, one per query block for dq (and the bias-parameter gradient) and
one per key block for dk and dv. Nothing of size L x S is ever stored.

What the kernel computes (the contract of attn.attention, README "Interfaces"):
- GQA: query head h reads kv head h // (H // G). dk/dv are produced per query head and
  summed over each group outside the kernel (simple and the same on every backend; it costs
  H / G times the dk/dv memory for the duration of the backward).
- Masks by index, bottom-right aligned: query i is position S - L + i among the keys; causal
  keeps keys j <= S - L + i; a window w keeps |S - L + i - j| < w (with causal: the past
  only). Key padding is per-row lengths (right padding): key j is real iff j < kv_lengths[b].
  Key blocks that these masks hide entirely are never visited (loop bounds, both passes).
- A fully masked row returns zeros, not NaN: masked logits are MASK_VALUE (finite), and a row
  whose running max never left MASK_VALUE is written as 0 with logsumexp 0.
- Bias: `attn.kernels.bias.KernelBias` evaluated on d = kpos - qpos from per-row integer
  positions (B, L) and (B, S) that are blocked with the queries and keys, so positions need
  not be 0..L-1 (randomized sampler, KV-cache slots). The "table" kind runs a select over the
  table's segments, restricted per block to the segments its distance range can reach
  (computed outside from per-block position minima and maxima): a block far from the
  diagonal of a clipped table sees a single segment. Parameter gradients are the kernel's
  dS summed per segment (tables) or contracted with dbias/dparam (closed forms), per query
  block, then summed outside.

Backends, chosen by `platform` (default: JAX's default backend):
- "gpu": Triton. Blocks of 128 queries x 64 keys (16-aligned powers of two); the head dim is
  zero-padded to a power of two >= 16 (tl.dot's minimum).
- "tpu": Mosaic. Blocks of 128 x 128 (lane-aligned; a sequence that fits one block uses one
  block of its 8-aligned length); per-head parameters, lengths and table metadata live in
  SMEM. The whole key/value sequence of one kv head is resident in VMEM for the inner loop,
  so very long sequences may need a larger `vmem_limit_bytes`.
- "cpu": the same kernels in Pallas' interpret mode (tests; far slower than "chunked").
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attn.attention import MASK_VALUE, default_scale
from attn.kernels.bias import NUM_PARAMS, KernelBias, PositionalBias, functional_bias

PLATFORMS = ("cpu", "gpu", "tpu")
# (block_q, block_k) per platform: Triton wants powers of two (>= 16 for tl.dot), Mosaic
# 8-aligned query blocks and 128-aligned key blocks (the key positions are a lane row).
DEFAULT_BLOCKS = {"gpu": (128, 64), "tpu": (128, 128), "cpu": (128, 128)}


def _platform(platform: str | None) -> str:
    platform = jax.default_backend() if platform is None else platform
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if platform not in PLATFORMS:
        raise ValueError(f"flash_attention: unknown platform {platform!r}; allowed: {PLATFORMS}")
    return platform


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _blocks(platform: str, n: int, block: int) -> int:
    """The block size along a length-n axis: `block`, or one block covering n when n fits."""
    align = {"gpu": 16, "tpu": 8, "cpu": 1}[platform]
    if n <= block:
        one = _round_up(n, align)
        return pl.next_power_of_2(one) if platform == "gpu" else one
    return block


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call: sizes, blocks, masks, bias layout, metadata offsets."""

    platform: str
    B: int
    H: int
    G: int
    L: int
    S: int
    bq: int
    bk: int
    scale: float
    causal: bool
    window: int | None
    kind: str | None
    offset: float
    num_params: int  # per head, in the float metadata
    padded_params: int  # lanes of the parameter-gradient row
    max_distance: int
    num_segments: int

    @property
    def nq(self) -> int:
        return -(-self.L // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.S // self.bk)

    @property
    def Lp(self) -> int:
        return self.nq * self.bq

    @property
    def Sp(self) -> int:
        return self.nk * self.bk

    # Offsets into the int32 metadata: lengths, then (table only) per-block position ranges,
    # segment starts (+ one sentinel) and the segment of each clipped distance.
    @property
    def off_qmin(self) -> int:
        return self.B

    @property
    def off_qmax(self) -> int:
        return self.off_qmin + self.B * self.nq

    @property
    def off_kmin(self) -> int:
        return self.off_qmax + self.B * self.nq

    @property
    def off_kmax(self) -> int:
        return self.off_kmin + self.B * self.nk

    @property
    def off_starts(self) -> int:
        return self.off_kmax + self.B * self.nk

    @property
    def off_segment(self) -> int:
        return self.off_starts + self.num_segments + 1

    def key_blocks(self, i, length):
        """[first, last) key blocks that query block i can see (causal, window, padding)."""
        first = self.S - self.L + i * self.bq
        last = self.S - self.L + jnp.minimum(i * self.bq + self.bq, self.L) - 1
        hi = length
        if self.causal:
            hi = jnp.minimum(hi, last + 1)
        elif self.window is not None:
            hi = jnp.minimum(hi, last + self.window)
        lo = 0 if self.window is None else jnp.maximum(first - self.window + 1, 0)
        j_lo = lax.div(lo, self.bk) if self.window is not None else 0
        j_hi = lax.div(jnp.maximum(hi, 0) + self.bk - 1, self.bk)
        return j_lo, jnp.where(hi > lo, j_hi, j_lo)

    def query_blocks(self, j, length):
        """[first, last) query blocks that can see some key of key block j."""
        offset = self.S - self.L
        k_first = j * self.bk
        k_last = jnp.minimum(k_first + self.bk, length) - 1
        lo, hi = 0, self.L
        if self.causal:
            lo = jnp.maximum(k_first - offset, 0)
        if self.window is not None:
            hi = jnp.minimum(k_last + self.window - offset, self.L)
            if not self.causal:
                lo = jnp.maximum(k_first - self.window + 1 - offset, 0)
        i_lo = lax.div(lo, self.bq) if (self.causal or self.window is not None) else 0
        i_hi = lax.div(jnp.maximum(hi, 0) + self.bq - 1, self.bq)
        return i_lo, jnp.where((hi > lo) & (k_first < length), i_hi, i_lo)

    def allowed(self, i, j, length):
        """bool (bq, bk): the causal/window/padding mask of block (i, j), by index."""
        shape = (self.bq, self.bk)
        q_idx = i * self.bq + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_idx = j * self.bk + lax.broadcasted_iota(jnp.int32, shape, 1)
        ok = k_idx < length
        rel = q_idx + (self.S - self.L) - k_idx
        if self.causal:
            ok &= rel >= 0
        if self.window is not None:
            ok &= rel < self.window
            if not self.causal:
                ok &= rel > -self.window
        return ok


def _dot(a, b, contract):
    """float32 a . b contracting axes `contract` = (axis of a, axis of b), no batch axes."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------ in-kernel bias


def _segment_range(c: _Config, ints, b, i, j):
    """First and last table segment that distances of block (i, j) of row b can reach."""
    D = c.max_distance
    qmin = ints[0, c.off_qmin + b * c.nq + i]
    qmax = ints[0, c.off_qmax + b * c.nq + i]
    kmin = ints[0, c.off_kmin + b * c.nk + j]
    kmax = ints[0, c.off_kmax + b * c.nk + j]
    lo = jnp.clip(kmin - qmax, -D, D) + D
    hi = jnp.clip(kmax - qmin, -D, D) + D
    return ints[0, c.off_segment + lo], ints[0, c.off_segment + hi]


def _params(c: _Config, params, h):
    return [params[0, h * c.num_params + n] for n in range(c.num_params)]


def _bias(c: _Config, ints, params, rel, b, h, i, j):
    """float32 (bq, bk) bias of block (i, j) of head h, or None."""
    if c.kind is None:
        return None
    if c.kind != "table":
        return functional_bias(c.kind, rel, _params(c, params, h), offset=c.offset)
    D = c.max_distance
    dist = jnp.clip(rel, -D, D)
    s_lo, s_hi = _segment_range(c, ints, b, i, j)
    base = h * c.num_segments

    def segment(s, acc):
        # Segments are sorted, so a later one overrides where its start is reached.
        return jnp.where(dist >= ints[0, c.off_starts + s], params[0, base + s], acc)

    init = jnp.full(rel.shape, params[0, base + s_lo], jnp.float32)
    return lax.fori_loop(s_lo + 1, s_hi + 1, segment, init)


def _bias_grad(c: _Config, ints, params, rel, ds, b, h, i, j, acc):
    """acc (1, padded_params) + this block's d loss / d params of head h."""
    lanes = lax.broadcasted_iota(jnp.int32, acc.shape, 1)
    if c.kind != "table":
        values = [jnp.full((1, 1), p, jnp.float32) for p in _params(c, params, h)]
        _, vjp = jax.vjp(lambda *p: functional_bias(c.kind, rel, p, offset=c.offset), *values)
        for n, g in enumerate(vjp(ds)):
            acc = acc + jnp.where(lanes == n, g, 0.0)
        return acc
    D = c.max_distance
    dist = jnp.clip(rel, -D, D)
    s_lo, s_hi = _segment_range(c, ints, b, i, j)

    def segment(s, acc):
        inside = (dist >= ints[0, c.off_starts + s]) & (dist < ints[0, c.off_starts + s + 1])
        g = jnp.sum(jnp.where(inside, ds, 0.0), keepdims=True)
        return acc + jnp.where(lanes == s, g, 0.0)

    return lax.fori_loop(s_lo, s_hi + 1, segment, acc)


def _logits(c: _Config, ints, params, q, k, qpos, kpos, b, h, i, j, length):
    """Masked float32 logits (bq, bk) of query block i against key block j, and the
    key - query distances."""
    s = c.scale * _dot(q, k, (1, 1))
    rel = kpos - qpos  # (1, bk) - (bq, 1)
    bias = _bias(c, ints, params, rel, b, h, i, j)
    if bias is not None:
        s = s + bias
    return jnp.where(c.allowed(i, j, length), s, MASK_VALUE), rel


def _rows(ref, start, size):
    return ref[pl.ds(pl.multiple_of(start, size), size), :]


def _cols(ref, start, size):
    return ref[:, pl.ds(pl.multiple_of(start, size), size)]


# ------------------------------------------------------------------------------------ kernels


def _forward_kernel(c: _Config, ints, params, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, o_ref,
                    lse_ref):  # fmt: skip
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = ints[0, b]
    q, qpos = q_ref[...], qpos_ref[...]

    def key_block(j, carry):
        m, l, acc = carry
        k, v = _rows(k_ref, j * c.bk, c.bk), _rows(v_ref, j * c.bk, c.bk)
        kpos = _cols(kpos_ref, j * c.bk, c.bk)
        s, _ = _logits(c, ints, params, q, k, qpos, kpos, b, h, i, j, length)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        # Before a row meets a visible key its max is MASK_VALUE and p sums masked entries;
        # alpha = exp(MASK_VALUE - real max) = 0 wipes them once it does.
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v, (1, 0))
        return m_new, l, acc

    init = (
        jnp.full((c.bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((c.bq, 1), jnp.float32),
        jnp.zeros(o_ref.shape, jnp.float32),
    )
    m, l, acc = lax.fori_loop(*c.key_blocks(i, length), key_block, init)
    seen = m > 0.5 * MASK_VALUE
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen, acc / l, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l), 0.0)


def _dq_kernel(c: _Config, want_dparams: bool, ints, params, q_ref, k_ref, v_ref, qpos_ref,
               kpos_ref, do_ref, lse_ref, delta_ref, dq_ref, *dparams_ref):  # fmt: skip
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = ints[0, b]
    q, qpos, do = q_ref[...], qpos_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def key_block(j, carry):
        dq, dpar = carry
        k, v = _rows(k_ref, j * c.bk, c.bk), _rows(v_ref, j * c.bk, c.bk)
        kpos = _cols(kpos_ref, j * c.bk, c.bk)
        s, rel = _logits(c, ints, params, q, k, qpos, kpos, b, h, i, j, length)
        p = jnp.exp(s - lse)
        ds = p * (_dot(do, v, (1, 1)) - delta)  # d loss / d logits
        dq = dq + c.scale * _dot(ds.astype(k.dtype), k, (1, 0))
        if want_dparams:
            dpar = _bias_grad(c, ints, params, rel, ds, b, h, i, j, dpar)
        return dq, dpar

    init = (
        jnp.zeros(dq_ref.shape, jnp.float32),
        jnp.zeros((1, c.padded_params), jnp.float32),
    )
    dq, dpar = lax.fori_loop(*c.key_blocks(i, length), key_block, init)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if want_dparams:
        dparams_ref[0][...] = dpar


def _dkv_kernel(c: _Config, ints, params, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref):  # fmt: skip
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = ints[0, b]
    k, v, kpos = k_ref[...], v_ref[...], kpos_ref[...]

    def query_block(i, carry):
        dk, dv = carry
        q, do = _rows(q_ref, i * c.bq, c.bq), _rows(do_ref, i * c.bq, c.bq)
        qpos = _rows(qpos_ref, i * c.bq, c.bq)
        lse, delta = _rows(lse_ref, i * c.bq, c.bq), _rows(delta_ref, i * c.bq, c.bq)
        s, _ = _logits(c, ints, params, q, k, qpos, kpos, b, h, i, j, length)
        p = jnp.exp(s - lse)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v, (1, 1)) - delta)
        dk = dk + c.scale * _dot(ds.astype(q.dtype), q, (0, 0))
        return dk, dv

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = lax.fori_loop(*c.query_blocks(j, length), query_block, init)
    dk_ref[...] = dk
    dv_ref[...] = dv


# ------------------------------------------------------------------------------ pallas calls


def _scalar_spec(c: _Config, n: int):
    """Whole small (1, n) array read as scalars: SMEM on TPU, one global block elsewhere.
    (1, n) rather than (n,) so that a vmapped call's extra leading axis is a squeezed block
    axis that Mosaic accepts."""
    memory = {}
    if c.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        memory = dict(memory_space=pltpu.SMEM)
    return pl.BlockSpec((1, n), lambda *_: (0, 0), **memory)


def _compiler_params(c: _Config, K: int):
    if c.platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4 if K <= 64 else 8, num_stages=2)
    if c.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    return None


def _call(c: _Config, kernel, grid, in_specs, out_specs, out_shape, K, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(c, K),
        interpret=c.platform == "cpu",
        name=name,
    )


def _specs(c: _Config, K: int, ints, params, *, query_blocked: bool):
    """Specs of (ints, params, q, k, v, qpos, kpos): one query block and the whole key
    sequence (forward, dq), or the whole query sequence and one key block (dk/dv)."""
    R = c.H // c.G
    whole_q = pl.BlockSpec((None, None, c.Lp, K), lambda b, h, n: (b, h, 0, 0))
    whole_kv = pl.BlockSpec((None, None, c.Sp, K), lambda b, h, n: (b, lax.div(h, R), 0, 0))
    if query_blocked:
        q = pl.BlockSpec((None, None, c.bq, K), lambda b, h, i: (b, h, i, 0))
        kv = whole_kv
        qpos = pl.BlockSpec((None, c.bq, 1), lambda b, h, i: (b, i, 0))
        kpos = pl.BlockSpec((None, 1, c.Sp), lambda b, h, i: (b, 0, 0))
    else:
        q = whole_q
        kv = pl.BlockSpec((None, None, c.bk, K), lambda b, h, j: (b, lax.div(h, R), j, 0))
        qpos = pl.BlockSpec((None, c.Lp, 1), lambda b, h, j: (b, 0, 0))
        kpos = pl.BlockSpec((None, 1, c.bk), lambda b, h, j: (b, 0, j))
    scalars = [_scalar_spec(c, ints.shape[1]), _scalar_spec(c, params.shape[1])]
    return [*scalars, q, kv, kv, qpos, kpos]


def _row_stat_spec(c: _Config, *, query_blocked: bool):
    if query_blocked:
        return pl.BlockSpec((None, None, c.bq, 1), lambda b, h, i: (b, h, i, 0))
    return pl.BlockSpec((None, None, c.Lp, 1), lambda b, h, j: (b, h, 0, 0))


def _forward(c: _Config, q, k, v, params, ints, qpos, kpos):
    K = q.shape[-1]
    return _call(
        c,
        functools.partial(_forward_kernel, c),
        (c.B, c.H, c.nq),
        _specs(c, K, ints, params, query_blocked=True),
        [
            pl.BlockSpec((None, None, c.bq, K), lambda b, h, i: (b, h, i, 0)),
            _row_stat_spec(c, query_blocked=True),
        ],
        [
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((c.B, c.H, c.Lp, 1), jnp.float32),
        ],
        K,
        "flash_attention_fwd",
    )(ints, params, q, k, v, qpos, kpos)


def _backward(c: _Config, want_dparams: bool, q, k, v, params, ints, qpos, kpos, o, lse, do):
    K = q.shape[-1]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    args = (ints, params, q, k, v, qpos, kpos, do, lse, delta)
    out_specs = [pl.BlockSpec((None, None, c.bq, K), lambda b, h, i: (b, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if want_dparams:
        out_specs.append(
            pl.BlockSpec((None, None, None, 1, c.padded_params), lambda b, h, i: (b, h, i, 0, 0))
        )
        out_shape.append(jax.ShapeDtypeStruct((c.B, c.H, c.nq, 1, c.padded_params), jnp.float32))
    stats = _row_stat_spec(c, query_blocked=True)
    q_spec = pl.BlockSpec((None, None, c.bq, K), lambda b, h, i: (b, h, i, 0))
    dq, *dpar = _call(
        c,
        functools.partial(_dq_kernel, c, want_dparams),
        (c.B, c.H, c.nq),
        [*_specs(c, K, ints, params, query_blocked=True), q_spec, stats, stats],
        out_specs,
        out_shape,
        K,
        "flash_attention_dq",
    )(*args)

    stats = _row_stat_spec(c, query_blocked=False)
    q_spec = pl.BlockSpec((None, None, c.Lp, K), lambda b, h, j: (b, h, 0, 0))
    kv_out = pl.BlockSpec((None, None, c.bk, K), lambda b, h, j: (b, h, j, 0))
    dk, dv = _call(
        c,
        functools.partial(_dkv_kernel, c),
        (c.B, c.H, c.nk),
        [*_specs(c, K, ints, params, query_blocked=False), q_spec, stats, stats],
        [kv_out, kv_out],
        [jax.ShapeDtypeStruct((c.B, c.H, c.Sp, K), jnp.float32)] * 2,
        K,
        "flash_attention_dkv",
    )(*args)
    # Query heads of one kv group were separate programs: sum them.
    R = c.H // c.G
    dk, dv = (x.reshape(c.B, c.G, R, c.Sp, K).sum(axis=2) for x in (dk, dv))
    dparams = None
    if want_dparams:
        P = c.num_segments if c.kind == "table" else c.num_params
        dparams = dpar[0].sum(axis=(0, 2, 3))[:, :P].reshape(-1)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), dparams


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c: _Config, q, k, v, params, ints, qpos, kpos):
    return _forward(c, q, k, v, params, ints, qpos, kpos)[0]


def _flash_fwd(c: _Config, q, k, v, params, ints, qpos, kpos):
    # Constant parameters (ALiBi's slopes) cost the backward nothing: whether they are
    # differentiated travels as pytree structure (() = yes, None = no) so it stays static.
    wanted = () if params.perturbed and c.kind is not None else None
    q, k, v, params, ints, qpos, kpos = jax.custom_derivatives.custom_vjp_primal_tree_values(
        (q, k, v, params, ints, qpos, kpos)
    )
    o, lse = _forward(c, q, k, v, params, ints, qpos, kpos)
    return o, (q, k, v, params, ints, qpos, kpos, o, lse, wanted)


def _flash_bwd(c: _Config, residuals, do):
    q, k, v, params, ints, qpos, kpos, o, lse, wanted = residuals
    if isinstance(do, jax.custom_derivatives.SymbolicZero):
        do = jnp.zeros(o.shape, o.dtype)
    dq, dk, dv, dparams = _backward(
        c, wanted is not None, q, k, v, params, ints, qpos, kpos, o, lse, do
    )
    if dparams is None:
        dparams = jnp.zeros_like(params)
    else:
        dparams = jnp.pad(dparams, (0, params.shape[1] - dparams.shape[0]))[None]
    return dq, dk, dv, dparams, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------- public


def _block_ranges(pos_BN, block: int):
    """Per-block minimum and maximum of positions (B, nblocks * block) -> two (B * n,)."""
    B = pos_BN.shape[0]
    blocks = pos_BN.reshape(B, -1, block)
    return blocks.min(axis=-1).reshape(-1), blocks.max(axis=-1).reshape(-1)


def _pad_to_pow2(x, platform: str):
    """Triton loads whole small arrays only in power-of-two shapes."""
    if platform != "gpu":
        return x
    return jnp.pad(x, (0, pl.next_power_of_2(x.shape[0]) - x.shape[0]))


def flash_attention(
    q_BLHK,
    k_BSGK,
    v_BSGK,
    *,
    bias: KernelBias | None = None,
    qpos_BL=None,
    kpos_BS=None,
    kv_lengths_B=None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    platform: str | None = None,
) -> jax.Array:
    """softmax(scale * q.k + bias(kpos - qpos), masked) v -> BLHK in q's dtype.

    `bias` is computed in the kernel from int positions qpos_BL (B, L) and kpos_BS (B, S)
    (default: 0..L-1 and 0..S-1); `kv_lengths_B` (B,) marks keys j >= length as padding.
    Differentiable in q, k, v and the bias parameters. `platform` ("gpu", "tpu", "cpu" =
    interpret mode; default the JAX backend) picks the lowering and default block sizes.
    """
    platform = _platform(platform)
    B, L, H, K = q_BLHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    if H % G:
        raise ValueError(f"flash_attention: H={H} is not a multiple of G={G}")
    default_q, default_k = DEFAULT_BLOCKS[platform]
    bq = _blocks(platform, L, block_q or default_q)
    bk = _blocks(platform, S, block_k or default_k)
    nq, nk = -(-L // bq), -(-S // bk)
    Lp, Sp = nq * bq, nk * bk
    Kp = max(pl.next_power_of_2(K), 16) if platform == "gpu" else K

    qpos = jnp.arange(L, dtype=jnp.int32)[None] if qpos_BL is None else qpos_BL
    kpos = jnp.arange(S, dtype=jnp.int32)[None] if kpos_BS is None else kpos_BS
    if not (jnp.issubdtype(qpos.dtype, jnp.integer) and jnp.issubdtype(kpos.dtype, jnp.integer)):
        raise ValueError("flash_attention: positions must be integers (the bias is f(kpos - qpos))")
    # Padding rows/columns repeat the last position: masked anyway, and they do not widen
    # the per-block distance ranges of the table path.
    qpos = jnp.pad(jnp.broadcast_to(qpos, (B, L)).astype(jnp.int32), ((0, 0), (0, Lp - L)), "edge")
    kpos = jnp.pad(jnp.broadcast_to(kpos, (B, S)).astype(jnp.int32), ((0, 0), (0, Sp - S)), "edge")
    lengths = (
        jnp.full((B,), S, jnp.int32)
        if kv_lengths_B is None
        else jnp.clip(jnp.asarray(kv_lengths_B, jnp.int32), 0, S)
    )

    kind = None if bias is None else bias.kind
    ints = [lengths]
    if kind is None:
        params = jnp.zeros((1,), jnp.float32)
        num_params, padded = 1, 1
        segments, max_distance = 0, 0
    elif kind == "table":
        if bias.num_heads != H:
            raise ValueError(f"flash_attention: bias has {bias.num_heads} heads, q has {H}")
        params = bias.params.astype(jnp.float32).reshape(-1)
        segments, max_distance = len(bias.starts), bias.max_distance
        num_params, padded = segments, pl.next_power_of_2(segments)
        ints += [*_block_ranges(qpos, bq), *_block_ranges(kpos, bk)]
        ints.append(jnp.asarray([*bias.starts, max_distance + 1], jnp.int32))
        ints.append(jnp.asarray(bias.segment_of_distance()))
    else:
        if bias.num_heads != H:
            raise ValueError(f"flash_attention: bias has {bias.num_heads} heads, q has {H}")
        params = bias.params.astype(jnp.float32).reshape(-1)
        num_params = NUM_PARAMS[kind]
        padded = pl.next_power_of_2(num_params)
        segments, max_distance = 0, 0

    c = _Config(
        platform=platform,
        B=B,
        H=H,
        G=G,
        L=L,
        S=S,
        bq=bq,
        bk=bk,
        scale=default_scale(scale, K),
        causal=causal,
        window=window,
        kind=kind,
        offset=0.0 if bias is None else bias.offset,
        num_params=num_params,
        padded_params=padded,
        max_distance=max_distance,
        num_segments=segments,
    )

    def heads_first(x, length, padded_length):
        x = jnp.moveaxis(x, 2, 1)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded_length - length), (0, Kp - K)))

    q = heads_first(q_BLHK, L, Lp)
    k, v = (heads_first(x, S, Sp) for x in (k_BSGK, v_BSGK))
    ints = _pad_to_pow2(jnp.concatenate(ints), platform)[None]
    params_flat = _pad_to_pow2(params, platform)[None]
    out = _flash(c, q, k, v, params_flat, ints, qpos[:, :, None], kpos[:, None, :])
    return jnp.moveaxis(out[:, :, :L, :K], 1, 2)


# ------------------------------------------------------------- attn.attention's impl="flash"


def _key_only(mask, B: int, S: int) -> bool:
    shape = (1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask)
    return shape[1] == 1 and shape[2] == 1 and shape[0] in (1, B) and shape[3] == S


def unsupported_reason(q_shape, k_shape, *, bias=None, mask=None) -> str | None:
    """Why `impl="flash"` cannot run this call of dot_product_attention, or None if it can."""
    B, L, H, _ = q_shape
    S = k_shape[1]
    if mask is not None and not _key_only(mask, B, S):
        return (
            f"its mask must be key padding (B, 1, 1, S), got shape {jnp.shape(mask)} (a general "
            "mask, e.g. a KV cache's, would be an L x S input)"
        )
    if bias is None:
        return None
    if not isinstance(bias, PositionalBias):
        return (
            "its bias must come from a positional encoding with a kernel_bias (ALiBi, T5, "
            "KERPLE); arrays and other callables (FIRE, Shaw, ...) are not computed in-kernel"
        )
    if bias.kernel.num_heads != H:
        return f"the kernel bias has {bias.kernel.num_heads} heads, q has {H}"
    qpos, kpos = bias.qpos_BL, bias.kpos_BS
    if not all(jnp.issubdtype(p.dtype, jnp.integer) for p in (qpos, kpos)):
        return "positions are not integers (interpolated sampler)"
    if qpos.ndim != 2 or qpos.shape[1] != L or kpos.ndim != 2 or kpos.shape[1] != S:
        return f"positions {qpos.shape} / {kpos.shape} are not (B, L) / (B, S)"
    return None


def _kv_lengths(mask, B: int, S: int):
    """Per-row key lengths from a key-padding mask, which must be right padding."""
    valid = jnp.broadcast_to(jnp.asarray(mask, bool).reshape(-1, S), (B, S))
    lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    if not isinstance(valid, jax.core.Tracer):
        right = jnp.arange(S)[None, :] < lengths[:, None]
        if not bool(jnp.all(valid == right)):
            raise ValueError("impl='flash': a key-padding mask must be right padding")
    return lengths


def attention(q_BLHK, k_BSGK, v_BSGK, *, bias, mask, causal, window, scale) -> jax.Array:
    """dot_product_attention's arguments mapped onto `flash_attention` (see
    `unsupported_reason` for what must hold). A key mask is read as right padding, the layout
    of every attn model, and checked to be one whenever it is concrete (not under jit)."""
    B, S = q_BLHK.shape[0], k_BSGK.shape[1]
    kw = {}
    if isinstance(bias, PositionalBias):
        kw = dict(bias=bias.kernel, qpos_BL=bias.qpos_BL, kpos_BS=bias.kpos_BS)
    lengths = None if mask is None else _kv_lengths(mask, B, S)
    return flash_attention(
        q_BLHK,
        k_BSGK,
        v_BSGK,
        kv_lengths_B=lengths,
        causal=causal,
        window=window,
        scale=scale,
        **kw,
    )


__all__ = ["DEFAULT_BLOCKS", "PLATFORMS", "attention", "flash_attention", "unsupported_reason"]
