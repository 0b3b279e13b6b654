"""Side-by-side peer benchmark (issue #19): the same training steps in attn and in a peer library.

    ./launch.sh bench --vs x-transformers [--workload w1 w1-mixed w2] [--variants none rope ...]
                      [--repeats 3] [--steps K] [--smoke] [--dtype float32|bfloat16]
                      [--peer-malloc same|system]
    python -m experiments.bench_peer --vs x-transformers ...   (what launch.sh runs for --vs)

The peer gets its own virtual environment, built on first use in .peer/<peer>/ (git-ignored;
never by `./launch.sh test`) from the pins of PEERS, and runs as one persistent child process
(experiments/peer_xtransformers.py, pure torch) answering JSON lines. One run interleaves the
sides: a round is K attn steps in this process and K steps of each peer mode (torch eager,
torch.compile), the order rotating from round to round; R rounds. Reported per workload and
encoding: median steps/s of each side and attn / best peer, the median over rounds of attn's
rate over the rate of the faster peer mode in the same round (> 1: attn is faster); such
ratios hold on any machine, the rates are this machine's. Warm-up is left out of the rounds
and reported on its own: attn's AOT compile and first call of every padded length, the peer's
first step at every length (torch.compile: its compilation, into an inductor cache that is new
for each run, so only kernels compiled earlier in the same run are reused; an ALiBi model
recompiles per length: "compile graphs" counts the graphs, and those made during the rounds).

The attn side is bench.py's builders stepped by the driver's `train.make_train_step` and
`train.train_loop`. `w1`: bench.py's w1 encoder (Deletang et al.: 5 layers, d_model 64, 8 heads,
MLP 256 ReLU, post-LN, parity_check, Adam, clipping 1.0) with dropout 0, batch 128, n = 40:
both run 41 tokens (attn cuts its top bucket at the longest training length). `w1-mixed`:
the papers' n ~ U{1..40}, one length per step, the same seeded sequence for both sides
(`schedule`); attn pads to its buckets (16, 24, 32, 41), torch runs every exact length, eager
and compiled once with `dynamic=True` (a symbolic length). `w2`: bench.py's w2 decoder LM
(4 layers, d_model 256, 4 heads, MLP 1024, vocab 256, pre-LN), batch 16 x 256 tokens, also as
MFU against this run's float32 matmul peak (bench.py `peak`). Encodings both sides have: none,
sinusoidal, learned, rope, alibi, t5. Threads: torch.set_num_threads = the cores XLA uses;
the peer runs with OMP_WAIT_POLICY=PASSIVE unless set (see `run`), and with attn's allocator
(launch.sh's jemalloc preload) unless `--peer-malloc system`. `--dtype bfloat16`: attn's
model.dtype=bfloat16 against torch's CPU autocast (both keep float32 parameters and Adam;
MFU stays against the float32 peak).

What x-transformers 2.31.10 does differently: LayerNorm with a gain and no bias, an output
head without bias (hence fewer parameters; both counts are reported), a learned scale on the
sinusoid, the learned table scaled by d^-0.5 (attn scales token embeddings by sqrt(d));
attention through torch's scaled_dot_product_attention (`attn_flash`) except with T5, where
the library forbids it. The peer's loss covers every position (attn's w1 masks all but the
answer slot; both compute the logits of every position).
"""

