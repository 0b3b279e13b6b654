"""Tests for experiments/compare.py on hand-made run directories (no training, no JAX)."""

import csv
import json

import matplotlib.image
import numpy as np
import pytest

from experiments import compare, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_LEN = 8
LENGTHS = (4, 8, 16, 32)


def _mean(values):
    return float(np.mean(values)) if values else None


def _write_run(
    path, *, task, variant, seed, acc_by_length, losses=(2.0, 1.5), config=None, name="final"
):
    path.mkdir(parents=True, exist_ok=True)
    per_length = {
        str(n): {"loss": 1.0 - a, "token_acc": a, "seq_acc": a / 2}
        for n, a in acc_by_length.items()
    }
    results = {
        "config": config or {},
        "task": task,
        "variant": variant,
        "seed": seed,
        "step": 100,
        "train_max_length": TRAIN_LEN,
        "per_length": per_length,
        "summary": {
            "id_mean": _mean([a for n, a in acc_by_length.items() if n <= TRAIN_LEN]),
            "ood_mean": _mean([a for n, a in acc_by_length.items() if n > TRAIN_LEN]),
            "metric": "token_acc",
        },
        "date": "",
    }
    file = path / ("results.json" if name == "final" else f"evals/{name}.json")
    file.parent.mkdir(exist_ok=True)
    file.write_text(json.dumps(results))
    rows = [{"step": i, "split": "train", "loss": loss} for i, loss in enumerate(losses)]
    rows.append({"step": 2, "split": "eval", "length": 4, "token_acc": 0.5})
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 3, "spl'  # torn last line
    (path / "metrics.jsonl").write_text(text)


@pytest.fixture
def runs(tmp_path):
    """2 tasks x 2 variants x 3 seeds (one variant of one task has 2), nested like sweeps."""
    rng = np.random.default_rng(0)
    truth = {}
    for task in ("parity_check", "reverse_string"):
        for variant in ("alibi", "rope"):
            seeds = (0, 1) if (task, variant) == ("reverse_string", "rope") else (0, 1, 2)
            for seed in seeds:
                accs = {n: float(rng.uniform(0.3, 1.0)) for n in LENGTHS}
                name = f"task={task},pe={variant},seed={seed}"
                _write_run(
                    tmp_path / "runs" / task / name,
                    task=task,
                    variant=variant,
                    seed=seed,
                    acc_by_length=accs,
                    losses=(2.0, 0.1 * (seed + 1)),
                )
                truth.setdefault((task, variant), []).append((name, accs, 0.1 * (seed + 1)))
    (tmp_path / "runs" / "not_a_run").mkdir()
    return tmp_path / "runs", truth


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_table_values_match_independent_statistics(runs, tmp_path, capsys):
    root, truth = runs
    out = tmp_path / "report"
    assert compare.main([str(root), "--out", str(out)]) == 0
    with open(out / "table.csv") as f:
        table = {(r["task"], r["variant"]): r for r in csv.DictReader(f)}
    assert set(table) == set(truth)
    for key, members in truth.items():
        ood = [np.mean([a[n] for n in LENGTHS if n > TRAIN_LEN]) for _, a, _ in members]
        ind = [np.mean([a[n] for n in LENGTHS if n <= TRAIN_LEN]) for _, a, _ in members]
        row = table[key]
        assert int(row["n"]) == len(members)
        assert float(row["ood_mean"]) == pytest.approx(sum(ood) / len(ood))
        assert float(row["ood_std"]) == pytest.approx(
            (sum((x - sum(ood) / len(ood)) ** 2 for x in ood) / (len(ood) - 1)) ** 0.5
        )
        assert float(row["id_mean"]) == pytest.approx(sum(ind) / len(ind))
        assert float(row["best_ood"]) == pytest.approx(max(ood))
        assert row["best_run"] == members[int(np.argmax(ood))][0]
        assert float(row["train_loss"]) == pytest.approx(np.mean([m[2] for m in members]))
        assert float(row["len_16_mean"]) == pytest.approx(np.mean([a[16] for _, a, _ in members]))
    md = (out / "table.md").read_text()
    assert "### parity_check" in md and "### reverse_string" in md
    row = table[("parity_check", "alibi")]
    assert f"{100 * float(row['ood_mean']):.1f} ± {100 * float(row['ood_std']):.1f}" in md
    ranks = {}
    for task in ("parity_check", "reverse_string"):
        order = sorted(("alibi", "rope"), key=lambda v: -float(table[(task, v)]["ood_mean"]))
        for rank, variant in enumerate(order, start=1):
            ranks.setdefault(variant, []).append(1 / rank)
    rows = compare.summarize([compare.load_run(p) for p in compare.find_runs([root])])
    mrr = {variant: value for variant, value, _ in compare.mean_reciprocal_rank(rows)}
    assert mrr == pytest.approx({v: np.mean(r) for v, r in ranks.items()})
    assert "Mean reciprocal rank" in md
    _png_ok(out / "length_curves.png")
    printed = capsys.readouterr().out
    assert "best on parity_check:" in printed and "best on reverse_string:" in printed


