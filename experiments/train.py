"""Training driver: mesh, sharded model, optimizer, jitted step, checkpoints, logging, eval.

Data flow (DESIGN.md section 2): config -> `validate` -> mesh (`data`, `model` axes) -> model
from the registries, initialised under `jit` with the shardings its logical axis names map to
(attn.sharding.RULES) -> `nnx.split` into (graphdef, params, rest) -> one jitted train step
per batch shape with the train state donated -> orbax checkpoints (experiments/checkpoint.py)
-> workdir/metrics.jsonl, workdir/tb -> experiments/evaluate.py at the eval grid ->
workdir/results.json, workdir/DONE. Protocol defaults follow Deletang et al. 2023
(arXiv 2207.02098): Adam, gradient clipping 1.0, one nominal length per batch.

Public pieces (README "Interfaces"; reused by sweep, seeds, bench and reliability):

- `run(config, workdir, *, eval_lengths=None) -> dict`: the whole run. Resumes from the latest
  good checkpoint; returns the results dict of the final evaluation, or
  `{"interrupted": signum, "step": s}` after SIGTERM/SIGINT (a checkpoint at s was saved).
- `validate(config, *, workdir=None, eval_lengths=None)`: every ConfigError check, no compiling.
- `make_mesh(config) -> Mesh`: `train.mesh.data` x `train.mesh.model` (-1: all remaining).
- `build_model(config, *, seed, mesh=None) -> nnx.Module`: sharded on the mesh.
- `make_optimizer(config) -> optax.GradientTransformation` (OPTIMIZERS x SCHEDULES, clipping);
  `make_schedule(config)` for the learning rate alone.
- `loss_and_metrics(model, batch, *, train) -> (loss, metrics)`: masked cross-entropy over
  `loss_mask`; metrics hold means (`loss`, `token_acc`, `seq_acc`) and the sums evaluation
  aggregates (`nll_sum`, `num_tokens`, `token_acc_sum`, `exact_sum`, `num_seqs`). token_acc is
  Deletang's per-sequence accuracy (fraction of correct output tokens, averaged over
  sequences); seq_acc is exact match.
- `init_train_state(config, *, mesh=None) -> (graphdef, state, tx)`;
  `init_state(config, graphdef, params, rest, tx)` from a built model's split;
  `make_train_step(config, graphdef, tx, *, donate=True)`:
  the train state is a dict pytree {"params", "rest" (RNG keys/counts and other non-Param
  state), "opt", "step", "skipped"}; `step_fn(state, batch) -> (state, metrics)` is jitted
  with the state donated. `split_model(model) -> (graphdef, params, rest)` and
  `merge_model(graphdef, state)` convert between module and state.
- `OPTIMIZERS` (adam, adamw, sgd) and `SCHEDULES` (constant, cosine, linear, rsqrt; each with
  linear `warmup` steps): classes with `DEFAULTS` and `make(...)`.
- `load_state(config, workdir, *, mesh=None, step=None) -> (graphdef, state, step)`: a run's
  checkpoint onto any mesh.
- `shard_batch(batch, mesh, *, local=True)`: numpy batch -> global jax arrays on `data`.
- `TIMING_KEYS`: metrics.jsonl fields that are wall-clock measurements (not reproducible).

Determinism: batches are a pure function of (seed, step) and the RNG is in the state, so a
run that is killed and resumed reaches bit-identical parameters and metrics rows.
"""

import logging
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import attn.models
import attn.sharding
from attn.registry import ConfigError, lookup, require
from experiments import checkpoint as ckpt_lib
from experiments import config_utils, input_pipeline, tasks

log = logging.getLogger("attn.train")

TIMING_KEYS = ("steps_per_s", "tokens_per_s", "eta_s", "compile_s", "elapsed_s", "eval_s")


# ----------------------------------------------------------------------------- optimizers


