"""The SLURM backend of experiments.sweep: the grid as one job array, submitted with submitit.

    ./launch.sh sweep --config configs/deletang.py:mini=true --workdir /shared/runs/d \
        --backend slurm [--slurm_partition gpu] [--slurm_time 240] [--slurm_mem 32] \
        [--slurm_gpus 1] [--slurm_cpus 8] [--parallel 64] [--slurm_param account=abc] \
        [--no_wait] [--poll 30]
    ./launch.sh sweep --status /shared/runs/d

Every program the local backend would start (one point, or with --vmap_seeds the seeds of
one shape trained together) is one task of a job array, running the same driver command in
the same point workdir, so a point's files are the same whichever backend ran it. The
workdir, the checkout and its .venv must be on a filesystem the nodes share.

- Resources: the flags, else the config file's `sweep_slurm` dict (or a callable of the
  `:arg` returning one; keys are OPTION_KEYS), else time_min=240 and the partition's
  defaults. `--parallel` is the array's parallelism (`--array=0-N%P`).
- Bookkeeping: `<workdir>/sweep_status.json` as the local backend writes it, each point also
  with its `slurm_job` ("1234_5"). Re-running the command submits only the points that are
  neither DONE nor still queued or running under an earlier submission (those are followed);
  `--only`, the drift check, the failure listing and the exit status are the local
  backend's.
- On the node, `PointTask` runs the driver as a child process (its output appended to the
  point's sweep.log as locally), forwards SIGTERM/SIGINT to it, and writes
  `<log stem>.exit.json` (job id, exit status, seconds) when the driver exits.
- Preemption and time limits: scancel and a preemption send SIGTERM, on which the driver
  saves a checkpoint and exits 143 (the point is "stopped"; re-running the sweep resumes it).
  submitit asks for USR2 `signal_delay_s` before the time limit (and a preemption that
  signals USR2); then `PointTask.checkpoint` stops the driver the same way and submitit
  requeues the task (`scontrol requeue`), which resumes from that checkpoint. The driver
  ignores USR2 (its default action would kill it without a checkpoint).
- Following: the submitting process stays and asks squeue every `--poll` seconds (sacct
  for jobs squeue has forgotten, where accounting is on), prints each point as it starts
  and ends, and writes sweep_status.json; Ctrl-C / SIGTERM stop following only (the jobs
  keep running; `--status` follows them later, re-running the command adopts them).
  `--no_wait` submits and returns.

Imports neither JAX nor submitit at module level: `--status` needs only squeue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.workdir import (
    DONE,
    SWEEP_STATUS_FILE,
    RunError,
    StopSignals,
    SweepError,
    atomic_write_json,
    workdir_lock,
)

SLURM_FOLDER = "slurm"  # submitit's pickles and each task's own log, under the sweep root
# squeue states of a job that will still run, or is running.
QUEUED_STATES = frozenset(
    {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD"}
)
RUNNING_STATES = frozenset(
    {"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "STOPPED"}
)
ALIVE_STATES = QUEUED_STATES | RUNNING_STATES
STOP_STATUSES = (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT)
# A job that left the queue without an exit record is given this long for the record to
# appear (a shared filesystem may show it late) before it is declared failed.
EXIT_GRACE_S = 30.0
STOP_GRACE_S = 120  # how long a stopped driver may take to save its checkpoint
OPTION_KEYS = (
    "partition",
    "time_min",
    "mem_gb",
    "gpus",
    "cpus",
    "array_parallelism",
    "job_name",
    "params",
    "signal_delay_s",
    "max_requeues",
)


class SlurmError(SweepError):
    """A SLURM sweep that cannot start (bad option, no submitit, no sbatch). One line."""


@dataclasses.dataclass
class SlurmOptions:
    """What each array task asks the scheduler for."""

    partition: str | None = None
    time_min: int = 240
    mem_gb: float | None = None
    gpus: int = 0  # per task, as --gres=gpu:N (works with cons_res and cons_tres)
    cpus: int | None = None  # per task
    array_parallelism: int | None = None  # tasks running at once (--array=...%N)
    job_name: str | None = None
    params: dict = dataclasses.field(default_factory=dict)  # any other sbatch option
    signal_delay_s: int = STOP_GRACE_S + 30  # USR2 this long before the time limit
    max_requeues: int = 10  # time-outs a task may be requeued after

    def describe(self) -> str:
        parts = [f"partition {self.partition or '(default)'}", f"{self.time_min} min"]
        if self.mem_gb:
            parts.append(f"{self.mem_gb:g} GB")
        if self.gpus:
            parts.append(f"{self.gpus} GPU")
        if self.cpus:
            parts.append(f"{self.cpus} CPU")
        parts += [f"{k}={v}" for k, v in self.params.items()]
        return ", ".join(parts)

    def sbatch_parameters(self, job_name: str) -> dict[str, Any]:
        """submitit SlurmExecutor parameters (mem in GB, as its update_parameters takes it)."""
        params: dict[str, Any] = {
            "job_name": self.job_name or job_name,
            "time": int(self.time_min),
            "signal_delay_s": int(self.signal_delay_s),
            "stderr_to_stdout": True,
        }
        if self.partition:
            params["partition"] = self.partition
        if self.mem_gb:
            params["mem"] = float(self.mem_gb)
        if self.gpus:
            params["gres"] = f"gpu:{int(self.gpus)}"
        if self.cpus:
            params["cpus_per_task"] = int(self.cpus)
        if self.array_parallelism:
            params["array_parallelism"] = int(self.array_parallelism)
        if self.params:
            params["additional_parameters"] = dict(self.params)
        return params


def options_from(config_options: Mapping | None, **flags) -> SlurmOptions:
    """The config file's `sweep_slurm` dict overridden by the flags that were given."""
    merged = dict(config_options or {})
    unknown = sorted(set(merged) - set(OPTION_KEYS))
    if unknown:
        raise SlurmError(f"sweep_slurm: unknown key {unknown[0]!r}; keys: {', '.join(OPTION_KEYS)}")
    params = dict(merged.pop("params", None) or {})
    params.update(flags.pop("params", None) or {})
    merged.update({k: v for k, v in flags.items() if v is not None})
    options = SlurmOptions(**merged, params=params)
    checks = [
        ("--slurm_time", options.time_min is not None and int(options.time_min) >= 1),
        ("--slurm_mem", options.mem_gb is None or float(options.mem_gb) > 0),
        ("--slurm_gpus", int(options.gpus or 0) >= 0),
        ("--slurm_cpus", options.cpus is None or int(options.cpus) >= 1),
    ]
    for flag, ok in checks:
        if not ok:
            raise SlurmError(f"{flag}: must be positive")
    return options


