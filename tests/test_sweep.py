"""Tests for experiments/sweep.py: grids, point names, isolation of failures, resume.

The fast tests drive the sweep with a stub trainer (absl + ml_collections, no JAX) so that
the process handling is tested in a second; the slow test runs the real driver.
"""

import json
import sys
import textwrap

import pytest

from experiments import sweep

CONFIG = textwrap.dedent(
    """
    import ml_collections

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.fail = False
        c.task = ml_collections.ConfigDict({"name": "copy"})
        c.train = ml_collections.ConfigDict({"steps": 10})
        for item in (arg or "").split(","):
            key, _, value = item.partition("=")
            if key == "task":
                c.task.name = value
        return c

    def get_sweep(arg=None):
        return [
            {"task": "copy", "seed": 0},
            {"task": "copy", "seed": 1},
            {"task": "reverse", "seed": 0, "fail": True},
            {"task": "reverse", "seed": 1},
        ]
    """
)

# Stands in for `python -m experiments.main --mode train`: same flags, same outputs.
STUB_DRIVER = textwrap.dedent(
    """
    import json, os, pathlib, sys
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "")
    flags.DEFINE_string("mode", "train", "")
    CONFIG = config_flags.DEFINE_config_file("config")

    def main(_):
        cfg = CONFIG.value
        wd = pathlib.Path(flags.FLAGS.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        with open(wd / "invocations", "a") as f:
            f.write(os.environ["ATTN_SWEEP_POINT"] + "\\n")
        if cfg.fail and os.environ.get("STUB_FAIL") == "1":
            sys.exit("injected failure for " + cfg.task.name)
        result = {"task": cfg.task.name, "seed": cfg.seed, "steps": cfg.train.steps}
        (wd / "results.json").write_text(json.dumps(result))
        (wd / "DONE").write_text("")

    app.run(main)
    """
)


@pytest.fixture
def stub(tmp_path):
    config = tmp_path / "grid.py"
    config.write_text(CONFIG)
    driver = tmp_path / "stub_driver.py"
    driver.write_text(STUB_DRIVER)
    return str(config), [sys.executable, str(driver)]


def test_expand_grid_cartesian_in_axis_order():
    points = sweep.expand_grid({"pe": ["a", "b"], "seed": [0, 1, 2]})
    assert len(points) == 6
    assert points[0] == {"pe": "a", "seed": 0}
    assert points[-1] == {"pe": "b", "seed": 2}
    assert sweep.expand_grid([{"x": 1}, {"x": 2, "y": 3}]) == [{"x": 1}, {"x": 2, "y": 3}]
    with pytest.raises(sweep.SweepError):
        sweep.expand_grid({"pe": []})


def test_point_names_are_readable_and_safe():
    name = sweep.point_name({"task": "reverse_string", "pe": "alibi", "seed": 0})
    assert name == "task=reverse_string,pe=alibi,seed=0"
    assert "/" not in sweep.point_name({"x": "a/b", "lengths": (1, 2)})
    assert sweep.merge_arg("mini,pe=rope", {"pe": "alibi", "task": "x"}) == "mini,pe=alibi,task=x"


def test_fields_become_flags_and_choices_go_into_the_arg(stub, tmp_path):
    config, _ = stub
    points, _ = sweep.build_points(f"{config}:task=copy", tmp_path / "runs", ["--config.x=1"])
    third = points[2]
    assert third.name == "task=reverse,seed=0,fail=true"
    assert third.config_spec == f"{config}:task=reverse"
    assert third.flags == ("--config.seed=0", "--config.fail=true", "--config.x=1")
    bad = tmp_path / "bad.py"
    bad.write_text(CONFIG.replace('"seed": 1}', '"train.stepz": 1}'))
    with pytest.raises(sweep.SweepError, match="train.stepz"):
        sweep.build_points(str(bad), tmp_path)


def test_failure_is_isolated_reported_and_only_it_reruns(stub, tmp_path, monkeypatch, capsys):
    config, driver = stub
    workdir = tmp_path / "runs"
    monkeypatch.setenv("STUB_FAIL", "1")
    status = sweep.run_sweep(config, workdir, parallel=2, driver=driver)
    failed = "task=reverse,seed=0,fail=true"
    assert status["failed"] == [failed]
    on_disk = json.loads((workdir / sweep.STATUS_FILE).read_text())
    assert on_disk["points"][failed]["status"] == "failed"
    assert "injected failure" in on_disk["points"][failed]["error"]
    assert sum(p["status"] == "done" for p in on_disk["points"].values()) == 3
    assert failed in capsys.readouterr().out

    monkeypatch.setenv("STUB_FAIL", "0")
    status = sweep.run_sweep(config, workdir, parallel=2, driver=driver)
    assert status["failed"] == []
    runs = {
        d.name: (d / "invocations").read_text().split() for d in workdir.iterdir() if d.is_dir()
    }
    assert runs[failed] == [failed, failed]
    assert all(len(v) == 1 for k, v in runs.items() if k != failed)


