"""A workdir is one run: re-running it with another config is refused before anything is
written, fields that may change on resume (more steps, evaluation settings) are accepted and
recorded, a run cannot be shortened below its checkpoint, and a finished run re-run unchanged
does nothing but say where its results are."""

import json
import logging

import pytest

from attn.registry import ConfigError
from configs import formal
from experiments import train


def smoke(steps=3, **fields):
    config = formal.get_config("smoke=true")
    config.train.steps = steps
    config.eval.lengths = "4"
    config.eval.compilation_cache = ""
    for path, value in fields.items():
        node = config
        *parents, key = path.split(".")
        for p in parents:
            node = node[p]
        node[key] = value
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("identity") / "run"
    train.run(smoke(), str(workdir))
    return workdir


def _snapshot(workdir):
    return {
        name: (workdir / name).read_bytes()
        for name in ("config.json", "metrics.jsonl", "results.json", "DONE")
    }


def test_another_config_is_refused_before_anything_is_written(finished):
    before = _snapshot(finished)
    config = formal.get_config("smoke=true,pe=alibi")
    config.train.steps, config.eval.lengths = 3, "4"
    with pytest.raises(ConfigError) as e:
        train.run(config, str(finished))
    message = str(e.value)
    assert message.startswith(f"--workdir: {finished} holds a run of another config: ")
    assert "model.pe.name 'sinusoidal' -> 'alibi'" in message and "\n" not in message
    assert _snapshot(finished) == before


def test_finished_run_rerun_unchanged_only_says_where_its_results_are(finished, capsys):
    before = _snapshot(finished)
    results = train.run(smoke(), str(finished))
    assert results["step"] == 3
    assert f"{finished} is finished (step 3); results: {finished / 'results.json'}" in (
        capsys.readouterr().out
    )
    assert _snapshot(finished) == before


def test_more_steps_resume_and_are_recorded(tmp_path):
    workdir = tmp_path / "run"
    train.run(smoke(steps=2), str(workdir))
    results = train.run(smoke(steps=4), str(workdir))
    assert results["step"] == 4
    (change,) = [json.loads(x) for x in (workdir / "config_changes.jsonl").read_text().splitlines()]
    assert change["changes"] == {"train.steps": [2, 4]}
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 4
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    # A run cannot be shortened below its checkpoint.
    with pytest.raises(ConfigError, match=r"^train.steps: 3 is below the step of the run's"):
        train.run(smoke(steps=3), str(workdir))


def test_unreadable_config_json_is_one_line_naming_the_file(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"model": ')
    with pytest.raises(ConfigError, match=rf"^{workdir / 'config.json'}: not a readable config"):
        train.run(smoke(), str(workdir))


def test_evaluation_time_is_estimated_before_the_grid_runs(finished, caplog):
    from experiments import evaluate

    caplog.set_level(logging.INFO, logger="attn.evaluate")
    evaluate.run(str(finished), lengths=[4, 8], name="estimate")
    lines = [r.getMessage() for r in caplog.records if r.name == "attn.evaluate"]
    first = next(i for i, line in enumerate(lines) if line.startswith("evaluation at lengths"))
    assert lines[first].startswith("evaluation at lengths 4,8: 2 batches of <= 8, estimated ")
    assert all(not line.startswith("eval step") for line in lines[:first])
