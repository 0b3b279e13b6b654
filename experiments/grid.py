"""The 2-D operand-length evaluation of a run: exact match on every cell of a grid of lengths.

    python -m experiments.grid --workdir runs/abacus [--lengths 1,5,10,20,40] \
        [--num_examples 100] [--step N]

For a task with two lengths (`GRID_AXES`: digits of a and of b for long_addition and
long_multiplication, largest number of digits and count of numbers for number_sort;
experiments/tasks/arithmetic.py) the run's checkpoint (the latest good one, or --step) is
scored on `num_examples` examples of every cell (i, j) of lengths x lengths (default: the
task's `grid_lengths`), drawn deterministically from (EVAL_SEED, index, cell), with the same
compiled executables as the length evaluation (experiments.evaluate.Evaluator.score).
McLeish et al. 2024 (Abacus) evaluate 100 examples per cell of a 100 x 100 grid; the default
here is the same count on the task's sparser grid.

Outputs: `workdir/grid.json` ({"task", "variant", "seed", "step", "axes", "lengths",
"train_max_length", "num_examples", "cells": [{"len_a", "len_b", "seq_acc", "token_acc",
"loss", "num_examples"}, ...], "summary", "config"}), written atomically, and one
metrics.jsonl row per cell, {"step", "split": "grid", "length": null, "len_a", "len_b",
metrics...} (rows of an earlier grid evaluation are replaced). `summary` holds the mean
exact match over the cells with both lengths <= the longest training length (in
distribution) and over the others.

Tables over runs (`compare_grids`, which `python -m experiments.compare ROOTS --out D --grid`
calls): the grid.json of every grid-task run under the roots (runs without one are evaluated
first), grouped into settings as compare groups runs (seeds together), written as
`grid.md` (per setting, exact match by len a x len b, mean over runs; bold where both
lengths are within training), `grid.csv` (per setting and cell: mean, std, n) and
`grid_heatmaps.png` (experiments/plots.py: one heatmap per setting, the training region
outlined).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attn.registry import ConfigError
from experiments import plots
from experiments.runs import (
    BOOKKEEPING,
    CompareError,
    differing,
    find_runs,
    flatten,
    fmt,
    group_runs,
    mean_std,
    number,
)
from experiments.workdir import atomic_write_text

log = logging.getLogger("attn.grid")

GRID_FILE = "grid.json"
GRID_EXAMPLES = 100  # per cell, as McLeish et al. 2024


def grid_task(config):
    """The run's task, or a ConfigError when it has no grid of two lengths."""
    from experiments import tasks

    task = tasks.build(config.task)
    if not getattr(task, "GRID_AXES", None):
        grid = sorted(n for n, c in tasks.REGISTRY.items() if getattr(c, "GRID_AXES", None))
        raise ConfigError(
            f"task.name: {task.name!r} has one length; the 2-D evaluation takes one of "
            f"{', '.join(grid)}"
        )
    return task


def cell_batches(task, cell, *, layout: str, num_examples: int, batch_size: int, seed: int):
    """The evaluation batches of one grid cell."""
    records = task.grid_examples(seed, range(num_examples), cell)
    rows = [{k: v[i] for k, v in records.items()} for i in range(num_examples)]
    for start in range(0, num_examples, batch_size):
        yield task.eval_batch(rows[start : start + batch_size], layout)


def summarize(cells: list[dict], train_max_length: int, metric: str = "seq_acc") -> dict:
    """Mean `metric` over in-distribution cells (both lengths <= train_max_length) and the rest."""

    def mean(values):
        return float(sum(values) / len(values)) if values else None

    inside = [c[metric] for c in cells if max(c["len_a"], c["len_b"]) <= train_max_length]
    outside = [c[metric] for c in cells if max(c["len_a"], c["len_b"]) > train_max_length]
    return {"id_mean": mean(inside), "ood_mean": mean(outside), "metric": metric}


def evaluate_grid(evaluator, model, *, lengths, num_examples: int, log_row=None) -> list[dict]:
    """[{"len_a", "len_b", metrics...}] of `model` over lengths x lengths."""
    from experiments.input_pipeline import EVAL_SEED

    task, layout = evaluator.task, evaluator.layout
    batch_size = evaluator.config.eval.batch_size
    out = []
    for i in lengths:
        t0 = time.perf_counter()
        for j in lengths:
            batches = cell_batches(
                task,
                (i, j),
                layout=layout,
                num_examples=num_examples,
                batch_size=batch_size,
                seed=EVAL_SEED,
            )
            m = evaluator.score(model, batches)
            row = {"len_a": int(i), "len_b": int(j), **m}
            out.append(row)
            if log_row is not None:
                log_row(row)
        accs = " ".join(f"{100 * c['seq_acc']:.0f}" for c in out[-len(lengths) :])
        log.info(
            "grid %s = %d: seq_acc %% at %s = %s: %s (%.1fs)",
            task.GRID_AXES[0],
            i,
            task.GRID_AXES[1],
            ",".join(map(str, lengths)),
            accs,
            time.perf_counter() - t0,
        )
    return out