class Adam:
    """Kingma & Ba 2015; the Deletang et al. 2023 optimizer."""

    DEFAULTS = {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8}

    @staticmethod
    def make(cfg, lr) -> optax.GradientTransformation:
        return optax.adam(lr, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"])


class AdamW:
    """Loshchilov & Hutter 2019 (decoupled weight decay)."""

    DEFAULTS = {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}

    @staticmethod
    def make(cfg, lr) -> optax.GradientTransformation:
        return optax.adamw(
            lr, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=cfg["weight_decay"]
        )


class SGD:
    DEFAULTS = {"lr": 0.1, "momentum": 0.9, "nesterov": False}

    @staticmethod
    def make(cfg, lr) -> optax.GradientTransformation:
        return optax.sgd(lr, momentum=cfg["momentum"] or None, nesterov=cfg["nesterov"])


def _warmup(lr: float, warmup: int, after) -> optax.Schedule:
    if warmup <= 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), lambda s: after(s)], [warmup]
    )


class Constant:
    DEFAULTS = {"warmup": 0}

    @staticmethod
    def make(cfg, lr: float, steps: int) -> optax.Schedule:
        return _warmup(lr, cfg["warmup"], optax.constant_schedule(lr))


class Cosine:
    """Linear warmup, then cosine decay to min_ratio * lr at the last step."""

    DEFAULTS = {"warmup": 0, "min_ratio": 0.0}

    @staticmethod
    def make(cfg, lr: float, steps: int) -> optax.Schedule:
        decay = max(1, steps - cfg["warmup"])
        return _warmup(lr, cfg["warmup"], optax.cosine_decay_schedule(lr, decay, cfg["min_ratio"]))


class Linear:
    """Linear warmup, then linear decay to min_ratio * lr at the last step."""

    DEFAULTS = {"warmup": 0, "min_ratio": 0.0}

    @staticmethod
    def make(cfg, lr: float, steps: int) -> optax.Schedule:
        decay = max(1, steps - cfg["warmup"])
        end = lr * cfg["min_ratio"]
        return _warmup(lr, cfg["warmup"], optax.linear_schedule(lr, end, decay))


class Rsqrt:
    """Linear warmup, then lr * sqrt(warmup / step) (Vaswani et al. 2017)."""

    DEFAULTS = {"warmup": 1000}

    @staticmethod
    def make(cfg, lr: float, steps: int) -> optax.Schedule:
        w = max(1, cfg["warmup"])
        return _warmup(lr, cfg["warmup"], lambda s: lr * jnp.sqrt(w / jnp.maximum(s + w, 1)))


OPTIMIZERS = {"adam": Adam, "adamw": AdamW, "sgd": SGD}
SCHEDULES = {"constant": Constant, "cosine": Cosine, "linear": Linear, "rsqrt": Rsqrt}


def make_schedule(config) -> optax.Schedule:
    s = config.train.schedule
    cls = lookup(SCHEDULES, s.name, "train.schedule.name")
    return cls.make(s, config.train.optimizer.lr, config.train.steps)


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.train.optimizer
    tx = lookup(OPTIMIZERS, o.name, "train.optimizer.name").make(o, make_schedule(config))
    if config.train.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.train.grad_clip), tx)
    return tx


# ----------------------------------------------------------------------------- validation


def train_max_length(config) -> int:
    return tasks.build(config.task).max_train_length


def resolve_eval_lengths(config, lengths=None, *, during_training=False) -> list[int]:
    """The eval grid: explicit lengths, "auto" (1, 2, 4, 8, 16 x the longest training length),
    or "task" (the task's own eval_lengths). During training: `train.eval_lengths`
    ("auto": 1x and 2x the longest training length)."""
    n = train_max_length(config)
    spec = lengths
    if spec is None:
        spec = config.train.eval_lengths if during_training else config.eval.lengths
    field = "train.eval_lengths" if during_training else "eval.lengths"
    if isinstance(spec, str):
        if spec == "auto":
            return [n, 2 * n] if during_training else [n * k for k in (1, 2, 4, 8, 16)]
        if spec == "task":
            return [int(v) for v in tasks.build(config.task).cfg["eval_lengths"]]
        try:
            spec = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{field}: {spec!r}; 'auto', 'task' or e.g. '40,80,160'") from None
    spec = [int(v) for v in spec]
    require(bool(spec), field, "no lengths; 'auto', 'task' or e.g. '40,80,160'")
    require(min(spec) > 0, field, f"length {min(spec)} <= 0; lengths must be positive")
    return spec