def parse_params(items: Iterable[str]) -> dict[str, str]:
    """--slurm_param KEY=VALUE (repeatable) -> {KEY: VALUE}; KEY as sbatch spells it."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SlurmError(f"--slurm_param: {item!r} is not KEY=VALUE (e.g. account=abc)")
        out[key.strip().lstrip("-")] = value
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def exit_path(log: str | Path) -> Path:
    """Where the task of a job whose driver log is `log` records how it ended."""
    return Path(log).with_suffix(".exit.json")


def task_log(root: Path, job_id: str) -> Path:
    """submitit's own log of task `job_id` (scheduler messages: time limit, OOM kill)."""
    return Path(root) / SLURM_FOLDER / f"{job_id}_0_log.out"


def _slurm_job_id() -> str:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "local")


def _ignore_preempt_signal() -> None:
    # In the driver, before exec: the signal submitit asks for before the time limit reaches
    # every process of the step; its default action would end the driver without saving.
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signal.signal(getattr(signal, name, signal.SIGUSR2), signal.SIG_IGN)


class PointFailed(RuntimeError):
    """The driver of an array task exited non-zero (the task then ends as FAILED)."""


class PointTask:
    """One array task, pickled by submitit and called on the node: run the driver command in
    `cwd` with its output appended to `log`, forward SIGTERM/SIGINT to it, record how it ended
    in exit_path(log). submitit calls `checkpoint` on USR2 (time limit near, preemption):
    the driver is stopped (it saves) and the same task is requeued."""

    POLL_S = 0.5

    def __init__(self, argv: Sequence[str], log: str, label: str, cwd: str, env: Mapping):
        self.argv, self.log, self.label = list(argv), str(log), label
        self.cwd, self.env = cwd, dict(env)
        self._proc: subprocess.Popen | None = None
        self._start = time.monotonic()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proc"] = None
        return state

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError), open(self.log, "a") as f:
            f.write(text)

    def _record(self, returncode: int | None, **extra) -> None:
        record = {
            "job": _slurm_job_id(),
            "returncode": returncode,
            "seconds": round(time.monotonic() - self._start, 1),
            "host": socket.gethostname(),
            "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "finished": _now(),
            **extra,
        }
        with contextlib.suppress(OSError):
            atomic_write_json(exit_path(self.log), record)

    def _forward(self, signum, frame) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def _wait(self, timeout: float | None = None) -> int | None:
        # poll(), not wait(): a signal handler (checkpoint) may wait while __call__ waits,
        # and Popen.wait holds a lock a nested wait in the same thread would block on.
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self._proc.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(self.POLL_S)
        return rc

    def __call__(self) -> int:
        self._start = time.monotonic()
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        again = f", requeued {restarts}x" if restarts not in ("", "0") else ""
        header = (
            f"\n=== {_now()} {shlex.join(self.argv)}\n"
            f"=== slurm job {_slurm_job_id()} on {socket.gethostname()}{again}\n"
        )
        with open(self.log, "a") as log:
            log.write(header)
            log.flush()
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, self._forward)
            self._proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env={**os.environ, **self.env},
                preexec_fn=_ignore_preempt_signal,
            )
            rc = self._wait()
        self._record(rc)
        if rc != 0:
            raise PointFailed(f"{self.label}: the driver exited {rc}; log {self.log}")
        return rc

    def checkpoint(self, *args, **kwargs):
        """Stop the driver (SIGTERM: it saves a checkpoint), then requeue this task."""
        from submitit.helpers import DelayedSubmission

        if self._proc is not None and self._proc.poll() is None:
            self._write(f"\n=== {_now()} slurm: time limit or preemption; stopping the driver\n")
            self._forward(signal.SIGTERM, None)
            if self._wait(STOP_GRACE_S) is None:
                self._proc.kill()
                self._wait()
        rc = self._proc.returncode if self._proc is not None else None
        self._record(rc, requeued=True)
        return DelayedSubmission(PointTask(self.argv, self.log, self.label, self.cwd, self.env))


