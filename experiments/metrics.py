"""Metrics: the loss, the sums evaluation adds up, their means, the ID/OOD summary, and the one
writer of metrics.jsonl and TensorBoard.

- `loss_and_metrics(model, batch, *, train) -> (loss, metrics)`: masked cross-entropy over
  `loss_mask`; metrics hold batch means (`loss`, `token_acc`, `seq_acc`) and the sums an
  evaluation adds up over batches (`SUMS`). token_acc is Deletang et al.'s per-sequence
  accuracy (fraction of correct output tokens, averaged over sequences); seq_acc is exact
  match (Kazemnejad et al. 2023).
- `means(sums, task)`: the per-length metrics of an evaluation from its sums, plus what the
  task adds (`Task.extra_metrics`: perplexity for text).
- `summarize(per_length, train_max_length=, metric=)`: the mean of `metric` over the
  in-distribution lengths (<= the longest training length) and the out-of-distribution ones:
  the `summary` of results.json, which compare reads.
- `train_row(step, metrics, timing)`: the metrics.jsonl row of a training step.
- `MetricsWriter`: metrics.jsonl rows, TensorBoard scalars and the console, on process 0;
  Weights & Biases too when `ATTN_WANDB_PROJECT` names a project (off otherwise; wandb is the
  optional `wandb` extra, and a configured but missing wandb is one warning line).
"""

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.workdir import append_jsonl, one_line

log = logging.getLogger("attn.metrics")

SUMS = ("nll_sum", "num_tokens", "token_acc_sum", "exact_sum", "num_seqs")
# Fields of metrics.jsonl rows that are wall-clock measurements (never reproducible).
TIMING_KEYS = ("steps_per_s", "tokens_per_s", "eta_s", "compile_s", "elapsed_s", "eval_s", "mfu")
# Per-step values a train row reports (means over the batch, and the optimizer's).
TRAIN_KEYS = ("loss", "token_acc", "seq_acc", "grad_norm", "lr", "skipped")
# Weights & Biases logging is on when this names a project (W&B's own WANDB_* variables, such
# as WANDB_ENTITY, WANDB_MODE=offline or WANDB_API_KEY, then apply as usual).
WANDB_ENV = "ATTN_WANDB_PROJECT"


def loss_and_metrics(model, batch: dict, *, train: bool):
    """Masked cross-entropy over batch["loss_mask"] and accuracy sums (module docstring)."""
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


def means(sums: dict, task) -> dict:
    """Per-length evaluation metrics from the sums of all its batches."""
    seqs = max(sums["num_seqs"], 1.0)
    loss = sums["nll_sum"] / max(sums["num_tokens"], 1.0)
    metrics = {
        "loss": loss,
        "token_acc": sums["token_acc_sum"] / seqs,
        "seq_acc": sums["exact_sum"] / seqs,
        "num_examples": int(sums["num_seqs"]),
    }
    return {**metrics, **task.extra_metrics(metrics)}


def summarize(per_length: dict, *, train_max_length: int, metric: str) -> dict:
    """{"id_mean", "ood_mean", "metric"} of per_length {length: {metric: value}}."""

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    return {
        "id_mean": mean(m.get(metric) for n, m in per_length.items() if int(n) <= train_max_length),
        "ood_mean": mean(m.get(metric) for n, m in per_length.items() if int(n) > train_max_length),
        "metric": metric,
    }


def train_row(step: int, metrics: dict, timing: dict) -> dict:
    """The metrics.jsonl row of training step `step` (host values)."""
    row = {"step": step, "split": "train", "length": None}
    row.update({k: metrics[k] for k in TRAIN_KEYS})
    row["skipped"] = int(row["skipped"])
    return {**row, **timing}


