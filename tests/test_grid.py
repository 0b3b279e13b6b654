"""The 2-D operand-length evaluation (experiments/grid.py) and its tables and heatmap (compare
--grid): a smoke run of the position-coupling config evaluated on a grid, its diagonal equal to
the length evaluation, compare evaluating a run without a grid, and the tables of hand-made
grids (means and standard deviations over seeds, the in-distribution cells)."""

import json
from pathlib import Path

import numpy as np
import pytest

from configs import position_coupling
from experiments import compare, grid, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("grid") / "coupled"
    config = position_coupling.get_config("smoke=true")
    config.eval.lengths = "3,5"
    config.eval.num_examples = 6
    config.task.grid_lengths = (1, 3, 5)
    config.train.mesh.data = 1
    train.run(config, str(workdir))
    return workdir


def test_grid_run_writes_cells_rows_and_matches_the_length_evaluation(run_dir):
    result = grid.run(str(run_dir), num_examples=6)
    assert result["axes"] == ["digits of a", "digits of b"] and result["lengths"] == [1, 3, 5]
    cells = {(c["len_a"], c["len_b"]): c for c in result["cells"]}
    assert set(cells) == {(i, j) for i in (1, 3, 5) for j in (1, 3, 5)}
    assert all(c["num_examples"] == 6 and 0 <= c["seq_acc"] <= 1 for c in cells.values())
    # the diagonal cell (n, n) holds the evaluation set of nominal length n
    final = json.loads((run_dir / "results.json").read_text())["per_length"]
    for n in (3, 5):
        for metric in ("seq_acc", "token_acc", "loss"):
            assert cells[(n, n)][metric] == pytest.approx(final[str(n)][metric], abs=1e-6)
    saved = json.loads((run_dir / "grid.json").read_text())
    assert saved["summary"]["metric"] == "seq_acc" and saved["step"] == result["step"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    grid_rows = [r for r in rows if r["split"] == "grid"]
    assert len(grid_rows) == 9 and {(r["len_a"], r["len_b"]) for r in grid_rows} == set(cells)
    grid.run(str(run_dir), num_examples=6, lengths=[1, 3])  # again: earlier rows replaced
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["split"] == "grid"]) == 4


def test_compare_grid_evaluates_missing_grids_and_writes_tables(run_dir, tmp_path, capsys):
    (run_dir / "grid.json").unlink(missing_ok=True)
    out = tmp_path / "report"
    code = compare.main(
        [str(run_dir), "--out", str(out), "--grid", "--grid_lengths", "1,2", "--grid_examples", "3"]
    )
    assert code == 0, capsys.readouterr().err
    assert (run_dir / "grid.json").exists()
    table = (out / "grid.md").read_text()
    assert "digits of a \\ digits of b | 1 | 2 |" in table
    lines = (out / "grid.csv").read_text().splitlines()
    assert lines[0].startswith("task,label,metric,axis_a,axis_b,len_a,len_b,in_distribution")
    assert len(lines) == 1 + 4
    assert (out / "grid_heatmaps.png").stat().st_size > 1000
    assert "evaluated the grid of" in capsys.readouterr().err


def test_grid_of_a_one_length_task_is_one_line(tmp_path, capsys):
    from configs import algorithmic
    from experiments import config_utils

    workdir = tmp_path / "run"
    workdir.mkdir()
    config = algorithmic.get_config("task=copy,smoke=true")
    (workdir / "config.json").write_text(config_utils.to_json(config))
    assert grid.main(["--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task.name: 'copy' has one length; the 2-D evaluation takes")
    assert "\n" not in err


def _grid_run(seed, values, train_max=2):
    lengths = (1, 2, 4)
    cells = {(i, j): values[a][b] for a, i in enumerate(lengths) for b, j in enumerate(lengths)}
    return grid.GridRun(
        path=Path(f"/runs/s{seed}"),
        task="long_addition",
        variant="decoder:coupled",
        seed=seed,
        step=10,
        train_max_length=train_max,
        axes=("digits of a", "digits of b"),
        lengths=lengths,
        cells=cells,
        settings={"task.name": "long_addition"},
    )


def test_grid_tables_average_seeds_and_mark_training_cells(tmp_path):
    a = np.array([[1.0, 1.0, 0.5], [1.0, 0.75, 0.0], [0.25, 0.0, 0.0]])
    b = np.array([[1.0, 0.5, 0.5], [1.0, 0.25, 0.0], [0.75, 0.0, 0.0]])
    rows = grid.summarize_grids([_grid_run(0, a), _grid_run(1, b)])
    assert len(rows) == 1 and rows[0].n == 2
    mean, std = rows[0].cells[(2, 2)]
    assert mean == pytest.approx(0.5) and std == pytest.approx(np.std([0.75, 0.25], ddof=1))
    table = grid.grid_markdown(rows)
    assert "| 1 | **100.0** | **75.0** | 50.0 |" in table  # in distribution: both <= 2
    assert "| 4 | 50.0 | 0.0 | 0.0 |" in table
    csv_lines = grid.grid_csv(rows).splitlines()
    assert "long_addition,decoder:coupled,seq_acc,digits of a,digits of b,2,2,1,0.5," in (
        "\n".join(csv_lines)
    )
    lengths = (1, 2, 4)
    cells = [
        {"len_a": i, "len_b": j, "seq_acc": float(a[x, y])}
        for x, i in enumerate(lengths)
        for y, j in enumerate(lengths)
    ]
    summary = grid.summarize(cells, train_max_length=2)
    assert summary["id_mean"] == pytest.approx(0.9375)  # (1,1) (1,2) (2,1) (2,2)
    assert summary["ood_mean"] == pytest.approx(0.15)
    path = grid.plots.plot_grid(rows, tmp_path / "h.png")
    assert path.stat().st_size > 1000