# ----------------------------------------------------------------------------- the queue


def _run(cmd: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _squeue(arrays: Sequence[str]) -> dict[str, dict[str, str]] | None:
    cmd = ["squeue", "-h", "-r", "--states=all", "-j", ",".join(arrays), "-o", "%i|%T|%r|%N"]
    proc = _run(cmd)
    if proc is None:
        return None
    if proc.returncode != 0:
        if "Invalid job id" not in proc.stderr:
            return None  # the controller did not answer: nothing is known
        if len(arrays) > 1:  # some of them are forgotten: ask for each on its own
            out = {}
            for array in arrays:
                part = _squeue([array])
                if part is None:
                    return None
                out.update(part)
            return out
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3:
            node = parts[3] if len(parts) > 3 else ""
            out[parts[0]] = {"state": parts[1], "reason": parts[2], "node": node}
    return out


def query(job_ids: Iterable[str]) -> dict[str, dict[str, str]] | None:
    """{job id: {"state", "reason", "node"}} from squeue (every state it still remembers),
    then sacct for the jobs squeue has forgotten (where accounting is on); jobs neither
    knows are missing from the answer. None when squeue cannot be asked (no squeue here, or
    the controller does not answer)."""
    wanted = sorted(set(job_ids))
    if not wanted:
        return {}
    out = _squeue(sorted({j.split("_")[0] for j in wanted}))
    if out is None:
        return None
    missing = [j for j in wanted if j not in out]
    if missing:
        sacct = ["sacct", "-n", "-P", "-X", "-o", "JobID,State,NodeList"]
        proc = _run([*sacct, "-j", ",".join(missing)])
        if proc is not None and proc.returncode == 0:
            for line in proc.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) >= 2 and parts[0] in missing:
                    state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"
                    node = parts[2] if len(parts) > 2 else ""
                    out[parts[0]] = {"state": state, "reason": parts[1], "node": node}
    return {j: out[j] for j in wanted if j in out}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, lines: int = 3) -> str:
    """The driver's last lines (not the "=== " headers the sweep and the task write)."""
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join([t for t in text if not t.startswith("=== ")][-lines:])


