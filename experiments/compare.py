"""Run directories -> comparison tables and plots for length-generalization ablations.

    python -m experiments.compare runs/x [runs/y ...] --out reports/x [--metric token_acc] \
        [--eval NAME] [--pool train.optimizer.lr] [--attention RUN --length N]

Finds every run directory under the given roots (a directory holding `results.json`, the
driver's final evaluation, or `evals/NAME.json` with `--eval NAME`; README "Run outputs") and
writes to --out:

- `table.md`, `table.csv`: one row per setting: runs are grouped by everything that tells
  them apart except the seed (task, variant and every config field but bookkeeping ones), so
  runs of another learning rate, step count, training length or size are never averaged as if
  they were seeds; where a variant label covers several settings, the row names what differs
  (`encoder:rope [train.optimizer.lr=0.001]`). `--pool FIELD` pools runs over a field on
  purpose (Deletang et al. 2023 report the best run over seeds and learning rates) and the
  table says so. Per row: n runs (and how many diverged), the training steps, the mean and
  sample standard deviation (ddof=1) over runs of the in-distribution score (mean over
  evaluation lengths <= the longest training length) and of the out-of-distribution score
  (lengths beyond it): each run's `summary` from its results file
  (experiments.metrics.summarize, which also scores any other --metric); the best run's OOD
  score; the mean training loss over the last tenth of training (not one batch); the mean per
  evaluation length. One table per task and training length, with the task's chance level.
- `length_curves.png` (experiments/plots.py): the metric against evaluation length per task,
  one line per row with a +- one standard deviation band, chance and training length marked.
- `attention_<run>.png` for each `--attention RUN` at `--length N`: every head of every layer
  on one evaluation example, from the run's last checkpoint (the model's return_attention).
- with `--grid`, for runs of a task with two lengths (long_addition, long_multiplication,
  number_sort): `grid.md` (per setting, exact match over len a x len b, mean over seeds),
  `grid.csv` (one line per setting and cell: mean, std, n) and `grid_heatmaps.png` (one
  heatmap per setting, the training region outlined), from each run's `grid.json`
  (experiments/grid.py); a run that has none is evaluated on its grid first (with the run's
  lock, written into the run directory), `--grid_lengths` and `--grid_examples` choosing it.

A run directory whose results file cannot be read is skipped with one line naming it; a run
whose loss or metrics are not finite counts as diverged and stays out of the means.
`load_runs(roots)` returns every run's config and per-length metrics as a pandas DataFrame
(pandas: `pip install -e .[analysis]`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments import metrics, plots
from experiments.config_utils import ArgumentParser
from experiments.workdir import atomic_write_text, read_jsonl

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


def _number(v) -> float:
    return float("nan") if v is None else float(v)


def _numbers(m: dict) -> dict[str, float]:
    """The numeric entries of a per-length dict; null (a non-finite value) becomes NaN."""
    return {k: _number(v) for k, v in m.items() if v is None or isinstance(v, int | float)}


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
        _number(r["loss"])
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
        per_length = {int(n): _numbers(m) for n, m in results["per_length"].items()}
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


@dataclass
class Row:
    """Statistics of one setting (a variant with everything else fixed) over its runs."""

    task: str
    variant: str
    metric: str
    runs: list[Run]
    label: str = ""
    train_max_length: int = 0
    chance: float | None = None
    steps: tuple[int, ...] = ()
    pooled: tuple[str, ...] = ()  # fields over which runs differ beyond the seed (--pool)
    diverged: int = 0
    id_mean: float | None = None
    id_std: float | None = None
    ood_mean: float | None = None
    ood_std: float | None = None
    best_ood: float | None = None
    best_run: str = ""
    train_loss: float | None = None
    per_length: dict[int, tuple[float, float | None]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std


def _differing(groups: Sequence[dict]) -> list[str]:
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


def summarize(
    runs: Sequence[Run], metric: str | None = None, pool: Sequence[str] = ()
) -> list[Row]:
    """Rows, one per setting; tasks in name order, rows best OOD first (ties: best ID first)."""
    groups = group_runs(runs, pool)
    by_variant: dict[tuple, list[dict]] = {}
    for task, length, variant, kept in groups:
        by_variant.setdefault((task, length, variant), []).append(dict(kept))
    rows = []
    for (task, length, variant, kept), members in groups.items():
        m = metric or members[0].metric
        members = [r for r in members if all(m in v for v in r.per_length.values())]
        if not members:
            continue
        differ = _differing(by_variant[(task, length, variant)])
        extra = ", ".join(f"{k}={dict(kept).get(k)}" for k in differ)
        row = Row(task, variant, m, members, label=f"{variant} [{extra}]" if extra else variant)
        row.train_max_length = length
        row.chance = members[0].chance
        row.steps = tuple(sorted({r.step for r in members}))
        row.pooled = tuple(_differing([r.settings for r in members]))
        ok = [r for r in members if not r.diverged(m)]
        row.diverged = len(members) - len(ok)
        scores = [(r.scores(m), r) for r in ok]
        row.id_mean, row.id_std = _mean_std([s[0] for s, _ in scores if s[0] is not None])
        oods = [(s[1], r) for s, r in scores if s[1] is not None]
        row.ood_mean, row.ood_std = _mean_std([o for o, _ in oods])
        if oods:
            pick = min if lower_is_better(m) else max
            row.best_ood, best = pick(oods, key=lambda pair: pair[0])
            row.best_run = best.path.name
        row.train_loss, _ = _mean_std([r.train_loss for r in ok if r.train_loss is not None])
        for n in sorted({n for r in ok for n in r.per_length}):
            row.per_length[n] = _mean_std([r.per_length[n][m] for r in ok if n in r.per_length])
        rows.append(row)

    def order(row: Row):
        sign = 1.0 if lower_is_better(row.metric) else -1.0
        in_dist = -math.inf if row.id_mean is None else row.id_mean
        return (row.task, row.train_max_length, sign * _score(row), sign * in_dist, row.label)

    return sorted(rows, key=order)


def _score(row: Row) -> float:
    """What ranks rows: the OOD mean (the ID mean when nothing was tested beyond)."""
    score = row.ood_mean if row.ood_mean is not None else row.id_mean
    if score is None:
        return math.inf if lower_is_better(row.metric) else -math.inf
    return score


def _better(a: float, b: float, metric: str) -> bool:
    return a < b if lower_is_better(metric) else a > b


def best_per_task(rows: Sequence[Row]) -> dict[str, Row | None]:
    """The best row of each task, or None where no row beats the others (all tied)."""
    best: dict[str, Row | None] = {}
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        top = task_rows[0]
        tied = all(_score(r) == _score(top) for r in task_rows)
        best[task] = None if tied and len(task_rows) > 1 else top
    return best


def mean_reciprocal_rank(rows: Sequence[Row]) -> list[tuple[str, float, int]]:
    """(label, MRR, tasks) best first: per task, rows ranked by OOD mean (ID if no OOD; tied
    scores share a rank), 1/rank averaged over the tasks a label was run on (Kazemnejad et al.
    2023's aggregate)."""
    reciprocal: dict[str, list[float]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        scores = [_score(r) for r in task_rows]
        for row, score in zip(task_rows, scores, strict=True):
            rank = 1 + sum(_better(other, score, row.metric) for other in scores)
            reciprocal.setdefault(row.label, []).append(1.0 / rank)
    table = [(v, float(np.mean(rr)), len(rr)) for v, rr in reciprocal.items()]
    return sorted(table, key=lambda t: (-t[1], t[0]))


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


def _table_groups(rows: Sequence[Row]) -> dict[tuple[str, int], list[Row]]:
    out: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        out.setdefault((r.task, r.train_max_length), []).append(r)
    return out


def markdown(rows: Sequence[Row]) -> str:
    """One table per task and training length (its evaluation lengths as columns)."""
    out = []
    for (task, train_len), table_rows in _table_groups(rows).items():
        metric = table_rows[0].metric
        unit = " (%)" if metric.endswith("acc") else ""
        better = "lower" if lower_is_better(metric) else "higher"
        chance = table_rows[0].chance
        chance_text = f", chance {fmt(metric, chance)}" if chance and metric.endswith("acc") else ""
        out.append(
            f"### {task}: {metric}{unit}, trained on lengths <= {train_len}{chance_text}, "
            f"{better} is better\n"
        )
        lengths = sorted({n for r in table_rows for n in r.per_length})
        head = ["variant", "n", "steps", "ID mean ± std", "OOD mean ± std", "best OOD"]
        head += ["train loss"] + [f"**{n}**" if n <= train_len else str(n) for n in lengths]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in table_rows:
            n = f"{r.n} ({r.diverged} diverged)" if r.diverged else str(r.n)
            cells = [
                r.label,
                n,
                "/".join(map(str, r.steps)),
                fmt_pm(metric, r.id_mean, r.id_std),
                fmt_pm(metric, r.ood_mean, r.ood_std),
                fmt(metric, r.best_ood),
                "-" if r.train_loss is None else f"{r.train_loss:.3g}",
            ]
            cells += [fmt(metric, r.per_length.get(n, (None, None))[0]) for n in lengths]
            out.append("| " + " | ".join(cells) + " |")
        pooled = sorted({f for r in table_rows for f in r.pooled})
        if pooled:
            out.append(f"\nPooled over {', '.join(pooled)} (--pool): n counts runs of all values.")
        out.append("")
    if len({r.task for r in rows}) > 1:
        out.append("### Mean reciprocal rank over tasks (by OOD mean)\n")
        out.append("| variant | MRR | tasks |")
        out.append("|---|---:|---:|")
        out.extend(f"| {v} | {mrr:.3f} | {k} |" for v, mrr, k in mean_reciprocal_rank(rows))
        out.append("")
    out.append(
        "n: runs of the setting (seeds); ID: mean over evaluation lengths up to the training "
        "length (bold columns), OOD: beyond it; ± one sample standard deviation over runs; best "
        f"OOD: the best single run; train loss: mean over the last {TRAIN_LOSS_TAIL:.0%} of "
        "training; diverged runs (non-finite loss or metrics) stay out of the means."
    )
    return "\n".join(out) + "\n"


def to_csv(rows: Sequence[Row]) -> str:
    lengths = sorted({n for r in rows for n in r.per_length})
    head = ["task", "variant", "label", "metric", "n", "diverged", "steps", "train_max_length"]
    head += ["chance", "id_mean", "id_std", "ood_mean", "ood_std", "best_ood", "best_run"]
    head += ["train_loss", "pooled"]
    head += [f"len_{n}_mean" for n in lengths] + [f"len_{n}_std" for n in lengths]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)

    def cell(v):
        return "" if v is None else v

    for r in rows:
        means = [cell(r.per_length.get(n, (None, None))[0]) for n in lengths]
        stds = [cell(r.per_length.get(n, (None, None))[1]) for n in lengths]
        writer.writerow(
            [r.task, r.variant, r.label, r.metric, r.n, r.diverged, "/".join(map(str, r.steps))]
            + [r.train_max_length, cell(r.chance)]
            + [cell(v) for v in (r.id_mean, r.id_std, r.ood_mean, r.ood_std, r.best_ood)]
            + [r.best_run, cell(r.train_loss), ";".join(r.pooled)]
            + means
            + stds
        )
    return buf.getvalue()


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
                        k: _number(v)
                        for k, v in m.items()
                        if v is None or isinstance(v, int | float)
                    },
                    **config,
                }
            )
    return pd.DataFrame.from_records(records)


