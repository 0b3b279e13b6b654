"""Claims checked on comparisons (experiments/claims.py) and `./launch.sh reproduce` end to end
on a tiny reproduction (experiments/reproduce.py)."""

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from experiments import claims, compare, reproduce

REPO = Path(__file__).resolve().parents[1]


def _run(path, *, task, pe, sampler="identity", seed=0, per_length, metric="token_acc"):
    path.mkdir(parents=True)
    train_len = 8
    results = {
        "config": {"model": {"pe": {"name": pe}, "positions": {"name": sampler}}, "seed": seed},
        "task": task,
        "variant": f"encoder:{pe}/{sampler}",
        "seed": seed,
        "step": 10,
        "train_max_length": train_len,
        "per_length": {str(n): {metric: v} for n, v in per_length.items()},
        "summary": {
            "id_mean": sum(v for n, v in per_length.items() if n <= train_len)
            / max(1, sum(n <= train_len for n in per_length)),
            "ood_mean": sum(v for n, v in per_length.items() if n > train_len)
            / max(1, sum(n > train_len for n in per_length)),
            "metric": metric,
        },
    }
    (path / "results.json").write_text(json.dumps(results))


@pytest.fixture
def rows(tmp_path):
    grid = {
        ("t1", "alibi", "identity"): {8: 1.0, 32: 0.6, 128: 0.5},
        ("t1", "rope", "identity"): {8: 0.9, 32: 0.3, 128: 0.2},
        ("t1", "rope", "randomized"): {8: 0.8, 32: 0.7, 128: 0.6},
        ("t2", "alibi", "identity"): {8: 1.0, 32: 0.4, 128: 0.4},
        ("t2", "rope", "identity"): {8: 1.0, 32: 0.5, 128: 0.1},
        ("t2", "rope", "randomized"): {8: 0.95, 32: 0.5, 128: 0.5},
    }
    for (task, pe, sampler), per_length in grid.items():
        _run(tmp_path / f"{task}-{pe}-{sampler}", task=task, pe=pe, sampler=sampler,
             per_length=per_length)  # fmt: skip
    return compare.summarize(compare.load_all([tmp_path])[0])


def test_claims_measure_what_they_say(rows):
    r = claims.ratio("x", "p", pe="alibi", metric="token_acc", at="16x", over="1x", above=0.4)
    out = r.evaluate(rows)
    assert out["figure"] == pytest.approx((0.5 / 1.0 + 0.4 / 1.0) / 2) and out["holds"] is True
    b = claims.better("x", "p", a={"pe": "alibi"}, b={"pe": "rope", "sampler": "identity"},
                      metric="token_acc")  # fmt: skip
    # OOD means: t1 alibi 0.55 vs rope 0.25; t2 0.4 vs 0.3 -> margins 0.3 and 0.1.
    out = b.evaluate(rows)
    assert out["figure"] == pytest.approx(0.2) and out["holds"] is True
    g = claims.mean_gain("x", "p", a={"sampler": "randomized"}, b={"sampler": "identity"},
                         metric="token_acc", at_least=0.1)  # fmt: skip
    out = g.evaluate(rows)  # randomized (0.65 + 0.5) / 2 - identity (0.55 + 0.25 + 0.4 + 0.3) / 4
    assert out["figure"] == pytest.approx(0.575 - 0.375) and out["holds"] is True
    f = claims.fits("x", "p", metric="token_acc", at_least=0.85).evaluate(rows)
    assert f["figure"] == pytest.approx(0.8) and f["holds"] is False
    # OOD ranks per task: rope/randomized 1st, alibi 2nd, rope/identity 3rd on both tasks.
    m = claims.top_by_mrr("x", "p", expected=("alibi",), k=1).evaluate(rows)
    assert m["figure"] == 2.0 and m["holds"] is False
    assert m["detail"] == "MRR order: rope > alibi > rope"
    assert claims.top_by_mrr("x", "p", expected=("alibi",), k=2).evaluate(rows)["holds"] is True
    f = claims.fits("x", "p", metric="token_acc", at_least=0.95, rows_of={"pe": "alibi"})
    assert f.evaluate(rows)["figure"] == pytest.approx(1.0)
    # rope/randomized at 4x the training length (32): 0.7 on t1, 0.5 on t2.
    at = claims.reaches("x", "p", rows_of={"sampler": "randomized"}, metric="token_acc",
                        at="4x", at_least=0.6)  # fmt: skip
    out = at.evaluate(rows)
    assert out["figure"] == pytest.approx(0.6) and out["holds"] is True


def test_rows_are_chosen_by_any_config_field(rows):
    chosen = claims.select(rows, **{"model.positions.name": "randomized"})
    assert sorted(r.task for r in chosen) == ["t1", "t2"]
    with pytest.raises(LookupError, match="no row with pe='rope', task.index_hints=True"):
        claims.select(rows, pe="rope", **{"task.index_hints": True})


def test_a_claim_whose_rows_were_not_run_is_not_measured(rows):
    out = claims.better("x", "p", a={"pe": "t5"}, b={"pe": "rope"}, metric="token_acc")
    result = out.evaluate(rows)
    assert result["holds"] is None and result["detail"].startswith("not measured: no row")


_TINY = textwrap.dedent(
    """
    \"\"\"Tiny reproduction for tests: two encodings of the smoke formal config.\"\"\"
    from configs import formal
    from experiments import claims

    def get_config(arg=None):
        config = formal.get_config("smoke=true")
        config.eval.lengths = "4,8,16"
        config.eval.compilation_cache = ""
        config.train.mesh.data = 1
        return config

    def get_sweep(arg=None):
        return {"pe": ["alibi", "rope"]}

    CLAIMS_METRIC = ("token_acc", "loss")  # the table's metric, then one more for claims

    def get_claims(arg=None):
        return [
            claims.fits("fits", "paper", metric="token_acc", at_least=0.0),
            claims.fits("fits perfectly", "paper", metric="token_acc", at_least=1.01),
            claims.fits("has a loss", "paper", metric="loss", at_least=0.0),
        ]
    """
)


def test_reproduce_runs_compares_checks_and_writes_results(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text(_TINY)
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)
    assert reproduce.main(["tiny", "--parallel", "2"]) == 0
    out = capsys.readouterr().out
    assert "[holds] fits:" in out and "[does not hold] fits perfectly:" in out
    assert "[holds] has a loss: lowest ID mean" in out  # rows of the second metric were made
    assert "reproduce tiny: 2 of 3 claims hold" in out
    record = json.loads((tmp_path / "reports" / "tiny" / "claims.json").read_text())
    assert record["held"] == 2 and record["total"] == 3 and record["runs"] == 2
    assert "token_acc" in (tmp_path / "reports" / "tiny" / "table.md").read_text()
    assert record["command"] == "./launch.sh reproduce tiny --parallel 2"
    assert "claims hold" in (tmp_path / "reports" / "tiny" / "claims.md").read_text()
    assert reproduce.main(["--results"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## tiny: 2 of 3 claims hold" in text and "### t" not in text[:10]
    assert (tmp_path / "results" / "tiny_length_curves.png").exists()
    shutil.rmtree(tmp_path / "runs")


def test_reproduce_of_an_unknown_name_is_one_line(capsys):
    assert reproduce.main(["nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reproduce: NAME: no reproduction 'nope'; reproductions: ")
    assert "press" in err and "deletang" in err
