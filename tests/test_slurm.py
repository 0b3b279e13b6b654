"""The SLURM backend of the sweep (experiments/slurm.py) and `sweep --status`.

The fast tests need no scheduler: the sbatch script submitit would write (--dry_run), the
options and their one-line errors, reading a fake squeue, the task wrapper's signal handling,
and --status of a local sweep. The `cluster` tests (./launch.sh test-cluster; minutes) start
a real single-node SLURM from Debian's slurm-wlm and munge (installed with apt-get when
missing and running as root; skipped with the reason otherwise, or failed when
ATTN_REQUIRE_SLURM=1, as CI sets after installing them): munged, slurmctld and slurmd on
localhost with private ports, socket and state, one partition of this machine's cores. They
run the README's commands: a grid in which every point finishes and a failing one is listed
and re-run alone, a point cancelled with scancel that resumes from its checkpoint, a task
requeued before its time limit that resumes in the same job, and one run over two srun tasks
that jax.distributed detects from SLURM's environment.
"""

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from experiments import slurm, sweep

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

GRID = textwrap.dedent(
    """
    import ml_collections

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.task = ml_collections.ConfigDict({"name": "copy"})
        c.train = ml_collections.ConfigDict({"steps": 10})
        if arg and arg.startswith("task="):
            c.task.name = arg.partition("=")[2]
        return c

    def get_sweep(arg=None):
        return {"task": ["copy", "reverse"], "seed": [0, 1]}

    sweep_slurm = {"partition": "cfg", "time_min": 30, "mem_gb": 8, "gpus": 1,
                   "params": {"account": "abc"}}
    """
)


def _grid(tmp_path, text=GRID) -> str:
    path = tmp_path / "grid.py"
    path.write_text(text)
    return str(path)


def _one_line_error(capsys, status, needle):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def _main(argv) -> int:
    try:
        return sweep.main(argv)
    except SystemExit as e:
        return e.code


# ----------------------------------------------------------------------------- no scheduler


def test_dry_run_prints_the_job_array_flags_over_the_config(tmp_path, capsys):
    # (not importorskip: importing submitit unguarded closes every logging handler; the
    # backend imports it with SUBMITIT_LOG_LEVEL=NOCONFIG)
    if importlib.util.find_spec("submitit") is None:
        pytest.skip("submitit is not installed (the test and cluster extras have it)")
    argv = ["--config", _grid(tmp_path), "--workdir", str(tmp_path / "runs"), "--backend"]
    argv += ["slurm", "--slurm_partition", "debug", "--slurm_cpus", "2", "--parallel", "2"]
    argv += ["--slurm_param", "qos=high", "--dry_run", "--config.train.steps=5"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 to submit as a job array of 4 tasks" in out
    for line in (
        "#SBATCH --array=0-3%2",
        "#SBATCH --partition=debug",  # the flag over the config's "cfg"
        "#SBATCH --time=30",
        "#SBATCH --mem=8GB",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --account=abc",
        "#SBATCH --qos=high",
        f"#SBATCH --signal=USR2@{slurm.STOP_GRACE_S + 30}",
    ):
        assert line in out.splitlines(), (line, out)
    assert "--workdir " + str(tmp_path / "runs" / "task=reverse,seed=1") in out
    assert "--config.train.steps=5" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--devices_per_run", "1"], "--devices_per_run: a local-backend flag"),
        (["--timeout", "60"], "--timeout: a local-backend flag"),
        (["--slurm_param", "account"], "--slurm_param: 'account' is not KEY=VALUE"),
        (["--slurm_time", "0"], "--slurm_time: must be positive"),
        (["--poll", "0"], "--poll: seconds, > 0"),
    ],
)
def test_bad_slurm_options_are_one_line(tmp_path, capsys, extra, needle):
    argv = ["--config", _grid(tmp_path), "--workdir", str(tmp_path / "r"), "--backend", "slurm"]
    _one_line_error(capsys, _main([*argv, *extra, "--dry_run"]), needle)


def test_unknown_sweep_slurm_key_is_one_line(tmp_path, capsys):
    config = _grid(tmp_path, GRID.replace('"gpus": 1', '"gpu": 1'))
    argv = ["--config", config, "--workdir", str(tmp_path / "r"), "--backend", "slurm"]
    _one_line_error(capsys, _main([*argv, "--dry_run"]), "sweep_slurm: unknown key 'gpu'")