def test_scores_are_the_summary_evaluate_wrote(tmp_path):
    """compare ranks by each run's results.json summary (one definition of ID/OOD, in
    experiments.metrics), not by a second computation of its own."""
    run = tmp_path / "runs" / "a"
    _write_run(run, task="t", variant="v", seed=0, acc_by_length={4: 0.5, 16: 0.25})
    results = json.loads((run / "results.json").read_text())
    results["summary"]["ood_mean"] = 0.125  # what the run's own evaluation said
    (run / "results.json").write_text(json.dumps(results))
    (row,) = compare.summarize([compare.load_run(run)])
    assert row.ood_mean == 0.125 and row.id_mean == 0.5
    # Another metric than the summary's is scored by the same function evaluate uses.
    (row,) = compare.summarize([compare.load_run(run)], metric="loss")
    assert row.ood_mean == pytest.approx(0.75) and row.id_mean == pytest.approx(0.5)


def test_lower_is_better_metric_picks_the_minimum(runs, tmp_path):
    root, truth = runs
    report = compare.compare([root], tmp_path / "r", metric="loss")
    for row in report["rows"]:
        ood = [
            np.mean([1.0 - a[n] for n in LENGTHS if n > TRAIN_LEN])
            for _, a, _ in truth[(row.task, row.variant)]
        ]
        assert row.best_ood == pytest.approx(min(ood))
    first = {r.task: r for r in reversed(report["rows"])}
    for task, best in compare.best_per_task(report["rows"]).items():
        assert best.ood_mean <= first[task].ood_mean


def test_tied_scores_share_a_rank(tmp_path):
    for variant, accs in (
        ("a", {4: 0.9, 16: 0.0}),
        ("b", {4: 0.5, 16: 0.0}),
        ("c", {4: 1.0, 16: 0.2}),
    ):
        _write_run(tmp_path / variant, task="t", variant=variant, seed=0, acc_by_length=accs)
    for variant, accs in (
        ("a", {4: 0.9, 16: 0.3}),
        ("b", {4: 0.5, 16: 0.1}),
        ("c", {4: 1.0, 16: 0.2}),
    ):
        _write_run(tmp_path / f"u{variant}", task="u", variant=variant, seed=0, acc_by_length=accs)
    rows = compare.compare([tmp_path], tmp_path / "r")["rows"]
    assert [r.variant for r in rows if r.task == "t"] == ["c", "a", "b"]  # tie: better ID first
    mrr = {v: m for v, m, _ in compare.mean_reciprocal_rank(rows)}
    assert mrr == pytest.approx(
        {"a": (1 / 2 + 1) / 2, "b": (1 / 2 + 1 / 3) / 2, "c": (1 + 1 / 2) / 2}
    )


