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
`load_runs(roots)` (experiments/runs.py) returns every run's config and per-length metrics as
a pandas DataFrame (pandas: `pip install -e .[analysis]`).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments import plots
from experiments.config_utils import ArgumentParser
from experiments.runs import (  # noqa: F401  (find_runs, load_run, load_runs: compare's API too)
    FINAL,
    TRAIN_LOSS_TAIL,
    CompareError,
    Run,
    differing,
    find_runs,
    fmt,
    fmt_pm,
    group_runs,
    load_all,
    load_run,
    load_runs,
    lower_is_better,
    mean_std,
    results_file,
)
from experiments.workdir import atomic_write_text


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
        differ = differing(by_variant[(task, length, variant)])
        extra = ", ".join(f"{k}={dict(kept).get(k)}" for k in differ)
        row = Row(task, variant, m, members, label=f"{variant} [{extra}]" if extra else variant)
        row.train_max_length = length
        row.chance = members[0].chance
        row.steps = tuple(sorted({r.step for r in members}))
        row.pooled = tuple(differing([r.settings for r in members]))
        ok = [r for r in members if not r.diverged(m)]
        row.diverged = len(members) - len(ok)
        scores = [(r.scores(m), r) for r in ok]
        row.id_mean, row.id_std = mean_std([s[0] for s, _ in scores if s[0] is not None])
        oods = [(s[1], r) for s, r in scores if s[1] is not None]
        row.ood_mean, row.ood_std = mean_std([o for o, _ in oods])
        if oods:
            pick = min if lower_is_better(m) else max
            row.best_ood, best = pick(oods, key=lambda pair: pair[0])
            row.best_run = best.path.name
        row.train_loss, _ = mean_std([r.train_loss for r in ok if r.train_loss is not None])
        for n in sorted({n for r in ok for n in r.per_length}):
            row.per_length[n] = mean_std([r.per_length[n][m] for r in ok if n in r.per_length])
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
