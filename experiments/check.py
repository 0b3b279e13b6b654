"""`./launch.sh check`: what JAX sees on this machine, and whether every attention path trains.

1. JAX: its version, backend, devices and processes, and the accelerator launch.sh installed
   for (a CUDA or TPU build whose JAX reports only a CPU is a failure, the classic silent
   fallback).
2. Training: for each model (a causal decoder, and a bidirectional encoder, where key padding
   changes what real tokens see) x positional encoding x attention implementation, a small
   model in bfloat16 (`model.dtype`; parameters and Adam state stay float32) trains STEPS steps
   on fixed right-padded batches through the driver's train step, and its losses must match
   the float32 model with impl="reference" (same initialisation, same batches) within
   LOSS_TOLERANCE. What `auto` picked is printed. Combinations that cannot run on this
   backend (cuDNN off a GPU, flash on a CPU, where Pallas only interprets) are left out.
3. Fused vs chunked: one attention call (forward and gradients of q, k, v) with key padding
   and a causal mask in bfloat16, each fused implementation this backend has (cuDNN on a GPU,
   the flash kernel with an ALiBi bias on a GPU or TPU; dense and XLA on a CPU) against
   chunked, within FUSED_TOLERANCE relative to the largest value.

By default a GPU or TPU runs both models with four encodings (none, RoPE, ALiBi, T5: no bias,
rotation, a kernel bias, a bucketed table) and the implementations auto, cudnn, flash and
chunked (a few minutes); a CPU runs a reduced set (the encoder, two encodings, two
implementations, a short length) in under a minute. `--full` runs every encoding and
implementation. Exit
status 0 when every check passes, 1 otherwise; `--json PATH` also writes the results.

    ./launch.sh check [--full] [--models encoder] [--pes none,rope] [--impls auto,chunked]
                      [--json out.json]
"""

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from attn import attention

PES = ("none", "sinusoidal", "learned", "rope", "xpos", "alibi", "t5", "kerple", "fire")
IMPLS = {
    "gpu": ("auto", "cudnn", "flash", "chunked", "dense", "xla"),
    "tpu": ("auto", "flash", "chunked", "dense", "xla"),
    "cpu": ("auto", "chunked", "dense", "xla"),
}
MODELS = ("decoder", "encoder")
DEFAULT_PES = ("none", "rope", "alibi", "t5")
DEFAULT_IMPLS = {"gpu": ("auto", "cudnn", "flash", "chunked"), "tpu": ("auto", "flash", "chunked")}
QUICK_MODELS, QUICK_PES, QUICK_IMPLS = ("encoder",), ("none", "alibi"), ("auto", "chunked")
NO_BIAS = ("none", "sinusoidal", "learned", "rope", "xpos")
STEPS = 3
# bf16 against float32 over STEPS Adam steps: rounding alone moved the losses (~1.3-2 nats) by
# 0.001-0.003 on the CPU; an encoder whose padding mask was dropped moved them by 0.035.
LOSS_TOLERANCE = 1.5e-2
FUSED_TOLERANCE = 2e-2


def jax_summary() -> dict:
    devices = jax.devices()
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    import jaxlib

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": len(devices),
        "local_devices": jax.local_device_count(),
        "kinds": kinds,
        "processes": jax.process_count(),
        "installed_for": installed_for(),
        "python": sys.version.split()[0],
    }


def installed_for() -> str | None:
    """The accelerator launch.sh set up for: ATTN_ACCELERATOR, else .venv/.installed."""
    if os.environ.get("ATTN_ACCELERATOR"):
        return os.environ["ATTN_ACCELERATOR"]
    stamp = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".venv", ".installed")
    try:
        with open(stamp) as f:
            return f.read().strip() or "cpu"
    except OSError:
        return None


def backend_problem(summary: dict) -> str | None:
    want = summary["installed_for"]
    have = summary["backend"]
    if want and want.startswith("cuda") and have != "gpu":
        return f"jax was installed for {want} but its backend is {have}: check the driver"
    if want == "tpu" and have != "tpu":
        return f"jax was installed for a TPU but its backend is {have}"
    return None


def _config(model: str, pe: str, impl: str, dtype: str, size: dict):
    from configs import base

    config = base.build(
        task="reverse_string",
        model=model,
        pe=pe,
        sampler="",
        scorer="",
        size="s",
        smoke=True,
        batch_size=size["batch"],
    )
    m = config.model
    m.num_layers, m.d_model, m.num_heads = size["layers"], size["d_model"], size["heads"]
    m.num_kv_heads, m.head_dim, m.mlp_dim = size["heads"], size["head_dim"], 4 * size["d_model"]
    m.dropout, m.impl, m.dtype = 0.0, impl, dtype
    config.train.mesh.data = 1
    config.train.optimizer.lr = 1e-3
    return config


