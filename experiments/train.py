"""Training: the train step, the one training loop, and `run`, the driver of one workdir.

Data flow (README "Interfaces"): config -> `validate` -> mesh (experiments/mesh.py) -> the
model from the registries, initialised under jit with the shardings its logical axis names
map to (experiments/state.py) -> one jitted train step per batch shape with the train state
donated -> `train_loop` -> orbax checkpoints (experiments/checkpoint.py), metrics.jsonl and
TensorBoard (experiments/metrics.py) -> experiments/evaluate.py at the eval grid ->
results.json, DONE. Protocol defaults follow Deletang et al. 2023 (arXiv 2207.02098).

- `make_train_step(config, graphdef, tx, *, donate=True)`: jitted `step(state, batch) ->
  (state, metrics)`; the state is experiments/state.py's dict. Metrics: loss, token_acc,
  seq_acc, grad_norm, the learning rate of the update (lr), the updates skipped so far
  (skipped, with train.skip_nonfinite) and whether loss, gradients and new parameters are
  finite (finite).
- `train_loop(step_fn, state, batches, ...)`: the loop every trainer runs: this driver,
  vmapped seeds (experiments/seeds.py) and the benchmark (experiments/bench.py). It compiles
  each batch shape once (AOT), fetches metrics one step late, keeps compilation and
  evaluation out of its throughput, and calls `LoopHooks` for metrics, evaluation,
  checkpoints and stopping, so a feature added here reaches all three.
- `RunFiles`: one workdir during training (config.json, checkpoints, metrics.jsonl rewound to
  the restored step, the final save, evaluation and DONE), shared by this driver and seeds.
- `run(config, workdir, *, eval_lengths=None) -> dict`: the whole run. Resumes from the latest
  good checkpoint; returns the results dict of the final evaluation, or
  `{"interrupted": signum, "step": s}` after SIGTERM/SIGINT (a checkpoint at s was saved).

Determinism: batches are a pure function of (seed, step) and the RNG is in the state, so a
run that is killed and resumed reaches bit-identical parameters and metrics rows.
"""

import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import attn.models
from attn.registry import ConfigError, require
from experiments import checkpoint, config_utils, evaluate, input_pipeline, metrics, optim, tasks
from experiments import mesh as mesh_lib
from experiments import profile as profile_lib
from experiments import state as state_lib
from experiments.validate import resolve_eval_lengths, run_identity, validate
from experiments.workdir import (
    DONE,
    RunError,
    Stopped,
    StopSignals,
    append_jsonl,
    atomic_write_text,
    rewind_jsonl,
    workdir_lock,
    write_done,
)

log = logging.getLogger("attn.train")


# ----------------------------------------------------------------------------- step


def check_training(config) -> int:
    """ConfigError for a precision or accumulation setting the step cannot train with; returns
    train.grad_accum_steps.

    float16 is refused: without loss scaling its 5-bit exponent flushes small gradients to
    zero (Micikevicius et al. 2018), and bfloat16 has float32's range at the same speed on
    every accelerator JAX runs on (parameters and optimizer state stay float32 either way).
    """
    if config.model.get("dtype") == "float16":
        raise ConfigError(
            "model.dtype: float16 needs loss scaling, which this trainer does not do; use "
            "bfloat16 (float32's range, same speed) or float32"
        )
    k = config.train.get("grad_accum_steps", 1)
    require(
        isinstance(k, int) and k >= 1, "train.grad_accum_steps", f"must be an int >= 1, got {k!r}"
    )
    require(
        config.train.batch_size % k == 0,
        "train.grad_accum_steps",
        f"{k} does not divide train.batch_size={config.train.batch_size}",
    )
    return k


def _micro_batches(batch: dict, k: int) -> dict:
    """(B, ...) -> (k, B / k, ...), micro-batch i holding rows i, i + k, i + 2k, ...: every
    device's contiguous block of rows (batch sharding) splits into its own part of each
    micro-batch, so no rows move between devices."""
    return jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0), batch
    )


