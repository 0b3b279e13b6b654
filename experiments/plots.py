"""Plots of a comparison: metric against evaluation length, and attention maps.

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
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from experiments.compare import Row


def _save(fig, path: Path) -> None:
    """savefig to a temporary file, then rename: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_length_curves(rows: Sequence[Row], path: str | Path) -> Path:
    """One panel per task: metric vs evaluation length, a line and a ±std band per variant."""
    path = Path(path)
    tasks = list(dict.fromkeys(r.task for r in rows))
    cols = min(3, max(1, len(tasks)))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    # One colour per variant in every panel; past 10 variants tab10 would repeat colours.
    variants = sorted({r.variant for r in rows})
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    color = {v: cmap(i % cmap.N) for i, v in enumerate(variants)}
    for ax, task in zip(axes.flat, tasks, strict=False):
        task_rows = [r for r in rows if r.task == task]
        metric = task_rows[0].metric
        for r in task_rows:
            lengths = sorted(r.per_length)
            mean = np.array([r.per_length[n][0] for n in lengths])
            std = np.array([r.per_length[n][1] or 0.0 for n in lengths])
            c = color[r.variant]
            ax.plot(lengths, mean, marker="o", ms=3, color=c, label=f"{r.variant} (n={r.n})")
            if r.n > 1:
                ax.fill_between(lengths, mean - std, mean + std, color=c, alpha=0.15)
        train_len = max(r.train_max_length for r in task_rows)
        ax.axvline(train_len, color="k", ls="--", lw=1, label=f"train length {train_len}")
        all_lengths = sorted({n for r in task_rows for n in r.per_length})
        if len(all_lengths) > 1 and all_lengths[-1] / max(all_lengths[0], 1) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(all_lengths, [str(n) for n in all_lengths], fontsize=7)
        if metric in {"ppl", "bpc", "bpb"}:
            ax.set_yscale("log")
            # Plain numbers on the ticks: a perplexity axis spans less than a decade.
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(task)
        ax.set_xlabel("evaluation length")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
    """Grid of attention maps: one row per layer, one column per head.

    weights: layer index -> array HLS (one example) or BHLS (the first example is drawn).
    tokens: optional labels of the L = S positions, drawn when there are few of them.
    """
    path = Path(path)
    layers = sorted(weights)
    maps = {i: np.asarray(weights[i], dtype=np.float32) for i in layers}
    maps = {i: (w[0] if w.ndim == 4 else w) for i, w in maps.items()}
    heads = max(w.shape[0] for w in maps.values())
    fig, axes = plt.subplots(
        len(layers), heads, figsize=(1.9 * heads + 0.6, 1.9 * len(layers) + 0.6), squeeze=False
    )
    for row, layer in zip(axes, layers, strict=True):
        for h, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= maps[layer].shape[0]:
                ax.set_visible(False)
                continue
            ax.imshow(
                maps[layer][h], cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest"
            )
            if layer == layers[0]:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {layer}\nquery", fontsize=8)
            if tokens is not None and len(tokens) <= 24:
                ax.set_xticks(range(len(tokens)), tokens, fontsize=5, rotation=90)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return path