def test_cli_exit_status_and_only(stub, tmp_path, monkeypatch):
    config, driver = stub
    monkeypatch.setattr(sweep, "DRIVER", tuple(driver))
    monkeypatch.setenv("STUB_FAIL", "1")
    workdir = tmp_path / "runs"
    assert sweep.main(["--config", config, "--workdir", str(workdir), "--only", "fail"]) == 1
    assert [d.name for d in workdir.iterdir() if d.is_dir()] == ["task=reverse,seed=0,fail=true"]
    assert sweep.main(["--config", config, "--workdir", str(workdir), "--only", "copy"]) == 0
    assert sweep.main(["--config", config, "--workdir", str(workdir), "--only", "nothing"]) == 2


def test_vmap_seeds_groups_points_differing_only_in_seed(tmp_path):
    def point(task, seed):
        overrides = {"task": task, "seed": seed}
        return sweep.Point(
            name=sweep.point_name(overrides),
            overrides=overrides,
            workdir=tmp_path / sweep.point_name(overrides),
            config_spec=f"c.py:task={task}",
            flags=(f"--config.seed={seed}", "--config.train.steps=5"),
            seed=seed,
        )

    points = [point(t, s) for t in ("copy", "reverse") for s in (0, 1, 2)]
    (points[2].workdir).mkdir()
    (points[2].workdir / sweep.DONE).write_text("")
    jobs = sweep.make_jobs(points, vmap_seeds=True, seeds_driver=("seeds",))
    assert [len(j.points) for j in jobs] == [2, 3]
    argv = jobs[0].argv
    assert argv[argv.index("--seeds") + 1] == "0,1"
    assert argv[argv.index("--workdir") + 1] == str(tmp_path / "task=copy,seed={seed}")
    assert "--config.train.steps=5" in argv and not any("config.seed" in a for a in argv)


@pytest.mark.parametrize("backend,programs", [("cpu", 4), ("gpu", 3)])
def test_vmap_seeds_accelerator_groups_seeds_only_off_the_cpu(
    stub, tmp_path, monkeypatch, capsys, backend, programs
):
    config, _ = stub
    grid = tmp_path / "grid_acc.py"
    grid.write_text(open(config).read() + '\nsweep_vmap_seeds = "accelerator"\n')
    monkeypatch.setattr(sweep, "default_backend", lambda: backend)
    sweep.run_sweep(str(grid), tmp_path / "runs", dry_run=True)  # copy seeds 0, 1 share one
    assert f"4 to run as {programs} programs" in capsys.readouterr().out


def test_default_backend_is_jaxs():
    import jax

    assert sweep.default_backend() == jax.default_backend()


REAL_GRID = textwrap.dedent(
    """
    from configs import formal

    def get_config(arg=None):
        return formal.get_config(arg)

    def get_sweep(arg=None):
        # The last point fails at run time in the driver (train.steps must be positive).
        return [
            {"pe": "alibi", "seed": 0},
            {"pe": "rope", "seed": 0},
            {"pe": "none", "seed": 0},
            {"pe": "alibi", "seed": 1, "train.steps": -1},
        ]
    """
)


@pytest.mark.slow
def test_real_driver_sweep_isolates_a_failing_point(tmp_path, capsys):
    config = tmp_path / "real_grid.py"
    config.write_text(REAL_GRID)
    workdir = tmp_path / "runs"
    argv = ["--config", f"{config}:smoke=true", "--workdir", str(workdir), "--parallel", "2"]
    argv += ["--config.eval.lengths=8", "--config.eval.compilation_cache="]
    assert sweep.main(argv) == 1
    status = json.loads((workdir / sweep.STATUS_FILE).read_text())
    failed = "pe=alibi,seed=1,train.steps=-1"
    assert status["failed"] == [failed]
    assert "train.steps" in status["points"][failed]["error"]
    for name in ("pe=alibi,seed=0", "pe=rope,seed=0", "pe=none,seed=0"):
        assert (workdir / name / "DONE").exists()
        assert json.loads((workdir / name / "results.json").read_text())["per_length"]["8"]
    assert f"{failed}: exit 2" in capsys.readouterr().out

    assert sweep.main(argv) == 1
    runs = {
        d.name: (d / sweep.LOG_FILE).read_text().count("\n=== ")
        for d in workdir.iterdir()
        if d.is_dir()
    }
    assert runs == {failed: 2, "pe=alibi,seed=0": 1, "pe=rope,seed=0": 1, "pe=none,seed=0": 1}


@pytest.mark.slow
def test_vmap_seeds_sweep_writes_one_run_per_seed(tmp_path):
    """sweep --vmap_seeds -> one experiments.seeds program -> per-seed runs compare reads."""
    from experiments import compare

    config = tmp_path / "seeds_grid.py"
    config.write_text(
        "from configs import formal\n\n"
        "def get_config(arg=None):\n    return formal.get_config(arg)\n\n"
        "def get_sweep(arg=None):\n    return {'pe': ['alibi'], 'seed': [0, 1]}\n"
    )
    workdir = tmp_path / "runs"
    argv = ["--config", f"{config}:smoke=true", "--workdir", str(workdir), "--vmap_seeds"]
    assert sweep.main([*argv, "--config.eval.lengths=8", "--config.eval.compilation_cache="]) == 0
    assert (workdir / f"pe=alibi.{sweep.LOG_FILE}").exists()
    (row,) = compare.compare([workdir], tmp_path / "report")["rows"]
    assert row.n == 2 and {r.seed for r in row.runs} == {0, 1}