def _accumulated_grads(graphdef, state, batch: dict, k: int):
    """(loss, metrics, grads, rest) of the whole batch from k micro-batches under lax.scan.

    Each micro-batch's loss is its summed token NLL over the whole batch's scored tokens, so
    the summed gradients are those of the whole batch's mean loss (to float32 rounding). The
    RNG streams advance once per micro-batch (dropout and sampled positions draw per call).
    """
    total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def micro(carry, mb):
        # The parameters ride in the carry unchanged: nnx merges and differentiates only
        # values of the scan's own trace.
        params, rest, grads, sums = carry
        model = nnx.merge(graphdef, params, rest)

        def loss_fn(model):
            _, m = metrics.loss_and_metrics(model, mb, train=True)
            return m["nll_sum"] / total, m

        (_, m), g = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        grads = jax.tree.map(jnp.add, grads, g)
        sums = {s: sums[s] + m[s] for s in metrics.SUMS}
        return (params, state_lib.split_model(model)[2], grads, sums), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    sums0 = {s: jnp.zeros((), jnp.float32) for s in metrics.SUMS}
    (_, rest, grads, sums), _ = jax.lax.scan(
        micro, (state["params"], state["rest"], zeros, sums0), _micro_batches(batch, k)
    )
    seqs = jnp.maximum(sums["num_seqs"], 1.0)
    loss = sums["nll_sum"] / total
    m = {
        "loss": loss,
        "token_acc": sums["token_acc_sum"] / seqs,
        "seq_acc": sums["exact_sum"] / seqs,
    }
    return loss, m, grads, rest


def make_train_step(config, graphdef, tx, *, donate: bool = True):
    """Jitted `step_fn(state, batch) -> (state, metrics)`; the state argument is donated.

    With train.grad_accum_steps = k > 1 the batch is split into k micro-batches whose
    gradients are summed inside the step (one optimizer update per batch, activation memory
    of B / k rows); every trainer (driver, vmapped seeds, bench) gets it through here.
    """
    k = check_training(config)

    def step_fn(state, batch):
        if k == 1:
            model = state_lib.merge_model(graphdef, state)

            def loss_fn(model):
                return metrics.loss_and_metrics(model, batch, train=True)

            # nnx.value_and_grad differentiates the nnx.Param state and carries the RNG counts
            # the forward pass advanced back into `model`.
            (loss, m), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
            rest = state_lib.split_model(model)[2]
        else:
            loss, m, grads, rest = _accumulated_grads(graphdef, state, batch, k)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}
        out = {name: m[name] for name in ("loss", "token_acc", "seq_acc")}
        out["grad_norm"] = optax.tree.norm(grads)
        out["lr"] = optim.learning_rate(opt)
        out["skipped"] = optim.skipped_updates(opt)
        # A finite loss and gradient can still overflow a parameter; checking the new
        # parameters too keeps every checkpoint the driver saves finite.
        out["finite"] = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
        return new_state, out

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ----------------------------------------------------------------------------- loop


class LoopHooks:
    """What a trainer does around the loop's steps; the defaults do nothing (the benchmark).

    `metrics(step, m, timing)` gets every step's metrics on the host, one step late; `timing`
    (steps_per_s, tokens_per_s, eta_s, elapsed_s and compile_s on a step that compiled) is set
    on the steps a row is due (every log_every steps, the last, and steps that compiled),
    None otherwise. It may raise to end the run (RunError on a non-finite loss).
    """

    def metrics(self, step: int, m: dict, timing: dict | None) -> None:
        pass

    def save_due(self, step: int) -> bool:
        return False

    def save(self, step: int, state, *, force: bool = False) -> None:
        pass

    def evaluate(self, step: int, state) -> None:
        pass

    def stop(self, step: int) -> str | None:
        """The name of the signal that asks the loop to stop before `step`, or None."""
        return None


def shape_key(batch: dict) -> tuple:
    return tuple((k, v.shape) for k, v in sorted(batch.items()))