def jsonable(v: Any) -> Any:
    """A JSON value: numpy and JAX scalars as Python numbers, non-finite floats as null."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray | np.generic | jax.Array):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """metrics.jsonl rows, TensorBoard scalars and the console, on process 0 only.

    Logging never blocks or ends training: TensorBoard events go through a bounded queue to a
    thread of ours that writes them synchronously with tensorboardX's EventsWriter (its
    SummaryWriter's own thread dies on a full disk, after which the next event blocks forever,
    and its exit hook prints a traceback), and a writer that fails (disk full, a closed pipe)
    is reported once, in one log line, and dropped. The run then stops where it must, at its
    next checkpoint, with the checkpoint's own one-line error.

    With ATTN_WANDB_PROJECT set, the same scalars also go to a W&B run (another thread of
    ours, its own bounded queue): one run per workdir (name: the workdir's name, group: its
    parent's, e.g. the sweep root; id: a hash of the path, so a resumed or requeued run
    continues the same W&B run), its config the workdir's config.json, "step" as the x axis.
    """

    QUEUE = 10_000
    CLOSE_TIMEOUT_S = 10.0
    FLUSH_S = 5.0

    def __init__(self, workdir: str, total_steps: int | None = None, start_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.main = jax.process_index() == 0
        self.bar = None
        self.failed: dict[str, str] = {}  # writer -> why it was dropped
        self._tb_queue = None
        self._wandb_queue = None
        if not self.main:
            return
        project = os.environ.get(WANDB_ENV, "").strip()
        if project:
            self._start_wandb(workdir, project)
        self._tb_queue = queue.Queue(self.QUEUE)
        self._tb_thread = threading.Thread(
            target=self._tb_loop, args=(os.path.join(workdir, "tb"),), daemon=True
        )
        self._tb_thread.start()
        if total_steps is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step")

    def _fail(self, writer: str, error: BaseException) -> None:
        if writer not in self.failed:
            self.failed[writer] = one_line(error)
            where = os.path.dirname(self.path)
            log.warning("%s: %s stopped (%s); training goes on", where, writer, one_line(error))

    def _start_wandb(self, workdir: str, project: str) -> None:
        if importlib.util.find_spec("wandb") is None:
            self.failed["W&B"] = "not installed"
            log.warning(
                "%s=%s is set but wandb is not installed (.venv/bin/pip install -e '.[wandb]'); "
                "logging to metrics.jsonl and TensorBoard only",
                WANDB_ENV,
                project,
            )
            return
        self._wandb_queue = queue.Queue(self.QUEUE)
        self._wandb_thread = threading.Thread(
            target=self._wandb_loop, args=(workdir, project), daemon=True
        )
        self._wandb_thread.start()

    def _wandb_loop(self, workdir: str, project: str) -> None:
        run = None
        try:
            import wandb

            path = os.path.abspath(workdir)
            config = None
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(path, "config.json")) as f:
                    config = json.load(f)
            run = wandb.init(
                project=project,
                name=os.path.basename(path),
                group=os.path.basename(os.path.dirname(path)),
                id=hashlib.sha1(path.encode()).hexdigest()[:16],
                resume="allow",
                dir=path,
                config=config,
                reinit="create_new",
            )
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
            while (item := self._wandb_queue.get()) is not None:
                run.log(item)
            run.finish()
        except Exception as e:  # the thread must end, whatever W&B does
            self._fail("W&B", e)
            if run is not None:
                with contextlib.suppress(Exception):
                    run.finish()

    def _tb_loop(self, logdir: str) -> None:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        writer = None
        try:
            os.makedirs(logdir, exist_ok=True)
            writer = EventsWriter(os.path.join(logdir, "events"))
            flushed = time.monotonic()
            while (item := self._tb_queue.get()) is not None:
                tag, value, step = item
                event = event_pb2.Event(
                    wall_time=time.time(), step=int(step), summary=summary.scalar(tag, value)
                )
                writer.write_event(event)
                if time.monotonic() - flushed > self.FLUSH_S:
                    writer.flush()
                    flushed = time.monotonic()
            writer.close()
        except Exception as e:  # the thread must end, whatever the disk does
            self._fail("TensorBoard", e)
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()

    def row(self, row: dict) -> None:
        if not self.main:
            return
        clean = jsonable(row)
        try:
            append_jsonl(self.path, clean)
        except OSError as e:
            self._fail("metrics.jsonl", e)
        tag = row["split"] if row.get("length") is None else f"{row['split']}/{row['length']}"
        scalars = {
            f"{tag}/{k}": v
            for k, v in clean.items()
            if k not in ("step", "split", "length") and isinstance(v, float | int)
        }
        if self._wandb_queue is not None and "W&B" not in self.failed:
            try:
                self._wandb_queue.put_nowait({"step": row["step"], **scalars})
            except queue.Full:
                self._fail("W&B", RuntimeError("its writer stopped taking rows"))
        if "TensorBoard" in self.failed or self._tb_queue is None:
            return
        for name, v in scalars.items():
            try:
                self._tb_queue.put_nowait((name, v, row["step"]))
            except queue.Full:
                self._fail("TensorBoard", RuntimeError("its writer stopped taking events"))
                return

    def progress(self, step: int, text: str) -> None:
        if not self.main or "console" in self.failed:
            return
        try:
            if self.bar is not None:
                self.bar.n = step
                self.bar.set_postfix_str(text, refresh=True)
            else:
                log.info("step %d: %s", step, text)
        except (OSError, ValueError) as e:  # a closed terminal or pipe
            self._fail("console", e)

    def close(self) -> None:
        if self.bar is not None:
            with contextlib.suppress(OSError, ValueError):
                self.bar.close()
        if self._tb_queue is not None:
            with contextlib.suppress(queue.Full):
                self._tb_queue.put(None, timeout=self.CLOSE_TIMEOUT_S)
            self._tb_thread.join(self.CLOSE_TIMEOUT_S)
            self._tb_queue = None
        if self._wandb_queue is not None:
            with contextlib.suppress(queue.Full):
                self._wandb_queue.put(None, timeout=self.CLOSE_TIMEOUT_S)
            self._wandb_thread.join(self.CLOSE_TIMEOUT_S)
            self._wandb_queue = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
