"""Train S seeds of one config in one program, with jax.vmap over parameters and data.

DESIGN.md section 5: a small model leaves an accelerator (or even a CPU's vector units)
mostly idle, so S seeds of the same shape train together: each seed's train state (params,
RNG, optimizer state; the driver's `init_state`) is built exactly as a separate run would
build it, the S states are stacked on a leading axis, and the driver's own train step
(`experiments.train.make_train_step`, i.e. `loss_and_metrics` + the optimizer) runs under
`jax.vmap` on the stacked states and a stacked batch whose row s is seed s's batch at that
step (`input_pipeline.train_batches(seed=s)`). When seeds draw different nominal lengths at a
step, their batches are right-padded to the longest (pad id 0, nothing scored, padded keys
masked), which leaves every loss and gradient unchanged up to float rounding. The one
exception is a randomized-position sampler (Ruoss et al. 2023, arXiv 2305.16843): it draws
positions for the padded length, so its positions follow the same distribution as a separate
run's but are not the same draws.

Each seed writes its own workdir in the driver's format (config.json with that seed,
metrics.jsonl, tb/, orbax checkpoints of the per-seed state, results.json from
`evaluate.evaluate_and_write`, DONE), so a seed's workdir can be resumed or evaluated by
`experiments.main` and compare cannot tell it from a separate run. Re-running resumes when
every seed has a checkpoint at the same step, and starts over otherwise. A seed whose loss
turns non-finite is reported and left without DONE; the others finish.

    python -m experiments.seeds --config configs/quickstart.py:pe=alibi \
        --workdir 'runs/q/pe=alibi,seed={seed}' --seeds 0,1,2,3 [--config.train.steps=500]
    python -m experiments.seeds --bench [--bench_seeds 8 --bench_steps 30]  # vmap speed-up

`experiments.sweep` runs groups of seeds this way when the config file sets
`sweep_vmap_seeds = True` or `--vmap_seeds` is given.

When it pays (`--bench`, measured on the shared 2-core CPU, RESULTS.md): 8 seeds of a 25k-
parameter encoder at batch 8 step 5.5x faster vmapped than one after another, where the step
is per-call overhead; at batch 32 (the quickstart shape) it breaks even (1.0x), and for
Deletang's 0.25M-parameter encoder at batch 32 it is slower (0.55x): a CPU already runs a
compute-bound step at full width. Small models on an accelerator are launch-bound, the regime
where vmap should pay; that was not measured here (no GPU in the session).
"""

import contextlib
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import attn.models
from attn.registry import ConfigError, require
from experiments import checkpoint as ckpt_lib
from experiments import config_utils, evaluate, input_pipeline, tasks, train

log = logging.getLogger("attn.seeds")


def seed_config(config, seed: int):
    """A copy of `config` with `seed` set (what a separate run of that seed would get)."""
    cfg = config.copy_and_resolve_references()
    cfg.seed = int(seed)
    cfg.lock()
    return cfg


def stack(trees):
    """[tree_0, ..., tree_{S-1}] -> one tree with a leading seed axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, index: int):
    """Seed `index`'s slice of a stacked tree."""
    return jax.tree.map(lambda x: x[index], tree)


def stack_batches(batches: list[dict]) -> dict[str, np.ndarray]:
    """Numpy batches of S seeds -> arrays S x B x ..., right-padding every key to the longest.

    Zero is the right padding for every key: PAD token, loss_mask 0, token_mask/src_mask False.
    """
    out = {}
    for key in batches[0]:
        arrays = [np.asarray(b[key]) for b in batches]
        width = max(a.shape[1] for a in arrays)
        padded = [
            np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays
        ]
        out[key] = np.stack(padded)
    return out


