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

Public: `Evaluator(config, mesh)(state, step=, lengths=, log_row=)`, `evaluate_and_write(...)`,
`run(workdir, *, lengths=None)`.
"""

import contextlib
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attn.models
from attn.registry import ConfigError
from experiments import input_pipeline, mesh, metrics, state, tasks
from experiments.validate import resolve_eval_lengths, validate
from experiments.workdir import atomic_write_json, workdir_lock

log = logging.getLogger("attn.evaluate")


def _eval_config(config):
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
        graphdef, _ = nnx.split(state.abstract_model(_eval_config(config))[1])

        def sums(model_state, batch):
            model = nnx.merge(graphdef, model_state)
            _, m = metrics.loss_and_metrics(model, batch, train=False)
            return {k: m[k] for k in metrics.SUMS}

        self._fn = jax.jit(sums)
        self._compiled: dict = {}
        self._rows_multiple = device_mesh.shape["data"] * jax.process_count()

    def __call__(self, model, *, step: int, lengths, log_row=None) -> dict:
        """{length: metrics} of `model` (a module or its nnx.State); one "eval" row per length
        through log_row."""
        model_state = model if isinstance(model, nnx.State) else nnx.split(model)[1]
        out = {}
        for n in lengths:
            t0 = time.perf_counter()
            compile_s, total = 0.0, None
            for batch in input_pipeline.eval_batches(
                self.task,
                layout=self.layout,
                length=n,
                batch_size=self.config.eval.batch_size,
                num_examples=self.config.eval.num_examples,
                data_dir=self.config.eval.data_dir or None,
            ):
                g = mesh.shard_batch(_pad_rows(batch, self._rows_multiple), self.mesh, local=False)
                key = tuple((k, v.shape) for k, v in sorted(g.items()))
                if key not in self._compiled:
                    c0 = time.perf_counter()
                    self._compiled[key] = self._fn.lower(model_state, g).compile()
                    compile_s += time.perf_counter() - c0
                part = self._compiled[key](model_state, g)
                total = part if total is None else jax.tree.map(jnp.add, total, part)
            m = metrics.means(jax.tree.map(float, jax.device_get(total)), self.task)
            m["compile_s"] = compile_s
            m["eval_s"] = time.perf_counter() - t0
            out[n] = m
            ood = n > self.task.max_train_length
            if log_row is not None:
                log_row({"step": step, "split": "eval", "length": n, "ood": ood, **m})
            log.info(
                "eval step %d length %d: loss %.4f token_acc %.4f seq_acc %.4f (compile %.2fs)",
                step,
                n,
                m["loss"],
                m["token_acc"],
                m["seq_acc"],
                compile_s,
            )
        return out


def evaluate_and_write(
    config, workdir, model, *, step: int, evaluator: Evaluator, lengths=None, writer=None
) -> dict:
    """The evaluation at the eval grid, then workdir/results.json (process 0). Rows go to
    `writer` (a metrics.MetricsWriter of workdir; one is opened if None)."""
    lengths = resolve_eval_lengths(config, lengths)
    with contextlib.ExitStack() as stack:
        if writer is None:
            writer = stack.enter_context(metrics.MetricsWriter(workdir))
        per_length = evaluator(model, step=step, lengths=lengths, log_row=writer.row)
    task = evaluator.task
    results = {
        "config": config.to_dict(),
        "task": task.name,
        "variant": config.variant,
        "seed": int(config.seed),
        "step": int(step),
        "train_max_length": task.max_train_length,
        "per_length": {str(n): m for n, m in per_length.items()},
        "summary": metrics.summarize(
            per_length, train_max_length=task.max_train_length, metric=task.metric
        ),
        "random_positions": bool(config.eval.random_positions),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, "results.json"), metrics.jsonable(results))
    return results


def run(workdir: str, *, lengths=None) -> dict:
    """Evaluate the latest good checkpoint of `workdir` at `lengths` (default: eval.lengths)."""
    from experiments import config_utils

    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--workdir: {path} not found; not a run directory (train it first)")
    config = config_utils.load_json(path)
    validate(config, eval_lengths=lengths)
    with workdir_lock(workdir, process_index=jax.process_index()):
        device_mesh = mesh.make_mesh(config)
        graphdef, train_state, step = state.load_state(config, workdir, mesh=device_mesh)
        model = state.merge_model(graphdef, train_state)
        evaluator = Evaluator(config, device_mesh)
        return evaluate_and_write(
            config, workdir, model, step=step, evaluator=evaluator, lengths=lengths
        )