import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import attn.models
from attn import layers
from experiments import bench, optim, tasks, train
from experiments import mesh as mesh_lib
from experiments import state as state_lib
from experiments.config_utils import ArgumentParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_WORKLOADS = ("w1", "w1-mixed", "w2")
ENCODINGS = ("none", "sinusoidal", "learned", "rope", "alibi", "t5")
MODES = ("eager", "compile")
W1_N = 40
MIXED = (1, 40)  # n ~ U{lo..hi}, as the papers train
# Each peer: its script, and every package of its environment pinned (pip freeze of a working
# install). PyPI's Linux x86_64 torch is the CUDA build, whose nvidia-* requirements are GBs and
# without which it does not import (libcudnn.so.9 missing): the CPU build torch==X+cpu is
# installed from where pip finds it (PIP_FIND_LINKS or pip's find-links configuration).
PEERS = {
    "x-transformers": {
        "script": "experiments/peer_xtransformers.py",
        "torch": "torch==2.13.0+cpu",
        "check": "import torch, x_transformers; assert torch.version.cuda is None, 'not the CPU"
        " build'; a = torch.ones(64, 64); assert float((a @ a).sum()) == 64.0**3, 'matmul'",
        "pins": (
            "x-transformers==2.31.10", "einops==0.8.2", "einx==0.4.3", "loguru==0.7.3",
            "torch-einops-utils==0.2.0", "frozendict==2.5.1", "numpy==2.4.6", "packaging==26.4",
            "filelock==4.3.1", "fsspec==2026.9.0", "jinja2==3.1.6", "markupsafe==3.0.4",
            "mpmath==1.3.0", "networkx==3.6.1", "sympy==1.14.0", "typing-extensions==4.16.0",
            "setuptools==84.2.1",
        ),
    },
}  # fmt: skip
TORCH_HINT = (
    "the CPU build must be where pip finds it (PIP_FIND_LINKS); PyPI's Linux torch is the CUDA"
    " build, which does not import without its nvidia-* packages (GBs)"
)


class PeerError(RuntimeError):
    """One line: what failed on the peer's side."""


# ----------------------------------------------------------------------------- arguments


def check_args(parser, args) -> None:
    """Errors (one line, exit 2) before anything is built or compiled."""
    parser.check(args.vs in PEERS, "--vs", f"unknown peer {args.vs!r}; peers: {', '.join(PEERS)}")
    args.workload = args.workload or list(PEER_WORKLOADS)
    bad = [w for w in args.workload if w not in PEER_WORKLOADS]
    parser.check(not bad, "--workload", f"{bad} with --vs; allowed: {', '.join(PEER_WORKLOADS)}")
    args.variants = args.variants or list(ENCODINGS)
    bad = [v for v in args.variants if v not in ENCODINGS]
    parser.check(not bad, "--variants", f"{bad} with --vs; allowed: {', '.join(ENCODINGS)}")
    for flag, value, allowed in (
        ("--dtype", args.dtype, ("float32", "bfloat16")),
        ("--peer-malloc", args.peer_malloc, ("same", "system")),
    ):
        parser.check(value in allowed, flag, f"{value!r}; allowed: {', '.join(allowed)}")


def schedule(seed: int, rounds: int, k: int, lo: int, hi: int) -> list[list[int]]:
    """Nominal lengths n ~ U{lo..hi} of each step of each round; the one sequence both sides
    run (attn pads each n to its bucket, the peer runs it as it is)."""
    rng = np.random.default_rng([seed, lo, hi])
    return [[int(n) for n in rng.integers(lo, hi + 1, size=k)] for _ in range(rounds)]


def first_seen(rounds) -> list:
    """The distinct values of all rounds in order of first appearance (the warm-up order)."""
    return list(dict.fromkeys(x for r in rounds for x in r))


# ----------------------------------------------------------------------------- environment


def ensure_env(peer: str, *, root: str = ROOT, python: str = sys.executable) -> str:
    """The peer's Python, after creating or updating .peer/<peer>/ when its pins changed."""
    spec = PEERS[peer]
    folder = os.path.join(root, ".peer", peer)
    py = os.path.join(folder, "bin", "python")
    stamp = os.path.join(folder, "pins.txt")
    wanted = "\n".join((spec["torch"], *spec["pins"])) + "\n"
    if os.path.exists(stamp) and open(stamp).read() == wanted and os.path.exists(py):
        return py
    print(f"bench: setting up {os.path.relpath(folder, root)} (once)", file=sys.stderr)
    pip = [py, "-m", "pip", "install", "--quiet"]
    steps = [
        ([python, "-m", "venv", folder], "creating the virtual environment", ""),
        ([*pip, "--no-deps", spec["torch"]], f"pip install {spec['torch']}", TORCH_HINT),
        ([*pip, spec["torch"], *spec["pins"]], "pip install of the pinned packages", ""),
        ([py, "-I", "-c", spec["check"]], "the check (imports, CPU build, a matmul)", ""),
    ]
    for cmd, what, hint in steps:
        if cmd[0] == py and not os.path.exists(py):
            raise PeerError(f"bench --vs {peer}: {what} failed: {py} is missing")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            lines = [s for s in (proc.stderr + proc.stdout).splitlines() if s.strip()]
            last = [s for s in lines if "ERROR" in s or "Error" in s][-1:] or lines[-1:] or [""]
            tail = f" ({hint})" if hint else ""
            raise PeerError(f"bench --vs {peer}: {what} failed: {last[0].strip()[:300]}{tail}")
    with open(stamp, "w") as f:
        f.write(wanted)
    return py