_SPECIAL_LABELS = {0: "pad", 1: "bos", 2: "sep", 3: "_"}


def run_attention(run_dir: str | Path, length: int) -> tuple[dict[int, np.ndarray], list[str]]:
    """Attention weights (layer -> HLS) of a run's last checkpoint on its first eval example
    at nominal `length`, cut to the real tokens; and the token labels.

    Restores the run the way `experiments.evaluate` does (read-only: safe beside a run that is
    training) and calls the model with return_attention over every layer (dropout off, the
    sampler's evaluation positions).
    """
    import jax.numpy as jnp

    import attn.models
    from attn.registry import ConfigError
    from experiments import config_utils, input_pipeline, state, tasks
    from experiments.workdir import RunError

    run_dir = Path(run_dir).absolute()  # orbax refuses relative checkpoint paths
    if not (run_dir / "config.json").exists():
        raise CompareError(f"--attention: {run_dir} is not a run directory (no config.json)")
    try:
        config = config_utils.load_json(str(run_dir / "config.json"))
        graphdef, train_state, _ = state.load_state(config, str(run_dir))
    except (ConfigError, RunError) as e:
        raise CompareError(f"--attention: {e}") from None
    if "num_layers" not in config.model:
        raise CompareError(f"--attention: model {config.model.name!r} has no attention maps")
    model = state.merge_model(graphdef, train_state)
    task = tasks.build(config.task)
    data = input_pipeline.eval_batches(
        task,
        layout=attn.models.batch_format(config.model.name, config.model),
        length=length,
        batch_size=1,
        num_examples=config.eval.num_examples,
        data_dir=config.eval.data_dir or None,
    )
    batch = {k: jnp.asarray(v[:1]) for k, v in next(iter(data)).items()}
    layers = tuple(range(config.model.num_layers))
    _, maps = model(batch, train=False, return_attention=layers)
    real = int(np.asarray(batch["token_mask"][0]).sum())
    weights = {i: np.asarray(w, dtype=np.float32)[0, :, :real, :real] for i, w in maps.items()}
    ids = np.asarray(batch["inputs"][0, :real]).tolist()
    return weights, [_SPECIAL_LABELS.get(i) or task.token_label(i) for i in ids]


