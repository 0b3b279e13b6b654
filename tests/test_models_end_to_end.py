"""Every model in attn.models.REGISTRY trains, evaluates and compares through the real entry
points (`python -m experiments.main`, then experiments.compare) at smoke sizes, so a model
that trains but cannot be evaluated (the recurrent baselines once crashed in the final
evaluation) fails here. The config is the family config of the model's batch layout."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import attn.models
from experiments import compare

REPO = Path(__file__).resolve().parents[1]
CONFIG_OF_LAYOUT = {
    "encoder": "configs/formal.py",
    "decoder": "configs/algorithmic.py",
    "seq2seq": "configs/seq2seq.py",
}
MODELS = sorted(attn.models.REGISTRY)


def _train(workdir: Path, name: str) -> subprocess.CompletedProcess:
    layout = attn.models.batch_format(name)
    cmd = [
        sys.executable,
        "-m",
        "experiments.main",
        f"--config={CONFIG_OF_LAYOUT[layout]}:model={name},smoke=true",
        f"--workdir={workdir / name}",
        "--lengths=4,16",
        "--config.eval.compilation_cache=",
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    with ThreadPoolExecutor(2) as pool:  # two processes at a time on the 2-core machine
        procs = dict(zip(MODELS, pool.map(lambda m: _train(root, m), MODELS), strict=True))
    return root, procs


@pytest.mark.parametrize("name", MODELS)
def test_model_trains_and_evaluates_through_the_entry_point(runs, name):
    root, procs = runs
    proc = procs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    # No start-up noise about accelerators this machine does not have.
    assert "Unable to initialize backend" not in proc.stderr
    workdir = root / name
    assert (workdir / "DONE").exists()
    results = json.loads((workdir / "results.json").read_text())
    assert sorted(results["per_length"]) == ["16", "4"]
    assert results["summary"]["id_mean"] is not None and results["summary"]["ood_mean"] is not None


def test_every_model_compares(runs, tmp_path):
    root, _ = runs
    report = compare.compare([root], tmp_path / "report")
    assert report["runs"] == len(MODELS)
    variants = {row.variant.split(":")[0] for row in report["rows"]}
    assert variants == set(MODELS)
    assert (tmp_path / "report" / "length_curves.png").stat().st_size > 1000