def _done_since(workdir: Path, since: float) -> bool:
    try:
        return (workdir / DONE).stat().st_mtime >= since - 1
    except OSError:
        return False


def refresh(status: dict, names: Iterable[str] | None = None, root: Path | None = None) -> list:
    """Update the SLURM points of `status` (sweep_status.json's dict) from the queue, their
    exit records and DONE files; return [(name, old status, new status)] for those that
    changed. Points that are queued or running are asked about; others are left alone."""
    points = status["points"]
    names = list(points) if names is None else list(names)
    active = {
        n: points[n]["slurm_job"]
        for n in names
        if points[n].get("slurm_job") and points[n].get("status") in ("queued", "running")
    }
    if not active:
        return []
    root = Path(root or status.get("root") or ".")
    queue = query(active.values())
    if queue is None:
        return []  # the queue cannot be asked: the points stay as they were
    now = time.time()
    changes = []
    for name, job in active.items():
        s = points[name]
        old = s["status"]
        info = queue.get(job)
        state = info["state"] if info else None
        record = _read_json(exit_path(s["log"])) if s.get("log") else None
        if record is not None and record.get("job") != job:
            record = None  # an earlier job's record
        if state in QUEUED_STATES:
            fields = {"status": "queued", "reason": info["reason"]}
        elif state in RUNNING_STATES:
            fields = {"status": "running", "host": info.get("node", "")}
        else:
            fields = _ended(s, job, state, record, root, now)
        if fields:
            if fields.get("status") != "queued":
                s.pop("reason", None)
            s.update(fields)
            if s["status"] != old:
                changes.append((name, old, s["status"]))
    if changes:
        status["updated"] = _now()
    return changes


def _ended(s: dict, job: str, state: str | None, record: dict | None, root, now) -> dict:
    """The final fields of a point whose job is no longer queued or running ({} to wait)."""
    workdir = Path(s["workdir"])
    submitted = s.get("submitted_at", 0.0)
    if record is not None and not record.get("requeued"):
        rc = record.get("returncode")
        base = {"returncode": rc, "seconds": record.get("seconds"), "host": record.get("host")}
        if rc == 0 and (workdir / DONE).exists():
            return {**base, "status": "done", "error": None}
        if rc in STOP_STATUSES:
            why = f"stopped by a signal (job {state or 'ended'})"
            return {**base, "status": "stopped", "error": why}
        why = "exited 0 without writing DONE" if rc == 0 else _tail(Path(s["log"]))
        return {**base, "status": "failed", "error": why}
    if _done_since(workdir, submitted):
        return {"status": "done", "returncode": 0, "error": None}
    if state is None or state == "COMPLETED":
        # Not (yet) in the queue's memory or without a record: give a shared filesystem time.
        first = s.setdefault("ended_at", now)
        if now - first < EXIT_GRACE_S:
            return {}
    s.pop("ended_at", None)
    where = f"; scheduler log {task_log(root, job)}"
    if state == "CANCELLED" or (record and record.get("requeued")):
        return {"status": "stopped", "returncode": None, "error": f"job {job} {state}{where}"}
    what = state or "left the queue"
    tail = _tail(Path(s["log"])) if s.get("log") else ""
    return {
        "status": "failed",
        "returncode": None,
        "error": f"job {job} {what} without an exit record{where}" + (f": {tail}" if tail else ""),
    }


# ----------------------------------------------------------------------------- submission


