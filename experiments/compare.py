"""Run directories -> comparison tables and plots for length-generalization ablations.

    python -m experiments.compare runs/x [runs/y ...] --out reports/x [--metric token_acc] \
        [--attention RUN --length N]

Finds every run directory under the given roots (a directory holding `results.json`, the
driver's final per-length evaluation; README "Run outputs") and writes to --out:

- `table.md`, `table.csv`: one row per (task, variant) with the number of runs n, the mean
  and sample standard deviation (ddof=1) over runs of the in-distribution score (mean of the
  metric over evaluation lengths <= the longest training length) and of the
  out-of-distribution score (lengths beyond it): each run's `summary` from results.json
  (experiments.metrics.summarize, which also scores any other --metric), the best run's OOD
  score (Deletang et al.
  2023 report the best run over seeds and learning rates), the mean per evaluation length,
  and the last training loss from `metrics.jsonl`. Runs of a variant that differ in
  something its label does not name (e.g. learning rate) count as runs of that variant.
- `length_curves.png`: one panel per task, the metric against evaluation length, one line
  per variant (mean over runs) with a band of +- one standard deviation, and the training
  length marked by a dashed vertical line (Press et al. 2022, Fig. 1 style).
- `attention_<run>.png` for each `--attention RUN` at `--length N`: every head of every layer
  on one evaluation example, from the run's last checkpoint (the model's return_attention).

and prints the tables and the best variant per task. Writes are atomic; matplotlib runs
with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
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
from experiments.workdir import atomic_write_text, read_jsonl

RESULTS = "results.json"
METRICS = "metrics.jsonl"
DEFAULT_METRIC = "token_acc"
# Metrics where smaller is better; every other metric (accuracies) is maximised.
LOWER_IS_BETTER = frozenset({"loss", "ppl", "bpc", "bpb", "nll"})
# Sub-directories of a run that never hold runs themselves; skipping them keeps the walk fast.
_NOT_RUNS = frozenset({"checkpoints", "tb", ".jax_cache", "__pycache__"})


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


@dataclass
class Run:
    """One finished run directory, reduced to what the comparison needs."""

    path: Path
    task: str
    variant: str
    seed: int | None
    train_max_length: int
    per_length: dict[int, dict[str, float]]
    metric: str
    summary: dict = field(default_factory=dict)
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


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def find_runs(roots: Iterable[str | Path]) -> list[Path]:
    """Every directory under the roots (roots included) that holds a results.json."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _NOT_RUNS)
            if RESULTS in filenames:
                found.append(Path(dirpath))
    return found


def last_train_loss(metrics_path: Path) -> float | None:
    """Loss of the last training row of a metrics.jsonl (None if there is none)."""
    losses = [
        r["loss"] for r in read_jsonl(metrics_path) if r.get("split") == "train" and "loss" in r
    ]
    return float(losses[-1]) if losses else None


def load_run(path: Path) -> Run:
    results = json.loads((path / RESULTS).read_text())
    per_length = {
        int(n): {k: float(v) for k, v in m.items() if isinstance(v, int | float)}
        for n, m in results["per_length"].items()
    }
    return Run(
        path=path,
        task=results["task"],
        variant=str(results["variant"]),
        seed=results.get("seed"),
        train_max_length=int(results["train_max_length"]),
        per_length=per_length,
        metric=results.get("summary", {}).get("metric", DEFAULT_METRIC),
        summary=results.get("summary", {}),
        train_loss=last_train_loss(path / METRICS),
    )


@dataclass
class Row:
    """Statistics of one (task, variant) over its runs."""

    task: str
    variant: str
    metric: str
    runs: list[Run]
    train_max_length: int = 0
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
    if not values:
        return None, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std


