"""Length-extrapolation evaluation of a run directory at a grid of lengths.

  python -m experiments.main --mode eval --workdir runs/rev_alibi [--lengths 40,80,160]

For every nominal length n of the grid (default `eval.lengths="auto"`: 1, 2, 4, 8, 16 x the
longest training length; "task" = the task's own eval_lengths) the fixed evaluation set of
experiments.input_pipeline.eval_batches is scored with dropout off and positions from the
sampler's eval mode (`eval.random_positions=true` turns on the sampler's `at_eval`, as the
Ruoss et al. 2023 reference code does). Per length: loss (mean NLL per scored token),
token_acc (Deletang et al. 2023 per-sequence accuracy: the fraction of correct output tokens,
averaged over sequences), seq_acc (exact match, Kazemnejad et al. 2023), ppl = exp(loss) for
text tasks (Press et al. 2022), the number of sequences and the compilation time of that
length's shapes (measured with AOT `lower().compile()`; the JAX persistent compilation cache
is on by default, see train.setup_compilation_cache). The attention implementation is the
model's `impl` ("auto" picks the chunked kernel where L x S would not fit).

Outputs: one metrics.jsonl row per length {"step", "split": "eval", "length", ...} and
workdir/results.json (README "Run outputs"), written atomically, whose summary holds
the task metric's mean over in-distribution lengths (<= longest training length) and
out-of-distribution lengths.

Public: `run(workdir, *, lengths=None) -> results`, `evaluate_model(config, model, *, mesh,
step, lengths, log_row=None) -> {length: metrics}`, `evaluate_and_write(...)`.
"""

import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attn.models
from attn.registry import ConfigError
from experiments import checkpoint as ckpt_lib
from experiments import config_utils, input_pipeline, tasks, train

log = logging.getLogger("attn.evaluate")

SUMS = ("nll_sum", "num_tokens", "token_acc_sum", "exact_sum", "num_seqs")


def _eval_config(config):
    """The config the eval model is built from: eval.random_positions -> sampler at_eval."""
    cfg = config.copy_and_resolve_references()
    if "at_eval" in cfg.model.positions:
        cfg.model.positions.at_eval = bool(config.eval.random_positions)
    return cfg


def _data_dir(config):
    return config.eval.data_dir or None


def _pad_rows(batch: dict, multiple: int) -> dict:
    """Zero rows (nothing scored, every token masked) up to a multiple of the data axis."""
    b = next(iter(batch.values())).shape[0]
    extra = -b % multiple
    if not extra:
        return batch
    return {
        k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
    }


def evaluate_model(config, model, *, mesh, step: int, lengths, log_row=None) -> dict:
    """Metrics of `model` at each nominal length; one "eval" row per length via log_row."""
    task = tasks.build(config.task)
    layout = attn.models.batch_format(config.model.name, config.model)
    eval_cfg = _eval_config(config)
    _, state = nnx.split(model)
    graphdef, _ = nnx.split(train._abstract_model(eval_cfg, config.seed)[1])

    def sums(state, batch):
        _, metrics = train.loss_and_metrics(nnx.merge(graphdef, state), batch, train=False)
        return {k: metrics[k] for k in SUMS}

    fn = jax.jit(sums)
    rows_multiple = mesh.shape["data"] * jax.process_count()
    max_train = task.max_train_length
    out = {}
    compiled = {}
    for n in lengths:
        t0 = time.perf_counter()
        compile_s = 0.0
        total = None
        for batch in input_pipeline.eval_batches(
            task, config, layout=layout, length=n, data_dir=_data_dir(config)
        ):
            g = train.shard_batch(_pad_rows(batch, rows_multiple), mesh, local=False)
            key = tuple((k, v.shape) for k, v in sorted(g.items()))
            if key not in compiled:
                c0 = time.perf_counter()
                compiled[key] = fn.lower(state, g).compile()
                compile_s += time.perf_counter() - c0
            part = compiled[key](state, g)
            total = part if total is None else jax.tree.map(jnp.add, total, part)
        metrics = _finish(jax.tree.map(float, jax.device_get(total)), task)
        metrics["compile_s"] = compile_s
        metrics["eval_s"] = time.perf_counter() - t0
        out[n] = metrics
        if log_row is not None:
            log_row({"step": step, "split": "eval", "length": n, "ood": n > max_train, **metrics})
        log.info(
            "eval step %d length %d: loss %.4f token_acc %.4f seq_acc %.4f (compile %.2fs)",
            step,
            n,
            metrics["loss"],
            metrics["token_acc"],
            metrics["seq_acc"],
            compile_s,
        )
    return out


def _finish(s: dict, task) -> dict:
    seqs = max(s["num_seqs"], 1.0)
    loss = s["nll_sum"] / max(s["num_tokens"], 1.0)
    metrics = {
        "loss": loss,
        "token_acc": s["token_acc_sum"] / seqs,
        "seq_acc": s["exact_sum"] / seqs,
        "num_examples": int(s["num_seqs"]),
    }
    if task.family == "text":
        metrics["ppl"] = math.exp(min(loss, 700.0))
    return metrics


def summarize(per_length: dict, *, train_max_length: int, metric: str) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    return {
        "id_mean": mean(m.get(metric) for n, m in per_length.items() if n <= train_max_length),
        "ood_mean": mean(m.get(metric) for n, m in per_length.items() if n > train_max_length),
        "metric": metric,
    }


def evaluate_and_write(config, workdir, model, *, mesh, step: int, lengths=None) -> dict:
    """evaluate_model at the eval grid, then workdir/results.json (process 0)."""
    lengths = train.resolve_eval_lengths(config, lengths)
    logger = train.MetricsLogger(workdir)
    try:
        per_length = evaluate_model(
            config, model, mesh=mesh, step=step, lengths=lengths, log_row=logger.row
        )
    finally:
        logger.close()
    task = tasks.build(config.task)
    results = {
        "config": config.to_dict(),
        "task": task.name,
        "variant": config.variant,
        "seed": int(config.seed),
        "step": int(step),
        "train_max_length": task.max_train_length,
        "per_length": {str(n): m for n, m in per_length.items()},
        "summary": summarize(
            per_length, train_max_length=task.max_train_length, metric=task.metric
        ),
        "random_positions": bool(config.eval.random_positions),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if jax.process_index() == 0:
        ckpt_lib.atomic_write_json(os.path.join(workdir, "results.json"), _clean(results))
    return results


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run(workdir: str, *, lengths=None) -> dict:
    """Evaluate the latest good checkpoint of `workdir` at `lengths` (default: eval.lengths)."""
    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--workdir: {path} not found; not a run directory (train it first)")
    config = config_utils.load_json(path)
    train.validate(config, eval_lengths=lengths)
    with ckpt_lib.workdir_lock(workdir, process_index=jax.process_index()):
        return _run_locked(config, workdir, lengths)


def _run_locked(config, workdir, lengths) -> dict:
    mesh = train.make_mesh(config)
    graphdef, state, step = train.load_state(config, workdir, mesh=mesh)
    model = train.merge_model(graphdef, state)
    return evaluate_and_write(config, workdir, model, mesh=mesh, step=step, lengths=lengths)