def _batches(vocab: int, size: dict, steps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    B, T = size["batch"], size["length"]
    out = []
    for _ in range(steps):
        tokens = rng.integers(4, vocab, (B, T + 1)).astype(np.int32)
        lengths = rng.integers(T // 4, T + 1, B)
        lengths[0] = T
        real = np.arange(T)[None, :] < lengths[:, None]
        out.append(
            {
                "inputs": np.where(real, tokens[:, :-1], 0),
                "targets": np.where(real, tokens[:, 1:], 0),
                "loss_mask": real.astype(np.float32),
                "token_mask": real,
            }
        )
    return out


def train_losses(model: str, pe: str, impl: str, dtype: str, size: dict, steps: int) -> list[float]:
    """Losses of `steps` driver train steps of the small model (same init and batches)."""
    from experiments import mesh as mesh_lib
    from experiments import state as state_lib
    from experiments import tasks, train

    config = _config(model, pe, impl, dtype, size)
    mesh = mesh_lib.make_mesh(config)
    graphdef, state, tx = state_lib.init_train_state(config, mesh=mesh)
    step_fn = train.make_train_step(config, graphdef, tx, donate=False)
    losses = []
    for batch in _batches(tasks.build(config.task).vocab_size, size, steps):
        state, m = step_fn(state, mesh_lib.shard_batch(batch, mesh))
        losses.append(float(m["loss"]))
    return losses


def _runs(impl: str, pe: str, backend: str) -> str | None:
    """Why (pe, impl) is left out on this backend, or None."""
    if impl == "cudnn" and backend != "gpu":
        return "needs a GPU"
    if impl == "cudnn" and pe not in NO_BIAS:
        return "a bias PE (auto never sends a bias to cuDNN: it would be rounded to bf16)"
    if impl == "flash" and backend == "cpu":
        return "interpret mode only on a CPU"
    return None


def training_matrix(models, pes, impls, size: dict, steps: int, report) -> None:
    backend = jax.default_backend()
    for model, pe in ((m, p) for m in models for p in pes):
        try:
            ref = train_losses(model, pe, "reference", "float32", size, steps)
        except Exception as e:  # a broken PE is one failed line, the rest still runs
            report.fail("train", f"{model} pe={pe} reference float32", _one_line(e))
            continue
        for impl in impls:
            why = _runs(impl, pe, backend)
            name = f"{model:<7} pe={pe:<10} impl={impl:<8}"
            if why:
                report.skip("train", name, why)
                continue
            before = set(attention._logged_choices)
            t0 = time.perf_counter()
            try:
                got = train_losses(model, pe, impl, "bfloat16", size, steps)
            except Exception as e:
                report.fail("train", name, _one_line(e))
                continue
            picked = sorted({k[0] for k in set(attention._logged_choices) - before if len(k) > 2})
            diff = max(abs(a - b) for a, b in zip(got, ref, strict=True))
            ok = all(np.isfinite(got)) and diff <= LOSS_TOLERANCE
            text = (
                f"bf16 {' '.join(f'{x:.4f}' for x in got)} vs f32 reference "
                f"{' '.join(f'{x:.4f}' for x in ref)}: max|diff| {diff:.4f}"
                + (f" (auto picked {', '.join(picked)})" if impl == "auto" and picked else "")
                + f" [{time.perf_counter() - t0:.1f}s]"
            )
            report.result("train", name, ok, text, diff=diff, losses=got, reference=ref)


def _attention_inputs(L: int, key=0):
    rng = np.random.default_rng(key)
    B, H, K = 2, 8, 64
    shapes = ((B, L, H, K), (B, L, H, K), (B, L, H, K))
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in shapes)
    lengths = np.array([L, (3 * L) // 4])
    mask = jnp.asarray(np.arange(L)[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, mask


def _alibi_bias(q, k):
    """ALiBi as the layers pass it: a bias callable with the flash kernel's form attached."""
    from flax import nnx

    import attn.pe
    from attn.layers import positional_bias

    B, L, H, K = q.shape
    pe = attn.pe.build(
        {"name": "alibi"}, d_model=H * K, num_heads=H, head_dim=K, causal=True, rngs=nnx.Rngs(0)
    )
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    return positional_bias(pe, q, k, pos, pos, materialize=False)


def _fwd_bwd(impl: str, q, k, v, mask, bias):
    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, bias=bias, mask=mask, causal=True, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * w), out

    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = fn(q, k, v)
    jax.block_until_ready(grads)
    t0 = time.perf_counter()
    (_, out), grads = fn(q, k, v)
    jax.block_until_ready(grads)
    return [out, *grads], time.perf_counter() - t0


def fused_vs_chunked(length: int, report) -> None:
    backend = jax.default_backend()
    pairs = {
        "gpu": [("cudnn", None), ("flash", "alibi")],
        "tpu": [("flash", None), ("flash", "alibi")],
    }.get(backend, [("dense", None), ("xla", None)])
    q, k, v, mask = _attention_inputs(length)
    for impl, bias_name in pairs:
        name = f"{impl} vs chunked L={length}" + (f" bias={bias_name}" if bias_name else "")
        try:
            bias = _alibi_bias(q, k) if bias_name else None
            want, t_chunked = _fwd_bwd("chunked", q, k, v, mask, bias)
            got, t_fused = _fwd_bwd(impl, q, k, v, mask, bias)
        except Exception as e:
            report.fail("fused", name, _one_line(e))
            continue
        errs = []
        for label, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            errs.append((label, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))))
        worst = max(e for _, e in errs)
        text = (
            ", ".join(f"{label} {e:.1e}" for label, e in errs)
            + f" (relative to max); fwd+bwd {1e3 * t_fused:.1f} ms vs chunked "
            f"{1e3 * t_chunked:.1f} ms"
        )
        report.result("fused", name, worst <= FUSED_TOLERANCE, text, errors=dict(errs))


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


class Report:
    def __init__(self, out=None):
        self.out = out  # None: sys.stdout at print time
        self.rows: list[dict] = []

    def _add(self, kind, name, status, text, **extra):
        self.rows.append(
            {"kind": kind, "name": name.strip(), "status": status, "text": text, **extra}
        )
        line = f"{kind:<6} {name}  {status.upper():<4}  {text}"
        print(line, file=self.out or sys.stdout, flush=True)

    def result(self, kind, name, ok, text, **extra):
        self._add(kind, name, "ok" if ok else "fail", text, **extra)

    def fail(self, kind, name, text):
        self._add(kind, name, "fail", text)

    def skip(self, kind, name, why):
        self._add(kind, name, "skip", why)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "fail"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every encoding and implementation")
    parser.add_argument("--models", default=None, help="comma-separated: decoder,encoder")
    parser.add_argument("--pes", default=None, help="comma-separated encodings")
    parser.add_argument("--impls", default=None, help="comma-separated implementations")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--length", type=int, default=None, help="fused check length")
    parser.add_argument(
        "--fused", action=argparse.BooleanOptionalAction, default=True, help="part 3"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    summary = jax_summary()
    backend = summary["backend"]
    quick = backend == "cpu" and not args.full
    kinds = ", ".join(f"{n} x {k}" for k, n in summary["kinds"].items())
    print(
        f"jax {summary['jax']} (jaxlib {summary['jaxlib']}, python {summary['python']}): "
        f"backend {backend}, {summary['devices']} devices ({kinds}), "
        f"{summary['processes']} process(es); launch.sh installed for "
        f"{summary['installed_for'] or 'unknown (not through launch.sh)'}",
        flush=True,
    )
    report = Report()
    problem = backend_problem(summary)
    if problem:
        report.fail("jax", "backend", problem)
    full = args.full or backend not in DEFAULT_IMPLS and not quick
    models = args.models.split(",") if args.models else (QUICK_MODELS if quick else MODELS)
    pes = (
        args.pes.split(",") if args.pes else (QUICK_PES if quick else PES if full else DEFAULT_PES)
    )
    impls = (
        args.impls.split(",")
        if args.impls
        else (
            QUICK_IMPLS
            if quick
            else IMPLS.get(backend, IMPLS["cpu"])
            if full
            else DEFAULT_IMPLS[backend]
        )
    )
    size = (
        {"layers": 1, "d_model": 32, "heads": 4, "head_dim": 8, "batch": 4, "length": 16}
        if quick
        else {"layers": 2, "d_model": 128, "heads": 4, "head_dim": 32, "batch": 8, "length": 256}
    )
    t0 = time.perf_counter()
    training_matrix(models, pes, impls, size, args.steps, report)
    if args.fused:
        fused_vs_chunked(args.length or (128 if quick else 4096), report)
    passed = sum(r["status"] == "ok" for r in report.rows)
    skipped = sum(r["status"] == "skip" for r in report.rows)
    verdict = "FAILED" if report.failed else "OK"
    print(
        f"check: {verdict}: {passed} passed, {len(report.failed)} failed, {skipped} left out "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": summary, "rows": report.rows, "verdict": verdict}, f, indent=1)
    return 1 if report.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
