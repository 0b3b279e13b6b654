"""Train S seeds of one config in one program, with jax.vmap over parameters and data.

A small model leaves an accelerator (or even a CPU's vector units) mostly idle, so S seeds of
the same shape train together: each seed's train state is built exactly as a separate run
would build it (experiments/state.py), the S states are stacked on a leading axis, and the
driver's own train step (`train.make_train_step`) runs under `jax.vmap` on the stacked states
and a stacked batch whose row s is seed s's batch at that step. When seeds draw different
nominal lengths at a step, their batches are right-padded to the longest (pad id 0, nothing
scored, padded keys masked), which leaves every loss and gradient unchanged up to float
rounding. The one exception is a randomized-position sampler (Ruoss et al. 2023,
arXiv 2305.16843) or dropout: they draw for the padded length, so their draws follow the
same distribution as a separate run's but are not the same draws.

The loop is the driver's (`train.train_loop`) and so is each seed's workdir handling
(`train.RunFiles`: config.json with that seed, metrics.jsonl rewound on resume, orbax
checkpoints of the per-seed state, results.json, DONE), so a seed's workdir can be resumed or
evaluated by experiments.main and compare cannot tell it from a separate run. Re-running
resumes when every seed has a checkpoint at the same step, and starts over otherwise. A seed
whose loss turns non-finite is reported and left without DONE; the others finish.

    python -m experiments.seeds --config configs/quickstart.py:pe=alibi \
        --workdir 'runs/q/pe=alibi,seed={seed}' --seeds 0,1,2,3 [--config.train.steps=500]

Placement: with several devices (and a config without model or fsdp axes), the seed axis is
split over a 1-D "seeds" mesh of the largest number of devices that divides S, so each
device trains whole seeds and nothing is communicated between them (`seed_placement`); one
seed's state is moved back onto the config's mesh for its checkpoint and evaluation. With one
device, or model/fsdp sharding, the stacked state is replicated and each seed's batch split
over the batch axes as before.

experiments.sweep runs groups of seeds this way when the config file sets
`sweep_vmap_seeds` or `--vmap_seeds` is given; `./launch.sh bench --workload seeds` measures
what it gains (README "Performance").
"""

import contextlib
import logging
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from ml_collections import config_flags

from attn.registry import ConfigError, require
from experiments import config_utils, evaluate, metrics, optim, train
from experiments import mesh as mesh_lib
from experiments import state as state_lib
from experiments.validate import resolve_eval_lengths, run_identity, validate
from experiments.workdir import RunError, StopSignals, ensure_writable_dir, workdir_lock

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


def seed_placement(config, num_seeds: int, device_mesh):
    """(place_state(stacked) -> stacked, place_batch(host batch) -> device batch) for S seeds.

    The seed axis splits over d devices, d the largest divisor of S up to the device count,
    when d > 1, the run is one process and the config's mesh is data parallel only; otherwise
    the state stays as stacked and batches split over the config mesh's batch axes.
    """
    m = config.train.mesh
    pure_data = m.model == 1 and m.get("fsdp", 1) == 1 and jax.process_count() == 1
    d = max(k for k in range(1, min(num_seeds, jax.device_count()) + 1) if num_seeds % k == 0)
    if not pure_data or d == 1:
        spec = (None, mesh_lib.batch_spec(device_mesh))
        return (lambda state: state), (lambda b: mesh_lib.shard_batch(b, device_mesh, spec=spec))
    seeds_mesh = jax.make_mesh(
        (d,), ("seeds",), axis_types=(AxisType.Auto,), devices=jax.devices()[:d]
    )
    log.info("%d seeds split over %d devices", num_seeds, d)
    on_seeds = NamedSharding(seeds_mesh, PartitionSpec("seeds"))
    return (lambda state: jax.device_put(state, on_seeds)), (
        lambda b: mesh_lib.shard_batch(b, seeds_mesh, spec=("seeds",))
    )


def make_vmapped_step(config, graphdef, tx):
    """jit(vmap(driver step)): (stacked state, stacked batch) -> (state, metrics per seed)."""
    step = train.make_train_step(config, graphdef, tx, donate=False)
    return jax.jit(jax.vmap(step), donate_argnums=(0,))


def init_states(configs, device_mesh, tx):
    """Per-seed train states, as the driver initialises them; (graphdef, [state_s])."""
    graphdef, states = None, []
    for cfg in configs:
        graphdef, params, rest = state_lib.split_model(
            state_lib.build_model(cfg, seed=cfg.seed, mesh=device_mesh)
        )
        states.append(state_lib.init_state(params, rest, tx))
    return graphdef, states


class _SeedHooks(train.LoopHooks):
    """The driver's hooks, once per seed: one row, one checkpoint, one evaluation each."""

    def __init__(self, files: list[train.RunFiles], graphdef, evaluator, signals, seed_state):
        self.files, self.graphdef, self.evaluator, self.signals = (
            files,
            graphdef,
            evaluator,
            signals,
        )
        self.seed_state = seed_state  # (stacked state, i) -> seed i's state on the config mesh
        self.failed: dict[int, str] = {}

    def metrics(self, step, m, timing):
        for i, f in enumerate(self.files):
            seed_m = {k: v[i] for k, v in m.items()}
            if i not in self.failed:
                try:
                    f.check_finite(step, seed_m)
                except RunError as e:
                    self.failed[i] = str(e)
                    log.error("%s: %s", f.workdir, e)
            if timing is not None:
                seed_timing = dict(timing, tokens_per_s=timing["tokens_per_s"] / len(self.files))
                row = metrics.train_row(step, seed_m, seed_timing)
                f.writer.row({**row, "vmapped_seeds": len(self.files)})
        if timing is not None:
            log.info("step %d: loss %s", step, np.round(m["loss"], 4).tolist())

    def save_due(self, step):
        return self.files[0].ckpt.should_save(step)

    def save(self, step, state, *, force=False):
        for i, f in enumerate(self.files):
            f.save(step, self.seed_state(state, i), force=force)
        if force:
            for f in self.files:
                f.ckpt.wait()

    def evaluate(self, step, state):
        for i, f in enumerate(self.files):
            self.evaluator(
                state_lib.merge_model(self.graphdef, self.seed_state(state, i)),
                step=step,
                lengths=resolve_eval_lengths(f.config, during_training=True),
                log_row=lambda row, f=f: f.writer.row({**row, "eval": evaluate.PERIODIC}),
            )

    def stop(self, step):
        return self.signals.received


