"""Plots of a comparison: metric against evaluation length, attention maps, and heatmaps of
exact match over a grid of two operand lengths (experiments/grid.py).

matplotlib with the Agg backend (no display needed); every PNG is written to a temporary
file and renamed, so a reader never sees half a picture.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from experiments.compare import Row
    from experiments.grid import GridRow


def _save(fig, path: Path) -> None:
    """savefig to a temporary file, then rename: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _is_fraction(metric: str) -> bool:
    return metric.endswith("acc")


def plot_length_curves(rows: Sequence[Row], path: str | Path) -> Path:
    """One panel per task and training length: metric vs evaluation length, a line and a
    ±std band per row (clipped to [0, 1] for accuracies), chance and training length marked.
    Panels of one metric share their y scale; the legend sits outside the panels, so a dozen
    variants do not cover the curves."""
    path = Path(path)
    panels: dict[tuple[str, int], list] = {}
    for r in rows:
        panels.setdefault((r.task, r.train_max_length), []).append(r)
    cols = min(3, max(1, len(panels)))
    nrows = math.ceil(len(panels) / cols)
    labels = sorted({r.label for r in rows})
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.0 * cols + 3.2, 3.6 * nrows), squeeze=False, sharey=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    # One colour per label in every panel; past 10 labels tab10 would repeat colours.
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    color = {v: cmap(i % cmap.N) for i, v in enumerate(labels)}
    limits: dict[str, list[float]] = {}
    for ax, ((task, train_len), panel_rows) in zip(axes.flat, panels.items(), strict=False):
        metric = panel_rows[0].metric
        for r in panel_rows:
            lengths = sorted(n for n in r.per_length if r.per_length[n][0] is not None)
            mean = np.array([r.per_length[n][0] for n in lengths], float)
            std = np.array([r.per_length[n][1] or 0.0 for n in lengths], float)
            c = color[r.label]
            ax.plot(lengths, mean, marker="o", ms=3, color=c, label=f"{r.label} (n={r.n})")
            if r.n > 1:
                lo, hi = mean - std, mean + std
                if _is_fraction(metric):
                    lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
                ax.fill_between(lengths, lo, hi, color=c, alpha=0.15)
            limits.setdefault(metric, []).extend(mean[np.isfinite(mean)].tolist())
        ax.axvline(train_len, color="k", ls="--", lw=1)
        chance = panel_rows[0].chance
        if chance and _is_fraction(metric):
            ax.axhline(chance, color="grey", ls=":", lw=1)
        all_lengths = sorted({n for r in panel_rows for n in r.per_length})
        if len(all_lengths) > 1 and all_lengths[-1] / max(all_lengths[0], 1) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(all_lengths, [str(n) for n in all_lengths], fontsize=7)
        if metric in {"ppl", "bpc", "bpb"}:
            ax.set_yscale("log")
            # Plain numbers on the ticks: a perplexity axis spans less than a decade.
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(f"{task} (trained on <= {train_len})", fontsize=9)
        ax.set_xlabel("evaluation length (dashed: training length)", fontsize=8)
        ax.set_ylabel(metric + (" (dotted: chance)" if chance and _is_fraction(metric) else ""))
        ax.grid(alpha=0.3)
    for ax, (_, panel_rows) in zip(axes.flat, panels.items(), strict=False):
        metric = panel_rows[0].metric
        if _is_fraction(metric):
            ax.set_ylim(-0.02, 1.02)  # every accuracy panel on one scale
        elif limits.get(metric) and metric not in {"ppl", "bpc", "bpb"}:
            lo, hi = min(limits[metric]), max(limits[metric])
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    handles, names = [], []
    for ax in axes.flat[: len(panels)]:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_attention(
    weights: Mapping[int, np.ndarray],
    path: str | Path,
    *,
    title: str = "",
    tokens: Sequence[str] | None = None,
) -> Path:
    """Grid of attention maps: one row per layer, one column per head, on one colour scale
    (0 to the largest weight) with its colorbar; rows are queries, columns keys.

    weights: layer index -> array HLS (one example) or BHLS (the first example is drawn).
    tokens: optional labels of the L = S positions, drawn when there are few of them.
    """
    path = Path(path)
    layers = sorted(weights)
    maps = {i: np.asarray(weights[i], dtype=np.float32) for i in layers}
    maps = {i: (w[0] if w.ndim == 4 else w) for i, w in maps.items()}
    heads = max(w.shape[0] for w in maps.values())
    vmax = max(float(w.max()) for w in maps.values()) or 1.0
    fig, axes = plt.subplots(
        len(layers), heads, figsize=(1.9 * heads + 1.4, 1.9 * len(layers) + 0.8), squeeze=False
    )
    image = None
    labelled = tokens is not None and len(tokens) <= 24
    for row, layer in zip(axes, layers, strict=True):
        for h, ax in enumerate(row):
            if h >= maps[layer].shape[0]:
                ax.set_visible(False)
                continue
            L, S = maps[layer][h].shape
            image = ax.imshow(
                maps[layer][h], cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto",
                interpolation="nearest", extent=(-0.5, S - 0.5, L - 0.5, -0.5),
            )  # fmt: skip
            if labelled:
                ax.set_xticks(range(len(tokens)), tokens, fontsize=5, rotation=90)
                ax.set_yticks(range(len(tokens)), tokens, fontsize=5)
            else:
                ax.tick_params(labelsize=5)
            if layer == layers[0]:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {layer}\nquery position", fontsize=7)
            if layer == layers[-1]:
                ax.set_xlabel("key position", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    _save(fig, path)
    return path


def plot_grid(rows: Sequence[GridRow], path: str | Path) -> Path:
    """One heatmap per setting: the metric (mean over runs) by len a (rows, growing upwards)
    and len b (columns), on one 0..1 scale with its colorbar; cells are evenly spaced with the
    lengths as tick labels, the training region (both lengths <= the longest training length)
    is outlined, and values are written in the cells when the grid is small enough to read."""
    path = Path(path)
    cols = min(3, max(1, len(rows)))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols + 1.0, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    image = None
    for ax, r in zip(axes.flat, rows, strict=False):
        n = len(r.lengths)
        values = np.full((n, n), np.nan)
        for a, i in enumerate(r.lengths):
            for b, j in enumerate(r.lengths):
                mean = r.cells.get((i, j), (None, None))[0]
                values[a, b] = np.nan if mean is None else mean
        image = ax.imshow(
            values, origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
            interpolation="nearest",
        )  # fmt: skip
        ticks = [str(v) for v in r.lengths]
        ax.set_xticks(range(n), ticks, fontsize=6, rotation=90 if n > 12 else 0)
        ax.set_yticks(range(n), ticks, fontsize=6)
        inside = sum(v <= r.train_max_length for v in r.lengths)
        if inside:
            ax.add_patch(
                matplotlib.patches.Rectangle(
                    (-0.5, -0.5), inside, inside, fill=False, ec="white", lw=1.5, ls="--"
                )
            )
        if n <= 12:
            for a in range(n):
                for b in range(n):
                    if np.isfinite(values[a, b]):
                        ax.text(
                            b, a, f"{100 * values[a, b]:.0f}", ha="center", va="center",
                            fontsize=6, color="white" if values[a, b] < 0.6 else "black",
                        )  # fmt: skip
        ax.set_xlabel(r.axes[1], fontsize=8)
        ax.set_ylabel(r.axes[0], fontsize=8)
        ax.set_title(f"{r.task}: {r.label} (n={r.n})", fontsize=8)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(
            image, ax=axes.ravel().tolist(), shrink=0.8,
            label=f"{rows[0].metric} (dashed: trained lengths)",
        )  # fmt: skip
    _save(fig, path)
    return path