FAKE_SQUEUE = textwrap.dedent(
    """\
    #!/bin/sh
    # squeue -h -r --states=all -j IDS -o FORMAT: canned states of array 7
    cat <<'TXT'
    7_0|PENDING|Priority|
    7_1|RUNNING|None|node3
    7_2|COMPLETED|None|node3
    7_3|FAILED|NonZeroExitCode|node3
    7_4|COMPLETED|None|node3
    7_5|CANCELLED|None|node4
    TXT
    """
)


def test_refresh_reads_the_queue_and_the_exit_records(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE)
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "EXIT_GRACE_S", 0.0)
    points = {}
    for i in range(7):
        wd = tmp_path / f"p{i}"
        wd.mkdir()
        log = wd / sweep.LOG_FILE
        log.write_text(f"=== header\nline of p{i}\nlast words of p{i}\n")
        points[f"p{i}"] = {"status": "queued", "workdir": str(wd), "log": str(log)}
        points[f"p{i}"]["slurm_job"] = f"7_{i}"

    def record(i, rc):
        path = slurm.exit_path(points[f"p{i}"]["log"])
        path.write_text(json.dumps({"job": f"7_{i}", "returncode": rc, "seconds": 3.0}))

    record(2, 0)
    (tmp_path / "p2" / "DONE").write_text("")
    record(3, 1)
    record(4, 143)
    status = {"points": points}
    changes = slurm.refresh(status, root=tmp_path)
    got = {n: s["status"] for n, s in points.items()}
    assert got == {
        "p0": "queued",
        "p1": "running",
        "p2": "done",
        "p3": "failed",
        "p4": "stopped",  # SIGTERM: saved and exited 143
        "p5": "stopped",  # cancelled before its task could record anything
        "p6": "failed",  # gone from the queue without a record
    }
    assert ("p0", "queued", "queued") not in changes and len(changes) == 6
    assert points["p0"]["reason"] == "Priority" and points["p1"]["host"] == "node3"
    assert points["p3"]["error"] == "line of p3 | last words of p3"
    assert points["p2"]["seconds"] == 3.0
    assert "7_6 left the queue without an exit record" in points["p6"]["error"]
    # A controller that does not answer changes nothing (no point is declared lost).
    timed_out = "#!/bin/sh\necho 'squeue: error: Socket timed out' >&2\nexit 1\n"
    (bin_dir / "squeue").write_text(timed_out)
    points["p0"]["status"] = "running"
    assert slurm.refresh(status, root=tmp_path) == [] and points["p0"]["status"] == "running"


