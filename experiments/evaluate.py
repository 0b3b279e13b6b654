"""Length-extrapolation evaluation of a model or a run directory at a grid of lengths.

  python -m experiments.main --mode eval --workdir runs/rev_alibi [--lengths 40,80,160]

For every nominal length n of the grid (default `eval.lengths="auto"`: 1, 2, 4, 8, 16 x the
longest training length; "task" = the task's own eval_lengths) the fixed evaluation set of
experiments.input_pipeline.eval_batches is scored with dropout off and positions from the
sampler's eval mode (`eval.random_positions=true` turns on the sampler's `at_eval`, as the
Ruoss et al. 2023 reference code does). Per length (experiments/metrics.py): loss (mean NLL
per scored token), token_acc, seq_acc, what the task adds (perplexity for text, Press et al.
2022), the number of sequences and the compilation time of that length's shapes (AOT
`lower().compile()`; the JAX persistent compilation cache is on by default, see
train.setup_compilation_cache). The attention implementation is the model's `impl`.

An `Evaluator` compiles each batch shape once per process: the periodic evaluations during
training and the final one reuse its executables.

Outputs: one metrics.jsonl row per length {"step", "split": "eval", "length", "ood", ...} and
workdir/results.json (README "Run outputs"), written atomically, whose summary holds the task
metric's mean over in-distribution and out-of-distribution lengths (metrics.summarize).

Public: `Evaluator(config, mesh)(state, step=, lengths=, log_row=)`, `Evaluator.score(state,
batches)` (any batches; the 2-D operand-length grid of experiments/grid.py uses it),
`evaluate_and_write(...)`, `run(workdir, *, lengths=None)`.
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attn.models
from attn.registry import ConfigError
from experiments import config_utils, input_pipeline, mesh, metrics, state, tasks
from experiments.tasks.layouts import padded_length
from experiments.validate import resolve_eval_lengths, validate
from experiments.workdir import (
    Stopped,
    StopSignals,
    atomic_write_json,
    rewind_jsonl,
    workdir_lock,
)

log = logging.getLogger("attn.evaluate")


def _with_eval_positions(config):
    """The config the eval model is built from: eval.random_positions -> sampler at_eval."""
    cfg = config.copy_and_resolve_references()
    positions = cfg.model.get("positions")  # recurrent and SSM models have no sampler
    if positions is not None and "at_eval" in positions:
        positions.at_eval = bool(config.eval.random_positions)
    return cfg


def _pad_rows(batch: dict, multiple: int) -> dict:
    """Zero rows (nothing scored, every token masked) up to a multiple of the data axis."""
    b = next(iter(batch.values())).shape[0]
    extra = -b % multiple
    if not extra:
        return batch
    return {
        k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
    }


class Evaluator:
    """Scores models of one config at nominal lengths; one compile per batch shape."""

    def __init__(self, config, device_mesh):
        self.config = config
        self.mesh = device_mesh
        self.task = tasks.build(config.task)
        self.layout = attn.models.batch_format(config.model.name, config.model)
        graphdef, _ = nnx.split(state.abstract_model(_with_eval_positions(config))[1])

        def sums(model_state, batch):
            model = nnx.merge(graphdef, model_state)
            _, m = metrics.loss_and_metrics(model, batch, train=False)
            return {k: m[k] for k in metrics.SUMS}

        self._fn = jax.jit(sums)
        self._compiled: dict = {}
        self._rows_multiple = device_mesh.shape["data"] * jax.process_count()

    def _relative_cost(self, T: int, params: int) -> float:
        """Forward FLOPs per sequence of padded length T (PaLM's count: 2 per parameter and
        token plus 4 x layers x heads x head dim x T per token for attention)."""
        m = self.config.model
        attention = 0
        if "num_layers" in m and "num_heads" in m:
            head_dim = m.get("head_dim") or m.d_model // m.num_heads
            attention = 4 * m.num_layers * m.num_heads * head_dim * T
        return T * (2 * params + attention)

    def check(self, lengths) -> dict:
        """The evaluation sets at `lengths` (built now if they are not on disk yet); a
        ConfigError naming a length whose set is empty (a text split shorter than it)."""
        datasets = {n: self._batches(n) for n in lengths}
        empty = [n for n, ds in datasets.items() if len(ds) == 0]
        if empty:
            raise ConfigError(
                f"eval.lengths: no evaluation examples at length {empty[0]} (the task's "
                "evaluation split is shorter than that); use shorter lengths"
            )
        return datasets

    def _batches(self, n: int):
        return input_pipeline.eval_batches(
            self.task,
            layout=self.layout,
            length=n,
            batch_size=self.config.eval.batch_size,
            num_examples=self.config.eval.num_examples,
            data_dir=self.config.eval.data_dir or None,
        )

    def __call__(self, model, *, step: int, lengths, log_row=None, stop=None) -> dict:
        """{length: metrics} of `model` (a module or its nnx.State); one "eval" row per length
        through log_row. After the first batch it logs what the whole grid will take. `stop`
        (a workdir.StopSignals) is checked between lengths: a signal raises Stopped."""
        model_state = model if isinstance(model, nnx.State) else nnx.split(model)[1]
        datasets = self.check(lengths)
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model_state, nnx.Param)))
        plan = {
            n: (len(ds), self._relative_cost(padded_length(self.task, self.layout, n), params))
            for n, ds in datasets.items()
        }
        out, estimated = {}, False
        for n in lengths:
            if stop is not None:
                stop.check()
            t0 = time.perf_counter()
            compile_s, total = 0.0, None
            for batch in datasets[n]:
                g = mesh.shard_batch(_pad_rows(batch, self._rows_multiple), self.mesh, local=False)
                key = tuple((k, v.shape) for k, v in sorted(g.items()))
                if key not in self._compiled:
                    c0 = time.perf_counter()
                    self._compiled[key] = self._fn.lower(model_state, g).compile()
                    compile_s += time.perf_counter() - c0
                r0 = time.perf_counter()
                part = jax.block_until_ready(self._compiled[key](model_state, g))
                if not estimated:
                    estimated = True
                    self._log_estimate(plan, n, time.perf_counter() - r0, compile_s)
                total = part if total is None else jax.tree.map(jnp.add, total, part)
            m = metrics.means(jax.tree.map(float, jax.device_get(total)), self.task)
            m["compile_s"] = compile_s
            m["eval_s"] = time.perf_counter() - t0
            out[n] = m
            ood = n > self.task.max_train_length
            if log_row is not None:
                log_row({"step": step, "split": "eval", "length": n, "ood": ood, **m})
            log.info(
                "eval step %d length %d: loss %.4f token_acc %.4f seq_acc %.4f (%.1fs, compile "
                "%.2fs)",
                step,
                n,
                m["loss"],
                m["token_acc"],
                m["seq_acc"],
                m["eval_s"],
                compile_s,
            )
        return out

    def score(self, model, batches) -> dict:
        """metrics.means of `model` (a module or its nnx.State) over `batches` (numpy dicts
        in the model's layout, e.g. experiments/grid.py's cells), through the same compiled
        executables as the lengths; "compile_s" is the compilation it needed."""
        model_state = model if isinstance(model, nnx.State) else nnx.split(model)[1]
        compile_s, total = 0.0, None
        for batch in batches:
            g = mesh.shard_batch(_pad_rows(batch, self._rows_multiple), self.mesh, local=False)
            key = tuple((k, v.shape) for k, v in sorted(g.items()))
            if key not in self._compiled:
                c0 = time.perf_counter()
                self._compiled[key] = self._fn.lower(model_state, g).compile()
                compile_s += time.perf_counter() - c0
            part = self._compiled[key](model_state, g)
            total = part if total is None else jax.tree.map(jnp.add, total, part)
        m = metrics.means(jax.tree.map(float, jax.device_get(total)), self.task)
        return {**m, "compile_s": compile_s}

    def _log_estimate(self, plan: dict, first: int, seconds: float, compile_s: float) -> None:
        """One line: the grid's batches and the time they should take, scaled from the first
        batch by their FLOPs (compilation comes on top, about once per length)."""
        per_cost = seconds / max(plan[first][1], 1.0)
        total = sum(count * cost * per_cost for count, cost in plan.values())
        batches = sum(count for count, _ in plan.values())
        log.info(
            "evaluation at lengths %s: %d batches of <= %d, estimated %s from %.2fs for a "
            "batch at length %d (plus about %.1fs of compilation per length)",
            ",".join(map(str, plan)),
            batches,
            self.config.eval.batch_size,
            _duration(total),
            seconds,
            first,
            compile_s,
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


FINAL = "final"  # the training run's own evaluation: results.json
PERIODIC = "periodic"  # evaluations during training (metrics.jsonl rows only)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# What an evaluation may change of a run's config (model fields only if every parameter keeps
# its shape: RoPE scaling, positions at evaluation, the attention implementation, ...).
EVAL_FIELDS = ("eval.", "model.", "task.eval_lengths")


def results_path(workdir: str, name: str = FINAL) -> str:
    """results.json for the final evaluation, evals/<name>.json for a named one."""
    if name == FINAL:
        return os.path.join(workdir, "results.json")
    return os.path.join(workdir, "evals", f"{name}.json")


def evaluate_and_write(
    config,
    workdir,
    model,
    *,
    step: int,
    evaluator: Evaluator,
    lengths=None,
    writer=None,
    name: str = FINAL,
    overrides: dict | None = None,
    extra: dict | None = None,
    stop=None,
) -> dict:
    """The evaluation at the eval grid, then its results file (process 0): results.json for
    the final evaluation, evals/<name>.json for a named one. Rows go to `writer` (a
    metrics.MetricsWriter of workdir; one is opened if None) with "eval": name."""
    lengths = resolve_eval_lengths(config, lengths)
    with contextlib.ExitStack() as stack:
        if writer is None:
            writer = stack.enter_context(metrics.MetricsWriter(workdir))
        log_row = lambda row: writer.row({**row, "eval": name})
        per_length = evaluator(model, step=step, lengths=lengths, log_row=log_row, stop=stop)
    task = evaluator.task
    results = {
        "config": config.to_dict(),
        "task": task.name,
        "variant": config.variant,
        "seed": int(config.seed),
        "step": int(step),
        "eval": name,
        "overrides": dict(overrides or {}),
        "train_max_length": task.max_train_length,
        "chance": task.chance,
        "per_length": {str(n): m for n, m in per_length.items()},
        "summary": metrics.summarize(
            per_length, train_max_length=task.max_train_length, metric=task.metric
        ),
        "random_positions": bool(config.eval.random_positions),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    if jax.process_index() == 0:
        path = results_path(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, metrics.jsonable(results))
    return results


def _eval_config(config, overrides):
    """The run's config with evaluation-time overrides ("a.b=v"); ConfigError for a field an
    evaluation may not change."""
    config = config.copy_and_resolve_references()
    for item in overrides:
        path = item.partition("=")[0]
        if not path.startswith(EVAL_FIELDS):
            raise ConfigError(
                f"config.{path}: not an evaluation-time field; an evaluation may change eval.*, "
                "task.eval_lengths and model fields that keep every parameter's shape"
            )
    applied = config_utils.apply_overrides(config, overrides)
    return config, applied


def _param_shapes(config):
    return jax.tree.map(
        lambda x: tuple(x.shape), nnx.state(state.abstract_model(config)[1], nnx.Param)
    )


def default_name(step: int, applied: dict, lengths) -> str:
    """step<N>, with a short hash of what this evaluation changed when it changed anything."""
    change = {**applied, **({"lengths": list(lengths)} if lengths else {})}
    if not change:
        return f"step{step}"
    digest = hashlib.sha1(json.dumps(change, sort_keys=True, default=str).encode()).hexdigest()
    return f"step{step}-{digest[:8]}"


def run(
    workdir: str, *, lengths=None, step=None, name=None, overrides=(), config_given=False
) -> dict:
    """Evaluate a checkpoint of `workdir` (the latest good one, or `step`) at `lengths`
    (default: eval.lengths), with evaluation-time `overrides` ("a.b=v"), as evaluation `name`
    (default step<N>[-<hash of the overrides>]); writes evals/<name>.json and rows with
    "eval": name (rows of an earlier evaluation of that name are replaced)."""
    if config_given:
        raise ConfigError(
            "--config: eval reads the run's config.json; change its evaluation-time fields "
            "with overrides alone, e.g. --config.eval.num_examples=256"
        )
    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--workdir: {path} not found; not a run directory (train it first)")
    if name is not None and (name in (FINAL, PERIODIC) or not _NAME.match(name)):
        raise ConfigError(
            f"--name: {name!r}; letters, digits, '.', '_' and '-', not {FINAL!r} or {PERIODIC!r}"
            " (the training run's own evaluations)"
        )
    if step is not None and step < 0:
        raise ConfigError(f"--step: {step} < 0; a checkpoint step of the run")
    config = config_utils.load_json(path)
    eval_config, applied = _eval_config(config, overrides)
    validate(eval_config, eval_lengths=lengths)
    if _param_shapes(eval_config) != _param_shapes(config):
        changed = ", ".join(f"config.{k}" for k in applied if k.startswith("model."))
        raise ConfigError(
            f"{changed}: changes the model's parameters; an evaluation may only change fields "
            "that keep every parameter's shape"
        )
    with workdir_lock(workdir, process_index=jax.process_index()), StopSignals() as signals:
        device_mesh = mesh.make_mesh(config)
        graphdef, train_state, step = state.load_state(config, workdir, mesh=device_mesh, step=step)
        name = name or default_name(step, applied, lengths)
        if jax.process_index() == 0:
            rewind_jsonl(
                os.path.join(workdir, "metrics.jsonl"),
                math.inf,
                keep=lambda r: not (r.get("split") == "eval" and r.get("eval") == name),
            )
        log.info("evaluation %s of %s at step %d", name, workdir, step)
        try:
            return evaluate_and_write(
                eval_config,
                workdir,
                state.merge_model(graphdef, train_state),
                step=step,
                evaluator=Evaluator(eval_config, device_mesh),
                lengths=lengths,
                name=name,
                overrides=applied,
                stop=signals,
            )
        except Stopped as e:  # between lengths: nothing of this evaluation is kept
            log.warning("evaluation %s stopped by %s; not kept", name, e)
            return {"interrupted": e.signum, "step": step}
