"""Run directories as data: finding them, reading their results, grouping and formatting.

What compare's tables and grid's 2-D tables share: `find_runs` (every directory under some
roots that holds an evaluation's results file), `load_run` / `load_all` (a `Run`: task,
variant, seed, per-length metrics, summary, the config fields that tell runs apart, chance,
mean training loss), `group_runs` (by task, training length, variant and settings; never by
seed), mean and sample standard deviation, number formatting, and `load_runs` (every run as a
pandas DataFrame: one row per run and evaluation length with every config field).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments import metrics
from experiments.workdir import read_jsonl

FINAL = "final"
METRICS = "metrics.jsonl"
DEFAULT_METRIC = "token_acc"
# Metrics where smaller is better; every other metric (accuracies) is maximised.
LOWER_IS_BETTER = frozenset({"loss", "ppl", "bpc", "bpb", "nll"})
# Sub-directories of a run that never hold runs themselves; skipping them keeps the walk fast.
_NOT_RUNS = frozenset({"checkpoints", "tb", ".jax_cache", "__pycache__", "evals"})
# Config fields that do not change what a run computes (or are the seed and the label).
BOOKKEEPING = (
    "seed",
    "variant",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.eval_lengths",
    "train.mesh.",
    "train.profile_steps",
    "model.impl",
    "eval.lengths",
    "eval.batch_size",
    "eval.num_examples",
    "eval.compilation_cache",
    "eval.data_dir",
)
TRAIN_LOSS_TAIL = 0.1  # the mean training loss is taken over this last fraction of training


class CompareError(ValueError):
    """A comparison that cannot be made (no runs, a bad argument). One line."""


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def results_file(eval_name: str = FINAL) -> str:
    return "results.json" if eval_name == FINAL else os.path.join("evals", f"{eval_name}.json")


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def number(v) -> float:
    return float("nan") if v is None else float(v)


def numbers(m: dict) -> dict[str, float]:
    """The numeric entries of a per-length dict; null (a non-finite value) becomes NaN."""
    return {k: number(v) for k, v in m.items() if v is None or isinstance(v, int | float)}


@dataclass
class Run:
    """One evaluated run directory, reduced to what the comparison needs."""

    path: Path
    task: str
    variant: str
    seed: int | None
    step: int
    train_max_length: int
    per_length: dict[int, dict[str, float]]
    metric: str
    summary: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # flat config without bookkeeping fields
    chance: float | None = None
    train_loss: float | None = None

    def scores(self, metric: str) -> tuple[float | None, float | None]:
        """(in-distribution, out-of-distribution) mean of `metric` over evaluation lengths:
        the run's own summary for its metric, the same function's answer for another."""
        summary = self.summary
        if summary.get("metric") != metric:
            summary = metrics.summarize(
                self.per_length, train_max_length=self.train_max_length, metric=metric
            )
        return summary.get("id_mean"), summary.get("ood_mean")

    def diverged(self, metric: str) -> bool:
        values = [m.get(metric, math.nan) for m in self.per_length.values()]
        loss = math.nan if self.train_loss is None else self.train_loss
        return not all(math.isfinite(v) for v in values) or (
            self.train_loss is not None and not math.isfinite(loss)
        )


def find_runs(roots: Iterable[str | Path], eval_name: str = FINAL) -> list[Path]:
    """Every directory under the roots (roots included) that holds the evaluation's file."""
    rel = results_file(eval_name)
    found = []
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _NOT_RUNS)
            if os.path.isfile(os.path.join(dirpath, rel)):
                found.append(Path(dirpath))
    return found


def mean_train_loss(metrics_path: Path, tail: float = TRAIN_LOSS_TAIL) -> float | None:
    """Mean training loss over the last `tail` of the logged training rows (None if none;
    NaN if the run diverged there)."""
    losses = [
        number(r["loss"])
        for r in read_jsonl(metrics_path)
        if r.get("split") == "train" and "loss" in r
    ]
    if not losses:
        return None
    last = losses[-max(1, math.ceil(tail * len(losses))) :]
    return float(np.mean(last))