def test_single_run_has_no_std_and_missing_runs_fail_cleanly(tmp_path, capsys):
    _write_run(
        tmp_path / "one", task="copy", variant="none", seed=0, acc_by_length={4: 1.0, 16: 0.25}
    )
    report = compare.compare([tmp_path / "one"], tmp_path / "r")
    (row,) = report["rows"]
    assert (row.n, row.ood_std, row.ood_mean, row.id_mean) == (1, None, 0.25, 1.0)
    assert "| none | 1 | 100 | 100.0 | 25.0 |" in (tmp_path / "r" / "table.md").read_text()
    assert compare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "r2")]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_plot_attention_on_arrays(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 6, 6))
    weights = {i: np.exp(logits[i]) / np.exp(logits[i]).sum(-1, keepdims=True) for i in range(2)}
    weights[1] = weights[1][None]  # BHLS is accepted too
    path = plots.plot_attention(
        weights, tmp_path / "attention_x.png", title="x", tokens=list("abcdef")
    )
    _png_ok(path)


def _capture_figures(monkeypatch):
    """The matplotlib figures the plots would save, kept open for inspection."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path.touch())
    return figures


def test_runs_that_differ_beyond_the_seed_are_separate_rows_unless_pooled(tmp_path, capsys):
    for lr, seed, acc in ((1e-3, 0, 0.9), (1e-3, 1, 0.7), (3e-4, 0, 0.2)):
        config = {"task": {"name": "t"}, "train": {"optimizer": {"lr": lr}, "steps": 100}}
        _write_run(
            tmp_path / f"lr={lr},seed={seed}",
            task="t",
            variant="rope",
            seed=seed,
            acc_by_length={4: 1.0, 16: acc},
            config={**config, "seed": seed},
        )
    rows = compare.compare([tmp_path], tmp_path / "r")["rows"]
    assert [(r.label, r.n) for r in rows] == [
        ("rope [train.optimizer.lr=0.001]", 2),
        ("rope [train.optimizer.lr=0.0003]", 1),
    ]
    assert rows[0].ood_mean == pytest.approx(0.8) and rows[0].pooled == ()
    pooled = compare.compare([tmp_path], tmp_path / "p", pool=["train.optimizer.lr"])["rows"]
    assert [(r.label, r.n, r.pooled) for r in pooled] == [("rope", 3, ("train.optimizer.lr",))]
    assert "Pooled over train.optimizer.lr" in (tmp_path / "p" / "table.md").read_text()


def test_training_lengths_steps_chance_and_train_loss_tail(tmp_path):
    for train_len, steps in ((8, 30), (16, 1500)):
        config = {"task": {"name": "parity_check"}, "train": {"steps": steps}}
        path = tmp_path / f"len{train_len}"
        _write_run(
            path,
            task="parity_check",
            variant="rope",
            seed=0,
            acc_by_length={4: 1.0, 32: 0.5},
            losses=[5.0] * 18 + [1.0, 3.0],
            config=config,
        )
        results = json.loads((path / "results.json").read_text())
        results["train_max_length"], results["step"] = train_len, steps
        (path / "results.json").write_text(json.dumps(results))
    report = compare.compare([tmp_path], tmp_path / "r")
    assert [(r.train_max_length, r.steps) for r in report["rows"]] == [(8, (30,)), (16, (1500,))]
    table = (tmp_path / "r" / "table.md").read_text()
    # One table per training length, each with its own bold columns and the chance level.
    assert "### parity_check: token_acc (%), trained on lengths <= 8, chance 50.0, higher" in table
    assert "### parity_check: token_acc (%), trained on lengths <= 16, chance 50.0," in table
    # The train loss is the mean of the last tenth of training (2 of 20 rows), not the last row.
    assert report["rows"][0].train_loss == pytest.approx(2.0)


def test_diverged_and_unreadable_runs_do_not_stop_the_comparison(tmp_path, capsys):
    _write_run(tmp_path / "ok", task="t", variant="a", seed=0, acc_by_length={4: 1.0, 16: 0.5})
    _write_run(tmp_path / "nan", task="t", variant="a", seed=1, acc_by_length={4: 1.0, 16: 0.1})
    results = json.loads((tmp_path / "nan" / "results.json").read_text())
    results["per_length"]["16"]["token_acc"] = None  # written as null when not finite
    (tmp_path / "nan" / "results.json").write_text(json.dumps(results))
    (tmp_path / "nan" / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": null}\n')
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "results.json").write_text('{"task": "t", "per_len')
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert f"compare: skipped {tmp_path / 'torn' / 'results.json'}: not a readable" in captured.err
    (row,) = compare.load_all([tmp_path])[0] and compare.summarize(compare.load_all([tmp_path])[0])
    assert (row.n, row.diverged, row.ood_mean) == (2, 1, 0.5)
    assert "| a | 2 (1 diverged) |" in captured.out


def test_no_best_variant_when_every_row_ties(tmp_path, capsys):
    for variant in ("a", "b"):
        _write_run(tmp_path / variant, task="t", variant=variant, seed=0, acc_by_length={16: 0.0})
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    assert "best on t: none (every row scores the same)" in capsys.readouterr().out


def test_a_named_evaluation_is_compared_on_request(tmp_path):
    _write_run(tmp_path / "run", task="t", variant="a", seed=0, acc_by_length={4: 1.0, 16: 0.5})
    _write_run(
        tmp_path / "run", task="t", variant="a", seed=0, acc_by_length={64: 0.3}, name="ntk4"
    )
    (row,) = compare.compare([tmp_path], tmp_path / "r", eval_name="ntk4")["rows"]
    assert list(row.per_length) == [64] and row.ood_mean == pytest.approx(0.3)
    with pytest.raises(compare.CompareError, match="no run directories"):
        compare.compare([tmp_path], tmp_path / "r", eval_name="missing")


def test_load_runs_is_a_dataframe_of_configs_and_metrics(runs):
    root, truth = runs
    frame = compare.load_runs([root])
    assert len(frame) == sum(len(v) for v in truth.values()) * len(LENGTHS)
    assert {"path", "task", "variant", "seed", "length", "ood", "token_acc"} <= set(frame.columns)
    one = frame[(frame.task == "parity_check") & (frame.variant == "alibi") & (frame.seed == 0)]
    name, accs, _ = truth[("parity_check", "alibi")][0]
    assert dict(zip(one.length, one.token_acc, strict=True)) == pytest.approx(accs)


def test_length_curves_stay_readable_with_twelve_variants(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    for i in range(12):
        for seed, acc in ((0, 0.1), (1, 0.95)):  # a std band that would cross 0 and 1
            _write_run(
                tmp_path / f"v{i},seed={seed}",
                task="t",
                variant=f"v{i}",
                seed=seed,
                acc_by_length={4: acc, 16: acc},
            )
    compare.compare([tmp_path], tmp_path / "r")
    (fig,) = figures
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert ax.get_legend() is None and len(fig.legends) == 1  # the legend is outside the panel
    assert len(fig.legends[0].get_texts()) == 12
    assert ax.get_ylim() == pytest.approx((-0.02, 1.02))
    for band in ax.collections:
        ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
        assert ys.min() >= 0.0 and ys.max() <= 1.0


def test_attention_maps_have_a_colorbar_and_labelled_axes(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    weights = {0: np.full((2, 5, 5), 0.2), 1: np.full((2, 5, 5), 0.2)}
    plots.plot_attention(weights, tmp_path / "a.png", title="run, 5 tokens")
    (fig,) = figures
    maps = [a for a in fig.axes if a.get_images()]
    assert len(maps) == 4 and len(fig.axes) == 5  # 2 layers x 2 heads + the colorbar
    assert maps[0].get_ylabel() == "layer 0\nquery position"
    assert maps[-1].get_xlabel() == "key position"