class PeerProcess:
    """A persistent peer answering one JSON line per request (other lines are skipped)."""

    def __init__(self, cmd: list[str], log_path: str | None = None, env: dict | None = None):
        self.log_path, self.buf = log_path, b""
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env
        )

    def request(self, msg: dict, timeout: float = 900.0) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise PeerError(self._died()) from None
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if line is None:
                raise PeerError(f"peer gave no answer to {msg.get('cmd')!r} in {timeout:.0f}s")
            if line.startswith("{"):
                answer = json.loads(line)
                if not answer.get("ok"):
                    raise PeerError(f"peer: {answer.get('error', 'failed')}")
                return answer

    def _line(self, deadline: float) -> str | None:
        """The next line (own buffer: select() cannot see what a file object buffered)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise PeerError(self._died())
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")

    def _died(self) -> str:
        code = self.proc.wait(timeout=10)
        where = f"; its stderr: {self.log_path}" if self.log_path else ""
        return f"peer exited with status {code}{where}"

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.communicate(b'{"cmd": "quit"}\n', timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


# ----------------------------------------------------------------------------- results


def summarize(res: dict) -> dict:
    """Medians of each side and attn / best peer (median over rounds of the same-round
    ratio against the peer mode with the higher median); None where a side has no numbers."""
    med = {s: statistics.median(res[s]) if res.get(s) else None for s in ("attn", *MODES)}
    peers = [m for m in MODES if med[m] is not None]
    best = max(peers, key=lambda m: med[m]) if peers else None
    ratio = None
    if best and med["attn"] is not None:
        pairs = zip(res["attn"], res[best], strict=True)
        ratio = statistics.median(a / p for a, p in pairs)
    return {**med, "best": best, "ratio": ratio}


def _num(x, fmt="{:.3g}") -> str:
    return "–" if x is None else fmt.format(x)


def table(results: list[dict], peer: str) -> str:
    head = f"| workload | encoding | attn steps/s | {peer} eager | {peer} compile |"
    lines = [head + " attn / best peer |", "|---|---|---|---|---|---|"]
    for res in results:
        s = summarize(res)
        ratio = "–" if s["ratio"] is None else f"{s['ratio']:.2f}x ({s['best']})"
        lines.append(
            f"| {res['workload']} | {res['encoding']} | {_num(s['attn'])} | {_num(s['eager'])} | "
            f"{_num(s['compile'])} | {ratio} |"
        )
    return "\n".join(lines)


def _span(xs) -> str:
    return ",".join(map(str, xs)) if len(xs) <= 4 else f"{xs[0]}..{xs[-1]} ({len(xs)})"


def details(results: list[dict], peak: float | None) -> str:
    """Parameters, warm-up seconds, lengths run, torch.compile graphs, and MFU (w2) against
    the run's float32 matmul peak."""
    lines = [
        "| workload | encoding | params attn / peer | warm-up s attn / eager / compile | "
        "lengths attn / peer | compile graphs (in rounds) | MFU attn / eager / compile |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        s = summarize(res)
        warm = " / ".join(_num(res.get(f"{k}_warmup_s"), "{:.1f}") for k in ("attn", *MODES))
        mfu = "–"
        if res.get("flops") and peak:
            rates = [s[k] and s[k] * res["flops"] / 1e9 / peak for k in ("attn", *MODES)]
            mfu = " / ".join(_num(x, "{:.1%}") for x in rates)
        graphs = f"{_num(res.get('compile_graphs'), '{}')} ({res.get('compile_late_graphs', 0)})"
        lines.append(
            f"| {res['workload']} | {res['encoding']} | {res['attn_params']:,} / "
            f"{_num(res.get('peer_params'), '{:,}')} | {warm} | {_span(res['attn_T'])} / "
            f"{_span(res['peer_T'])} | {graphs} | {mfu} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- attn side


class AttnSide:
    """One workload and encoding in attn: bench.py's builders, the driver's step and loop.
    Steps are named by nominal length n (w2: its one length)."""

    def __init__(
        self, workload: str, encoding: str, smoke: bool, task=bench.W1_TASK, dtype="float32"
    ):
        self.compiled, self.host = {}, {}
        if workload == "w2":
            config = bench.lm_config(encoding, smoke)
            config.model.dtype = dtype
            self.vocab = 256
            tx = optim.make_optimizer(config)
            graphdef, params, rest = state_lib.split_model(bench._lm_model(config, self.vocab))
            self.state = state_lib.init_state(params, rest, tx)
            self.step_fn = train.make_train_step(config, graphdef, tx)
            self.place = bench._device_batch
            length = 16 if smoke else 256
            rng = np.random.default_rng(0)
            self.make = lambda n: bench._lm_batch(rng, config.train.batch_size, n, self.vocab)
            self.range = (length, length)
            self.flops = bench.transformer_flops(
                layers.resolve(attn.models.REGISTRY["decoder"], config.model),
                vocab=self.vocab,
                batch=config.train.batch_size,
                length=length,
                train_step=True,
            )
        else:
            config = bench.w1_config(encoding, smoke, task)
            config.model.dropout = 0.0  # the peer comparison runs without dropout
            config.model.dtype = dtype
            task = tasks.build(config.task)
            self.vocab = task.vocab_size
            mesh, _, _, self.state, self.step_fn = bench._train_setup(config)
            self.place = lambda b: mesh_lib.shard_batch(b, mesh)
            self.make = lambda n: bench._task_batch(task, config, n)
            hi = config.task.max_length if smoke else W1_N
            self.range = (MIXED[0], hi) if workload == "w1-mixed" else (hi, hi)
            self.flops = None
        self.config, self.batch_size = config, config.train.batch_size
        self.params = sum(int(np.size(x)) for x in jax.tree.leaves(self.state["params"]))

    def batch(self, n: int) -> dict:
        if n not in self.host:
            self.host[n] = self.make(n)
        return self.host[n]

    def attn_length(self, n: int) -> int:
        return int(self.batch(n)["inputs"].shape[1])

    def peer_length(self, n: int) -> int:
        """The real tokens of step n's rows (what the peer runs, unpadded)."""
        return int(self.batch(n)["token_mask"].sum(axis=1).max())

    def warmup(self, ns) -> float:
        """AOT compile and first call of every padded shape of `ns`; seconds."""
        t0 = time.perf_counter()
        for n in dict.fromkeys(ns):
            gbatch = self.place(self.batch(n))
            key = train.shape_key(gbatch)
            if key not in self.compiled:
                self.compiled[key] = fn = self.step_fn.lower(self.state, gbatch).compile()
                self.state, m = fn(self.state, gbatch)
                jax.device_get(m)
        return time.perf_counter() - t0

    def steps(self, ns) -> float:
        t0 = time.perf_counter()
        self.state, _ = train.train_loop(
            self.step_fn,
            self.state,
            (self.batch(n) for n in ns),
            start=0,
            total=len(ns),
            place=self.place,
            hooks=train.LoopHooks(),
            compiled=self.compiled,
        )
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the run


def build_request(side: AttnSide, workload: str, encoding: str) -> dict:
    """The peer's model and optimizer, read off attn's config so that the shapes match."""
    m, t = side.config.model, side.config.train
    model = {"num_layers": m.num_layers, "d_model": m.d_model, "num_heads": m.num_heads}
    model.update(mlp_dim=m.mlp_dim, vocab=side.vocab, causal=m.name == "decoder", norm=m.norm)
    model["max_len"] = m.pe.max_len if m.pe.name == "learned" else 4096
    request = {"cmd": "build", "model": model, "encoding": encoding, "batch": side.batch_size}
    request.update(lr=t.optimizer.lr, clip=t.grad_clip, threads=len(os.sched_getaffinity(0)))
    request["dtype"] = m.dtype
    return {**request, "seed": 0, "dynamic": workload == "w1-mixed"}


def measure(ctx, peer, workload, encoding, modes, rounds, k) -> dict:
    """Warm up both sides, then the interleaved rounds of one workload and encoding."""
    dtype = getattr(ctx, "dtype", "float32")
    side = AttnSide(workload, encoding, ctx.smoke, getattr(ctx, "w1_task", bench.W1_TASK), dtype)
    plan = schedule(0, rounds, k, *side.range)
    res = {"workload": workload, "encoding": encoding, "attn_params": side.params}
    res.update(flops=side.flops, attn=[], rounds=rounds, steps=k)
    res["attn_T"] = sorted({side.attn_length(n) for n in first_seen(plan)})
    res["peer_T"] = sorted({side.peer_length(n) for n in first_seen(plan)})
    res["attn_warmup_s"] = side.warmup(first_seen(plan))
    sides, request = [("attn", side.steps)], build_request(side, workload, encoding)
    for mode in modes:
        try:
            built = peer.request({**request, "mode": mode}, timeout=300)
            lengths = [side.peer_length(n) for n in first_seen(plan)]
            warm = peer.request({"cmd": "steps", "mode": mode, "lengths": lengths}, timeout=1200)
        except PeerError as e:
            ctx.report.note(ctx.name, f"{workload}/{encoding}/{mode}", f"failed: {e}")
            continue
        res.update({"peer_params": built["params"], f"{mode}_warmup_s": warm["seconds"]})
        res[mode] = []
        if mode == "compile":
            res["compile_graphs"] = warm["graphs"]

        def run_peer(ns, mode=mode):
            lengths = [side.peer_length(n) for n in ns]
            answer = peer.request({"cmd": "steps", "mode": mode, "lengths": lengths})
            if mode == "compile":
                res["compile_late_graphs"] = answer["graphs"] - res["compile_graphs"]
            return answer["seconds"]

        sides.append((mode, run_peer))
    for r, ns in enumerate(plan):
        turn = r % len(sides)
        for name, fn in sides[turn:] + sides[:turn]:
            if res[name] is None:
                continue
            try:
                res[name].append(len(ns) / fn(ns))
            except PeerError as e:
                ctx.report.note(ctx.name, f"{workload}/{encoding}/{name}", f"failed: {e}")
                res[name] = None
    return res


def emit(ctx, res: dict) -> None:
    rep, variant = ctx.report, f"{res['workload']}/{res['encoding']}"
    extra = {"steps": res["steps"], "attn_lengths": res["attn_T"], "peer_lengths": res["peer_T"]}
    for name in ("attn", *MODES):
        if not res.get(name):
            continue
        side = "attn" if name == "attn" else f"{ctx.peer} {name}"
        rep.emit(ctx.name, variant, "steps_per_s", res[name], "steps/s", side=side, **extra)
        graphs = {k: res[f"{name}_{k}"] for k in ("graphs", "late_graphs") if f"{name}_{k}" in res}
        rep.emit(ctx.name, variant, "warmup_s", [res[f"{name}_warmup_s"]], "s", side=side, **graphs)
        if res["flops"]:
            flops = [r * res["flops"] for r in res[name]]
            rep.throughput(ctx.name, f"{variant}/{name}", flops, model_flops_per_step=res["flops"])
    s = summarize(res)
    if s["ratio"] is not None:
        ratios = [a / p for a, p in zip(res["attn"], res[s["best"]], strict=True)]
        rep.emit(ctx.name, variant, "attn_over_best_peer", ratios, "x", best_peer_mode=s["best"])
    rep.emit(ctx.name, variant, "params", [res["attn_params"]], "count", side="attn")
    if res.get("peer_params"):
        rep.emit(ctx.name, variant, "params", [res["peer_params"]], "count", side=ctx.peer)


def peer_system_malloc(env: dict) -> dict:
    """The peer's environment without launch.sh's jemalloc preload: the allocator its own users
    get from a plain `python` (`--peer-malloc system`)."""
    env = dict(env)
    kept = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and "libjemalloc" not in p]
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    env.pop("MALLOC_CONF", None)
    return env


def run(ctx, peer_name: str, workloads, encodings) -> list[dict]:
    """The whole comparison; ctx is bench.py's Context (report, smoke, repeats, steps)."""
    ctx.peer, ctx.name = peer_name, f"vs-{peer_name}"
    threads = len(os.sched_getaffinity(0))
    try:
        python = ensure_env(peer_name)
    except PeerError as e:
        raise SystemExit(str(e)) from None
    log = os.path.join(ROOT, ".peer", peer_name, "peer.log")
    cache = tempfile.mkdtemp(prefix="attn_peer_inductor_")  # no compiled kernels of past runs
    # libgomp's default spin-waiting made a 2-thread torch step 9x slower while another process
    # held a core (0.3 s -> 2.8 s, w1 eager); passive waits also keep the peer's idle threads
    # off the cores while attn runs. An OMP_WAIT_POLICY already set is kept.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    if getattr(ctx, "peer_malloc", "same") == "system":
        env = peer_system_malloc(env)
    cmd = [python, "-I", os.path.join(ROOT, PEERS[peer_name]["script"])]
    peer, results = PeerProcess(cmd, log, env=env), []
    try:
        info = peer.request({"cmd": "info"}, timeout=120)
        modes = list(MODES)
        if not info.get("cxx"):
            modes.remove("compile")
            ctx.report.note(ctx.name, "compile", "skipped: no C++ compiler for torch.compile")
        versions = f"torch {info['torch']}, {peer_name} {info['x_transformers']}"
        omp = f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, malloc {bench.malloc_name(env)}"
        ctx.report.note(ctx.name, "versions", f"{versions}, {threads} threads, {omp}")
        bench.peak(ctx)
        for workload in workloads:
            k = ctx.steps or (2 if ctx.smoke else 3 if workload == "w2" else 10)
            for encoding in encodings:
                res = measure(ctx, peer, workload, encoding, modes, ctx.repeats, k)
                emit(ctx, res)
                results.append(res)
    finally:
        peer.close()
        shutil.rmtree(cache, ignore_errors=True)
    m = bench.machine()
    print(
        f"\n{table(results, peer_name)}\n\n{details(results, ctx.report.peak_gflops)}\n\n"
        f"{m['cpu']}, {m['cores']} cores, load average {m['loadavg']}, jax {m['jax']} "
        f"({m['backend']}), torch {info['torch']}, {peer_name} {info['x_transformers']}, "
        f"{threads} threads each, peer {omp}; {getattr(ctx, 'dtype', 'float32')}; matmul peak "
        f"{_num(ctx.report.peak_gflops, '{:.0f}')} GFLOP/s (float32, this run); {m['date']}",
        flush=True,
    )
    return results


def main(argv=None) -> bench.Report:
    """Its own entry (launch.sh sends `bench --vs` here), so bench.py never imports this file."""
    parser = ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", required=True, help=f"the peer library: {', '.join(PEERS)}")
    parser.add_argument("--workload", nargs="+", default=None, help=", ".join(PEER_WORKLOADS))
    parser.add_argument("--variants", nargs="+", default=None, help=", ".join(ENCODINGS))
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; smoke: 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per side and round")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; numbers mean nothing")
    parser.add_argument(
        "--peer-malloc",
        default="same",
        help="same (default: the peer inherits attn's allocator, jemalloc where launch.sh"
        " preloads it) or system (the peer without that preload, as a plain python runs it)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="float32 (default) or bfloat16: attn's model.dtype=bfloat16 against torch's CPU"
        " autocast to bfloat16 (for CPUs with AVX512-BF16 or AMX)",
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    parser.check(args.repeats is None or args.repeats >= 1, "--repeats", "must be >= 1")
    parser.check(args.steps is None or args.steps >= 1, "--steps", "must be >= 1")
    args.w1_task = bench.W1_TASK
    report = bench.Report()
    ctx = bench.Context(args, report)
    ctx.dtype, ctx.peer_malloc = args.dtype, args.peer_malloc
    bench.host_notes(report)
    run(ctx, args.vs, args.workload, args.variants)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