def _chance(task: str, config: dict) -> float | None:
    try:
        from experiments import tasks

        return tasks.build(config.get("task", {"name": task})).chance
    except Exception:  # a task this checkout does not know: no chance line
        return None


def load_run(path: Path, eval_name: str = FINAL) -> Run:
    """The run at `path`; CompareError naming the file if its results cannot be read."""
    file = Path(path) / results_file(eval_name)
    try:
        results = json.loads(file.read_text())
        per_length = {int(n): numbers(m) for n, m in results["per_length"].items()}
        config = results.get("config", {})
        run = Run(
            path=Path(path),
            task=results["task"],
            variant=str(results["variant"]),
            seed=results.get("seed"),
            step=int(results.get("step", 0)),
            train_max_length=int(results["train_max_length"]),
            per_length=per_length,
            metric=results.get("summary", {}).get("metric", DEFAULT_METRIC),
            summary=results.get("summary", {}),
            settings={k: v for k, v in flatten(config).items() if not k.startswith(BOOKKEEPING)},
            chance=results.get("chance", _chance(results["task"], config)),
            train_loss=mean_train_loss(Path(path) / METRICS),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        kind = type(e).__name__
        raise CompareError(f"{file}: not a readable results file ({kind}: {e})") from None
    return run


def load_all(roots, eval_name: str = FINAL) -> tuple[list[Run], list[str]]:
    """(runs, one line per run directory skipped because its results cannot be read)."""
    runs, skipped = [], []
    for path in find_runs(roots, eval_name):
        try:
            runs.append(load_run(path, eval_name))
        except CompareError as e:
            skipped.append(str(e))
    return runs, skipped


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std


def differing(groups: Sequence[dict]) -> list[str]:
    keys = sorted({k for g in groups for k in g})
    return [k for k in keys if len({repr(g.get(k)) for g in groups}) > 1]


def group_runs(runs: Sequence[Run], pool: Sequence[str] = ()) -> dict[tuple, list[Run]]:
    """Runs grouped by (task, training length, variant, settings minus `pool`), labelled with
    the settings that tell groups of one variant apart."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        kept = {k: v for k, v in run.settings.items() if not k.startswith(tuple(pool))}
        key = (run.task, run.train_max_length, run.variant, tuple(sorted(kept.items(), key=str)))
        groups.setdefault(key, []).append(run)
    return groups


def fmt(metric: str, value: float | None) -> str:
    """Accuracies as percentages with one decimal, everything else with 3 significant digits."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan"
    if metric.endswith("acc"):
        return f"{100 * value:.1f}"
    return f"{value:.3g}"


def fmt_pm(metric: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return fmt(metric, mean) if std is None else f"{fmt(metric, mean)} ± {fmt(metric, std)}"


def load_runs(roots: Iterable[str | Path], eval_name: str = FINAL):
    """Every run's config and per-length metrics as a pandas DataFrame: one row per run and
    evaluation length, columns path, task, variant, seed, step, length, ood, the metrics, and
    `config.<field>` for every config field (pandas is the optional `analysis` extra)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("load_runs needs pandas: pip install -e '.[analysis]'") from None
    records = []
    for path in find_runs(roots, eval_name):
        results = json.loads((path / results_file(eval_name)).read_text())
        config = {f"config.{k}": v for k, v in flatten(results.get("config", {})).items()}
        for n, m in results["per_length"].items():
            records.append(
                {
                    "path": str(path),
                    "task": results["task"],
                    "variant": results["variant"],
                    "seed": results.get("seed"),
                    "step": results.get("step"),
                    "length": int(n),
                    "ood": int(n) > int(results["train_max_length"]),
                    **{
                        k: number(v)
                        for k, v in m.items()
                        if v is None or isinstance(v, int | float)
                    },
                    **config,
                }
            )
    return pd.DataFrame.from_records(records)