def run(config, workdirs: list[str], seeds: list[int], *, eval_lengths=None) -> list[dict]:
    """Train every seed of `config` together; return the per-seed results (or failures).

    Each result is evaluate's results dict, {"interrupted": signum, "step": s} after a signal,
    or {"failed": message} for a seed whose loss became non-finite.
    """
    require(len(seeds) == len(set(seeds)), "--seeds", f"repeated seed in {seeds}")
    require(len(workdirs) == len(seeds), "--workdir", "one workdir per seed")
    require(len(set(workdirs)) == len(workdirs), "--workdir", "needs {seed} to tell seeds apart")
    require(jax.process_count() == 1, "--seeds", "vmapped seeds run in one process")
    workdirs = [os.path.abspath(w) for w in workdirs]
    validate(config, eval_lengths=eval_lengths)
    for wd in workdirs:
        ensure_writable_dir(wd)
    train.setup_compilation_cache(config, workdirs[0])
    configs = [seed_config(config, s) for s in seeds]
    with contextlib.ExitStack() as stack_:
        for wd in workdirs:
            stack_.enter_context(workdir_lock(wd))
        changes = [run_identity(c, w) for c, w in zip(configs, workdirs, strict=True)]
        finished = [
            train.finished_results(w, ch, eval_lengths)
            for w, ch in zip(workdirs, changes, strict=True)
        ]
        if all(r is not None for r in finished):
            return finished
        device_mesh = mesh_lib.make_mesh(config)
        tx = optim.make_optimizer(config)
        graphdef, states = init_states(configs, device_mesh, tx)
        files = [
            stack_.enter_context(train.RunFiles(c, w, changes=ch))
            for c, w, ch in zip(configs, workdirs, changes, strict=True)
        ]
        restored = [f.restore(states[0]) for f in files]
        steps = {step for _, step in restored}
        start = 0
        if len(steps) == 1 and None not in steps:
            start = steps.pop()
            states = [s for s, _ in restored]
            log.info("resumed %d seeds from step %d", len(seeds), start)
        elif steps != {None}:
            log.warning("seeds have checkpoints at different steps %s: starting over", steps)
        for f in files:
            f.begin(start)
        shardings = jax.tree.map(lambda x: x.sharding, states[0])
        place_state, place_batch = seed_placement(config, len(seeds), device_mesh)
        state = place_state(stack(states))
        del states, restored

        def seed_state(state, i):
            return jax.device_put(unstack(state, i), shardings)

        evaluator = evaluate.Evaluator(config, device_mesh)
        with StopSignals() as signals:
            hooks = _SeedHooks(files, graphdef, evaluator, signals, seed_state)
            state, stopped = train.train_loop(
                make_vmapped_step(config, graphdef, tx),
                state,
                _stacked_batches(configs, start),
                start=start,
                total=config.train.steps,
                place=place_batch,
                hooks=hooks,
                log_every=config.train.log_every,
                eval_every=config.train.eval_every,
            )
        if stopped:
            step = int(state["step"][0])
            return [{"interrupted": int(getattr(signal, stopped)), "step": step}] * len(seeds)
        return [
            {"failed": hooks.failed[i]}
            if i in hooks.failed
            else f.finish(seed_state(state, i), graphdef, evaluator, eval_lengths)
            for i, f in enumerate(files)
        ]


def _stacked_batches(configs, start: int):
    streams = [train.host_batches(c, seed=c.seed, start=start) for c in configs]
    while True:
        yield stack_batches([next(s) for s in streams])


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module next to experiments.main
    # (which owns the same flag names) does not clash.
    config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:k=v,...]")
    flags.DEFINE_string("workdir", None, "Workdir pattern with {seed}: 'runs/x/seed={seed}'.")
    flags.DEFINE_list("seeds", None, "Seeds to train together, e.g. 0,1,2,3.")
    flags.DEFINE_list("lengths", None, "Eval lengths (default: config eval.lengths).")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    try:
        if not f.workdir or "{seed}" not in f.workdir:
            raise ConfigError("--workdir: required, with {seed} in it, e.g. 'runs/x/seed={seed}'")
        if not f.seeds:
            raise ConfigError("--seeds: required, e.g. 0,1,2,3")
        seeds = [int(s) for s in f.seeds]
        results = run(
            config_utils.reconcile_blocks(f.config, sys.argv),
            [f.workdir.format(seed=s) for s in seeds],
            seeds,
            eval_lengths=config_utils.parse_lengths(f.lengths),
        )
    except (ConfigError, RunError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    if results and "interrupted" in results[0]:
        sys.exit(128 + results[0]["interrupted"])
    failed = [r["failed"] for r in results if "failed" in r]
    if failed:
        print("error: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _define_flags()
    app.run(main)