def make_vmapped_step(config, graphdef, tx):
    """jit(vmap(driver step)): (stacked state, stacked batch) -> (state, metrics per seed)."""
    step = train.make_train_step(config, graphdef, tx, donate=False)
    return jax.jit(jax.vmap(step), donate_argnums=(0,))


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def init_states(configs, mesh, tx):
    """Per-seed train states, as the driver initialises them; (graphdef, [state_s])."""
    graphdef, states = None, []
    for cfg in configs:
        model = train.build_model(cfg, seed=cfg.seed, mesh=mesh)
        graphdef, params, rest = train.split_model(model)
        states.append(train.init_state(cfg, graphdef, params, rest, tx))
    return graphdef, states


def run(config, workdirs: list[str], seeds: list[int], *, eval_lengths=None) -> list[dict]:
    """Train every seed of `config` together; return the per-seed results (or failures).

    Each result is evaluate's results dict, {"interrupted": signum, "step": s} after a signal,
    or {"failed": message} for a seed whose loss became non-finite.
    """
    require(len(seeds) == len(set(seeds)), "--seeds", f"repeated seed in {seeds}")
    require(len(workdirs) == len(seeds), "--workdir", "one workdir per seed")
    require(len(set(workdirs)) == len(workdirs), "--workdir", "needs {seed} to tell seeds apart")
    train.validate(config, eval_lengths=eval_lengths)
    for wd in workdirs:
        ckpt_lib.ensure_writable_dir(wd)
    train.setup_compilation_cache(config, workdirs[0])
    with contextlib.ExitStack() as stack_:
        for wd in workdirs:
            stack_.enter_context(ckpt_lib.workdir_lock(wd, process_index=jax.process_index()))
        return _run_locked(config, workdirs, seeds, eval_lengths, stack_)


def _run_locked(config, workdirs, seeds, eval_lengths, exit_stack) -> list[dict]:
    configs = [seed_config(config, s) for s in seeds]
    for cfg, wd in zip(configs, workdirs, strict=True):
        ckpt_lib.atomic_write_text(os.path.join(wd, "config.json"), config_utils.to_json(cfg))
    mesh = train.make_mesh(config)
    tx = train.make_optimizer(config)
    graphdef, states = init_states(configs, mesh, tx)
    ckpts = [ckpt_lib.Checkpointer(wd, keep=config.train.keep_checkpoints) for wd in workdirs]
    for c in ckpts:
        exit_stack.callback(c.close)
    restored = [c.restore(_abstract(s)) for c, s in zip(ckpts, states, strict=True)]
    steps = {step for _, step in restored}
    start = 0
    if len(steps) == 1 and None not in steps:
        start = steps.pop()
        states = [s for s, _ in restored]
        log.info("resumed %d seeds from step %d", len(seeds), start)
        for wd in workdirs:
            ckpt_lib.rewind_jsonl(os.path.join(wd, "metrics.jsonl"), start)
    elif steps != {None}:
        log.warning(
            "seeds have checkpoints at different steps %s: starting over", sorted(steps, key=str)
        )
        for wd in workdirs:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(wd, "metrics.jsonl"))
    for wd in workdirs:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(wd, "DONE"))
    state = stack(states)
    del states, restored
    with ckpt_lib.StopSignals() as stop:
        state, stopped, failed = _train(
            configs, workdirs, state, start, graphdef, tx, mesh, ckpts, stop
        )
    if stopped:
        for i, c in enumerate(ckpts):
            c.save(int(state["step"][i]), unstack(state, i), force=True)
        for c in ckpts:
            c.wait()
        return [{"interrupted": stopped, "step": int(state["step"][0])}] * len(seeds)
    results = []
    for i, (cfg, wd, c) in enumerate(zip(configs, workdirs, ckpts, strict=True)):
        if i in failed:
            results.append({"failed": failed[i]})
            continue
        seed_state = unstack(state, i)
        step = int(seed_state["step"])
        c.save(step, seed_state, force=True)
        c.wait()
        model = train.merge_model(graphdef, seed_state)
        results.append(
            evaluate.evaluate_and_write(cfg, wd, model, mesh=mesh, step=step, lengths=eval_lengths)
        )
        if jax.process_index() == 0:
            ckpt_lib.atomic_write_text(
                os.path.join(wd, "DONE"), time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime())
            )
    return results


