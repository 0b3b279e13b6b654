"""A 2-process CPU run through `python -m experiments.multi --num_processes 2` (what
`./launch.sh multi 2 train ...` runs: jax.distributed on localhost, one CPU device per
process, each process feeding its half of every global batch) gives the losses of a
1-process run of the same config (to 1e-5), and finishes with the documented outputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import formal
from experiments import mesh as mesh_lib
from experiments import state as state_lib
from experiments import train

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"train.steps": 3, "train.log_every": 1, "eval.lengths": "4"}


def losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow  # ~27 s; CI's ./launch.sh test-cluster runs 2 jax.distributed ranks under srun
def test_two_processes_match_one(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.multi",
        "--num_processes=2",
        "--mode=train",
        "--",
        "--config=configs/formal.py:smoke=true",
        f"--workdir={tmp_path / 'two'}",
        *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert (two / "DONE").exists() and (two / "results.json").exists()

    np.testing.assert_allclose(losses(two), one_process_losses(), rtol=1e-5, atol=1e-5)


def one_process_losses() -> list[float]:
    """The same steps on one device, with the public pieces train.run is made of."""
    config = formal.get_config("smoke=true")
    config.train.mesh.data = 1
    mesh = mesh_lib.make_mesh(config)
    graphdef, state, tx = state_lib.init_train_state(config, mesh=mesh)
    step_fn = train.make_train_step(config, graphdef, tx)
    batches = train.host_batches(config, seed=config.seed, start=0)
    out = []
    for _, batch in zip(range(OVERRIDES["train.steps"]), batches, strict=False):
        state, metrics = step_fn(state, mesh_lib.shard_batch(batch, mesh))
        out.append(float(metrics["loss"]))
    return out
