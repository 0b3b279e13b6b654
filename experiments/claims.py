"""A paper's claims as checks on a comparison: what `./launch.sh reproduce` reports.

A reproduction config (configs/press_lm.py, configs/deletang.py, ...) defines
`get_claims(arg) -> [Claim, ...]`. Each claim states the paper's finding in words, where the
paper's number comes from, and a check over compare's rows (experiments/compare.py) that
returns the measured figure and whether the claim holds. A claim that does not hold is a
result, not an error.

Rows are chosen with `select(rows, pe=..., sampler=..., task=..., **{"config.path": value})`:
the settings a row's runs share (the encoding's registry name, the position sampler's, any
config field), so labels do not matter.

Checks:
- `ratio(text, paper, pe, metric, at, over, below=None, above=None)`: the metric at
  evaluation length `at` over its value at `over` (lengths as multiples of the training
  length, "16x", or absolute numbers), mean over tasks, compared with a bound.
- `better(text, paper, a, b, metric, where)`: row a's ID or OOD mean beats row b's (for every
  task, or on the mean over tasks).
- `mean_gain(text, paper, a, b, metric, at_least)`: mean over tasks of a's OOD mean minus b's.
- `fits(text, paper, metric, at_least, rows_of=None)`: every row's (or the chosen rows')
  in-distribution mean reaches a level (the mini fits its training lengths, so the OOD
  comparison means something).
- `reaches(text, paper, rows_of, metric, at, at_least)`: the chosen rows' metric at one
  evaluation length ("2x" or a number) reaches a level.
- `top_by_mrr(text, paper, expected, k)`: the first k encodings by mean reciprocal rank over
  tasks include the paper's first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Claim:
    text: str  # the claim, in words
    paper: str  # the paper's figure and where it is
    check: Callable  # rows -> (measured figure, holds, detail)

    def evaluate(self, rows) -> dict:
        try:
            figure, holds, detail = self.check(rows)
        except LookupError as e:  # the rows the claim needs were not run
            figure, holds, detail = None, None, f"not measured: {e}"
        return {"claim": self.text, "paper": self.paper, "figure": figure, "holds": holds,
                "detail": detail}  # fmt: skip


def _setting(row, key: str):
    return row.runs[0].settings.get(key)


def select(rows, *, pe: str | None = None, sampler: str | None = None, task=None, **fields) -> list:
    """Rows whose runs use encoding `pe` and position sampler `sampler` (identity when the
    model has no sampler field), optionally of one task; any other keyword is a config field
    the runs share, by its dotted path: `select(rows, **{"task.index_hints": True})`."""
    out = []
    for r in rows:
        if pe is not None and _setting(r, "model.pe.name") != pe:
            continue
        if sampler is not None and (_setting(r, "model.positions.name") or "identity") != sampler:
            continue
        if task is not None and r.task != task:
            continue
        if any(_setting(r, key) != value for key, value in fields.items()):
            continue
        out.append(r)
    if not out:
        wanted = {"pe": pe, "sampler": sampler, "task": task, **fields}
        said = ", ".join(f"{k}={v!r}" for k, v in wanted.items() if v is not None)
        raise LookupError(f"no row with {said or 'any setting'}")
    return out


def _length(row, spec) -> int:
    if isinstance(spec, str) and spec.endswith("x"):
        return int(float(spec[:-1]) * row.train_max_length)
    return int(spec)


def _at(row, n: int) -> float:
    if n not in row.per_length or row.per_length[n][0] is None:
        raise LookupError(f"{row.label} was not evaluated at length {n}")
    return float(row.per_length[n][0])


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def ratio(text, paper, *, pe, metric, at, over, sampler=None, below=None, above=None) -> Claim:
    def check(rows):
        values = []
        for r in select([r for r in rows if r.metric == metric], pe=pe, sampler=sampler):
            values.append(_at(r, _length(r, at)) / _at(r, _length(r, over)))
        value = float(np.mean(values))
        holds = (below is None or value < below) and (above is None or value > above)
        bound = f"< {below}" if below is not None else f"> {above}"
        return value, holds, f"{pe} {metric} at {at} / at {over} = {_fmt(value)} (claim: {bound})"

    return Claim(text, paper, check)


def _score(row, where: str) -> float:
    value = row.ood_mean if where == "ood" else row.id_mean
    if value is None or not math.isfinite(value):
        raise LookupError(f"{row.label} has no {where} mean")
    return float(value)


def better(text, paper, *, a: dict, b: dict, metric: str, where="ood", every_task=False) -> Claim:
    """a and b are select() filters, e.g. {"pe": "alibi"}."""
    lower = metric in ("loss", "ppl")

    def check(rows):
        rows = [r for r in rows if r.metric == metric]
        tasks = sorted({r.task for r in select(rows, **a)} & {r.task for r in select(rows, **b)})
        if not tasks:
            raise LookupError("no task has both rows")
        diffs = []
        for t in tasks:
            sa = float(np.mean([_score(r, where) for r in select(rows, **a, task=t)]))
            sb = float(np.mean([_score(r, where) for r in select(rows, **b, task=t)]))
            diffs.append(sb - sa if lower else sa - sb)
        holds = all(d > 0 for d in diffs) if every_task else float(np.mean(diffs)) > 0
        value = float(np.mean(diffs))
        scope = f"on every one of {len(tasks)} tasks" if every_task else f"over {len(tasks)} tasks"
        return value, holds, f"{where} margin {_fmt(value)} {scope}"

    return Claim(text, paper, check)


def mean_gain(text, paper, *, a: dict, b: dict, metric: str, at_least: float) -> Claim:
    def check(rows):
        rows = [r for r in rows if r.metric == metric]
        mean_a = float(np.mean([_score(r, "ood") for r in select(rows, **a)]))
        mean_b = float(np.mean([_score(r, "ood") for r in select(rows, **b)]))
        gain = mean_a - mean_b
        return gain, gain >= at_least, f"mean OOD {_fmt(mean_a)} vs {_fmt(mean_b)}"

    return Claim(text, paper, check)


def fits(text, paper, *, metric: str, at_least: float, rows_of: dict | None = None) -> Claim:
    """Every row's (or every row of the select() filter `rows_of`) in-distribution mean
    reaches `at_least`."""

    def check(rows):
        rows = [r for r in rows if r.metric == metric]
        if not rows:
            raise LookupError(f"no row reports {metric}")
        if rows_of:
            rows = select(rows, **rows_of)
        worst = min(rows, key=lambda r: _score(r, "id"))
        value = _score(worst, "id")
        return value, value >= at_least, f"lowest ID mean {_fmt(value)} ({worst.label})"

    return Claim(text, paper, check)


def reaches(text, paper, *, rows_of: dict, metric: str, at, at_least: float) -> Claim:
    """The mean over tasks of the rows_of rows' metric at evaluation length `at` (a multiple
    of the training length, "2x", or a length) reaches `at_least`."""

    def check(rows):
        chosen = select([r for r in rows if r.metric == metric], **rows_of)
        value = float(np.mean([_at(r, _length(r, at)) for r in chosen]))
        return value, value >= at_least, f"{metric} at {at} = {_fmt(value)} (claim: >= {at_least})"

    return Claim(text, paper, check)


def top_by_mrr(text, paper, *, expected: Sequence[str], k: int = 1) -> Claim:
    """The paper's best encoding (expected[0]) is among the first k by MRR over tasks."""
    from experiments.compare import mean_reciprocal_rank

    def check(rows):
        by_label = {r.label: _setting(r, "model.pe.name") for r in rows}
        ranking = [by_label[label] for label, _, _ in mean_reciprocal_rank(rows)]
        position = ranking.index(expected[0]) + 1 if expected[0] in ranking else math.inf
        return float(position), position <= k, "MRR order: " + " > ".join(ranking)

    return Claim(text, paper, check)