def _train(configs, workdirs, state, start, graphdef, tx, mesh, ckpts, stop):
    """The vmapped loop; returns (state, signum or None, {seed index: failure message})."""
    import signal

    config = configs[0]
    t = config.train
    total = t.steps
    task = tasks.build(config.task)
    layout = attn.models.batch_format(config.model.name, config.model)
    schedule = train.make_schedule(config)
    loggers = [train.MetricsLogger(wd) for wd in workdirs]
    step_fn = make_vmapped_step(config, graphdef, tx)
    sharding = NamedSharding(mesh, P(None, "data"))
    streams = [
        input_pipeline.train_batches(
            task,
            cfg,
            layout=layout,
            seed=cfg.seed,
            start_step=start,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for cfg in configs
    ]
    compiled: dict = {}
    failed: dict[int, str] = {}
    window = {"t": time.perf_counter(), "steps": 0}
    started = time.perf_counter()
    try:
        for step in range(start, total):
            if stop.received is not None:
                return state, int(getattr(signal, stop.received)), failed
            pairs = [next(s) for s in streams]
            assert all(p[0] == step for p in pairs), "train_batches out of step"
            tokens = [int(b["token_mask"].sum()) for _, b in pairs]
            batch = {
                k: jax.device_put(v, sharding)
                for k, v in stack_batches([b for _, b in pairs]).items()
            }
            key = tuple((k, v.shape) for k, v in sorted(batch.items()))
            compile_s = 0.0
            if key not in compiled:
                c0 = time.perf_counter()
                compiled[key] = step_fn.lower(state, batch).compile()
                compile_s = time.perf_counter() - c0
            state, metrics = compiled[key](state, batch)
            window["steps"] += 1
            done = step + 1
            if done % t.log_every == 0 or done == total or compile_s:
                m = jax.device_get(metrics)
                now = time.perf_counter()
                rate = window["steps"] / max(now - window["t"], 1e-9)
                window.update(t=now, steps=0)
                for i, logger in enumerate(loggers):
                    if not bool(m["finite"][i]) and not t.skip_nonfinite and i not in failed:
                        failed[i] = f"non-finite loss at step {done} (seed {configs[i].seed})"
                        log.error("%s: %s", workdirs[i], failed[i])
                    row = {
                        "step": done,
                        "split": "train",
                        "length": None,
                        **{k: m[k][i] for k in ("loss", "token_acc", "seq_acc", "grad_norm")},
                        "lr": float(schedule(done - 1)),
                        "skipped": int(state["skipped"][i]) if t.skip_nonfinite else 0,
                        "steps_per_s": rate,
                        "tokens_per_s": rate * tokens[i],
                        "eta_s": (total - done) / rate if rate else None,
                        "elapsed_s": now - started,
                        "vmapped_seeds": len(configs),
                    }
                    if compile_s:
                        row["compile_s"] = compile_s
                    logger.row(row)
                log.info("step %d: loss %s", done, np.round(m["loss"], 4).tolist())
            if t.eval_every and done % t.eval_every == 0 and done < total:
                for i, cfg in enumerate(configs):
                    evaluate.evaluate_model(
                        cfg,
                        train.merge_model(graphdef, unstack(state, i)),
                        mesh=mesh,
                        step=done,
                        lengths=train.resolve_eval_lengths(cfg, during_training=True),
                        log_row=loggers[i].row,
                    )
            if done % t.ckpt_every == 0 and done < total:
                for i, c in enumerate(ckpts):
                    c.save(done, unstack(state, i))
    finally:
        for logger in loggers:
            logger.close()
    return state, None, failed


def benchmark(config, *, seeds: int, steps: int) -> dict:
    """Seconds per training step of S seeds: one vmapped program vs S separate steps.

    Both run the driver's jitted step on the same S batches (seed s's first batch, padded to
    one shape), after one compiling and warming call each; each is timed over `steps` steps
    three times, alternating, best kept: training throughput, not compilation, data or eval.
    """
    configs = [seed_config(config, s) for s in range(seeds)]
    mesh = train.make_mesh(config)
    tx = train.make_optimizer(config)
    graphdef, states = init_states(configs, mesh, tx)
    task = tasks.build(config.task)
    layout = attn.models.batch_format(config.model.name, config.model)
    batches = [
        next(input_pipeline.train_batches(task, cfg, layout=layout, seed=cfg.seed, start_step=0))[1]
        for cfg in configs
    ]
    stacked_np = stack_batches(batches)
    stacked = {k: jnp.asarray(v) for k, v in stacked_np.items()}
    per_seed = [{k: jnp.asarray(v[i]) for k, v in stacked_np.items()} for i in range(seeds)]
    single = train.make_train_step(config, graphdef, tx, donate=False)
    vmapped = jax.jit(jax.vmap(train.make_train_step(config, graphdef, tx, donate=False)))
    stacked_state = stack(states)

    def timed(fn):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / steps

    run_vmapped = lambda: vmapped(stacked_state, stacked)
    run_sequential = lambda: [single(s, b) for s, b in zip(states, per_seed, strict=True)]
    jax.block_until_ready((run_vmapped(), run_sequential()))  # compile and warm up
    # Alternate the two and keep each one's best of 3, so load from other processes on a
    # shared machine does not favour whichever happened to run in a quiet moment.
    t_vmap, t_seq = math.inf, math.inf
    for _ in range(3):
        t_vmap = min(t_vmap, timed(run_vmapped))
        t_seq = min(t_seq, timed(run_sequential))
    return {
        "seeds": seeds,
        "batch_per_seed": list(per_seed[0]["inputs"].shape),
        "params_per_seed": sum(x.size for x in jax.tree.leaves(states[0]["params"])),
        "vmapped_s_per_step": t_vmap,
        "sequential_s_per_step": t_seq,
        "speedup": t_seq / t_vmap,
        "device": jax.devices()[0].device_kind,
    }


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module next to experiments.main
    # (which owns the same flag names) does not clash.
    config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:k=v,...]")
    flags.DEFINE_string("workdir", None, "Workdir pattern with {seed}: 'runs/x/seed={seed}'.")
    flags.DEFINE_list("seeds", None, "Seeds to train together, e.g. 0,1,2,3.")
    flags.DEFINE_list("lengths", None, "Eval lengths (default: config eval.lengths).")
    flags.DEFINE_bool("bench", False, "Measure the vmap speed-up instead of training.")
    flags.DEFINE_integer("bench_seeds", 8, "Seeds in the benchmark.")
    flags.DEFINE_integer("bench_steps", 20, "Timed steps in the benchmark.")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    try:
        if f.bench:
            config = f.config if f["config"].present else _bench_config()
            result = benchmark(config, seeds=f.bench_seeds, steps=f.bench_steps)
            print(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in result.items()
                )
            )
            return
        if not f.workdir or "{seed}" not in f.workdir:
            raise ConfigError("--workdir: required, with {seed} in it, e.g. 'runs/x/seed={seed}'")
        if not f.seeds:
            raise ConfigError("--seeds: required, e.g. 0,1,2,3")
        seeds = [int(s) for s in f.seeds]
        results = run(
            f.config,
            [f.workdir.format(seed=s) for s in seeds],
            seeds,
            eval_lengths=config_utils.parse_lengths(f.lengths),
        )
    except ConfigError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except ckpt_lib.RunError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    if results and "interrupted" in results[0]:
        sys.exit(128 + results[0]["interrupted"])
    failed = [r["failed"] for r in results if "failed" in r]
    if failed:
        print("error: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


def _bench_config():
    """Deletang et al.'s encoder (5 layers, d_model 64, ~0.25M params) on reverse_string."""
    from configs import base

    return base.get_config("task=reverse_string,pe=rope,size=s")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _define_flags()
    app.run(main)