def _sequence_length(task, layout: str, n: int) -> int:
    """Padded length T of a batch at nominal length n (what positions must cover)."""
    if task.family == "text":
        return input_pipeline.bucket_length(n)
    total = task.input_length(n) + task.output_length(n)
    if layout == "decoder":
        total += 1  # separator; EOS is a target only
    elif layout == "seq2seq":
        total = max(task.input_length(n), task.output_length(n))
    return input_pipeline.bucket_length(total)


def validate(config, *, workdir: str | None = None, eval_lengths=None) -> None:
    """Every configuration check that can fail, before anything is compiled."""
    task = tasks.build(config.task)
    layout = attn.models.batch_format(config.model.name, config.model)
    if layout not in task.layouts:
        raise ConfigError(
            f"model.name: {config.model.name!r} eats the {layout!r} layout, which task "
            f"{task.name!r} does not provide; layouts: {', '.join(task.layouts)}"
        )
    t = config.train
    require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
    require(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    for field in ("log_every", "ckpt_every"):
        require(t[field] > 0, f"train.{field}", f"must be positive, got {t[field]}")
    require(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only at the end)")
    require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    lookup(OPTIMIZERS, t.optimizer.name, "train.optimizer.name")
    lookup(SCHEDULES, t.schedule.name, "train.schedule.name")
    for field, registry, block in (
        ("train.optimizer", OPTIMIZERS, t.optimizer),
        ("train.schedule", SCHEDULES, t.schedule),
    ):
        want = set(registry[block.name].DEFAULTS) | {"name"}
        require(
            set(block.keys()) == want,
            field,
            f"fields {sorted(block.keys())} do not match {block.name!r}; expected "
            f"{sorted(want)} (pick it with the config arg, not an override)",
        )
    require(t.optimizer.lr > 0, "train.optimizer.lr", f"must be positive, got {t.optimizer.lr}")
    require(
        config.eval.batch_size > 0, "eval.batch_size", f"must be positive: {config.eval.batch_size}"
    )
    lengths = resolve_eval_lengths(config, eval_lengths)
    if t.eval_every:
        lengths = lengths + resolve_eval_lengths(config, during_training=True)
    longest = max(
        [task.max_train_length] + lengths, key=lambda n: _sequence_length(task, layout, n)
    )
    attn.models.validate(
        config.model,
        vocab_size=task.vocab_size,
        max_length=_sequence_length(task, layout, longest),
    )
    data, model = _mesh_shape(config)
    require(
        t.batch_size % data == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by the mesh data axis ({data})",
    )
    require(
        t.batch_size % jax.process_count() == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by the process count ({jax.process_count()})",
    )
    if workdir is not None:
        try:
            ckpt_lib.ensure_writable_dir(workdir)
        except ckpt_lib.RunError as e:
            raise ConfigError(f"--workdir: {e}") from None


def _mesh_shape(config) -> tuple[int, int]:
    m, n = config.train.mesh, jax.device_count()
    require(m.model >= 1, "train.mesh.model", f"must be >= 1, got {m.model}")
    data = n // m.model if m.data == -1 else m.data
    require(data >= 1, "train.mesh.data", f"must be >= 1 or -1 (all devices), got {m.data}")
    used = data * m.model
    if used > n or (used < n and jax.process_count() > 1) or n % m.model:
        raise ConfigError(
            f"train.mesh: data={data} x model={m.model} = {used} devices, but {n} are "
            f"available ({jax.process_count()} processes); use data=-1 or a shape with "
            f"product {n}"
        )
    return data, m.model


def make_mesh(config) -> Mesh:
    """`data` x `model` mesh over the first data*model devices (all of them multi-process)."""
    data, model = _mesh_shape(config)
    return jax.make_mesh(
        (data, model),
        ("data", "model"),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=jax.devices()[: data * model],
    )


# ----------------------------------------------------------------------------- model


def _rules():
    rules = attn.sharding.RULES
    return tuple(rules.items()) if isinstance(rules, dict) else tuple(rules)


def _rngs(seed: int) -> nnx.Rngs:
    return nnx.Rngs(default=seed, params=seed, dropout=seed + 1, positions=seed + 2)


def split_model(model: nnx.Module):
    """(graphdef, params, rest): trainable nnx.Param state and everything else (RNG, ...)."""
    return nnx.split(model, nnx.Param, ...)


def merge_model(graphdef, state: dict) -> nnx.Module:
    return nnx.merge(graphdef, state["params"], state["rest"])


def _shardings(abstract_tree, mesh: Mesh):
    with flax_spmd.logical_axis_rules(_rules()):
        specs = nnx.get_partition_spec(abstract_tree)
    # fit_spec before NamedSharding: a mesh axis that does not divide a dimension (6 heads on
    # model=4) replicates it, and so does a second use of one mesh axis (FIRE's MLP output
    # kernel is ("mlp", "heads"), both "model"), which NamedSharding rejects.
    return jax.tree.map(
        lambda a, s: NamedSharding(
            mesh,
            attn.sharding.fit_spec(tuple(s) + (None,) * (len(a.shape) - len(s)), a.shape, mesh),
        ),
        abstract_tree,
        specs,
    )


def _abstract_model(config, seed: int):
    task = tasks.build(config.task)

    def create():
        return attn.models.build(config.model, vocab_size=task.vocab_size, rngs=_rngs(seed))

    return create, nnx.eval_shape(create)


def build_model(config, *, seed: int, mesh: Mesh | None = None) -> nnx.Module:
    """The model of `config`, initialised from `seed`, its parameters sharded on `mesh`."""
    mesh = mesh or make_mesh(config)
    create, abstract = _abstract_model(config, seed)
    graphdef, abs_state = nnx.split(abstract)
    shardings = _shardings(abs_state, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def init_state(config, graphdef, params, rest, tx) -> dict:
    del config
    return {
        "params": params,
        "rest": rest,
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
    }


def init_train_state(config, *, mesh: Mesh | None = None):
    """(graphdef, freshly initialised sharded train state, tx) for `config`."""
    mesh = mesh or make_mesh(config)
    tx = make_optimizer(config)
    graphdef, init, _, _ = _init_fn(config, mesh, tx)
    with jax.set_mesh(mesh):
        return graphdef, init(), tx


# Initialisation runs once: compiling it without XLA's expensive optimisations cuts its
# compile time about 4x on CPU (measured on the smoke encoder: 4.3 s -> 1.2 s).
_INIT_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _init_fn(config, mesh: Mesh, tx):
    """(graphdef, init() -> sharded train state, abstract state, shardings)."""
    create, abstract = _abstract_model(config, config.seed)
    graphdef, _, _ = split_model(abstract)

    def init():
        _, params, rest = split_model(create())
        return init_state(config, graphdef, params, rest, tx)

    abstract_state = jax.eval_shape(init)
    shardings = _shardings(abstract_state, mesh)
    jitted = jax.jit(init, out_shardings=shardings)

    def init_state_now():
        return jitted.lower().compile(compiler_options=_INIT_COMPILER_OPTIONS)()

    return graphdef, init_state_now, abstract_state, shardings


# ----------------------------------------------------------------------------- step


def loss_and_metrics(model: nnx.Module, batch: dict, *, train: bool):
    """Masked cross-entropy over batch["loss_mask"] and accuracy sums (see module docstring)."""
    logits = model(batch, train=train).astype(jnp.float32)
    targets = batch["targets"]
    mask = batch["loss_mask"].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    nll_sum = jnp.sum(nll * mask)
    num_tokens = jnp.sum(mask)
    loss = nll_sum / jnp.maximum(num_tokens, 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * mask
    per_seq = jnp.sum(mask, -1)
    scored = (per_seq > 0).astype(jnp.float32)
    seq_correct = jnp.sum(correct, -1)
    token_acc_sum = jnp.sum(seq_correct / jnp.maximum(per_seq, 1.0) * scored)
    exact_sum = jnp.sum((seq_correct == per_seq).astype(jnp.float32) * scored)
    num_seqs = jnp.sum(scored)
    metrics = {
        "loss": loss,
        "token_acc": token_acc_sum / jnp.maximum(num_seqs, 1.0),
        "seq_acc": exact_sum / jnp.maximum(num_seqs, 1.0),
        "nll_sum": nll_sum,
        "num_tokens": num_tokens,
        "token_acc_sum": token_acc_sum,
        "exact_sum": exact_sum,
        "num_seqs": num_seqs,
    }
    return loss, metrics


def make_train_step(config, graphdef, tx, *, donate: bool = True):
    """Jitted `step_fn(state, batch) -> (state, metrics)`; the state argument is donated.

    With train.skip_nonfinite, a step whose loss or gradients are not finite leaves params
    and optimizer state unchanged and counts one in state["skipped"].
    """
    skip = bool(config.train.skip_nonfinite)

    def step_fn(state, batch):
        model = merge_model(graphdef, state)

        def loss_fn(model):
            return loss_and_metrics(model, batch, train=True)

        # nnx.value_and_grad differentiates the nnx.Param state and carries the RNG counts
        # the forward pass advanced back into `model`.
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        rest = split_model(model)[2]
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        # A finite loss and gradient can still overflow a parameter; checking the new
        # parameters too keeps every saved checkpoint finite. (Not via norms: a norm of
        # finite but large values can overflow.)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
        if skip:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            params, opt = keep(params, state["params"]), keep(opt, state["opt"])
        new_state = {
            "params": params,
            "rest": rest,
            "opt": opt,
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {
            "loss": metrics["loss"],
            "token_acc": metrics["token_acc"],
            "seq_acc": metrics["seq_acc"],
            "grad_norm": grad_norm,
            "finite": finite,
        }
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def shard_batch(batch: dict, mesh: Mesh, *, local: bool = True) -> dict:
    """Numpy batch -> global arrays sharded on `data`.

    local=True: `batch` holds this process's rows (train_batches). local=False: every process
    holds the whole batch (eval sets) and keeps its own contiguous block of rows.
    """
    sharding = NamedSharding(mesh, P("data"))
    if not local and jax.process_count() > 1:
        rows = next(iter(batch.values())).shape[0] // jax.process_count()
        lo = jax.process_index() * rows
        batch = {k: v[lo : lo + rows] for k, v in batch.items()}
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


# ----------------------------------------------------------------------------- run


def init_distributed(enabled: bool | None = None) -> None:
    """jax.distributed.initialize for multi-process runs.

    experiments/multi.py sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
    enabled=True with none of them uses JAX's cluster auto-detection (SLURM, TPU pods, ...).
    """
    env = os.environ
    if enabled is None:
        enabled = "JAX_COORDINATOR_ADDRESS" in env
    if not enabled:
        return
    if "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()


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


class MetricsLogger:
    """metrics.jsonl rows, TensorBoard scalars and the console, on process 0 only."""

    def __init__(self, workdir: str, total_steps: int | None = None, start_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.main = jax.process_index() == 0
        self.tb = None
        self.bar = None
        if self.main:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            if total_steps is not None and sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, unit="step")

    def row(self, row: dict) -> None:
        if not self.main:
            return
        clean = {k: _jsonable(v) for k, v in row.items()}
        ckpt_lib.append_jsonl(self.path, clean)
        tag = row["split"] if row.get("length") is None else f"{row['split']}/{row['length']}"
        for k, v in clean.items():
            if k not in ("step", "split", "length") and isinstance(v, float | int):
                self.tb.add_scalar(f"{tag}/{k}", v, row["step"])

    def progress(self, step: int, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            log.info("step %d: %s", step, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray | np.generic | jax.Array):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run(config, workdir: str, *, eval_lengths=None) -> dict:
    """Train `config` in `workdir` (resuming), evaluate, write results.json and DONE."""
    from experiments import evaluate

    workdir = os.path.abspath(workdir)  # orbax wants absolute paths
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    validate(config, workdir=workdir, eval_lengths=eval_lengths)
    setup_compilation_cache(config, workdir)
    with ckpt_lib.workdir_lock(workdir, process_index=jax.process_index()):
        return _run_locked(config, workdir, eval_lengths, evaluate)


def _run_locked(config, workdir, eval_lengths, evaluate) -> dict:
    main = jax.process_index() == 0
    if main:
        ckpt_lib.atomic_write_text(
            os.path.join(workdir, "config.json"), config_utils.to_json(config)
        )
    done = os.path.join(workdir, "DONE")
    mesh = make_mesh(config)
    task = tasks.build(config.task)
    layout = attn.models.batch_format(config.model.name, config.model)
    tx = make_optimizer(config)
    schedule = make_schedule(config)
    graphdef, init, abstract, shardings = _init_fn(config, mesh, tx)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
        t0 = time.perf_counter()
        state, start = ckpt.restore(_with_shardings(abstract, shardings))
        if state is None:
            state, start = init(), 0
        else:
            log.info("resumed from step %d in %.2fs", start, time.perf_counter() - t0)
        if main:
            # Rows past the restored step (or all rows, when no checkpoint committed) will be
            # logged again, and so will the final evaluation, which always reruns at the end.
            ckpt_lib.rewind_jsonl(
                os.path.join(workdir, "metrics.jsonl"),
                start,
                keep=lambda r: r["split"] == "train" or r["step"] < config.train.steps,
            )
        if main and os.path.exists(done) and start < config.train.steps:
            os.remove(done)
        with ckpt_lib.StopSignals() as stop:
            state, stopped = _train(
                config,
                workdir,
                state,
                start,
                graphdef,
                tx,
                schedule,
                mesh,
                task,
                layout,
                ckpt,
                stop,
                evaluate,
            )
        if stopped:
            return {"interrupted": stopped, "step": int(state["step"])}
        ckpt.save(int(state["step"]), state, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    model = merge_model(graphdef, state)
    results = evaluate.evaluate_and_write(
        config, workdir, model, mesh=mesh, step=int(state["step"]), lengths=eval_lengths
    )
    if main:
        ckpt_lib.atomic_write_text(done, time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    return results


def load_state(config, workdir: str, *, mesh: Mesh | None = None, step: int | None = None):
    """(graphdef, train state, step) restored from workdir's checkpoints (latest good step)."""
    mesh = mesh or make_mesh(config)
    graphdef, _, abstract, shardings = _init_fn(config, mesh, make_optimizer(config))
    ckpt = ckpt_lib.Checkpointer(os.path.abspath(workdir), keep=config.train.keep_checkpoints)
    try:
        state, step = ckpt.restore(_with_shardings(abstract, shardings), step=step)
    finally:
        ckpt.close()
    if state is None:
        raise ckpt_lib.RunError(f"no checkpoint in {workdir}/checkpoints")
    return graphdef, state, step


def _with_shardings(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _train(
    config, workdir, state, start, graphdef, tx, schedule, mesh, task, layout, ckpt, stop, evaluate
):
    """The loop; returns (state, None) when done or (state, signum) when stopped."""
    import signal

    t = config.train
    total = t.steps
    logger = MetricsLogger(workdir, total, start)
    step_fn = make_train_step(config, graphdef, tx)
    compiled: dict = {}
    batches = input_pipeline.train_batches(
        task,
        config,
        layout=layout,
        seed=config.seed,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    pending = None  # (step, metrics on device, tokens, compile_s) fetched one step late
    # Throughput and ETA leave out compilation (paid once per batch shape) and evaluation.
    window = {"t": time.perf_counter(), "steps": 0, "tokens": 0, "excluded": 0.0}
    last_ckpt = ckpt.latest_step()
    run_started = time.perf_counter()

    def flush():
        nonlocal pending
        if pending is None:
            return
        step, metrics, compile_s = pending
        pending = None
        m = _to_host(metrics)
        if not bool(m["finite"]) and not t.skip_nonfinite:
            where = f"step {last_ckpt} in {workdir}/checkpoints" if last_ckpt else "none (step 0)"
            raise ckpt_lib.RunError(
                f"non-finite loss/gradients at step {step} (loss={float(m['loss'])}); last good "
                f"checkpoint: {where}; lower the learning rate or set "
                "--config.train.skip_nonfinite=true"
            )
        if step % t.log_every == 0 or step == total or compile_s:
            now = time.perf_counter()
            dt = max(now - window["t"] - window["excluded"], 1e-9)
            rate = window["steps"] / dt
            row = {
                "step": step,
                "split": "train",
                "length": None,
                "loss": m["loss"],
                "token_acc": m["token_acc"],
                "seq_acc": m["seq_acc"],
                "grad_norm": m["grad_norm"],
                "lr": float(schedule(step - 1)),
                "skipped": int(state["skipped"]) if t.skip_nonfinite else 0,
                "steps_per_s": rate,
                "tokens_per_s": window["tokens"] / dt,
                "eta_s": (total - step) / rate if rate else None,
                "elapsed_s": now - run_started,
            }
            if compile_s:
                row["compile_s"] = compile_s
            logger.row(row)
            logger.progress(
                step,
                f"loss {float(m['loss']):.4f} acc {float(m['token_acc']):.3f} "
                f"{rate:.1f} step/s {row['tokens_per_s']:.0f} tok/s "
                f"eta {_fmt_eta(row['eta_s'])}",
            )
            window.update(t=now, steps=0, tokens=0, excluded=0.0)

    try:
        for step, batch in batches:
            if step >= total:
                break
            if _should_stop(stop, step, t.log_every):
                flush()
                ckpt.save(step, state, force=True)
                ckpt.wait()
                logger.progress(step, f"stopped by {stop.received}; checkpoint saved")
                return state, int(getattr(signal, stop.received))
            tokens = int(batch["token_mask"].sum()) * jax.process_count()
            gbatch = shard_batch(batch, mesh)
            key = tuple((k, v.shape) for k, v in sorted(gbatch.items()))
            compile_s = 0.0
            if key not in compiled:
                c0 = time.perf_counter()
                compiled[key] = step_fn.lower(state, gbatch).compile()
                compile_s = time.perf_counter() - c0
                window["excluded"] += compile_s
            state, metrics = compiled[key](state, gbatch)
            flush()
            pending = (step + 1, metrics, compile_s)
            window["steps"] += 1
            window["tokens"] += tokens
            done = step + 1
            if t.eval_every and done % t.eval_every == 0 and done < total:
                flush()
                e0 = time.perf_counter()
                evaluate.evaluate_model(
                    config,
                    merge_model(graphdef, state),
                    mesh=mesh,
                    step=done,
                    lengths=resolve_eval_lengths(config, during_training=True),
                    log_row=logger.row,
                )
                window["excluded"] += time.perf_counter() - e0
            if done % t.ckpt_every == 0 and done < total:
                flush()
                ckpt.save(done, state)
                last_ckpt = done
        flush()
    finally:
        logger.close()
    return state, None


def _should_stop(stop, step: int, every: int) -> bool:
    """All processes must agree on the step they stop at (the save is collective)."""
    if jax.process_count() == 1:
        return stop.received is not None
    if step % every:
        return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(stop.received is not None))
    if np.any(flags) and stop.received is None:
        stop.received = "SIGTERM"
    return bool(np.any(flags))


def _fmt_eta(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TIMING_KEYS",
    "build_model",
    "init_distributed",
    "init_state",
    "init_train_state",
    "load_state",
    "loss_and_metrics",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge_model",
    "resolve_eval_lengths",
    "run",
    "setup_compilation_cache",
    "shard_batch",
    "split_model",
    "validate",
]
