"""Every config file in configs/ loads, validates and trains one step in smoke mode, and bad
configuration gives one line on stderr and exit status 2 before anything compiles.

The parametrisation is over the files in configs/, so configs added later are covered
without touching this file. A file's smoke arg is its `SMOKE_ARGS` ("smoke=true" by
convention); without one, its default config is shrunk with configs/base.py:shrink.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attn.registry import ConfigError
from experiments import mesh as mesh_lib
from experiments import state as state_lib
from experiments import train
from experiments.validate import validate

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_config(path: Path):
    from configs import base

    module = load(path)
    smoke = getattr(module, "SMOKE_ARGS", None)
    config = module.get_config(smoke)
    if smoke is None:
        base.shrink(config)
    config.train.mesh.data, config.train.mesh.model = 1, 1
    return config


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_loads_validates_and_steps(path, tmp_path):
    assert load(path).__doc__, f"{path.name} needs a docstring with its command and expectations"
    config = smoke_config(path)
    assert config.is_locked
    validate(config, workdir=str(tmp_path / "run"))
    mesh = mesh_lib.make_mesh(config)
    graphdef, state, tx = state_lib.init_train_state(config, mesh=mesh)
    batch = next(train.host_batches(config, seed=config.seed, start=0))
    step_fn = train.make_train_step(config, graphdef, tx)
    state, metrics = step_fn(state, mesh_lib.shard_batch(batch, mesh))
    assert int(state["step"]) == 1
    assert np.isfinite(float(metrics["loss"]))


def test_unknown_arg_key_is_a_config_error():
    from configs import formal

    with pytest.raises(ConfigError, match="unknown key 'pee'"):
        formal.get_config("pee=rope")


@pytest.mark.parametrize(
    "args, field",
    [
        (["--config=configs/formal.py:pe=rop"], "model.pe.name"),
        (["--config=configs/formal.py", "--config.model.pe.foo=3"], "config.model.pe.foo"),
        (["--config=configs/formal.py:smoke=true", "--config.model.num_kv_heads=3"], "num_kv"),
        (["--config=configs/missing.py"], "--config"),
    ],
)
def test_bad_config_exits_2_with_one_line(args, field, tmp_path):
    cmd = [sys.executable, "-m", "experiments.main", f"--workdir={tmp_path / 'w'}", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and field in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