def summarize(runs: Sequence[Run], metric: str | None = None) -> list[Row]:
    """Rows grouped by (task, variant); tasks in name order, variants best OOD first (ties:
    best ID first)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.variant), []).append(run)
    rows = []
    for (task, variant), members in groups.items():
        m = metric or members[0].metric
        members = [r for r in members if all(m in v for v in r.per_length.values())]
        if not members:
            continue
        row = Row(task, variant, m, members, max(r.train_max_length for r in members))
        scores = [r.scores(m) for r in members]
        row.id_mean, row.id_std = _mean_std([s[0] for s in scores if s[0] is not None])
        oods = [(s[1], r) for s, r in zip(scores, members, strict=True) if s[1] is not None]
        row.ood_mean, row.ood_std = _mean_std([o for o, _ in oods])
        if oods:
            pick = min if lower_is_better(m) else max
            row.best_ood, best = pick(oods, key=lambda pair: pair[0])
            row.best_run = best.path.name
        losses = [r.train_loss for r in members if r.train_loss is not None]
        row.train_loss = _mean(losses)
        lengths = sorted({n for r in members for n in r.per_length})
        for n in lengths:
            row.per_length[n] = _mean_std(
                [r.per_length[n][m] for r in members if n in r.per_length]
            )
        rows.append(row)

    def order(row: Row):
        sign = 1.0 if lower_is_better(row.metric) else -1.0
        in_dist = -math.inf if row.id_mean is None else row.id_mean
        return (row.task, sign * _score(row), sign * in_dist, row.variant)

    return sorted(rows, key=order)


def _score(row: Row) -> float:
    """What ranks variants: the OOD mean (the ID mean when nothing was tested beyond)."""
    score = row.ood_mean if row.ood_mean is not None else row.id_mean
    if score is None:
        return math.inf if lower_is_better(row.metric) else -math.inf
    return score


def _better(a: float, b: float, metric: str) -> bool:
    return a < b if lower_is_better(metric) else a > b


def best_per_task(rows: Sequence[Row]) -> dict[str, Row]:
    """The first (best OOD mean) row of each task."""
    best: dict[str, Row] = {}
    for row in rows:
        best.setdefault(row.task, row)
    return best


def mean_reciprocal_rank(rows: Sequence[Row]) -> list[tuple[str, float, int]]:
    """(variant, MRR, tasks) best first: per task, variants ranked by OOD mean (ID if no OOD;
    tied scores share a rank), 1/rank averaged over the tasks a variant was run on
    (Kazemnejad et al. 2023's aggregate)."""
    reciprocal: dict[str, list[float]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        scores = [_score(r) for r in task_rows]
        for row, score in zip(task_rows, scores, strict=True):
            # Ties share the best rank among them: equal scores are not a ranking.
            rank = 1 + sum(_better(other, score, row.metric) for other in scores)
            reciprocal.setdefault(row.variant, []).append(1.0 / rank)
    table = [(v, float(np.mean(rr)), len(rr)) for v, rr in reciprocal.items()]
    return sorted(table, key=lambda t: (-t[1], t[0]))


def fmt(metric: str, value: float | None) -> str:
    """Accuracies as percentages with one decimal, everything else with 3 significant digits."""
    if value is None:
        return "-"
    if metric.endswith("acc"):
        return f"{100 * value:.1f}"
    return f"{value:.3g}"


def fmt_pm(metric: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return fmt(metric, mean) if std is None else f"{fmt(metric, mean)} ± {fmt(metric, std)}"


def markdown(rows: Sequence[Row]) -> str:
    """One table per task (its evaluation lengths as columns)."""
    out = []
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        metric = task_rows[0].metric
        unit = " (%)" if metric.endswith("acc") else ""
        lengths = sorted({n for r in task_rows for n in r.per_length})
        train_len = max(r.train_max_length for r in task_rows)
        better = "lower" if lower_is_better(metric) else "higher"
        out.append(
            f"### {task}: {metric}{unit}, trained on lengths <= {train_len}, {better} is better\n"
        )
        head = ["variant", "n", "ID mean ± std", "OOD mean ± std", "best OOD", "train loss"]
        head += [
            f"{'**' if n <= train_len else ''}{n}{'**' if n <= train_len else ''}" for n in lengths
        ]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in task_rows:
            cells = [
                r.variant,
                str(r.n),
                fmt_pm(metric, r.id_mean, r.id_std),
                fmt_pm(metric, r.ood_mean, r.ood_std),
                fmt(metric, r.best_ood),
                "-" if r.train_loss is None else f"{r.train_loss:.3g}",
            ]
            cells += [fmt(metric, r.per_length.get(n, (None, None))[0]) for n in lengths]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if len({r.task for r in rows}) > 1:
        out.append("### Mean reciprocal rank over tasks (by OOD mean)\n")
        out.append("| variant | MRR | tasks |")
        out.append("|---|---:|---:|")
        out.extend(f"| {v} | {mrr:.3f} | {k} |" for v, mrr, k in mean_reciprocal_rank(rows))
        out.append("")
    out.append(
        "n: runs (seeds, and any setting the variant label does not name); ID: mean over "
        "evaluation lengths up to the training length (bold columns), OOD: beyond it; "
        "± one sample standard deviation over runs; best OOD: the best single run."
    )
    return "\n".join(out) + "\n"


def to_csv(rows: Sequence[Row]) -> str:
    lengths = sorted({n for r in rows for n in r.per_length})
    head = ["task", "variant", "metric", "n", "train_max_length", "id_mean", "id_std"]
    head += ["ood_mean", "ood_std", "best_ood", "best_run", "train_loss"]
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
            [r.task, r.variant, r.metric, r.n, r.train_max_length]
            + [cell(v) for v in (r.id_mean, r.id_std, r.ood_mean, r.ood_std, r.best_ood)]
            + [r.best_run, cell(r.train_loss)]
            + means
            + stds
        )
    return buf.getvalue()


_SPECIAL_LABELS = {0: "pad", 1: "bos", 2: "sep", 3: "_"}


def run_attention(run_dir: str | Path, length: int) -> tuple[dict[int, np.ndarray], list[str]]:
    """Attention weights (layer -> HLS) of a run's last checkpoint on its first eval example
    at nominal `length`, cut to the real tokens; and the token labels.

    Restores the run the way `experiments.evaluate` does and calls the model with
    return_attention over every layer (dropout off, the sampler's evaluation positions).
    """
    import jax.numpy as jnp

    import attn.models
    from experiments import config_utils, input_pipeline, state, tasks
    from experiments.workdir import RunError

    run_dir = Path(run_dir).absolute()  # orbax refuses relative checkpoint paths
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"--attention: {run_dir} is not a run directory (no config.json)")
    config = config_utils.load_json(str(run_dir / "config.json"))
    try:
        graphdef, train_state, _ = state.load_state(config, str(run_dir))
    except RunError as e:
        raise FileNotFoundError(f"--attention: {e}") from None
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
    attention: Sequence[str] = (),
    length: int | None = None,
) -> dict:
    """Write table.md, table.csv, length_curves.png (and attention maps) into `out`."""
    runs = [load_run(p) for p in find_runs(roots)]
    if not runs:
        raise FileNotFoundError(
            f"no run directories (with {RESULTS}) under {list(map(str, roots))}"
        )
    rows = summarize(runs, metric)
    if not rows:
        raise ValueError(f"--metric: no run reports {metric!r} at every length")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.csv", to_csv(rows))
    files = [
        out / "table.md",
        out / "table.csv",
        plots.plot_length_curves(rows, out / "length_curves.png"),
    ]
    for run_dir in attention:
        if length is None:
            raise ValueError("--attention needs --length")
        weights, tokens = run_attention(run_dir, length)
        name = Path(run_dir).name
        files.append(
            plots.plot_attention(
                weights,
                out / f"attention_{name}.png",
                tokens=tokens,
                title=f"{name}, length {length}",
            )
        )
    return {"rows": rows, "table": table, "files": files, "runs": len(runs)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description="Tables and plots comparing the run directories under the given roots.",
    )
    parser.add_argument("roots", nargs="+", help="run directories or folders holding them")
    parser.add_argument("--out", required=True, help="folder for table.md, table.csv, PNGs")
    parser.add_argument(
        "--metric", default=None, help="metric to compare (default: each run's summary metric)"
    )
    parser.add_argument(
        "--attention",
        action="append",
        default=[],
        metavar="RUN",
        help="run directory whose attention maps to draw (repeatable)",
    )
    parser.add_argument("--length", type=int, default=None, help="evaluation length for maps")
    args = parser.parse_args(argv)
    try:
        report = compare(
            args.roots, args.out, metric=args.metric, attention=args.attention, length=args.length
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"compare: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(report["table"])
    for task, row in best_per_task(report["rows"]).items():
        score = row.ood_mean if row.ood_mean is not None else row.id_mean
        where = "OOD" if row.ood_mean is not None else "ID"
        print(
            f"best on {task}: {row.variant} ({where} {row.metric} {fmt(row.metric, score)}, "
            f"n={row.n})"
        )
    print(f"{report['runs']} runs; wrote " + ", ".join(str(f) for f in report["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