def _load_submitit():
    # Importing submitit runs logging.config.dictConfig, which closes every logging handler
    # this process has (absl's, pytest's); NOCONFIG skips that here. The variable is put back
    # before anything is submitted, so the tasks (which inherit the environment) still log.
    previous = os.environ.get("SUBMITIT_LOG_LEVEL")
    os.environ["SUBMITIT_LOG_LEVEL"] = "NOCONFIG"
    try:
        import submitit  # noqa: F401
        from submitit.slurm import slurm as submitit_slurm
    except ImportError:
        raise SlurmError(
            "--backend slurm needs submitit: .venv/bin/pip install -e '.[cluster]'"
        ) from None
    finally:
        if previous is None:
            os.environ.pop("SUBMITIT_LOG_LEVEL", None)
        else:
            os.environ["SUBMITIT_LOG_LEVEL"] = previous
    return submitit_slurm


def sbatch_script(root: Path, options: SlurmOptions, job_name: str, tasks: int) -> str:
    """The sbatch file submitit writes for `tasks` array tasks (what --dry_run prints)."""
    submitit_slurm = _load_submitit()
    params = options.sbatch_parameters(job_name)
    if "mem" in params:
        params["mem"] = submitit_slurm._convert_mem(params["mem"])
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {root / SLURM_FOLDER}"
    return submitit_slurm._make_sbatch_string(
        command=command,
        folder=root / SLURM_FOLDER,
        map_count=tasks if tasks > 1 else None,
        **params,
    )


def submit(root: Path, jobs: Sequence, options: SlurmOptions, job_name: str, env=None) -> list:
    """Submit one task per job as a job array; return the job ids ("1234_0", ...)."""
    submitit_slurm = _load_submitit()
    if shutil.which("sbatch") is None:
        raise SlurmError(
            "--backend slurm: no sbatch on PATH; run this on a SLURM login node "
            "(--dry_run prints the script without one)"
        )
    executor = submitit_slurm.SlurmExecutor(
        folder=root / SLURM_FOLDER, max_num_timeout=options.max_requeues
    )
    executor.update_parameters(**options.sbatch_parameters(job_name))
    cwd = os.getcwd()
    tasks = []
    for job in jobs:
        task_env = {**(env or {}), "ATTN_SWEEP_POINT": job.points[0].name}
        log = str(Path(job.log).absolute())
        tasks.append(PointTask(job.argv, log, job.label, cwd, task_env))
    try:  # submitit prints sbatch's complaint too; it is in the one line below instead
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            submitted = [executor.submit(task) for task in tasks]
    except Exception as e:  # sbatch's own message: bad partition, time or account
        lines = [line.strip().removeprefix("sbatch: error: ") for line in str(e).splitlines()]
        text = "; ".join(line for line in lines if line)
        raise RunError(f"sbatch refused the job array: {text[-400:]}") from None
    return [str(s.job_id) for s in submitted]


# ----------------------------------------------------------------------------- the sweep