def train_loop(
    step_fn,
    state,
    batches: Iterator[dict],
    *,
    start: int,
    total: int,
    place: Callable[[dict], dict],
    hooks: LoopHooks,
    log_every: int = 1,
    eval_every: int = 0,
    compiled: dict | None = None,
):
    """Run steps start..total-1; returns (state, None) when done or (state, signal name).

    batches: host (numpy) batches of steps start, start + 1, ...; place: host batch -> device
    arrays. compiled: executables by batch shape, shared between calls (the benchmark
    compiles ahead); filled as new shapes come.
    """
    compiled = {} if compiled is None else compiled
    pending = None  # (step, metrics on device, compile_s): fetched one step late
    # Throughput and ETA leave out compilation (paid once per batch shape) and evaluation.
    window = {"t": time.perf_counter(), "steps": 0, "tokens": 0, "excluded": 0.0}
    started = time.perf_counter()
    processes = jax.process_count()

    def flush():
        nonlocal pending
        if pending is None:
            return
        step, m, compile_s = pending
        pending = None
        m = jax.tree.map(np.asarray, jax.device_get(m))
        timing = None
        if step % log_every == 0 or step == total or compile_s:
            now = time.perf_counter()
            dt = max(now - window["t"] - window["excluded"], 1e-9)
            rate = window["steps"] / dt
            timing = {
                "steps_per_s": rate,
                "tokens_per_s": window["tokens"] / dt,
                "eta_s": (total - step) / rate if rate else None,
                "elapsed_s": now - started,
            }
            if compile_s:
                timing["compile_s"] = compile_s
            window.update(t=now, steps=0, tokens=0, excluded=0.0)
        hooks.metrics(step, m, timing)

    for step in range(start, total):
        stop = hooks.stop(step)
        if stop is not None:
            flush()
            hooks.save(step, state, force=True)
            return state, stop
        batch = next(batches)
        tokens = int(batch["token_mask"].sum()) * processes
        device_batch = place(batch)
        key = shape_key(device_batch)
        compile_s = 0.0
        if key not in compiled:
            c0 = time.perf_counter()
            compiled[key] = step_fn.lower(state, device_batch).compile()
            compile_s = time.perf_counter() - c0
            window["excluded"] += compile_s
        state, m = compiled[key](state, device_batch)
        flush()
        pending = (step + 1, m, compile_s)
        window["steps"] += 1
        window["tokens"] += tokens
        done = step + 1
        if eval_every and done % eval_every == 0 and done < total:
            flush()
            e0 = time.perf_counter()
            hooks.evaluate(done, state)
            window["excluded"] += time.perf_counter() - e0
        if done < total and hooks.save_due(done):
            flush()
            hooks.save(done, state)
    flush()
    return state, None


# ----------------------------------------------------------------------------- one workdir


