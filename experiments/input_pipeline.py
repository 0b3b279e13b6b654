"""Training and evaluation batches in the three layouts of the README ("Interfaces").

Layouts (all numpy, batch-major, pad id 0 on the right, T padded to `bucket_length`):
  "encoder"  (Deletang et al. 2023 transduction): inputs = task input + |y| BLANKs; targets
             hold y at the last |y| real positions; loss_mask = the task's output mask there.
  "decoder"  (Kazemnejad et al. 2023 prompt + answer; and language modelling):
             seq = input + SEP + output + EOS, inputs = seq[:-1], targets = seq[1:]; loss on
             the answer tokens (output mask applied) and on the EOS that ends it. For text
             tasks seq is a window of the corpus and every token is scored.
  "seq2seq"  src = task input (padded to bucket_length(|x|)), inputs = BOS + output[:-1],
             targets = output, loss_mask = output mask; adds "src" and "src_mask".
Keys: inputs/targets int32 BT, loss_mask float32 BT, token_mask bool BT (True on real tokens).

Training follows the Deletang protocol: one nominal length n per batch, drawn from the
task's length distribution as a pure function of (seed, step); the batch itself is drawn
from `np.random.default_rng([seed, step, task_id, BATCH_STREAM])`. So a run resumed at
start_step sees exactly the batches it would have seen, and each of process_count processes
yields its own contiguous block of rows of the same global batch (every process draws the
global batch and keeps its rows: generation is cheap next to a train step and this keeps
the data independent of the process count).

Length buckets: T is rounded up to the next of 16, 24, 32, 48, 64, 96, 128, 192, ...
(powers of two and 1.5x powers of two, all multiples of 8), so padding wastes at most a third
of a batch and the Deletang range n = 1..40 (T up to 81 in the encoder layout, 121 for
duplicate_string) compiles at most 7 shapes.

Evaluation sets are fixed TFDS datasets (ArrayRecord) built on first use by
`experiments.tasks.tfds_builders`, read with `as_data_source()` and batched with grain; no
TensorFlow is needed.
"""

import itertools
from collections.abc import Iterator

import numpy as np

from attn.registry import ConfigError
from experiments.tasks.base import BATCH_STREAM, BLANK, BOS, EOS, NUM_SPECIAL, SEP

LAYOUTS = ("encoder", "decoder", "seq2seq")
MIN_BUCKET = 16
EVAL_SEED = 20230707  # fixed eval sets, shared by every training seed


