"""Performance benchmarks: throughput, MFU, long-context memory, compile time, vmapped seeds.

    python -m experiments.bench [--workload NAME ...] [--repeats 3] [--smoke]
    ./launch.sh bench --workload w1 w2
    ./launch.sh bench --vs x-transformers   # attn beside PyTorch's peer: experiments/bench_peer.py

Every measurement is one JSON line on stdout: {"workload", "variant", "metric", "median",
"min", "max", "repeats", "unit", ..., "machine": {CPU model, cores, load average, jax/flax
version, backend, device, XLA_FLAGS}}; a markdown table of all of them comes last. Timings
are wall clock (`time.perf_counter`) around work that ends in `jax.block_until_ready`.

Method (every claim of speed is a benchmark here, not a timed test):

- `peak`: float32 matmul through XLA at n = 1024, 2048, 4096 (2 n^3 FLOPs each); the best
  median is the machine's achievable peak, measured in the same run, and every throughput
  below is also reported as a fraction of it (MFU). It always runs first.
- FLOPs are counted analytically with the PaLM convention (Chowdhery et al. 2022, appendix B):
  a training step costs 6 N + 12 n_layers d_attn T FLOPs per token (N: parameters of the
  matmuls, output head included, embedding lookup excluded; d_attn = heads x head dim; T: the
  padded sequence length, full T x T attention counted even when causal), a forward pass a
  third of that. Padded tokens are counted because they are computed. XLA's own count
  (`compiled.cost_analysis()["flops"]`) is reported beside it as `xla_flops` per step.
- `w1`: the encoder of Deletang et al. 2023 (arXiv 2207.02098): 5 layers, d_model 64, 8 heads,
  MLP 256 ReLU, post-LN, dropout 0.1, batch 128, Adam with clipping, n ~ U{1..40} per batch
  from the real input pipeline, so every padded length bucket the first 1000 steps meet is
  compiled (AOT, as the driver does) and counted. Task (`--w1-task`): parity_check by default,
  a Deletang classification task whose encoder reads the n symbols and one answer slot, so
  T = n + 1 <= 41 positions: the "length 40" encoder of the issue's baselines (8.3 GFLOP per
  step at 40 tokens). `--w1-task reverse_string` measures the transduction layout instead,
  which reads n symbols and n answer slots (T = 2n <= 80, padded to 96), as the published
  Haiku code does. The loop is the driver's `train.train_loop`: the donated jitted step of
  `train.make_train_step`,
  metrics fetched one step late, batches generated on the host in the loop. Reported per PE
  (none, sinusoidal, alibi, rope, t5): steady-state steps/s (all shapes compiled), total
  compile seconds and number of compilations for 1000 steps, and the "1000-step equivalent"
  rate 1000 / (compile_s + first calls + (1000 - shapes) / steady), i.e. a 1000-step run
  with compilation and each executable's first (warm-up) call amortised. Every PE sees the
  same batches (seed 0), so the timed windows hold the same mix of lengths. Also per step of
  the timed windows: minor page faults and kernel CPU milliseconds (getrusage), which show
  whether XLA's per-execution temp buffers are being faulted in page by page.
- `w2`: decoder-only LM, 4 layers, d_model 256, 4 heads, MLP 1024, vocab 256, 256 tokens,
  batch 16 (random bytes in the LM layout): steps/s, tokens/s, GFLOP/s and MFU.
- `long`: forward (loss, no gradient) of the w2 model at 2k, 8k and 32k tokens, batch 1,
  for each attention implementation, each in a fresh subprocess: median time and peak
  resident memory (VmHWM of the child process), with RoPE (no bias operand). Lengths up
  to 8k get one untimed warm-up call first. Materialising implementations are skipped where
  their B x H x L x S float32 logits (x3: logits, probabilities, mask/bias) would not fit in
  60 % of the machine's memory; the skip is a JSON line with the estimate.
- `compile`: lowering and compile time of the w1 train step (T = 96) and of one eval length
  (forward at T = 256), after `jax.clear_caches()` per repeat; then two subprocesses sharing
  a fresh persistent compilation cache directory (the driver's `setup_compilation_cache`):
  compilation seconds and time from main() to the end of the first step, cold and warm.
- `seeds`: 8 seeds of w1 trained together (`jax.vmap` of the driver's step over stacked
  states and batches, the idea of experiments/seeds.py) against 8 separate steps in sequence,
  same batches (nominal length 20: T = 24 for parity_check, 48 for reverse_string): time per
  step of 8 seeds, and the ratio.
- `gpu` (GPU backends only; a "skipped" line otherwise): the bfloat16 matmul peak (n = 8192);
  w2 scaled to 12 layers, d_model 768, 12 heads, MLP 3072, 1024 tokens, bfloat16 (w2-large):
  MFU against that peak; long-context training steps (forward + backward + Adam) of that
  125M-parameter decoder in bfloat16 with `model.remat=block`, batch 1, at 8k and 32k tokens,
  each in a fresh process so its peak device memory (`memory_stats()["peak_bytes_in_use"]`)
  is its own: a no-bias PE (RoPE) with impl auto (cuDNN) and chunked, and a bias PE (ALiBi)
  with impl auto (the flash kernel) and chunked, with the chunked / fused time ratio; and
  data-parallel scaling of w2-large over 1, 2, 4, ... of the devices present (batch 16 per
  device, `train.mesh.data` = k, so the global batch grows with k): steps/s and efficiency
  rate_k / rate_1 (1.0: perfect weak scaling).

Host allocator: XLA:CPU allocates each execution's temp buffer afresh (one `mmap` of 144 MB for
a w1 step at T = 32) and unmaps it afterwards. With 4 KiB pages that is ~35k page faults and
~60 ms of kernel time per step, so `./launch.sh` runs Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (transparent huge pages for glibc's large
allocations: ~500-750 faults per step). Runs without it get a `host` note.

`--smoke` runs every workload at tiny sizes and one repeat (tests/test_bench.py); its numbers
mean nothing.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attn.models
from attn import layers
from experiments import mesh as mesh_lib
from experiments import metrics, optim, tasks, train
from experiments import state as state_lib
from experiments.config_utils import ArgumentParser
from experiments.tasks.layouts import format_lm, padded_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W1_PES = ("none", "sinusoidal", "alibi", "rope", "t5")
W1_TASK = "parity_check"  # default of --w1-task
W1_AMORTISE_STEPS = 1000
LONG_IMPLS = ("reference", "dense", "xla", "chunked")
LONG_LENGTHS = (2048, 8192, 32768)
LONG_PE = "rope"
LONG_WARMUP_MAX = 8192  # longer forwards take tens of seconds: their first call is timed too
HUGETLB_HINT = (
    "GLIBC_TUNABLES has no glibc.malloc.hugetlb=1 (./launch.sh sets it): XLA:CPU's per-execution"
    " temp buffers are faulted in 4 KiB pages, so CPU steps are slower than the README's table"
)
JEMALLOC_HINT = (
    "no jemalloc preloaded (./launch.sh preloads libjemalloc.so.2 where found, or unpacks Debian's"
    " libjemalloc2 into .venv at set-up): XLA:CPU maps and unmaps its temp buffer every step"
)
MATERIALISED_COPIES = 3  # logits, probabilities and a mask or bias of the same size


# ----------------------------------------------------------------------------- reporting


def malloc_name(env=None) -> str:
    """The allocator launch.sh chose for a process with this environment (default: ours)."""
    env = os.environ if env is None else env
    return "jemalloc" if "libjemalloc" in env.get("LD_PRELOAD", "") else "glibc"


def host_notes(report) -> None:
    """A `host` note for each allocator setting of ./launch.sh that this process lacks."""
    if sys.platform != "linux":
        return
    if malloc_name() != "jemalloc":
        report.note("host", "malloc", JEMALLOC_HINT)
        if "glibc.malloc.hugetlb=1" not in os.environ.get("GLIBC_TUNABLES", ""):
            report.note("host", "malloc", HUGETLB_HINT)


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = jax.devices()[0]
    import flax

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(_total_memory() / 2**30, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "malloc": malloc_name(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Report:
    """Collects measurements; prints one JSON line each as they come and a table at the end."""

    def __init__(self, out=None):
        self.out = out  # None: sys.stdout at print time
        self.rows: list[dict] = []
        self.peak_gflops: float | None = None

    def emit(self, workload, variant, metric, values, unit, **extra) -> dict:
        values = [float(v) for v in np.atleast_1d(values)]
        row = {
            "workload": workload,
            "variant": variant,
            "metric": metric,
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "repeats": len(values),
            "unit": unit,
            **extra,
            "machine": machine(),
        }
        self.rows.append(row)
        self._print(row)
        return row

    def throughput(self, workload, variant, flops_per_s, **extra) -> None:
        """GFLOP/s line with its MFU against this run's matmul peak."""
        gflops = [f / 1e9 for f in np.atleast_1d(flops_per_s)]
        mfu = None
        if self.peak_gflops:
            mfu = round(statistics.median(gflops) / self.peak_gflops, 4)
        self.emit(workload, variant, "gflops_per_s", gflops, "GFLOP/s", mfu=mfu, **extra)

    def note(self, workload, variant, text) -> None:
        row = {"workload": workload, "variant": variant, "metric": "note", "note": text}
        row["machine"] = machine()
        self.rows.append(row)
        self._print(row)

    def _print(self, row) -> None:
        print(json.dumps(row), file=self.out or sys.stdout, flush=True)

    def table(self) -> str:
        lines = [
            "| workload | variant | metric | median | min | max | n | unit | MFU |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            if r["metric"] == "note":
                lines.append(f"| {r['workload']} | {r['variant']} | note: {r['note']} ||||||||")
                continue
            mfu = r.get("mfu")
            lines.append(
                f"| {r['workload']} | {r['variant']} | {r['metric']} | {_fmt(r['median'])} | "
                f"{_fmt(r['min'])} | {_fmt(r['max'])} | {r['repeats']} | {r['unit']} | "
                f"{'' if mfu is None else f'{100 * mfu:.1f}%'} |"
            )
        m = machine()
        lines.append(
            f"\n{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load average "
            f"{m['loadavg']}, jax {m['jax']} ({m['backend']}, {m['device']}), {m['date']}"
        )
        return "\n".join(lines)


def _fmt(x: float) -> str:
    if x == 0 or 0.01 <= abs(x) < 1e5:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{x:.3g}"


def _median(values) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------- FLOPs


def transformer_flops(cfg, *, vocab: int, batch: int, length: int, train_step: bool) -> float:
    """PaLM model FLOPs of one training step (or forward) of a Transformer model block."""
    L, D, H = cfg["num_layers"], cfg["d_model"], cfg["num_heads"]
    G = cfg["num_kv_heads"]
    K = cfg["head_dim"] or D // H
    F = cfg["mlp_dim"]
    mlp_mats = 3 if cfg["mlp"] == "swiglu" else 2
    per_layer = D * H * K + 2 * D * G * K + H * K * D + mlp_mats * D * F
    params = L * per_layer + D * vocab
    forward_per_token = 2 * params + 4 * L * H * K * length
    return (3 if train_step else 1) * forward_per_token * batch * length


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return None if not cost else float(cost.get("flops", 0.0)) or None


def _ready(tree):
    return jax.block_until_ready(tree)


# ----------------------------------------------------------------------------- peak


def peak(ctx) -> None:
    """float32 matmul GFLOP/s through XLA; sets the MFU reference."""
    sizes = (128, 256) if ctx.smoke else (1024, 2048, 4096)
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(jnp.matmul)
        _ready(f(a, b))
        inner = max(1, int(2e9 // (2 * n**3))) if not ctx.smoke else 1
        rates = []
        for _ in range(ctx.repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                out = f(a, b)
            _ready(out)
            rates.append(2 * n**3 * inner / (time.perf_counter() - t0) / 1e9)
        row = ctx.report.emit("peak", f"matmul_f32_n{n}", "gflops_per_s", rates, "GFLOP/s")
        best = max(best, row["median"])
    ctx.report.peak_gflops = best
    ctx.report.emit("peak", "matmul_f32_best", "gflops_per_s", [best], "GFLOP/s")


# ----------------------------------------------------------------------------- w1


def w1_config(pe: str, smoke: bool, task: str = W1_TASK):
    from configs import formal

    config = formal.get_config(f"task={task},pe={pe}" + (",smoke=true" if smoke else ""))
    if smoke:
        config.task.max_length = 6
    config.eval.compilation_cache = ""
    return config


def _train_setup(config, seed: int = 0):
    """Driver pieces: mesh, model, train state, jitted donated step."""
    mesh = mesh_lib.make_mesh(config)
    tx = optim.make_optimizer(config)
    model = state_lib.build_model(config, seed=seed, mesh=mesh)
    graphdef, params, rest = state_lib.split_model(model)
    state = state_lib.init_state(params, rest, tx)
    return mesh, tx, graphdef, state, train.make_train_step(config, graphdef, tx)


def _lengths_needed(task, config, steps: int) -> list[int]:
    """Padded lengths T of the first `steps` batches of seed 0, in order of first use."""
    layout = attn.models.batch_format(config.model.name, config.model)
    seen: list[int] = []
    for step in range(steps):
        T = padded_length(task, layout, task.train_length(0, step), train=True)
        if T not in seen:
            seen.append(T)
    return seen


def _batch_at_length(config, T: int):
    """The first pipeline batch of seed 0 whose padded length is T."""
    for step, batch in enumerate(train.host_batches(config, seed=0, start=0)):
        if batch["inputs"].shape[1] == T:
            return batch
        if step > 100_000:
            raise RuntimeError(f"no batch of padded length {T}")


def _counted(batches, seen: dict, flops_by_T: dict):
    """The batches, adding up their tokens and model FLOPs in `seen` as they are generated
    (inside the timed window, as in the driver)."""
    for b in batches:
        seen["tokens"] += int(b["token_mask"].sum())
        seen["padded"] += b["token_mask"].size
        seen["flops"] += flops_by_T.get(b["inputs"].shape[1], 0.0)
        yield b


def train_loop(config, *, compile_steps: int, steps: int, repeats: int) -> dict:
    """The driver's loop (train.train_loop) on the real pipeline: AOT-compile every shape the
    first `compile_steps` steps need, then `repeats` timed windows of `steps` steps."""
    task = tasks.build(config.task)
    mesh, _, _, state, step_fn = _train_setup(config)
    compiled, compile_s, first_call_s, flops_by_T, xla_by_T = {}, [], [], {}, {}
    for T in _lengths_needed(task, config, compile_steps):
        gbatch = mesh_lib.shard_batch(_batch_at_length(config, T), mesh)
        c0 = time.perf_counter()
        compiled[train.shape_key(gbatch)] = fn = step_fn.lower(state, gbatch).compile()
        c1 = time.perf_counter()
        # The first execution of an executable pays one-off set-up: warm-up, not steady state.
        state, metrics = fn(state, gbatch)
        jax.device_get(metrics)
        compile_s.append(c1 - c0)
        first_call_s.append(time.perf_counter() - c1)
        flops_by_T[T] = transformer_flops(
            layers.resolve(attn.models.REGISTRY[config.model.name], config.model),
            vocab=task.vocab_size,
            batch=config.train.batch_size,
            length=T,
            train_step=True,
        )
        xla_by_T[T] = xla_flops(fn)
    shapes_ahead = len(compiled)
    rates, flops_rates, token_rates, real_fraction = [], [], [], []
    faults, kernel_ms = [], []
    start = 0
    for _ in range(repeats):
        seen = {"tokens": 0, "padded": 0, "flops": 0.0}
        u0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        state, _ = train.train_loop(
            step_fn,
            state,
            _counted(train.host_batches(config, seed=0, start=start), seen, flops_by_T),
            start=start,
            total=start + steps,
            place=lambda b: mesh_lib.shard_batch(b, mesh),
            hooks=train.LoopHooks(),
            compiled=compiled,
        )
        tokens, padded, flops = seen["tokens"], seen["padded"], seen["flops"]
        dt = time.perf_counter() - t0
        start += steps
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append((u1.ru_minflt - u0.ru_minflt) / steps)
        kernel_ms.append(1e3 * (u1.ru_stime - u0.ru_stime) / steps)
        rates.append(steps / dt)
        flops_rates.append(flops / dt)
        token_rates.append(tokens / dt)
        real_fraction.append(tokens / padded)
    return {
        "steps_per_s": rates,
        "flops_per_s": flops_rates,
        "tokens_per_s": token_rates,
        "real_token_fraction": _median(real_fraction),
        "compile_s": compile_s,
        "first_call_s": first_call_s,
        "lengths": sorted(flops_by_T),
        "xla_flops": {str(k): v for k, v in xla_by_T.items()},
        "model_flops": {str(k): v for k, v in flops_by_T.items()},
        "late_compiles": len(compiled) - shapes_ahead,
        "page_faults_per_step": faults,
        "kernel_ms_per_step": kernel_ms,
    }


def w1(ctx) -> None:
    steps = 3 if ctx.smoke else ctx.steps or 40
    compile_steps = 20 if ctx.smoke else W1_AMORTISE_STEPS
    rep = ctx.report
    for pe in ctx.variants or W1_PES:
        res = train_loop(
            w1_config(pe, ctx.smoke, ctx.w1_task),
            compile_steps=compile_steps,
            steps=steps,
            repeats=ctx.repeats,
        )
        rep.emit("w1", pe, "steps_per_s", res["steps_per_s"], "steps/s", steps=steps)
        compile_total = sum(res["compile_s"])
        first_total = sum(res["first_call_s"])
        shapes = len(res["compile_s"])
        rep.emit(
            "w1",
            pe,
            "compile_s_total",
            [compile_total],
            "s",
            compilations=len(res["compile_s"]),
            lengths=res["lengths"],
            per_shape_s=[round(c, 3) for c in res["compile_s"]],
            for_steps=compile_steps,
            late_compiles=res["late_compiles"],
            first_calls_s=round(first_total, 3),
        )
        rep.emit(
            "w1",
            pe,
            "steps_per_s_1000_with_compile",
            [
                W1_AMORTISE_STEPS / (compile_total + first_total + (W1_AMORTISE_STEPS - shapes) / r)
                for r in res["steps_per_s"]
            ],
            "steps/s",
            compilations=shapes,
        )
        # Host memory diagnostics: minor page faults and kernel (system) CPU time per step.
        rep.emit("w1", pe, "page_faults_per_step", res["page_faults_per_step"], "faults")
        rep.emit("w1", pe, "kernel_ms_per_step", res["kernel_ms_per_step"], "ms")
        rep.emit(
            "w1",
            pe,
            "tokens_per_s",
            res["tokens_per_s"],
            "tokens/s",
            real_token_fraction=round(res["real_token_fraction"], 3),
        )
        rep.throughput(
            "w1",
            pe,
            res["flops_per_s"],
            xla_flops_per_step=res["xla_flops"],
            model_flops_per_step=res["model_flops"],
        )


# ----------------------------------------------------------------------------- w2 / long


def lm_config(pe: str, smoke: bool, **model):
    """Decoder-only LM config; the w2 shape unless overridden (`smoke`: tiny)."""
    from configs import base

    config = base.build(
        task="reverse_string",  # any task: w2 and long feed random bytes
        model="decoder",
        pe=pe,
        sampler="",
        scorer="",
        size="s",
        smoke=smoke,
        batch_size=8 if smoke else 16,
    )
    shape = {"num_layers": 4, "d_model": 256, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 1024}
    if smoke:
        shape = {}
    for key, value in {**shape, **model}.items():
        config.model[key] = value
    return config


def _lm_model(config, vocab: int, seed: int = 0):
    return attn.models.build(config.model, vocab_size=vocab, rngs=state_lib.rngs(seed))


def _lm_batch(rng, batch: int, length: int, vocab: int) -> dict:
    return format_lm(rng.integers(0, vocab, (batch, length + 1), dtype=np.int32))


def _device_batch(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def lm_train(config, *, vocab: int, length: int, steps: int, repeats: int) -> dict:
    tx = optim.make_optimizer(config)
    graphdef, params, rest = state_lib.split_model(_lm_model(config, vocab))
    state = state_lib.init_state(params, rest, tx)
    step_fn = train.make_train_step(config, graphdef, tx)
    rng = np.random.default_rng(0)
    host = [_lm_batch(rng, config.train.batch_size, length, vocab) for _ in range(4)]
    first = _device_batch(host[0])
    c0 = time.perf_counter()
    fn = step_fn.lower(state, first).compile()
    compile_s = time.perf_counter() - c0
    state, m = fn(state, first)
    jax.device_get(m)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, _ = train.train_loop(
            step_fn,
            state,
            (host[i % len(host)] for i in range(steps)),
            start=0,
            total=steps,
            place=_device_batch,
            hooks=train.LoopHooks(),
            compiled={train.shape_key(first): fn},
        )
        rates.append(steps / (time.perf_counter() - t0))
    flops = transformer_flops(
        layers.resolve(attn.models.REGISTRY["decoder"], config.model),
        vocab=vocab,
        batch=config.train.batch_size,
        length=first["inputs"].shape[1],
        train_step=True,
    )
    return {
        "steps_per_s": rates,
        "flops": flops,
        "xla_flops": xla_flops(fn),
        "compile_s": compile_s,
    }


def w2(ctx) -> None:
    length = 16 if ctx.smoke else 256
    steps = 2 if ctx.smoke else ctx.steps or 10
    rep = ctx.report
    for pe in ctx.variants or ("none", "rope", "alibi"):
        config = lm_config(pe, ctx.smoke)
        res = lm_train(config, vocab=256, length=length, steps=steps, repeats=ctx.repeats)
        tokens = config.train.batch_size * length
        rep.emit("w2", pe, "steps_per_s", res["steps_per_s"], "steps/s", steps=steps)
        rep.emit("w2", pe, "tokens_per_s", [r * tokens for r in res["steps_per_s"]], "tokens/s")
        rep.throughput(
            "w2",
            pe,
            [r * res["flops"] for r in res["steps_per_s"]],
            model_flops_per_step=res["flops"],
            xla_flops_per_step=res["xla_flops"],
        )
        rep.emit("w2", pe, "compile_s", [res["compile_s"]], "s")


def _max_rss_bytes() -> int:
    """Peak resident memory of this process's address space (VmHWM). ru_maxrss is not used
    where /proc exists: Linux carries the parent's high-water mark across fork and exec, so a
    child spawned by a large benchmark process reported the parent's peak (seen: 1.38 GiB for
    every `long` case run after w1)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def long_child(spec: dict) -> dict:
    """Forward of the w2 model at one length with one impl (run in a fresh process)."""
    config = lm_config(spec["pe"], spec["smoke"], **spec.get("model", {}), impl=spec["impl"])
    model = _lm_model(config, 256)
    graphdef, state = nnx.split(model)
    batch = {
        k: jnp.asarray(v)
        for k, v in _lm_batch(np.random.default_rng(0), 1, spec["length"], 256).items()
    }
    fn = jax.jit(
        lambda state, batch: metrics.loss_and_metrics(
            nnx.merge(graphdef, state), batch, train=False
        )[0]
    )
    rss_before = _max_rss_bytes()
    c0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - c0
    if spec["length"] <= LONG_WARMUP_MAX:
        _ready(compiled(state, batch))
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        _ready(compiled(state, batch))
        times.append(time.perf_counter() - t0)
    return {
        "times": times,
        "compile_s": compile_s,
        "rss_before": rss_before,
        "peak_rss": _max_rss_bytes(),
        "flops": transformer_flops(
            layers.resolve(attn.models.REGISTRY["decoder"], config.model),
            vocab=256,
            batch=1,
            length=spec["length"],
            train_step=False,
        ),
    }


def run_child(spec: dict, timeout: float) -> dict:
    """`python -m experiments.bench --child SPEC` in a fresh process; its last JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.bench", "--child", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def long(ctx) -> None:
    lengths = (64,) if ctx.smoke else LONG_LENGTHS
    config = lm_config(LONG_PE, ctx.smoke)
    H = config.model.num_heads
    budget = 0.6 * _total_memory()
    for impl in LONG_IMPLS:
        for length in lengths:
            variant = f"{impl}/{length}"
            need = MATERIALISED_COPIES * H * length * length * 4
            if impl != "chunked" and need > budget:
                ctx.report.note(
                    "long",
                    variant,
                    f"skipped: materialised logits need ~{need / 2**30:.0f} GiB "
                    f"> 60% of {_total_memory() / 2**30:.0f} GiB",
                )
                continue
            spec = {
                "kind": "long",
                "impl": impl,
                "length": length,
                "pe": LONG_PE,
                "smoke": ctx.smoke,
                "repeats": ctx.repeats,
            }
            res = run_child(spec, timeout=1200)
            if "error" in res:
                ctx.report.note("long", variant, f"failed: {res['error']}")
                continue
            ctx.report.emit("long", variant, "forward_s", res["times"], "s", pe=LONG_PE)
            ctx.report.emit(
                "long",
                variant,
                "peak_rss_gib",
                [res["peak_rss"] / 2**30],
                "GiB",
                rss_before_compile_gib=round(res["rss_before"] / 2**30, 3),
            )
            ctx.report.throughput(
                "long", variant, [res["flops"] / t for t in res["times"]], model_flops=res["flops"]
            )


# ----------------------------------------------------------------------------- compile


def _eval_fn(graphdef):
    def sums(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        return metrics.loss_and_metrics(model, batch, train=False)[1]["nll_sum"]

    return jax.jit(sums)


def _task_batch(task, config, n: int, seed: int = 0) -> dict:
    layout = attn.models.batch_format(config.model.name, config.model)
    return task.train_batch(np.random.default_rng([seed, n]), n, config.train.batch_size, layout)


def compile_child(spec: dict) -> dict:
    """Time to the first train step with the persistent cache at spec["cache_dir"]."""
    t0 = time.perf_counter()
    config = w1_config(spec["pe"], spec["smoke"], spec["task"])
    config.eval.compilation_cache = spec["cache_dir"]
    train.setup_compilation_cache(config, spec["cache_dir"])
    mesh, _, _, state, step_fn = _train_setup(config)
    task = tasks.build(config.task)
    batch = mesh_lib.shard_batch(_task_batch(task, config, spec["n"]), mesh)
    c0 = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    c1 = time.perf_counter()
    fn = lowered.compile()
    c2 = time.perf_counter()
    state, metrics = fn(state, batch)
    jax.device_get(metrics)
    return {
        "lower_s": c1 - c0,
        "compile_s": c2 - c1,
        "first_step_s": time.perf_counter() - t0,
        "setup_s": c0 - t0,
    }


def compile_(ctx) -> None:
    rep = ctx.report
    pe = (ctx.variants or ("rope",))[0]
    config = w1_config(pe, ctx.smoke, ctx.w1_task)
    n_train, n_eval = (6, 12) if ctx.smoke else (40, 100)
    task = tasks.build(config.task)
    mesh, _, graphdef, state, step_fn = _train_setup(config)
    tbatch = mesh_lib.shard_batch(_task_batch(task, config, n_train), mesh)
    ebatch = mesh_lib.shard_batch(_task_batch(task, config, n_eval), mesh)
    eval_fn = _eval_fn(graphdef)
    for name, fn, args in (
        (f"train_step/T{tbatch['inputs'].shape[1]}", step_fn, (state, tbatch)),
        (f"eval/T{ebatch['inputs'].shape[1]}", eval_fn, (state["params"], state["rest"], ebatch)),
    ):
        lower, comp = [], []
        for _ in range(ctx.repeats):
            jax.clear_caches()
            t0 = time.perf_counter()
            lowered = fn.lower(*args)
            t1 = time.perf_counter()
            lowered.compile()
            lower.append(t1 - t0)
            comp.append(time.perf_counter() - t1)
        variant = f"{pe}/{name}"
        rep.emit("compile", variant, "lower_s", lower, "s", layers=config.model.num_layers)
        rep.emit("compile", variant, "compile_s", comp, "s", layers=config.model.num_layers)
        rep.emit(
            "compile", variant, "total_s", [a + b for a, b in zip(lower, comp, strict=True)], "s"
        )
    runs: dict[str, list] = {"cold": [], "warm": []}
    for _ in range(ctx.repeats):
        with tempfile.TemporaryDirectory(prefix="attn_bench_cache_") as cache_dir:
            spec = {"kind": "compile", "pe": pe, "smoke": ctx.smoke, "n": n_train}
            spec["task"] = ctx.w1_task
            for which in ("cold", "warm"):
                res = run_child({**spec, "cache_dir": cache_dir}, timeout=600)
                if "error" in res:
                    rep.note("compile", f"{pe}/cache_{which}", f"failed: {res['error']}")
                    return
                runs[which].append(res)
    for which, results in runs.items():
        variant = f"{pe}/persistent_cache_{which}"
        for key in ("lower_s", "compile_s", "first_step_s"):
            rep.emit("compile", variant, key, [r[key] for r in results], "s")


# ----------------------------------------------------------------------------- seeds


def seeds(ctx) -> None:
    num = 2 if ctx.smoke else 8
    steps = 2 if ctx.smoke else ctx.steps or 5
    pe = (ctx.variants or ("rope",))[0]
    config = w1_config(pe, ctx.smoke, ctx.w1_task)
    n = 4 if ctx.smoke else 20
    task = tasks.build(config.task)
    mesh = mesh_lib.make_mesh(config)
    tx = optim.make_optimizer(config)
    states, graphdef = [], None
    for s in range(num):
        model = state_lib.build_model(config, seed=s, mesh=mesh)
        graphdef, params, rest = state_lib.split_model(model)
        states.append(state_lib.init_state(params, rest, tx))
    host = [_task_batch(task, config, n, seed=s) for s in range(num)]
    batches = [mesh_lib.shard_batch(b, mesh) for b in host]
    stacked_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    stacked = {k: jax.device_put(np.stack([b[k] for b in host]), stacked_sharding) for k in host[0]}
    vstate = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    single = train.make_train_step(config, graphdef, tx)
    vmapped = jax.jit(
        jax.vmap(train.make_train_step(config, graphdef, tx, donate=False)), donate_argnums=(0,)
    )

    def run_vmapped(k):
        nonlocal vstate
        for _ in range(k):
            vstate, metrics = vmapped(vstate, stacked)
        jax.device_get(metrics)

    def run_sequential(k):
        for _ in range(k):
            for i in range(num):
                states[i], metrics = single(states[i], batches[i])
        jax.device_get(metrics)

    timings = {}
    for name, fn in (("vmapped", run_vmapped), ("sequential", run_sequential)):
        fn(2)  # the second call may recompile for the output shardings of the first
        times = []
        for _ in range(ctx.repeats):
            t0 = time.perf_counter()
            fn(steps)
            times.append((time.perf_counter() - t0) / steps)
        timings[name] = times
        ctx.report.emit(
            "seeds",
            f"{pe}/{name}",
            "s_per_step_all_seeds",
            times,
            "s",
            seeds=num,
            padded_length=host[0]["inputs"].shape[1],
        )
    ctx.report.emit(
        "seeds",
        f"{pe}/{num}_seeds",
        "vmapped_speedup",
        [s / v for s, v in zip(timings["sequential"], timings["vmapped"], strict=True)],
        "x",
    )


# ----------------------------------------------------------------------------- gpu


GPU_LONG_CASES = (("rope", "auto"), ("rope", "chunked"), ("alibi", "auto"), ("alibi", "chunked"))
GPU_LONG_LENGTHS = (8192, 32768)
GPU_LARGE = {"num_layers": 12, "d_model": 768, "num_heads": 12, "num_kv_heads": 12}
GPU_LARGE.update({"mlp_dim": 3072, "dtype": "bfloat16"})


def _peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def gpu_train_child(spec: dict) -> dict:
    """Training steps of the large decoder at one length (run in a fresh process, so the
    device's peak memory is this case's)."""
    from attn import attention

    model = dict(spec["model"], impl=spec["impl"], remat=spec.get("remat", "none"))
    config = lm_config(spec["pe"], spec["smoke"], **model)
    config.train.batch_size = spec.get("batch", 1)
    res = lm_train(
        config, vocab=256, length=spec["length"], steps=spec["steps"], repeats=spec["repeats"]
    )
    picked = sorted({k[0] for k in attention._logged_choices if len(k) > 2})
    return {**res, "peak_device_bytes": _peak_device_bytes(), "picked": picked}


def _dp_rate(config, k: int, per_device: int, length: int, steps: int, repeats: int) -> list:
    """steps/s of w2-large data parallel over the first k devices (batch per_device x k)."""
    config.train.mesh.data = k
    config.train.batch_size = per_device * k
    mesh, _, _, state, step_fn = _train_setup(config)
    rng = np.random.default_rng(0)
    host = [_lm_batch(rng, per_device * k, length, 256) for _ in range(2)]
    batches = [mesh_lib.shard_batch(b, mesh) for b in host]
    state, m = step_fn(state, batches[0])
    jax.device_get(m)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step_fn(state, batches[i % 2])
        jax.device_get(m)
        rates.append(steps / (time.perf_counter() - t0))
    return rates


def gpu(ctx) -> None:
    rep = ctx.report
    if jax.default_backend() != "gpu":
        rep.note("gpu", "-", f"skipped: no GPU backend (backend is {jax.default_backend()})")
        return
    n = 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(jnp.matmul)
    _ready(f(a, a))
    rates = []
    for _ in range(ctx.repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            out = f(a, a)
        _ready(out)
        rates.append(2 * n**3 * 10 / (time.perf_counter() - t0) / 1e9)
    bf16_peak = rep.emit("gpu", "matmul_bf16_n8192", "gflops_per_s", rates, "GFLOP/s")["median"]
    shape = {"dtype": "bfloat16"} if ctx.smoke else dict(GPU_LARGE)
    length = 64 if ctx.smoke else 1024
    steps = ctx.steps or 10
    config = lm_config("rope", ctx.smoke, **shape)
    res = lm_train(config, vocab=256, length=length, steps=steps, repeats=ctx.repeats)
    rep.emit("gpu", "w2_large_bf16", "steps_per_s", res["steps_per_s"], "steps/s")
    flops = [r * res["flops"] / 1e9 for r in res["steps_per_s"]]
    rep.emit(
        "gpu",
        "w2_large_bf16",
        "gflops_per_s",
        flops,
        "GFLOP/s",
        mfu=round(_median(flops) / bf16_peak, 4),
    )
    # Long-context training: a no-bias PE on cuDNN and a bias PE on the flash kernel, each
    # against chunked, with this case's own peak device memory.
    times: dict[tuple, float] = {}
    for length in (256,) if ctx.smoke else GPU_LONG_LENGTHS:
        for pe, impl in GPU_LONG_CASES:
            variant = f"{pe}/{impl}/T{length}"
            spec = {"kind": "gpu_train", "pe": pe, "impl": impl, "length": length}
            spec.update(smoke=ctx.smoke, model=shape, remat="block", steps=2, repeats=ctx.repeats)
            res = run_child(spec, timeout=900)
            if "error" in res:
                rep.note("gpu", variant, f"failed: {res['error']}")
                continue
            step_s = [1 / r for r in res["steps_per_s"]]
            times[(pe, impl, length)] = _median(step_s)
            rep.emit(
                "gpu", variant, "train_step_s", step_s, "s", picked=res["picked"], remat="block"
            )
            if res["peak_device_bytes"] is not None:
                peak_gib = res["peak_device_bytes"] / 2**30
                rep.emit("gpu", variant, "peak_device_gib", [peak_gib], "GiB")
        for pe in ("rope", "alibi"):
            fused, chunked = times.get((pe, "auto", length)), times.get((pe, "chunked", length))
            if fused and chunked:
                rep.emit("gpu", f"{pe}/T{length}", "chunked_over_auto", [chunked / fused], "x")
    # Data-parallel scaling of w2-large over the devices present.
    count = jax.device_count()
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= count]
    if count == 1:
        rep.note("gpu", "data_parallel", "one device: no scaling to measure")
    base = None
    for k in ks if count > 1 else []:
        config = lm_config("rope", ctx.smoke, **shape)
        per_device, dp_length = (2, 64) if ctx.smoke else (16, 1024)
        rates = _dp_rate(config, k, per_device, dp_length, steps, ctx.repeats)
        base = base or _median(rates)
        rep.emit(
            "gpu",
            f"data_parallel/{k}",
            "steps_per_s",
            rates,
            "steps/s",
            efficiency=round(_median(rates) / base, 3),
        )


# ----------------------------------------------------------------------------- main

WORKLOADS = {"w1": w1, "w2": w2, "long": long, "compile": compile_, "seeds": seeds, "gpu": gpu}
CHILDREN = {"long": long_child, "compile": compile_child, "gpu_train": gpu_train_child}


class Context:
    def __init__(self, args, report: Report):
        self.report = report
        self.smoke = args.smoke
        self.repeats = args.repeats or (1 if args.smoke else 3)
        self.steps = args.steps
        self.variants = args.variants
        self.w1_task = args.w1_task


def main(argv=None) -> Report:
    parser = ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (smoke: 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; numbers mean nothing")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    parser.add_argument("--variants", nargs="+", default=None, help="PEs for w1/w2/compile/seeds")
    parser.add_argument(
        "--w1-task",
        default=W1_TASK,
        choices=sorted(cls.NAME for cls in tasks.formal.TASKS),
        help="formal task of w1/compile/seeds (parity_check: T = n + 1; reverse_string: T = 2n)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parser.check(args.repeats is None or args.repeats >= 1, "--repeats", "must be >= 1")
    parser.check(args.steps is None or args.steps >= 1, "--steps", "must be >= 1")
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)
        return Report()
    report = Report()
    ctx = Context(args, report)
    host_notes(report)
    peak(ctx)
    for name in args.workload:
        WORKLOADS[name](ctx)
    print("\n" + report.table(), flush=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
