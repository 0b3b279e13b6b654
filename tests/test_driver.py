"""Smoke tests of the experiment driver through its real entry point.

One tiny run (`baseline`, a subprocess of `python -m experiments.main` on one CPU device) is
trained once per module and shared: it is checked for the documented outputs, re-evaluated
with `--mode eval`, and is the reference for the kill-and-resume run (bit-identical
parameters and metrics rows). The (4, 2)-mesh run is in tests/test_sharding_driver.py, the
2-process run through experiments.multi in tests/test_multiprocess.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
TINY = [
    "--config",
    "configs/formal.py:smoke=true",
    f"--config.train.steps={STEPS}",
    "--config.train.ckpt_every=2",
    "--config.train.log_every=1",
    "--config.train.keep_checkpoints=2",
    "--config.train.mesh.data=1",
]
LENGTHS = "4,8,16"


def env_with_devices(n: int) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def main_cmd(workdir, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.main",
        *TINY,
        f"--workdir={workdir}",
        f"--lengths={LENGTHS}",
        *extra,
    ]


def run_main(cmd, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env=env_with_devices(1), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def reproducible(rs: list[dict]) -> list[dict]:
    from experiments.metrics import TIMING_KEYS

    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]


def final_params(workdir):
    from experiments import config_utils, state

    config = config_utils.load_json(str(Path(workdir) / "config.json"))
    mesh = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    _, train_state, step = state.load_state(config, str(workdir), mesh=mesh)
    return step, jax.tree.map(host, train_state)


def host(x) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("driver")


@pytest.fixture(scope="module")
def baseline(shared):
    workdir = shared / "baseline"
    run_main(main_cmd(workdir))
    return workdir


def test_train_writes_documented_outputs(baseline):
    wd = baseline
    for name in ("config.json", "metrics.jsonl", "results.json", "DONE"):
        assert (wd / name).is_file(), name
    assert any((wd / "tb").iterdir())
    assert json.loads((wd / "config.json").read_text())["train"]["steps"] == STEPS
    train_rows = [r for r in rows(wd) if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    for r in train_rows:
        assert {"loss", "token_acc", "seq_acc", "tokens_per_s", "lr"} <= set(r)
        assert np.isfinite(r["loss"])
    eval_rows = [r for r in rows(wd) if r["split"] == "eval"]
    assert [r["length"] for r in eval_rows] == [4, 8, 16]
    assert all(r["step"] == STEPS and "compile_s" in r for r in eval_rows)
    results = json.loads((wd / "results.json").read_text())
    assert results["step"] == STEPS and results["task"] == "reverse_string"
    assert results["train_max_length"] == 8
    assert set(results["per_length"]) == {"4", "8", "16"}
    for m in results["per_length"].values():
        assert {"loss", "token_acc", "seq_acc"} <= set(m) and 0 <= m["token_acc"] <= 1
    summary = results["summary"]
    assert summary["metric"] == "token_acc"
    ood = results["per_length"]["16"]["token_acc"]
    assert summary["ood_mean"] == pytest.approx(ood)
    id_values = [results["per_length"][n]["token_acc"] for n in ("4", "8")]
    assert summary["id_mean"] == pytest.approx(np.mean(id_values))


def eval_cmd(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "experiments.main", "--mode=eval", f"--workdir={workdir}", *extra]


def test_named_evaluations_are_kept_side_by_side(baseline, shared):
    final = (baseline / "results.json").read_bytes()
    for _ in range(2):  # the same evaluation again replaces its rows, never duplicates them
        out = run_main(eval_cmd(baseline, "--lengths=12"))
    (path,) = (baseline / "evals").glob("step12-*.json")
    name = path.stem
    results = json.loads(path.read_text())
    assert list(results["per_length"]) == ["12"] and results["step"] == STEPS
    assert results["eval"] == name and (baseline / "results.json").read_bytes() == final
    named = [r for r in rows(baseline) if r.get("eval") == name]
    assert [(r["step"], r["length"]) for r in named] == [(STEPS, 12)], out.stderr[-2000:]
    # Evaluation-time overrides of config.json, an earlier checkpoint, a chosen name.
    run_main(eval_cmd(baseline, "--step=10", "--name=small", "--config.eval.num_examples=4"))
    small = json.loads((baseline / "evals" / "small.json").read_text())
    assert small["step"] == 10 and small["overrides"] == {"eval.num_examples": 4}
    assert {m["num_examples"] for m in small["per_length"].values()} == {4}
    assert json.loads((baseline / "config.json").read_text())["eval"]["num_examples"] == 8


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=5", "config.train.steps: not an evaluation-time field"),
        ("model.d_model=32", "config.model.d_model: changes the model's parameters"),
        ("eval.lenghts=4", "config.eval.lenghts: no such field; fields of config.eval: "),
    ],
)
def test_evaluation_overrides_that_cannot_apply(baseline, override, message):
    from attn.registry import ConfigError
    from experiments import evaluate

    with pytest.raises(ConfigError) as e:
        evaluate.run(str(baseline), overrides=[override])
    assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ConfigError, match="^--name: 'final'"):
        evaluate.run(str(baseline), name="final")


def test_sigkill_then_resume_is_bit_identical(baseline, shared):
    workdir = shared / "killed"
    cmd = main_cmd(workdir)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env_with_devices(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    ckpts = workdir / "checkpoints"
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "DONE").exists()
    run_main(cmd)
    own = ("final", "periodic", None)  # rows of the run itself, not of later evaluations
    assert reproducible(rows(workdir)) == reproducible(
        [r for r in rows(baseline) if r.get("eval") in own]
    )
    step_a, a = final_params(baseline)
    step_b, b = final_params(workdir)
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
