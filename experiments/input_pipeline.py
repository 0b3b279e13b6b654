"""Training and evaluation batches: deterministic training streams, grain over evaluation sets.

Training follows the Deletang protocol: one nominal length n per batch, drawn from the
task's length distribution as a pure function of (seed, step); the batch itself is drawn
from `np.random.default_rng([seed, step, task_id, BATCH_STREAM])` and laid out by the task
(`Task.train_batch`, experiments/tasks/layouts.py). So a run resumed at start_step sees
exactly the batches it would have seen, and each of process_count processes yields its own
contiguous block of rows of the same global batch (every process draws the global batch and
keeps its rows: generation is cheap next to a train step and this keeps the data independent
of the process count).

Evaluation sets are fixed: the task's `eval_source` (a TFDS ArrayRecord dataset built on
first use, read with `as_data_source()`; no TensorFlow is needed), drawn with EVAL_SEED for
every training seed, batched with grain.
"""

import itertools
from collections.abc import Iterator

import numpy as np

from attn.registry import ConfigError
from experiments.tasks.base import BATCH_STREAM
from experiments.tasks.layouts import check_layout

EVAL_SEED = 20230707  # fixed eval sets, shared by every training seed


def global_batch(task, *, layout: str, seed: int, step: int, batch_size: int) -> dict:
    """The whole batch of `step` (all processes' rows)."""
    n = task.train_length(seed, step)
    rng = np.random.default_rng([seed, step, task.id, BATCH_STREAM])
    return task.train_batch(rng, n, batch_size, layout)


def train_batches(
    task,
    *,
    layout: str,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (step, batch) for step = start_step, start_step + 1, ...; this process's rows of
    the global batch of `batch_size`."""
    check_layout(task, layout)
    if batch_size % process_count:
        raise ConfigError(
            f"train.batch_size: {batch_size} is not divisible by process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    rows = batch_size // process_count
    lo, hi = process_index * rows, (process_index + 1) * rows
    for step in itertools.count(start_step):
        batch = global_batch(task, layout=layout, seed=seed, step=step, batch_size=batch_size)
        if process_count > 1:
            batch = {k: v[lo:hi] for k, v in batch.items()}
        yield step, batch


def eval_batches(
    task, *, layout: str, length: int, batch_size: int, num_examples: int, data_dir=None
):
    """Fixed evaluation batches at nominal `length` (a grain MapDataset of numpy dicts): at
    most `num_examples` records of the task's evaluation set; the last batch may be smaller."""
    import grain  # grain takes seconds to import: only evaluation needs it

    check_layout(task, layout)
    source = task.eval_source(length, num_examples=num_examples, seed=EVAL_SEED, data_dir=data_dir)
    return grain.MapDataset.source(source).batch(
        batch_size, batch_fn=lambda records: task.eval_batch(records, layout)
    )