def run_sweep(
    config_spec: str,
    workdir: str | Path,
    points: Sequence,
    *,
    make_jobs,
    options: SlurmOptions,
    wait: bool = True,
    poll: float = 10.0,
    dry_run: bool = False,
) -> dict:
    """Submit every point that is not DONE and not already queued or running; follow them
    unless wait=False; return the status dict (also in workdir/sweep_status.json).
    `make_jobs(points)` groups points into programs as the local backend does."""
    root = Path(workdir).absolute()
    previous = _read_json(root / SWEEP_STATUS_FILE) or {}
    recorded = {
        p.name: previous["points"][p.name]
        for p in points
        if not p.done and previous.get("points", {}).get(p.name, {}).get("slurm_job")
    }
    alive: dict[str, str] = {}
    if recorded and not dry_run:
        queue = query(r["slurm_job"] for r in recorded.values())
        if queue is None:
            raise SlurmError(
                "squeue did not answer: cannot tell which points of the last submission are "
                "still queued or running (re-run when the controller answers)"
            )
        for name, r in recorded.items():
            info = queue.get(r["slurm_job"])
            if info and info["state"] in ALIVE_STATES:
                alive[name] = r["slurm_job"]
    jobs = make_jobs([p for p in points if p.name not in alive])
    done = sum(p.done for p in points)
    queued = sum(len(j.points) for j in jobs)
    job_name = f"attn:{root.name}"
    how = "one job" if len(jobs) == 1 else f"a job array of {len(jobs)} tasks"
    print(
        f"[sweep] {len(points)} points in {workdir}: {done} already DONE, {len(alive)} still "
        f"queued or running on SLURM, {queued} to submit as {how} ({options.describe()})",
        flush=True,
    )
    if dry_run:
        if jobs:
            print(sbatch_script(root, options, job_name, len(jobs)))
        for job in jobs:
            print(shlex.join(job.argv))
        return {}
    root.mkdir(parents=True, exist_ok=True)
    with workdir_lock(root):
        status = {
            "config": config_spec,
            "backend": "slurm",
            "root": str(root),
            "started": _now(),
            "updated": _now(),
            "points": dict(previous.get("points", {})),
            "slurm": dict(previous.get("slurm", {})),
        }
        for p in points:
            workdir_abs = str(p.workdir.absolute())
            entry = {"status": "done" if p.done else "pending", "workdir": workdir_abs}
            entry["overrides"] = p.overrides
            if p.name in alive:
                entry = {**recorded[p.name], **entry, "status": "queued"}
            elif p.done:  # keep what was recorded when it finished (job, seconds)
                entry = {**previous.get("points", {}).get(p.name, {}), **entry}
            status["points"][p.name] = entry
        names = [p.name for p in points]
        if jobs:
            ids = submit(root, jobs, options, job_name)
            submitted_at = time.time()
            for job, job_id in zip(jobs, ids, strict=True):
                for p in job.points:
                    status["points"][p.name].update(
                        status="queued",
                        slurm_job=job_id,
                        command=job.argv,
                        log=str(Path(job.log).absolute()),
                        slurm_log=str(task_log(root, job_id)),
                        submitted=_now(),
                        submitted_at=submitted_at,
                        returncode=None,
                        error=None,
                    )
            arrays = sorted({i.split("_")[0] for i in ids})
            status["slurm"] = {"folder": str(root / SLURM_FOLDER), "arrays": arrays}
            print(
                f"[sweep] submitted {len(ids)} tasks as job {', '.join(arrays)}; follow with "
                f"./launch.sh sweep --status {workdir}",
                flush=True,
            )
        atomic_write_json(root / SWEEP_STATUS_FILE, status)
        if not wait:
            return status
        detached = follow(status, root, names, poll)
    if detached:
        left = [n for n in names if status["points"][n]["status"] in ("queued", "running")]
        jobs_left = sorted({status["points"][n]["slurm_job"].split("_")[0] for n in left})
        status["detached"] = signal.Signals(detached).name
        atomic_write_json(root / SWEEP_STATUS_FILE, status)
        print(
            f"[sweep] {signal.Signals(detached).name}: stopped following; {len(left)} points are "
            f"still queued or running on SLURM. Follow them with ./launch.sh sweep --status "
            f"{workdir} (or re-run this command); stop them with scancel {' '.join(jobs_left)}"
        )
        return status
    return status


def follow(status: dict, root: Path, names: Sequence[str], poll: float) -> int | None:
    """Poll the queue until no point of `names` is queued or running; print and record each
    change. Returns the signal number if SIGINT/SIGTERM stopped the following."""
    points = status["points"]
    with StopSignals() as stop:
        while stop.received is None:
            changes = refresh(status, names, root)
            for name, _old, new in changes:
                s = points[name]
                if new == "running":
                    print(f"[sweep] start  {name} (job {s['slurm_job']} on {s.get('host')})")
                elif new == "queued":
                    print(f"[sweep] queued {name} (job {s['slurm_job']}: {s.get('reason')})")
                elif new == "done":
                    print(f"[sweep] done   {name} ({s.get('seconds') or 0:.0f} s)")
                elif new == "stopped":
                    print(f"[sweep] stopped {name} (job {s['slurm_job']})")
                else:
                    print(f"[sweep] FAILED {name} (job {s['slurm_job']})")
            sys.stdout.flush()
            if changes:
                atomic_write_json(root / SWEEP_STATUS_FILE, status)
            if not any(points[n]["status"] in ("queued", "running") for n in names):
                return None
            deadline = time.monotonic() + poll
            while stop.received is None and time.monotonic() < deadline:
                time.sleep(min(0.2, poll))
        return int(getattr(signal, stop.received))
