"""Optional Weights & Biases logging in MetricsWriter: off unless ATTN_WANDB_PROJECT is set,
one warning line when it is set and wandb is missing, and (with a stand-in wandb module) the
rows a run logs, under one W&B run per workdir that a resumed run continues."""

import importlib.util
import json
import logging
import sys
import types

import pytest

from experiments import metrics

ROW = {"step": 3, "split": "train", "length": None, "loss": 0.5, "token_acc": 0.25}
EVAL = {"step": 3, "split": "eval", "length": 16, "loss": 0.75, "seq_acc": 0.0}


def _rows(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_off_unless_configured(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.WANDB_ENV, raising=False)
    with metrics.MetricsWriter(str(tmp_path)) as writer:
        writer.row(ROW)
        assert writer._wandb_queue is None and "W&B" not in writer.failed
    assert _rows(tmp_path) == [ROW]


def test_configured_but_missing_is_one_line(tmp_path, monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    monkeypatch.setenv(metrics.WANDB_ENV, "attn-test")
    with caplog.at_level(logging.WARNING, logger="attn.metrics"):
        with metrics.MetricsWriter(str(tmp_path)) as writer:
            writer.row(ROW)
            writer.row(EVAL)
    lines = [r.getMessage() for r in caplog.records if r.name == "attn.metrics"]
    assert lines == [
        "ATTN_WANDB_PROJECT=attn-test is set but wandb is not installed (.venv/bin/pip install "
        "-e '.[wandb]'); logging to metrics.jsonl and TensorBoard only"
    ]
    assert _rows(tmp_path) == [ROW, EVAL]


class FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def define_metric(self, name, **kwargs):
        self.calls.append(("define_metric", name, kwargs))

    def log(self, row):
        self.calls.append(("log", row))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: FakeRun(calls, **kwargs)
    monkeypatch.setitem(sys.modules, "wandb", module)
    real = importlib.util.find_spec
    spec = importlib.util.spec_from_loader("wandb", loader=None)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "wandb" else real(name, *a)
    )
    monkeypatch.setenv(metrics.WANDB_ENV, "attn-test")
    return calls


def test_rows_go_to_one_wandb_run_per_workdir(tmp_path, fake_wandb):
    workdir = tmp_path / "sweep" / "pe=alibi,seed=0"
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"model": {"pe": {"name": "alibi"}}}))
    for _ in range(2):  # a run, then the same run resumed
        with metrics.MetricsWriter(str(workdir)) as writer:
            writer.row(ROW)
            writer.row(EVAL)
    inits = [c[1] for c in fake_wandb if c[0] == "init"]
    assert len(inits) == 2 and inits[0] == inits[1]
    assert inits[0]["project"] == "attn-test" and inits[0]["resume"] == "allow"
    assert inits[0]["name"] == "pe=alibi,seed=0" and inits[0]["group"] == "sweep"
    assert inits[0]["config"] == {"model": {"pe": {"name": "alibi"}}}
    logged = [c[1] for c in fake_wandb if c[0] == "log"]
    assert logged[:2] == [
        {"step": 3, "train/loss": 0.5, "train/token_acc": 0.25},
        {"step": 3, "eval/16/loss": 0.75, "eval/16/seq_acc": 0.0},
    ]
    assert ("define_metric", "*", {"step_metric": "step"}) in fake_wandb
    assert sum(c[0] == "finish" for c in fake_wandb) == 2