class RunFiles:
    """One workdir of a training run: config.json, checkpoints, metrics.jsonl, DONE.

    Process 0 writes the files; every process takes part in checkpoints and evaluation.
    """

    def __init__(self, config, workdir: str, *, changes: dict | None = None):
        """changes: resumable fields that differ from the config.json on disk (validate's
        run_identity); they are recorded in config_changes.jsonl before config.json is
        replaced."""
        self.config = config
        self.workdir = workdir
        self.main = jax.process_index() == 0
        if self.main:
            if changes:
                append_jsonl(
                    os.path.join(workdir, "config_changes.jsonl"),
                    {"date": _now(), "changes": {k: list(v) for k, v in changes.items()}},
                )
            atomic_write_text(os.path.join(workdir, "config.json"), config_utils.to_json(config))
        t = config.train
        self.ckpt = checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints, every=t.ckpt_every)
        self.last_saved = None
        self.writer = None
        self.skipped = 0  # updates skipped so far (train.skip_nonfinite)

    def restore(self, target):
        """(state, step) of the newest good checkpoint, or (None, None)."""
        t0 = time.perf_counter()
        state, step = self.ckpt.restore(target)
        if step is not None and step > self.config.train.steps:
            raise ConfigError(
                f"train.steps: {self.config.train.steps} is below the step of the run's "
                f"checkpoint ({step} in {self.workdir}/checkpoints); a run cannot be shortened"
            )
        if state is not None:
            log.info(
                "%s: resumed from step %d in %.2fs", self.workdir, step, time.perf_counter() - t0
            )
        self.last_saved = step
        return state, step

    def begin(self, start: int) -> None:
        """Rows past the restored step (or all rows, when no checkpoint committed) will be
        logged again, and so will the final evaluation, which always reruns at the end."""
        steps = self.config.train.steps
        if self.main:
            rewind_jsonl(
                os.path.join(self.workdir, "metrics.jsonl"),
                start,
                keep=lambda r: (
                    r["split"] == "train"
                    or r["step"] < steps
                    or r.get("eval", evaluate.FINAL) != evaluate.FINAL
                ),
            )
            done = os.path.join(self.workdir, DONE)
            if os.path.exists(done) and start < steps:
                os.remove(done)
        self.writer = metrics.MetricsWriter(self.workdir, steps, start)

    def save(self, step: int, state, *, force: bool = False) -> None:
        if self.ckpt.save(step, state, force=force):
            self.last_saved = step

    def check_finite(self, step: int, m: dict) -> None:
        t = self.config.train
        self.skipped = int(m["skipped"])
        if t.skip_nonfinite and 0 <= t.max_skipped < self.skipped:
            raise RunError(
                f"train.max_skipped: {self.skipped} updates skipped by step {step} (non-finite "
                f"loss or gradients), over the cap of {t.max_skipped}; the run diverged: lower "
                "the learning rate, or raise --config.train.max_skipped"
            )
        if bool(m["finite"]) or t.skip_nonfinite:
            return
        where = (
            f"step {self.last_saved} in {self.workdir}/checkpoints"
            if self.last_saved
            else "none (step 0)"
        )
        raise RunError(
            f"non-finite loss/gradients at step {step} (loss={float(m['loss'])}); last good "
            f"checkpoint: {where}; lower the learning rate or set "
            "--config.train.skip_nonfinite=true"
        )

    def finish(self, state, graphdef, evaluator, lengths=None, *, stop=None) -> dict:
        """The final checkpoint, the final evaluation (results.json) and DONE. `stop` (a
        StopSignals) ends the evaluation between lengths with workdir.Stopped."""
        step = int(state["step"])
        self.save(step, state, force=True)
        self.ckpt.wait()
        results = evaluate.evaluate_and_write(
            self.config,
            self.workdir,
            state_lib.merge_model(graphdef, state),
            step=step,
            evaluator=evaluator,
            lengths=lengths,
            writer=self.writer,
            extra={"skipped_updates": self.skipped},
            stop=stop,
        )
        if self.skipped:
            summary = f"{self.skipped} of {step} updates skipped (non-finite loss or gradients)"
            log.warning("%s: %s", self.workdir, summary)
            if self.main:
                print(f"{self.workdir}: {summary}", flush=True)
        if self.main:
            write_done(self.workdir)
        return results

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self.ckpt.close()

    def __enter__(self) -> "RunFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- the driver


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def finished_results(workdir: str, changes: dict, eval_lengths) -> dict | None:
    """The results of a finished run re-run with the same config (DONE, no change, no new
    lengths), after saying where they are; None if there is work to do."""
    results = os.path.join(workdir, "results.json")
    if changes or eval_lengths or not os.path.exists(os.path.join(workdir, DONE)):
        return None
    try:
        with open(results) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # results.json lost or torn: evaluate again
    log.warning("%s is finished (step %s): results in %s", workdir, data.get("step"), results)
    if jax.process_index() == 0:
        print(f"{workdir} is finished (step {data.get('step')}); results: {results}", flush=True)
    return data


def setup_compilation_cache(config, workdir: str) -> None:
    """JAX persistent compilation cache: eval.compilation_cache "auto" = workdir/../.jax_cache,
    "" = off, else a directory."""
    path = config.eval.compilation_cache
    if not path:
        return
    if path == "auto":
        path = os.path.join(os.path.dirname(os.path.abspath(workdir)), ".jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # A cache entry that cannot be written (a full disk) only means compiling again next time.
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache")


def stop_requested(signals: StopSignals, ckpt: checkpoint.Checkpointer, every: int):
    """hooks.stop for a run: a signal this process received, or a cluster's preemption notice.
    With several processes, they agree (every `every` steps) on the step they stop at, since
    the stop checkpoint is saved by all of them together."""

    def stop(step: int) -> str | None:
        if jax.process_count() == 1:
            return signals.received
        if step % every:
            return None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(signals.received is not None))
        if np.any(flags) or ckpt.reached_preemption(step):
            return signals.received or "SIGTERM"
        return None

    return stop