def bucket_length(n: int) -> int:
    """Padded length for a sequence of n real tokens (>= n, from a short geometric grid)."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    p = 1 << (int(n) - 1).bit_length()  # next power of two >= n
    return 3 * p // 4 if 3 * p // 4 >= n else p


def _get(cfg, path: str, default):
    """cfg["a"]["b"] for path "a.b" on dicts or ConfigDicts, or default when missing."""
    node = cfg
    for key in path.split("."):
        try:
            node = node[key]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def _check_layout(task, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout: unknown {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if layout not in task.layouts:
        allowed = ", ".join(task.layouts)
        raise ConfigError(f"layout: {layout!r} does not fit task {task.name!r}; allowed: {allowed}")


def format_batch(x_BN, y_BM, mask_BM, layout: str) -> dict[str, np.ndarray]:
    """Lay out token ids (already shifted by NUM_SPECIAL) of one nominal length."""
    b, n = x_BN.shape
    m = y_BM.shape[1]
    mask = mask_BM.astype(np.float32)
    if layout == "seq2seq":
        s, t = bucket_length(n), bucket_length(m)
        src = np.zeros((b, s), np.int32)
        src[:, :n] = x_BN
        inputs = np.zeros((b, t), np.int32)
        inputs[:, 0] = BOS
        inputs[:, 1:m] = y_BM[:, :-1]
        targets = np.zeros((b, t), np.int32)
        targets[:, :m] = y_BM
        loss = np.zeros((b, t), np.float32)
        loss[:, :m] = mask
        return {
            "inputs": inputs,
            "targets": targets,
            "loss_mask": loss,
            "token_mask": np.arange(t)[None, :].repeat(b, 0) < m,
            "src": src,
            "src_mask": np.arange(s)[None, :].repeat(b, 0) < n,
        }
    if layout == "encoder":
        real = n + m
        t = bucket_length(real)
        inputs = np.zeros((b, t), np.int32)
        inputs[:, :n] = x_BN
        inputs[:, n:real] = BLANK
        targets = np.zeros((b, t), np.int32)
        targets[:, n:real] = y_BM
        loss = np.zeros((b, t), np.float32)
        loss[:, n:real] = mask
    elif layout == "decoder":
        real = n + m + 1  # len(x + SEP + y + EOS) - 1
        t = bucket_length(real)
        inputs = np.zeros((b, t), np.int32)
        inputs[:, :n] = x_BN
        inputs[:, n] = SEP
        inputs[:, n + 1 : real] = y_BM
        targets = np.zeros((b, t), np.int32)
        targets[:, : n - 1] = x_BN[:, 1:]
        targets[:, n - 1] = SEP
        targets[:, n : n + m] = y_BM
        targets[:, n + m] = EOS
        loss = np.zeros((b, t), np.float32)
        loss[:, n : n + m] = mask
        loss[:, n + m] = 1.0
    else:
        raise ConfigError(f"layout: unknown {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss,
        "token_mask": np.arange(t)[None, :].repeat(b, 0) < real,
    }


def format_lm(tokens_BL1) -> dict[str, np.ndarray]:
    """Decoder layout of corpus windows of L + 1 tokens: every next token is scored."""
    b, l1 = tokens_BL1.shape
    real = l1 - 1
    t = bucket_length(real)
    inputs = np.zeros((b, t), np.int32)
    targets = np.zeros((b, t), np.int32)
    inputs[:, :real] = tokens_BL1[:, :-1]
    targets[:, :real] = tokens_BL1[:, 1:]
    valid = np.arange(t)[None, :].repeat(b, 0) < real
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": valid.astype(np.float32),
        "token_mask": valid,
    }


def global_batch(task, *, layout: str, seed: int, step: int, batch_size: int) -> dict:
    """The whole batch of `step` (all processes' rows)."""
    n = task.train_length(seed, step)
    rng = np.random.default_rng([seed, step, task.id, BATCH_STREAM])
    if task.family == "text":
        return format_lm(task.train_windows(rng, n, batch_size))
    x, y, m = task.batch(rng, n, batch_size)
    return format_batch(x + NUM_SPECIAL, y + NUM_SPECIAL, m, layout)


def train_batches(
    task,
    cfg,
    *,
    layout: str,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (step, batch) for step = start_step, start_step + 1, ...; this process's rows.

    cfg is the experiment config (batch size at cfg.train.batch_size, global).
    """
    _check_layout(task, layout)
    batch_size = int(_get(cfg, "train.batch_size", 128))
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


def _stack(records):
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


def eval_batches(task, cfg, *, layout: str, length: int, data_dir=None):
    """Fixed evaluation batches at nominal `length` (a grain MapDataset of numpy dicts).

    Task sets: cfg.eval.num_examples examples (default 512) of TFDS dataset
    attn_task_eval/<task>-<fields hash>-n<length>-k<num>-s<seed>, built on first use under
    data_dir (default <repo>/data/tfds). Text: the non-overlapping chunks of `length` tokens
    of the task's eval split (Press et al. 2022), at most cfg.eval.num_examples of them.
    The last batch may be smaller.
    """
    import grain  # grain and TFDS take seconds to import: only evaluation needs them

    from experiments.tasks import tfds_builders

    _check_layout(task, layout)
    batch_size = int(_get(cfg, "eval.batch_size", 128))
    num = int(_get(cfg, "eval.num_examples", 512))
    if task.family == "text":
        source = task.eval_chunks(length, data_dir=data_dir, limit=num)
        return grain.MapDataset.source(source).batch(batch_size, batch_fn=np.stack).map(format_lm)
    seed = int(_get(cfg, "eval.seed", EVAL_SEED))
    source = tfds_builders.task_eval_source(
        task, length=length, num_examples=num, seed=seed, data_dir=data_dir
    )

    def fmt(rows):
        b = _stack(rows)
        return format_batch(b["input"], b["output"], b["output_mask"], layout)

    return grain.MapDataset.source(source).batch(batch_size, batch_fn=fmt)
