"""Benchmark of `impl="flash"` against its peers, all measured in the same process.

The workload is one attention call as the attention layer makes it: a positional encoding
built from the registry, its bias passed exactly as `attn.layers.positional_bias` passes it
(so flash computes it in-kernel and the peers evaluate the per-block callable or materialise
it), identity positions, and the forward alone and forward + backward (gradients of q, k, v
and of the encoding's parameters). Each (impl, pe, length) reports compile seconds, the
median of `steps` timed calls, the temporary device memory XLA allocates for the forward +
backward (Pallas' on-chip buffers are not in it), and the
largest difference of the output from the first impl listed. The caller (experiments/bench.py
or a one-line command, see README) decides what to run and where to write it.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attn.pe
from attn import attention
from attn.layers import positional_bias


def _timed(fn, args, steps: int):
    """(output, compile seconds, median ms per call, temporary device bytes) of jit(fn)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    temp = None if memory is None else memory.temp_size_in_bytes
    return out, compile_s, 1e3 * statistics.median(times), temp


def run_one(
    impl: str,
    *,
    pe: str = "alibi",
    batch: int = 4,
    length: int = 4096,
    heads: int = 16,
    kv_heads: int | None = None,
    head_dim: int = 64,
    dtype: str = "bfloat16",
    causal: bool = True,
    window: int | None = None,
    steps: int = 10,
    seed: int = 0,
):
    """One row: {impl, pe, length, ..., fwd_ms, fwd_bwd_ms, compile_s, temp_bytes (of the
    compiled forward + backward), out} or
    {..., "error": message} when the impl cannot run the case (e.g. cuDNN in float32)."""
    G = kv_heads or heads
    row = dict(impl=impl, pe=pe, batch=batch, length=length, heads=heads, kv_heads=G)
    row.update(head_dim=head_dim, dtype=dtype, causal=causal, window=window)
    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dt)
    k, v = (jax.random.normal(key, (batch, length, G, head_dim), dt) for key in keys[1:3])
    do = jax.random.normal(keys[3], q.shape, dt)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    enc = attn.pe.build(
        attn.pe.default_config(pe),
        d_model=heads * head_dim,
        num_heads=heads,
        head_dim=head_dim,
        causal=causal,
        rngs=nnx.Rngs(seed),
    )
    graphdef, state = nnx.split(enc)

    def attend(q, k, v, state):
        q, k = nnx.merge(graphdef, state).rotate(q, k, pos, pos)
        bias = positional_bias(nnx.merge(graphdef, state), q, k, pos, pos, materialize=False)
        return attention.dot_product_attention(
            q, k, v, bias=bias, causal=causal, window=window, impl=impl
        )

    def fwd_bwd(q, k, v, state):
        out, vjp = jax.vjp(attend, q, k, v, state)
        return out, vjp(do)

    args = (q, k, v, state)
    try:
        out, compile_fwd, row["fwd_ms"], _ = _timed(attend, args, steps)
        _, compile_bwd, row["fwd_bwd_ms"], row["temp_bytes"] = _timed(fwd_bwd, args, steps)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run this case is a result
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    row["compile_s"] = compile_fwd + compile_bwd
    row["out"] = out
    return row


def run(impls=("flash", "chunked", "cudnn", "dense"), pes=("none", "alibi", "t5", "kerple"),
        lengths=(128, 1024, 4096, 16384), **kw) -> list[dict]:  # fmt: skip
    """Rows of `run_one` for every (pe, length, impl); `max_abs_diff` compares each output
    with that of the first impl that ran the same (pe, length)."""
    rows = []
    for pe in pes:
        for length in lengths:
            first = None
            for impl in impls:
                row = run_one(impl, pe=pe, length=length, **kw)
                out = row.pop("out", None)
                if out is not None:
                    if first is None:
                        first = out
                    diff = jnp.abs(out.astype(jnp.float32) - first.astype(jnp.float32))
                    row["max_abs_diff"] = float(jnp.max(diff))
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of `run`'s rows."""
    cols = ["pe", "length", "impl", "fwd_ms", "fwd_bwd_ms", "compile_s", "temp_bytes"]
    cols += ["max_abs_diff", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for c in cols:
            x = row.get(c)
            if isinstance(x, float):
                x = f"{x:.3g}"
            elif c == "temp_bytes" and x is not None:
                x = f"{x / 2**20:.1f} MiB"
            cells.append("" if x is None else str(x))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform} {d.device_kind}, jax {jax.__version__}, numpy {np.__version__}"