class _DriverHooks(LoopHooks):
    def __init__(self, files: RunFiles, graphdef, evaluator, stop, stats: profile_lib.StepStats):
        self.files, self.graphdef, self.evaluator, self.stats = files, graphdef, evaluator, stats
        self._stop = stop
        self.config = files.config

    def metrics(self, step, m, timing):
        self.files.check_finite(step, m)
        self.stats.metrics_seen(step)
        if timing is None:
            return
        row = metrics.train_row(step, m, timing)
        mfu = self.stats.mfu(step, timing)
        if mfu is not None:
            row["mfu"] = mfu
        self.files.writer.row(row)
        self.files.writer.progress(
            step,
            f"loss {float(m['loss']):.4f} acc {float(m['token_acc']):.3f} "
            f"{timing['steps_per_s']:.1f} step/s {timing['tokens_per_s']:.0f} tok/s "
            + ("" if mfu is None else f"MFU {100 * mfu:.1f}% ")
            + f"eta {_fmt_eta(timing['eta_s'])}",
        )

    def stop(self, step):
        self.stats.step_started(step)
        return self._stop(step)

    def save_due(self, step):
        return self.files.ckpt.should_save(step)

    def save(self, step, state, *, force=False):
        self.files.save(step, state, force=force)
        if force:
            self.files.ckpt.wait()

    def evaluate(self, step, state):
        self.evaluator(
            state_lib.merge_model(self.graphdef, state),
            step=step,
            lengths=resolve_eval_lengths(self.config, during_training=True),
            log_row=lambda row: self.files.writer.row({**row, "eval": evaluate.PERIODIC}),
        )


def _fmt_eta(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def host_batches(config, *, seed: int, start: int) -> Iterator[dict]:
    """This process's training batches of `config` from step `start` on."""
    task = tasks.build(config.task)
    layout = attn.models.batch_format(config.model.name, config.model)
    stream = input_pipeline.train_batches(
        task,
        layout=layout,
        batch_size=config.train.batch_size,
        seed=seed,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return (batch for _, batch in stream)


def run(config, workdir: str, *, eval_lengths=None) -> dict:
    """Train `config` in `workdir` (resuming), evaluate, write results.json and DONE."""
    workdir = os.path.abspath(workdir)  # orbax wants absolute paths
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    validate(config, workdir=workdir, eval_lengths=eval_lengths)
    setup_compilation_cache(config, workdir)
    with workdir_lock(workdir, process_index=jax.process_index()), StopSignals() as signals:
        changes = run_identity(config, workdir)
        finished = finished_results(workdir, changes, eval_lengths)
        if finished is not None:
            return finished
        stats = profile_lib.StepStats(config, workdir, vocab=tasks.build(config.task).vocab_size)
        device_mesh = mesh_lib.make_mesh(config)
        tx = optim.make_optimizer(config)
        graphdef, init, target = state_lib.initializer(config, device_mesh, tx)
        step_fn = make_train_step(config, graphdef, tx)  # its ConfigErrors before any compile
        evaluator = evaluate.Evaluator(config, device_mesh)
        evaluator.check(resolve_eval_lengths(config, eval_lengths))  # before training, not after
        t = config.train
        with RunFiles(config, workdir, changes=changes) as files:
            state, start = files.restore(target)
            if state is None:
                state, start = init(), 0
            files.begin(start)
            stop = stop_requested(signals, files.ckpt, t.log_every)
            try:
                state, stopped = train_loop(
                    step_fn,
                    state,
                    host_batches(config, seed=config.seed, start=start),
                    start=start,
                    total=t.steps,
                    place=stats.place(lambda b: mesh_lib.shard_batch(b, device_mesh), start),
                    hooks=_DriverHooks(files, graphdef, evaluator, stop, stats),
                    log_every=t.log_every,
                    eval_every=t.eval_every,
                )
            finally:
                stats.stop()
            if stopped:
                step = int(state["step"])
                files.writer.progress(step, f"stopped by {stopped}; checkpoint saved")
                return {"interrupted": int(getattr(signal, stopped)), "step": step}
            try:
                return files.finish(state, graphdef, evaluator, eval_lengths, stop=signals)
            except Stopped as e:  # during the final evaluation: re-running redoes it
                files.writer.progress(int(state["step"]), f"stopped by {e}; evaluation not kept")
                return {"interrupted": e.signum, "step": int(state["step"])}
