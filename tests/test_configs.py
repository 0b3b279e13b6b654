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
# Step the same long_addition decoder as abacus.py and frontier.py: ~6 s each, run with -m slow.
SLOW_CONFIGS = {"index_hints.py", "position_coupling.py"}


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


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_CONFIGS else p
        for p in CONFIG_FILES
    ],
    ids=lambda p: p.name,
)
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


def _reconciled(arg: str, *overrides: str):
    from configs import formal
    from experiments import config_utils

    config = formal.get_config(arg)
    argv = [f"--config.{o}" for o in overrides]
    with config.unlocked():
        for o in overrides:
            path, value = o.split("=", 1)
            node = config
            *parents, key = path.split(".")
            for p in parents:
                node = node[p]
            node[key] = type(node[key])(value) if node[key] is not None else value
    return config_utils.reconcile_blocks(config, argv)


def test_config_arg_swaps_a_block_with_that_entrys_defaults():
    from configs import formal

    config = formal.get_config("smoke=true,optimizer=adamw,schedule=cosine")
    assert config.train.optimizer.to_dict() == {
        "name": "adamw",
        "lr": 3e-4,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.01,
    }
    assert config.train.schedule.to_dict() == {"name": "cosine", "warmup": 0, "min_ratio": 0.0}


def test_name_override_rebuilds_the_block_from_the_new_entry():
    # rsqrt shares constant's only field (warmup) but not its default: 1000, not 0.
    config = _reconciled("smoke=true", "train.schedule.name=rsqrt")
    assert config.train.schedule.to_dict() == {"name": "rsqrt", "warmup": 1000}
    config = _reconciled("smoke=true", "train.schedule.name=rsqrt", "train.schedule.warmup=7")
    assert config.train.schedule.warmup == 7
    config = _reconciled("smoke=true", "train.optimizer.name=sgd", "train.optimizer.lr=0.5")
    assert config.train.optimizer.to_dict() == {
        "name": "sgd",
        "lr": 0.5,
        "momentum": 0.9,
        "nesterov": False,
    }
    config = _reconciled("smoke=true", "model.pe.name=alibi")
    assert config.model.pe.to_dict() == {"name": "alibi", "bidirectional_offset": 0.5}
    assert config.is_locked
    with pytest.raises(ConfigError, match=r"^train.optimizer.b1: unknown field for 'sgd'; allowed"):
        _reconciled("smoke=true", "train.optimizer.name=sgd", "train.optimizer.b1=0.5")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.train.schedule.name=cosine", "--config.train.schedule.min_ratio=0.1"],
            "config.train.schedule.min_ratio: no such field; fields of config.train.schedule: "
            "name, warmup (those of 'constant'); another entry's fields come with the config "
            "arg, e.g. configs/formal.py:schedule=NAME",
        ),
        (
            ["--config.train.optimizer.name=sgd", "--config.train.optimizer.b1=0.5"],
            "train.optimizer.b1: unknown field for 'sgd'; allowed: lr, momentum, nesterov",
        ),
    ],
)
def test_block_switch_errors_name_the_entrys_fields(args, message, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.main",
        "--config=configs/formal.py:smoke=true",
        f"--workdir={tmp_path / 'w'}",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"