def run(workdir: str, *, lengths=None, num_examples: int = GRID_EXAMPLES, step=None) -> dict:
    """Evaluate a run directory on its grid; writes workdir/grid.json and metrics rows."""
    import jax

    from experiments import config_utils, evaluate, mesh, metrics, state
    from experiments.workdir import atomic_write_json, rewind_jsonl, workdir_lock

    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--workdir: {path} not found; not a run directory (train it first)")
    config = config_utils.load_json(path)
    task = grid_task(config)
    lengths = [int(v) for v in (lengths or task.cfg["grid_lengths"])]
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"--lengths: {lengths}; positive lengths, e.g. 1,5,10,20")
    if num_examples < 1:
        raise ConfigError(f"--num_examples: {num_examples}; at least 1 per cell")
    with workdir_lock(workdir, process_index=jax.process_index()):
        device_mesh = mesh.make_mesh(config)
        graphdef, train_state, step = state.load_state(config, workdir, mesh=device_mesh, step=step)
        model = state.merge_model(graphdef, train_state)
        evaluator = evaluate.Evaluator(config, device_mesh)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        if jax.process_index() == 0:
            rewind_jsonl(metrics_path, math.inf, keep=lambda r: r.get("split") != "grid")
        log.info(
            "grid evaluation of %s at step %d: %d x %d cells of %d examples",
            workdir,
            step,
            len(lengths),
            len(lengths),
            num_examples,
        )
        with metrics.MetricsWriter(workdir) as writer:
            cells = evaluate_grid(
                evaluator,
                model,
                lengths=lengths,
                num_examples=num_examples,
                log_row=lambda r: writer.row({"step": step, "split": "grid", "length": None, **r}),
            )
    results = {
        "task": task.name,
        "variant": config.variant,
        "seed": int(config.seed),
        "step": int(step),
        "axes": list(task.GRID_AXES),
        "lengths": lengths,
        "train_max_length": task.max_train_length,
        "num_examples": num_examples,
        "metric": "seq_acc",
        "cells": cells,
        "summary": summarize(cells, task.max_train_length),
        "config": config.to_dict(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, GRID_FILE), metrics.jsonable(results))
    return results


# ------------------------------------------------------------------ tables over runs


@dataclass
class GridRun:
    """One run's 2-D operand-length evaluation (experiments/grid.py's grid.json)."""

    path: Path
    task: str
    variant: str
    seed: int | None
    step: int
    train_max_length: int
    axes: tuple[str, str]
    lengths: tuple[int, ...]
    cells: dict[tuple[int, int], float]
    metric: str = "seq_acc"
    settings: dict = field(default_factory=dict)


@dataclass
class GridRow:
    """Per-cell mean and std over the runs of one setting."""

    task: str
    label: str
    metric: str
    axes: tuple[str, str]
    lengths: tuple[int, ...]
    train_max_length: int
    runs: list[GridRun]
    cells: dict[tuple[int, int], tuple[float | None, float | None]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)