def compare(
    roots: Sequence[str | Path],
    out: str | Path,
    *,
    metric: str | None = None,
    eval_name: str = FINAL,
    pool: Sequence[str] = (),
    attention: Sequence[str] = (),
    length: int | None = None,
    grid: bool = False,
    grid_lengths: Sequence[int] | None = None,
    grid_examples: int | None = None,
) -> dict:
    """Write table.md, table.csv, length_curves.png (and attention maps, and with `grid` the
    2-D operand-length tables and heatmaps) into `out`."""
    if attention and (length is None or length < 1):
        raise CompareError("--length: a positive evaluation length is needed with --attention")
    runs, skipped = load_all(roots, eval_name)
    if not runs:
        raise CompareError(
            f"no run directories (with {results_file(eval_name)}) under {list(map(str, roots))}"
        )
    rows = summarize(runs, metric, pool)
    if not rows:
        raise CompareError(f"--metric: no run reports {metric!r} at every length")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f"--out: {out} cannot be created ({e.strerror or e})") from None
    table = markdown(rows)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.csv", to_csv(rows))
    files = [
        out / "table.md",
        out / "table.csv",
        plots.plot_length_curves(rows, out / "length_curves.png"),
    ]
    for run_dir in attention:
        weights, tokens = run_attention(run_dir, length)
        name = Path(run_dir).name
        title = f"{name}: nominal length {length}, {len(tokens)} tokens"
        files.append(
            plots.plot_attention(weights, out / f"attention_{name}.png", tokens=tokens, title=title)
        )
    report = {"rows": rows, "table": table, "files": files, "runs": len(runs), "skipped": skipped}
    if grid:
        from experiments import grid as grid_lib

        g = grid_lib.compare_grids(
            roots, out, pool=pool, lengths=grid_lengths, num_examples=grid_examples
        )
        report["grid"] = g
        report["files"] += g["files"]
        report["skipped"] += g["skipped"]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="compare",
        description="Tables and plots comparing the run directories under the given roots.",
    )
    parser.add_argument("roots", nargs="+", help="run directories or folders holding them")
    parser.add_argument("--out", required=True, help="folder for table.md, table.csv, PNGs")
    parser.add_argument(
        "--metric", default=None, help="metric to compare (default: each run's summary metric)"
    )
    parser.add_argument(
        "--eval", default=FINAL, help="which evaluation: final (results.json) or a NAME of evals/"
    )
    parser.add_argument(
        "--pool",
        default="",
        help="comma-separated config fields to pool runs over, e.g. train.optimizer.lr",
    )
    parser.add_argument(
        "--attention",
        action="append",
        default=[],
        metavar="RUN",
        help="run directory whose attention maps to draw (repeatable)",
    )
    parser.add_argument("--length", type=int, default=None, help="evaluation length for maps")
    parser.add_argument(
        "--grid",
        action="store_true",
        help="2-D operand-length tables and heatmaps (grid.json; a run without one is "
        "evaluated first)",
    )
    parser.add_argument(
        "--grid_lengths", default="", help="each grid axis for runs evaluated now, e.g. 1,4,8"
    )
    parser.add_argument(
        "--grid_examples", type=int, default=None, help="examples per cell (default 100)"
    )
    args = parser.parse_args(argv)
    parser.check(args.length is None or args.length >= 1, "--length", "must be >= 1")
    lengths = args.grid_lengths.replace(",", " ").split()
    parser.check(all(v.isdigit() and int(v) >= 1 for v in lengths), "--grid_lengths", "e.g. 1,4,8")
    parser.check(
        args.grid_examples is None or args.grid_examples >= 1, "--grid_examples", "must be >= 1"
    )
    from attn.registry import ConfigError
    from experiments.workdir import RunError

    try:
        report = compare(
            args.roots,
            args.out,
            metric=args.metric,
            eval_name=args.eval,
            pool=[p for p in args.pool.split(",") if p],
            attention=args.attention,
            length=args.length,
            grid=args.grid,
            grid_lengths=[int(v) for v in lengths] or None,
            grid_examples=args.grid_examples,
        )
    except (CompareError, ConfigError) as e:
        print(f"compare: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"compare: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    for line in report["skipped"]:
        print(f"compare: skipped {line}", file=sys.stderr)
    print(report["table"])
    for task, row in best_per_task(report["rows"]).items():
        if row is None:
            print(f"best on {task}: none (every row scores the same)")
            continue
        score = row.ood_mean if row.ood_mean is not None else row.id_mean
        where = "OOD" if row.ood_mean is not None else "ID"
        print(
            f"best on {task}: {row.label} ({where} {row.metric} {fmt(row.metric, score)}, "
            f"n={row.n})"
        )
    if "grid" in report:
        for path in report["grid"]["evaluated"]:
            print(f"compare: evaluated the grid of {path} (its grid.json)", file=sys.stderr)
        print(report["grid"]["table"])
    print(f"{report['runs']} runs; wrote " + ", ".join(str(f) for f in report["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
