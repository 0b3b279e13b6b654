"""Sweeps of real (smoke-sized) runs: SIGTERM reaches every running point, which saves and is
recorded as stopped; a second sweep on the same workdir is refused; re-running with changed
overrides names the points whose runs differ, and more steps re-run the finished points."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

_CONFIG = textwrap.dedent(
    """
    \"\"\"Test sweep: the smoke formal config over two seeds.\"\"\"
    from configs import formal

    def get_config(arg=None):
        config = formal.get_config("smoke=true")
        config.eval.lengths = "4"
        config.eval.compilation_cache = ""
        config.train.mesh.data = 1
        return config

    def get_sweep():
        return {"seed": [0, 1]}
    """
)


def _env() -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _sweep(tmp_path: Path, *flags: str) -> list[str]:
    config = tmp_path / "sweep_config.py"
    config.write_text(_CONFIG)
    return [
        PY, "-m", "experiments.sweep", "--config", str(config),
        "--workdir", str(tmp_path / "sweep"), "--parallel", "2", *flags,
    ]  # fmt: skip


def _status(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "sweep" / "sweep_status.json").read_text())


def _train_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return max((r["step"] for r in rows if r.get("split") == "train"), default=0)


def test_sigterm_reaches_every_point_which_saves_and_is_recorded(tmp_path):
    cmd = _sweep(tmp_path, "--config.train.steps=100000", "--config.train.ckpt_every=100000")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    points = [tmp_path / "sweep" / f"seed={s}" for s in (0, 1)]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all(_train_steps(p) >= 2 for p in points):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    # A second sweep on the same workdir is refused while the first holds it.
    second = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert second.stderr.strip().startswith(f"sweep: workdir {tmp_path / 'sweep'} is in use by")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, out
    status = _status(tmp_path)
    assert status["stopped"] == "SIGTERM"
    assert {p["status"] for p in status["points"].values()} == {"stopped"}, status
    for point in points:  # each point saved a checkpoint when it stopped, and is not running
        steps = [int(p.name) for p in (point / "checkpoints").iterdir() if p.name.isdigit()]
        assert steps and steps[0] >= 2
        lock = (point / ".lock").read_text().strip()
        with pytest.raises(ProcessLookupError):
            os.kill(int(lock), 0)


def test_changed_overrides_are_named_and_more_steps_rerun_finished_points(tmp_path):
    first = subprocess.run(
        _sweep(tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stdout + first.stderr
    changed = subprocess.run(
        _sweep(tmp_path, "--config.model.dropout=0.2"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert changed.returncode == 2
    assert changed.stderr.strip() == (
        "sweep: 2 points differ from the runs in their workdirs, e.g. seed=0: model.dropout "
        "0.0 -> 0.2 (and 1 more); re-run with the overrides they were made with, or use a new "
        "--workdir"
    )
    more = subprocess.run(
        _sweep(tmp_path, "--config.train.steps=5"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert more.returncode == 0, more.stdout + more.stderr
    assert "0 already DONE" in more.stdout
    for seed in (0, 1):
        results = json.loads((tmp_path / "sweep" / f"seed={seed}" / "results.json").read_text())
        assert results["step"] == 5