def grid_task_runs(roots) -> list[Path]:
    """Finished runs (results.json) under the roots whose task has a grid of two lengths."""
    from experiments import tasks

    found = []
    for path in find_runs(roots):
        try:
            name = json.loads((path / "config.json").read_text())["task"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if getattr(tasks.REGISTRY.get(name), "GRID_AXES", None):
            found.append(path)
    return found


def ensure_grids(roots, *, lengths=None, num_examples: int | None = None) -> list[Path]:
    """Evaluate (experiments.grid.run) every grid-task run under the roots that has no
    grid.json; the runs evaluated."""
    done = []
    for path in grid_task_runs(roots):
        if not (path / GRID_FILE).exists():
            run(str(path), lengths=lengths, num_examples=num_examples or GRID_EXAMPLES)
            done.append(path)
    return done


def load_grid(path: Path) -> GridRun:
    """The grid.json of a run; CompareError naming the file if it cannot be read."""
    file = Path(path) / GRID_FILE
    try:
        g = json.loads(file.read_text())
        metric = g.get("metric", "seq_acc")
        config = g.get("config", {})
        return GridRun(
            path=Path(path),
            task=g["task"],
            variant=str(g["variant"]),
            seed=g.get("seed"),
            step=int(g.get("step", 0)),
            train_max_length=int(g["train_max_length"]),
            axes=tuple(g["axes"]),
            lengths=tuple(int(v) for v in g["lengths"]),
            cells={(int(c["len_a"]), int(c["len_b"])): number(c[metric]) for c in g["cells"]},
            metric=metric,
            settings={k: v for k, v in flatten(config).items() if not k.startswith(BOOKKEEPING)},
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        kind = type(e).__name__
        raise CompareError(f"{file}: not a readable grid file ({kind}: {e})") from None


def summarize_grids(runs: Sequence[GridRun], pool: Sequence[str] = ()) -> list[GridRow]:
    """One row per setting (runs grouped and labelled as `summarize` does), cells averaged
    over the setting's runs."""
    groups = group_runs(runs, pool)
    by_variant: dict[tuple, list[dict]] = {}
    for task, length, variant, kept in groups:
        by_variant.setdefault((task, length, variant), []).append(dict(kept))
    rows = []
    for (task, length, variant, kept), members in groups.items():
        differ = differing(by_variant[(task, length, variant)])
        extra = ", ".join(f"{k}={dict(kept).get(k)}" for k in differ)
        row = GridRow(
            task=task,
            label=f"{variant} [{extra}]" if extra else variant,
            metric=members[0].metric,
            axes=members[0].axes,
            lengths=tuple(sorted({v for r in members for v in r.lengths})),
            train_max_length=length,
            runs=list(members),
        )
        for cell in sorted({c for r in members for c in r.cells}):
            row.cells[cell] = mean_std([r.cells[cell] for r in members if cell in r.cells])
        rows.append(row)
    return sorted(rows, key=lambda r: (r.task, r.train_max_length, r.label))


def grid_markdown(rows: Sequence[GridRow]) -> str:
    """Per setting, the metric (mean over runs) with len a down and len b across; bold where
    both lengths are within training."""
    out = []
    for r in rows:
        a, b = r.axes
        out.append(
            f"### {r.task}: {r.label}, {r.metric} (%) by {a} (rows) x {b} (columns), trained "
            f"on lengths <= {r.train_max_length}, n={r.n}\n"
        )
        out.append(f"| {a} \\ {b} | " + " | ".join(map(str, r.lengths)) + " |")
        out.append("|---:|" + "---:|" * len(r.lengths))
        for i in r.lengths:
            cells = []
            for j in r.lengths:
                v = fmt(r.metric, r.cells.get((i, j), (None, None))[0])
                cells.append(f"**{v}**" if max(i, j) <= r.train_max_length and v != "-" else v)
            out.append(f"| {i} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(
        "Mean over runs (n) of exact match per cell of lengths; bold: both lengths within "
        "training. Each run's own values: its grid.json."
    )
    return "\n".join(out) + "\n"


def grid_csv(rows: Sequence[GridRow]) -> str:
    """One line per setting and cell: mean, std and n over runs."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["task", "label", "metric", "axis_a", "axis_b", "len_a", "len_b", "in_distribution"]
        + ["mean", "std", "n", "train_max_length"]
    )
    for r in rows:
        for (i, j), (mean, std) in sorted(r.cells.items()):
            writer.writerow(
                [r.task, r.label, r.metric, *r.axes, i, j, int(max(i, j) <= r.train_max_length)]
                + ["" if mean is None else mean, "" if std is None else std, r.n]
                + [r.train_max_length]
            )
    return buf.getvalue()


def compare_grids(roots, out: Path, *, pool=(), lengths=None, num_examples=None) -> dict:
    """grid.md, grid.csv and grid_heatmaps.png of the grid-task runs under the roots
    (evaluating the ones without a grid.json first)."""
    evaluated = ensure_grids(roots, lengths=lengths, num_examples=num_examples)
    runs, skipped = [], []
    for path in grid_task_runs(roots):
        try:
            runs.append(load_grid(path))
        except CompareError as e:
            skipped.append(str(e))
    if not runs:
        raise CompareError(
            "--grid: no finished run of a task with two lengths (long_addition, "
            f"long_multiplication, number_sort) under {list(map(str, roots))}"
        )
    rows = summarize_grids(runs, pool)
    table = grid_markdown(rows)
    atomic_write_text(out / "grid.md", table)
    atomic_write_text(out / "grid.csv", grid_csv(rows))
    files = [out / "grid.md", out / "grid.csv", plots.plot_grid(rows, out / "grid_heatmaps.png")]
    return {
        "rows": rows,
        "table": table,
        "files": files,
        "evaluated": evaluated,
        "skipped": skipped,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.grid",
        description="Exact match of a run on a 2-D grid of operand lengths (grid.json).",
    )
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument(
        "--lengths", default="", help="lengths of each axis, e.g. 1,5,10 (default: the task's)"
    )
    parser.add_argument("--num_examples", type=int, default=GRID_EXAMPLES, help="per cell")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from experiments.workdir import RunError

    try:
        lengths = [int(v) for v in args.lengths.split(",") if v.strip()] or None
    except ValueError:
        print(f"error: --lengths: {args.lengths!r}; e.g. 1,5,10", file=sys.stderr)
        return 2
    try:
        result = run(args.workdir, lengths=lengths, num_examples=args.num_examples, step=args.step)
    except (ConfigError, RunError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    s = result["summary"]
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"
    print(
        f"grid of {result['task']} at step {result['step']}: seq_acc in distribution "
        f"{fmt(s['id_mean'])} %, beyond {fmt(s['ood_mean'])} %; wrote "
        f"{os.path.join(args.workdir, GRID_FILE)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