def test_the_task_forwards_sigterm_and_its_driver_ignores_usr2(tmp_path):
    """PointTask, called as submitit calls it on a node (here a plain process): USR2 (the
    pre-time-limit signal that reaches every process of the step) does not end the driver;
    SIGTERM to the task reaches the driver, whose exit status is recorded."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            """
            import os, signal, sys, time
            def stop(signum, frame):
                print("driver: saving after", signal.Signals(signum).name, flush=True)
                sys.exit(128 + signum)
            signal.signal(signal.SIGTERM, stop)
            os.kill(os.getpid(), signal.SIGUSR2)  # ignored, as it must be
            print("driver: alive after USR2", flush=True)
            time.sleep(60)
            """
        )
    )
    log = tmp_path / "point" / sweep.LOG_FILE
    code = (
        "from experiments.slurm import PointTask, PointFailed\n"
        f"task = PointTask([{PY!r}, {str(driver)!r}], {str(log)!r}, 'p', '.', {{}})\n"
        "try:\n    task()\nexcept PointFailed as e:\n    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "42"}
    proc = subprocess.Popen([PY, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "alive after USR2" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert "the driver exited 143" in out
    assert "driver: saving after SIGTERM" in log.read_text()
    record = json.loads(slurm.exit_path(log).read_text())
    assert record["job"] == "42" and record["returncode"] == 143


# Stands in for the driver (`python -m experiments.main --mode train`): fails for task=reverse.
STUB_DRIVER = textwrap.dedent(
    """
    import pathlib, sys
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "")
    flags.DEFINE_string("mode", "train", "")
    CONFIG = config_flags.DEFINE_config_file("config")

    def main(_):
        wd = pathlib.Path(flags.FLAGS.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        if CONFIG.value.task.name == "reverse" and CONFIG.value.seed == 1:
            sys.exit("injected failure")
        (wd / "DONE").write_text("")

    app.run(main)
    """
)


def test_status_of_a_local_sweep(tmp_path, capsys):
    config = _grid(tmp_path, GRID.replace("sweep_slurm", "unused"))
    (tmp_path / "stub.py").write_text(STUB_DRIVER)
    root = tmp_path / "runs"
    sweep.run_sweep(config, root, driver=[PY, str(tmp_path / "stub.py")])
    capsys.readouterr()
    assert sweep.main(["--status", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{root}: local sweep of {config}, 4 points: 1 failed, 3 done")
    assert out[1].split()[:2] == ["task=reverse,seed=1", "failed"]
    assert "injected failure" in out[1]
    # A point recorded as running by a sweep that is gone (killed) is shown as interrupted.
    status = json.loads((root / sweep.STATUS_FILE).read_text())
    status["points"]["task=copy,seed=0"]["status"] = "running"
    (root / sweep.STATUS_FILE).write_text(json.dumps(status))
    assert sweep.main(["--status", str(root)]) == 0
    assert "1 interrupted" in capsys.readouterr().out
    assert _main(["--status", str(tmp_path)]) == 2
    assert "not a sweep workdir" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real SLURM

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")


def _install_slurm() -> str | None:
    """None when slurm-wlm and munge are installed (installing them as root with apt-get if
    they are missing); else why they cannot be."""
    if all(shutil.which(b) for b in SLURM_BINARIES):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm and munge are not installed, and installing them needs root"
    if shutil.which("apt-get") is None:
        return "slurm-wlm and munge are not installed, and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]
    proc = None
    for cmd in (install, ["apt-get", "update", "-qq"], install):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"apt-get could not install slurm-wlm and munge: {e}"
        if cmd is install and proc.returncode == 0:
            break
    if not all(shutil.which(b) for b in SLURM_BINARIES):
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if proc else []
        return f"apt-get install slurm-wlm munge failed: {' '.join(last)}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(1024, int(line.split()[1]) // 1024 - 1024)
    return 4096


class LocalSlurm:
    """munged + slurmctld + slurmd on localhost, everything under `root` (its own munge
    socket and key, ports, state and logs), so it touches nothing of the machine's own."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge = root / "munge"
        self.pids = {
            "slurmd": root / "slurmd.pid",
            "slurmctld": root / "slurmctld.pid",
            "munged": self.munge / "munged.pid",
        }
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.munge.chmod(0o700)
        key = self.munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        r = self.root
        self.conf.write_text(
            textwrap.dedent(
                f"""\
                ClusterName=attntest
                SlurmctldHost=localhost
                SlurmctldPort={_free_port()}
                SlurmdPort={_free_port()}
                SlurmUser=root
                SlurmdUser=root
                AuthType=auth/munge
                AuthInfo=socket={self.munge / "munge.socket"}
                CredType=cred/munge
                StateSaveLocation={r / "state"}
                SlurmdSpoolDir={r / "spool"}
                SlurmctldPidFile={self.pids["slurmctld"]}
                SlurmdPidFile={self.pids["slurmd"]}
                SlurmctldLogFile={r / "log" / "slurmctld.log"}
                SlurmdLogFile={r / "log" / "slurmd.log"}
                ProctrackType=proctrack/linuxproc
                TaskPlugin=task/none
                JobAcctGatherType=jobacct_gather/none
                AccountingStorageType=accounting_storage/none
                SelectType=select/cons_tres
                SelectTypeParameters=CR_CPU
                SchedulerType=sched/builtin
                MpiDefault=none
                ReturnToService=2
                KillWait=30
                MinJobAge=300
                NodeName=localhost CPUs={os.cpu_count()} RealMemory={_memory_mb()} State=UNKNOWN
                PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
                """
            )
        )

    def _start(self, cmd) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} did not start: {(proc.stderr or proc.stdout).strip()}")

    def start(self) -> None:
        self.write_config()
        m = self.munge
        self._start(
            [
                "munged",
                f"--socket={m / 'munge.socket'}",
                f"--key-file={m / 'munge.key'}",
                f"--pid-file={self.pids['munged']}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
                "--force",
            ]
        )
        self._start(["slurmctld", "-c", "-f", str(self.conf)])
        self._start(["slurmd", "-N", "localhost", "-f", str(self.conf)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            proc = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True
            )
            if proc.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node did not come up: {self.log_tail()}")

    def log_tail(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            with contextlib.suppress(OSError):
                out += (self.root / "log" / name).read_text().splitlines()[-2:]
        return " | ".join(out)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            proc = subprocess.run(
                ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True
            )
            if proc.returncode != 0 or not proc.stdout.strip():
                break
            time.sleep(0.5)
        for pid_file in self.pids.values():
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def jobs(self) -> list[str]:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T|%r"], env=self.env, capture_output=True, text=True
        )
        return proc.stdout.split()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    required = os.environ.get("ATTN_REQUIRE_SLURM") == "1"
    give_up = pytest.fail if required else pytest.skip
    why = _install_slurm()
    if why is None and os.geteuid() != 0:
        why = "slurmd runs jobs as their user and must run as root"
    if why:
        give_up(f"no SLURM test cluster: {why}")
    local = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        local.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        local.stop()
        give_up(f"no SLURM test cluster: {e}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(local.conf)
    try:
        yield local
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        local.stop()


def _env(cluster) -> dict:
    env = dict(cluster.env)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env.pop("ATTN_SWEEP_POINT", None)
    return env


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

ONE_POINT = textwrap.dedent(
    """
    from configs import formal

    def get_config(arg=None):
        config = formal.get_config("smoke=true")
        config.eval.lengths = "4"
        config.eval.compilation_cache = ""
        return config

    def get_sweep():
        return {"seed": [0]}
    """
)


def _sweep_cmd(config: Path, root: Path, *flags: str) -> list[str]:
    # README: ./launch.sh sweep --config ... --workdir ... --backend slurm --slurm_partition debug
    return [
        PY, "-m", "experiments.sweep", "--config", str(config), "--workdir", str(root),
        "--backend", "slurm", "--slurm_partition", "debug", "--slurm_time", "30",
        "--poll", "1", *flags,
    ]  # fmt: skip


def _train_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return max((r["step"] for r in rows if r.get("split") == "train"), default=0)


def _wait_for_steps(proc, workdir: Path, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _train_steps(workdir) < steps:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{workdir} did not reach step {steps}"
        time.sleep(0.2)


@pytest.mark.cluster
def test_grid_finishes_and_a_failing_point_is_listed_and_rerun_alone(cluster, tmp_path):
    from experiments import compare

    config = tmp_path / "grid.py"
    config.write_text(REAL_GRID)
    root = tmp_path / "runs"
    cmd = _sweep_cmd(f"{config}:smoke=true", root)
    cmd += ["--config.eval.lengths=8", "--config.eval.compilation_cache="]
    first = subprocess.run(cmd, cwd=REPO, env=_env(cluster), capture_output=True, text=True)
    assert first.returncode == 1, first.stdout + first.stderr
    failed = "pe=alibi,seed=1,train.steps=-1"
    assert f"{failed}: exit 2" in first.stdout
    assert "to submit as a job array of 4 tasks" in first.stdout
    status = json.loads((root / sweep.STATUS_FILE).read_text())
    assert status["backend"] == "slurm" and status["failed"] == [failed]
    assert "train.steps" in status["points"][failed]["error"]
    for name in ("pe=alibi,seed=0", "pe=rope,seed=0", "pe=none,seed=0"):
        assert status["points"][name]["status"] == "done"
        assert json.loads((root / name / "results.json").read_text())["per_length"]["8"]

    shown = subprocess.run(
        [PY, "-m", "experiments.sweep", "--status", str(root)],
        cwd=REPO,
        env=_env(cluster),
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and "4 points: 1 failed, 3 done" in shown.stdout, shown.stdout

    again = subprocess.run(cmd, cwd=REPO, env=_env(cluster), capture_output=True, text=True)
    assert again.returncode == 1
    assert "3 already DONE, 0 still queued or running on SLURM, 1 to submit as one job" in (
        again.stdout
    )
    runs = {
        d.name: (d / sweep.LOG_FILE).read_text().count("=== slurm job")
        for d in root.iterdir()
        if d.is_dir() and d.name != slurm.SLURM_FOLDER
    }
    assert runs == {failed: 2, "pe=alibi,seed=0": 1, "pe=rope,seed=0": 1, "pe=none,seed=0": 1}
    rows = compare.compare([root], tmp_path / "report")["rows"]
    assert len(rows) == 3


@pytest.mark.cluster
def test_a_point_cancelled_with_scancel_resumes_from_its_checkpoint(cluster, tmp_path):
    """Submitted with --no_wait; the same command then follows the running point instead of
    submitting it again; Ctrl-C stops the following, not the job; --status follows it; the
    point cancelled with scancel saves, and resubmitting it resumes from that checkpoint."""
    config = tmp_path / "one.py"
    config.write_text(ONE_POINT)
    root = tmp_path / "runs"
    point = root / "seed=0"
    cmd = _sweep_cmd(config, root, "--config.train.ckpt_every=100000")
    long_run = [*cmd, "--config.train.steps=100000"]
    run = dict(cwd=REPO, env=_env(cluster), capture_output=True, text=True, timeout=120)
    submitted = subprocess.run([*long_run, "--no_wait"], **run)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = json.loads((root / sweep.STATUS_FILE).read_text())["points"]["seed=0"]["slurm_job"]

    follower = subprocess.Popen(
        long_run,
        cwd=REPO,
        env=_env(cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_steps(follower, point, 3)
    follower.send_signal(signal.SIGINT)
    out, _ = follower.communicate(timeout=60)
    assert follower.returncode == 128 + signal.SIGINT, out
    assert "0 already DONE, 1 still queued or running on SLURM, 0 to submit" in out
    assert "stopped following; 1 points are still queued or running" in out
    assert f"{job}|RUNNING|None" in cluster.jobs()

    def status() -> str:
        cmd = [PY, "-m", "experiments.sweep", "--status", str(root)]
        return subprocess.run(cmd, **run).stdout

    assert "1 points: 1 running" in status()
    subprocess.run(["scancel", job], env=cluster.env, check=True)
    deadline = time.monotonic() + 90
    while "1 points: 1 stopped" not in (shown := status()):
        assert time.monotonic() < deadline, shown
        time.sleep(1)
    recorded = json.loads((root / sweep.STATUS_FILE).read_text())["points"]["seed=0"]
    assert recorded["status"] == "stopped" and recorded["returncode"] == 143, recorded
    saved = max(int(p.name) for p in (point / "checkpoints").iterdir() if p.name.isdigit())
    assert saved >= 3

    steps = saved + 3  # more steps: a resumable change
    again = subprocess.run([*cmd, f"--config.train.steps={steps}"], **{**run, "timeout": 300})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 to submit as one job" in again.stdout
    assert f"resumed from step {saved} " in (point / sweep.LOG_FILE).read_text()
    assert json.loads((point / "results.json").read_text())["step"] == steps


@pytest.mark.cluster
def test_a_task_requeued_before_its_time_limit_resumes_in_the_same_job(cluster, tmp_path):
    """USR2 is what submitit asks SLURM to send signal_delay_s before the time limit (and
    what a preemption may send): the task stops its driver, which saves, and requeues itself;
    the requeued task resumes. SLURM holds a requeued job for two minutes (BeginTime); the
    test releases it at once with scontrol."""
    config = tmp_path / "one.py"
    config.write_text(ONE_POINT)
    root = tmp_path / "runs"
    point = root / "seed=0"
    cmd = _sweep_cmd(config, root, "--config.train.steps=2000", "--config.train.ckpt_every=5000")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_steps(proc, point, 3)
    job = json.loads((root / sweep.STATUS_FILE).read_text())["points"]["seed=0"]["slurm_job"]
    subprocess.run(["scancel", "--signal=USR2", job], env=cluster.env, check=True)
    deadline = time.monotonic() + 120
    while f"{job}|PENDING|BeginTime" not in cluster.jobs():
        assert time.monotonic() < deadline, cluster.jobs()
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert out.count("[sweep] done   seed=0") == 1  # (queued for a moment in between)
    log = (point / sweep.LOG_FILE).read_text()
    assert "slurm: time limit or preemption; stopping the driver" in log
    assert f"=== slurm job {job} on" in log and "requeued 1x" in log
    stopped = int(log.split("stopped by SIGTERM")[0].rsplit("step ", 1)[1].split(":")[0])
    assert f"resumed from step {stopped} " in log
    assert json.loads((point / "results.json").read_text())["step"] == 2000


@pytest.mark.cluster
def test_one_run_over_two_srun_tasks_initialises_jax_distributed_from_slurm(cluster, tmp_path):
    """README's multi-node recipe on one node: srun starts one process per task and
    jax.distributed.initialize() reads SLURM_NTASKS / SLURM_PROCID / SLURM_STEP_NODELIST."""
    workdir = tmp_path / "mp"
    cmd = ["srun", "--ntasks=2", "--cpus-per-task=1", PY, "-m", "experiments.main"]
    cmd += ["--distributed", "--mode", "train", "--config", "configs/formal.py:smoke=true"]
    cmd += ["--workdir", str(workdir), "--config.eval.lengths=8"]
    cmd += ["--config.eval.compilation_cache="]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(cluster), capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("Connecting to JAX distributed service") == 2, out
    assert (workdir / "DONE").exists()


@pytest.mark.cluster
def test_a_job_sbatch_refuses_is_one_line(cluster, tmp_path):
    config = tmp_path / "one.py"
    config.write_text(ONE_POINT)
    cmd = _sweep_cmd(config, tmp_path / "runs", "--slurm_partition", "nosuch")
    proc = subprocess.run(cmd, cwd=REPO, env=_env(cluster), capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep: sbatch refused the job array"), lines
    assert "partition" in lines[0]
