"""Run a config's grid of ablations, one isolated subprocess per point.

A sweep is a config file that also defines `get_sweep()` (or `get_sweep(arg)`, receiving the
same `:arg` string as `get_config`) returning the grid, either

- a list of dicts of overrides (one dict per point), or
- a dict of axis -> list of values (the cartesian product, axes in the order written).

An override key is either a config field (`seed`, `train.steps`, `model.pe.max_wavelength`:
any key that names a leaf of the config, passed as `--config.<key>=<value>`) or a structural
choice of the config file (`task`, `pe`, `positions`, ...: merged into its `:arg` string as
`key=value`, last one wins). Every point runs in its own workdir named after its overrides,
e.g. `runs/x/task=reverse_string,pe=alibi,seed=0`, as a subprocess of

    python -m experiments.main --mode train --config <file>:<arg> --workdir <point> --config.<k>=<v>

so a crash or an out-of-memory kill in one point cannot take the sweep down. Points whose
workdir holds `DONE` are skipped; unfinished ones are re-run, and the driver resumes them
from their last checkpoint. A failed point does not stop the others: the sweep reports all
failures at the end (printed and in `<workdir>/sweep_status.json`, written atomically after
every change) and exits with status 1, and re-running the same command runs only what is
not DONE.

Seeds together: when the config file sets `sweep_vmap_seeds = True` (or a callable of the
`:arg` returning it) or `--vmap_seeds` is given, points that differ only in `seed` run as one
`python -m experiments.seeds` program that trains them under `jax.vmap` and writes the same
per-seed workdirs. `sweep_vmap_seeds = "accelerator"` does so only where JAX's default backend
is not the CPU (asked of a short child process, so the sweep itself never claims the
accelerator), since on a CPU it gains little (README "Performance" has the measurement).

Devices: `--devices_per_run N` gives every child process its own N devices of this host
(CUDA_VISIBLE_DEVICES on GPUs, the TPU VM's per-process chip variables on TPUs: see
experiments/devices.py), and runs as many children at once as there are slots (unless
`--parallel` says fewer); 0 gives every child all devices. Without the flag a config file's
`sweep_devices_per_run` decides, else models under 100M parameters get one device each on an
accelerator (a small model spread over 8 GPUs spends its steps in all-reduces). On a CPU
the flag sets each child's number of emulated devices (XLA_FLAGS) and `--parallel` alone
decides how many run.

SLURM: `--backend slurm` submits the same programs as one job array through submitit
instead of running them here (experiments/slurm.py: resources from --slurm_* flags or the
config file's `sweep_slurm`, `--parallel` as the array's parallelism), and writes the same
sweep_status.json, so --only, resuming, the failure listing and compare behave the same.
`--status WORKDIR` shows every point of a sweep (queued, running, done, failed, stopped)
whichever backend ran it, asking squeue/sacct for the SLURM one.

Usage:
    python -m experiments.sweep --config configs/quickstart.py --workdir runs/quickstart \
        [--parallel 2] [--devices_per_run 1] [--only 'pe=(alibi|rope)'] [--vmap_seeds] \
        [--dry_run] [--backend slurm --slurm_partition gpu --slurm_gpus 1 --slurm_time 240] \
        [--config.train.steps=100 ...]   # extra overrides applied to every point
    python -m experiments.sweep --status runs/quickstart
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import inspect
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attn.registry import ConfigError
from experiments import devices
from experiments.config_utils import ArgumentParser
from experiments.workdir import (
    DONE,
    SWEEP_STATUS_FILE,
    RunError,
    StopSignals,
    SweepError,
    atomic_write_json,
    workdir_lock,
)

DRIVER = (sys.executable, "-m", "experiments.main", "--mode", "train")
SEEDS_DRIVER = (sys.executable, "-m", "experiments.seeds")
STATUS_FILE = SWEEP_STATUS_FILE
LOG_FILE = "sweep.log"
STOP_GRACE_S = 120  # how long a stopped point may take to save its checkpoint
# Characters kept in a point's directory name; anything else becomes "_".
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-]")


def split_config_spec(spec: str) -> tuple[str, str | None]:
    """'configs/x.py:a=1' -> ('configs/x.py', 'a=1'); no colon -> (path, None)."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def load_config_module(path: str):
    """Import a config file by path, the way ml_collections' config flag does."""
    if not os.path.isfile(path):
        raise SweepError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(f"sweep_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_backend() -> str:
    """JAX's default backend ("cpu", "gpu", "tpu"), from a child process: importing JAX here
    would claim the accelerator's memory in the sweep process itself."""
    proc = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.split()
    return lines[-1] if proc.returncode == 0 and lines else "cpu"


def _call_with_arg(fn, arg: str | None):
    """Call fn(arg) if it takes a parameter, fn() otherwise (ml_collections passes none)."""
    if inspect.signature(fn).parameters:
        return fn(arg) if arg is not None else fn()
    return fn()


def expand_grid(grid: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> list[dict]:
    """A grid as a list of override dicts, or axes -> values expanded as a cartesian product."""
    if isinstance(grid, Mapping):
        for axis, values in grid.items():
            if isinstance(values, str) or not isinstance(values, Sequence) or not values:
                raise SweepError(f"get_sweep: axis {axis!r} needs a non-empty list of values")
        axes = list(grid)
        return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*grid.values())]
    points = [dict(p) for p in grid]
    if not points:
        raise SweepError("get_sweep: the grid is empty")
    return points


def format_value(value: Any) -> str:
    """How a value is written both in a point name and on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else ")")
    return str(value)


def point_name(overrides: Mapping[str, Any]) -> str:
    """Readable, stable directory name: 'task=reverse_string,pe=alibi,seed=0'."""
    parts = [f"{k}={format_value(v)}" for k, v in overrides.items()]
    return _NAME_UNSAFE.sub("_", ",".join(parts)) or "default"


def merge_arg(base: str | None, items: Mapping[str, Any]) -> str | None:
    """Merge structural choices into a `k=v,k=v` config arg; grid values win over base ones."""
    tokens = [t for t in (base or "").split(",") if t]
    keyed = {t.partition("=")[0]: t for t in tokens}
    for key, value in items.items():
        keyed[key] = f"{key}={format_value(value)}"
    merged = ",".join(keyed.values())
    return merged or base


def _leaf_exists(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False
    return not isinstance(node, Mapping) and not hasattr(node, "to_dict")


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: where it runs and how its config is made."""

    name: str
    overrides: dict
    workdir: Path
    config_spec: str  # '<file>:<arg>' with the structural choices merged in
    flags: tuple[str, ...]  # '--config.<key>=<value>' for config fields (seed included)
    seed: Any = None
    changed: bool = False  # resumable fields (e.g. more steps) differ from its config.json

    @property
    def done(self) -> bool:
        return (self.workdir / DONE).exists() and not self.changed


def point_config(module, point: Point):
    """The config the driver will run for `point` (the file's get_config of the point's arg,
    then its --config.k=v flags, as experiments.main applies them)."""
    from experiments import config_utils

    arg = split_config_spec(point.config_spec)[1]
    config = _call_with_arg(module.get_config, arg)
    overrides = [f.removeprefix("--config.") for f in point.flags]
    config_utils.apply_overrides(config, overrides)
    return config_utils.reconcile_blocks(config, point.flags)


def check_drift(module, points: list[Point]) -> list[Point]:
    """Points whose workdir holds a run: the same config, or only resumable fields changed
    (those points are marked `changed` and run again); a SweepError naming the points whose
    workdir holds another config (changed overrides or config file)."""
    from experiments.validate import config_changes, describe_changes

    out, differ = [], []
    for p in points:
        resumable, fixed = config_changes(point_config(module, p), str(p.workdir))
        if fixed:
            differ.append(f"{p.name}: {describe_changes(fixed, limit=2)}")
        out.append(dataclasses.replace(p, changed=bool(resumable)))
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise SweepError(
            f"{len(differ)} points differ from the runs in their workdirs, e.g. {differ[0]}{more};"
            " re-run with the overrides they were made with, or use a new --workdir"
        )
    return out


def build_points(
    config_spec: str, workdir: str | Path, extra_flags: Sequence[str] = (), only: str | None = None
) -> tuple[list[Point], Any]:
    """Read the config file's grid; return (points, config module)."""
    path, arg = split_config_spec(config_spec)
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"--config: {path} defines no get_sweep(); it is not a sweep")
    grid = expand_grid(_call_with_arg(module.get_sweep, arg))
    base_config = _call_with_arg(module.get_config, arg)
    points, seen = [], set()
    for overrides in grid:
        fields = {k: v for k, v in overrides.items() if _leaf_exists(base_config, k)}
        structural = {k: v for k, v in overrides.items() if k not in fields}
        dotted = [k for k in structural if "." in k]
        if dotted:
            raise SweepError(f"get_sweep: {dotted[0]!r} is not a field of the config from {path}")
        point_arg = merge_arg(arg, structural)
        name = point_name(overrides)
        if name in seen:
            raise SweepError(f"get_sweep: two points share the name {name!r}")
        seen.add(name)
        if only and not re.search(only, name):
            continue
        flags = tuple(f"--config.{k}={format_value(v)}" for k, v in fields.items())
        points.append(
            Point(
                name=name,
                overrides=dict(overrides),
                workdir=Path(workdir) / name,
                config_spec=path if point_arg is None else f"{path}:{point_arg}",
                flags=flags + tuple(extra_flags),
                seed=fields.get("seed"),
            )
        )
    return points, module


@dataclasses.dataclass
class Job:
    """One subprocess: a single point, or a group of seeds trained together."""

    points: list[Point]
    argv: list[str]
    log: Path

    @property
    def label(self) -> str:
        if len(self.points) == 1:
            return self.points[0].name
        return f"{group_key(self.points[0])} (seeds {','.join(str(p.seed) for p in self.points)})"


def _absolute(path: Path) -> str:
    # Orbax refuses relative checkpoint paths; the driver gets the workdir absolute.
    return str(Path(path).absolute())


def group_key(point: Point) -> str:
    """The point's name without its seed: the points that vmapped seeds train together."""
    return point_name({k: v for k, v in point.overrides.items() if k != "seed"})


def make_jobs(
    points: Sequence[Point],
    *,
    vmap_seeds: bool,
    driver: Sequence[str] | None = None,
    seeds_driver: Sequence[str] | None = None,
) -> list[Job]:
    """One job per unfinished point, or per group of unfinished seeds with vmap_seeds."""
    driver, seeds_driver = driver or DRIVER, seeds_driver or SEEDS_DRIVER
    todo = [p for p in points if not p.done]
    if not vmap_seeds:
        return [
            Job(
                [p],
                [*driver, "--config", p.config_spec, "--workdir", _absolute(p.workdir), *p.flags],
                p.workdir / LOG_FILE,
            )
            for p in todo
        ]
    groups: dict[str, list[Point]] = {}
    for p in todo:
        groups.setdefault(group_key(p) if p.seed is not None else p.name, []).append(p)
    jobs = []
    for members in groups.values():
        first = members[0]
        if len(members) == 1:
            jobs.extend(make_jobs(members, vmap_seeds=False, driver=driver))
            continue
        placeholder = "SEEDPLACEHOLDER"
        name = point_name({**first.overrides, "seed": placeholder})
        pattern = _absolute(first.workdir.parent / name).replace(placeholder, "{seed}")
        flags = [f for f in first.flags if not f.startswith("--config.seed=")]
        argv = [
            *seeds_driver,
            "--config",
            first.config_spec,
            "--workdir",
            pattern,
            "--seeds",
            ",".join(format_value(p.seed) for p in members),
            *flags,
        ]
        jobs.append(Job(members, argv, first.workdir.parent / f"{group_key(first)}.{LOG_FILE}"))
    return jobs


def child_env(parallel: int) -> dict[str, str]:
    """Environment for every point: ours, plus settings that let N programs share a machine."""
    env = dict(os.environ)
    if parallel > 1:
        # Several programs on one accelerator must not each grab 75% of its memory.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if parallel >= (os.cpu_count() or 1):
            # One XLA CPU thread pool per point; N pools of all cores only thrash.
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            ).strip()
    return env


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Sweep:
    """Runs jobs with at most `parallel` subprocesses alive; records every transition."""

    def __init__(
        self,
        workdir: Path,
        points: Sequence[Point],
        *,
        config_spec: str,
        parallel: int,
        pool: devices.DevicePool | None = None,
    ):
        self.workdir = Path(workdir)
        self.parallel = max(1, parallel)
        self.pool = pool
        self.slots: dict[subprocess.Popen, int] = {}  # the device slot each child holds
        previous = _read_json(self.workdir / STATUS_FILE) or {}
        # Points left out by --only keep what an earlier invocation recorded about them.
        self.status = {
            "config": config_spec,
            "started": _now(),
            "updated": _now(),
            "points": previous.get("points", {}),
        }
        for p in points:
            self.status["points"][p.name] = {
                "status": "done" if p.done else "pending",
                "workdir": str(p.workdir),
                "overrides": p.overrides,
            }
        self.names = [p.name for p in points]

    def _set(self, points: Sequence[Point], **fields) -> None:
        for p in points:
            self.status["points"][p.name].update(fields)
        self.status["updated"] = _now()
        atomic_write_json(self.workdir / STATUS_FILE, self.status)

    def run(self, jobs: Sequence[Job], env: Mapping[str, str], timeout: float | None) -> int | None:
        """Run the jobs; the signal number if SIGTERM / SIGINT stopped the sweep (every running
        point got the signal, saved its checkpoint and was recorded as "stopped")."""
        queue = list(jobs)
        running: dict[subprocess.Popen, tuple[Job, float, Any]] = {}
        self._set([])
        with StopSignals() as stop:
            while (queue or running) and stop.received is None:
                while queue and len(running) < self.parallel:
                    got = self.pool.acquire(dict(env)) if self.pool else (-1, env)
                    if got is None:
                        break  # every device slot is busy
                    slot, job_env = got
                    job = queue.pop(0)
                    job.log.parent.mkdir(parents=True, exist_ok=True)
                    log = open(job.log, "a")  # closed when the job ends
                    log.write(f"\n=== {_now()} {shlex.join(job.argv)}\n")
                    placed = {k: v for k, v in job_env.items() if env.get(k) != v}
                    if placed:
                        log.write(
                            f"=== devices: {' '.join(f'{k}={v}' for k, v in placed.items())}\n"
                        )
                    log.flush()
                    proc = subprocess.Popen(
                        job.argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**job_env, "ATTN_SWEEP_POINT": job.points[0].name},
                        start_new_session=True,  # signals reach points only through the sweep
                    )
                    self.slots[proc] = slot
                    running[proc] = (job, time.monotonic(), log)
                    self._set(job.points, status="running", command=job.argv, log=str(job.log))
                    print(f"[sweep] start  {job.label}", flush=True)
                for proc in list(running):
                    job, start, log = running[proc]
                    elapsed = time.monotonic() - start
                    if proc.poll() is None:
                        if timeout and elapsed > timeout:
                            os.killpg(proc.pid, signal.SIGKILL)
                            proc.wait()
                            log.write(f"\n=== sweep: killed after {timeout:.0f} s timeout\n")
                        else:
                            continue
                    log.close()
                    del running[proc]
                    if self.pool:
                        self.pool.release(self.slots.pop(proc))
                    self._finish(job, proc.returncode, elapsed)
                time.sleep(0.2)
            if stop.received is None:
                return None
            signum = int(getattr(signal, stop.received))
            self._stop(running, signum)
            return signum

    def _stop(self, running: dict, signum: int) -> None:
        """Forward `signum` to every running point, let each save its checkpoint, record it."""
        print(f"[sweep] {signal.Signals(signum).name}: stopping {len(running)} running points")
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc, (job, start, log) in running.items():
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                log.write(f"\n=== sweep: killed {STOP_GRACE_S} s after {signum}\n")
            log.close()
            stopped = proc.returncode == 128 + signum or proc.returncode == -signum
            if stopped or proc.returncode != 0:
                status = "stopped" if stopped else "failed"
                self._set(
                    job.points,
                    status=status,
                    returncode=proc.returncode,
                    seconds=round(time.monotonic() - start, 1),
                    error=None if stopped else _tail(job.log),
                )
            else:
                self._finish(job, 0, time.monotonic() - start)
        for name in self.names:
            if self.status["points"][name]["status"] == "pending":
                self.status["points"][name]["status"] = "not started"
        self._set([])

    def _finish(self, job: Job, returncode: int, elapsed: float) -> None:
        for p in job.points:
            if returncode == 0 and (p.workdir / DONE).exists():
                fields = {"status": "done", "returncode": 0, "error": None}
            else:
                why = "exited 0 without writing DONE" if returncode == 0 else _tail(job.log)
                fields = {"status": "failed", "returncode": returncode, "error": why}
            self._set([p], seconds=round(elapsed, 1), **fields)
            mark = "done  " if fields["status"] == "done" else "FAILED"
            print(f"[sweep] {mark} {p.name} ({elapsed:.0f} s)", flush=True)

    def failures(self) -> dict[str, dict]:
        """Points of this invocation that are not DONE."""
        return {
            n: self.status["points"][n]
            for n in self.names
            if self.status["points"][n]["status"] != "done"
        }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _device_pool(module, points, host, devices_per_run) -> devices.DevicePool | None:
    """The device slots children take, or None to leave their environment alone."""
    per_run = devices_per_run
    if per_run is None and host["backend"] != "cpu":
        per_run = getattr(module, "sweep_devices_per_run", None)
        if per_run is None:
            per_run = devices.default_devices_per_run(point_config(module, points[0]))
    if per_run is None:
        return None
    try:
        pool = devices.DevicePool(host["backend"], host["count"], int(per_run))
    except ValueError as e:
        raise SweepError(str(e)) from None
    print(f"[sweep] {devices.describe(pool)}", flush=True)
    return pool


def run_sweep(
    config_spec: str,
    workdir: str | Path,
    *,
    parallel: int | None = 1,
    devices_per_run: int | None = None,
    only: str | None = None,
    vmap_seeds: bool | None = None,
    extra_flags: Sequence[str] = (),
    timeout: float | None = None,
    dry_run: bool = False,
    driver: Sequence[str] | None = None,
    seeds_driver: Sequence[str] | None = None,
    probe=devices.probe,
    backend: str = "local",
    slurm_flags: Mapping[str, Any] | None = None,
    wait: bool = True,
    poll: float = 10.0,
) -> dict:
    """Run every unfinished point; return the status dict (also in workdir/sweep_status.json).

    backend="slurm" submits the points as a SLURM job array instead (experiments/slurm.py:
    `slurm_flags` are its options over the config file's `sweep_slurm`; wait=False returns
    once submitted; `poll` is the seconds between looks at the queue).

    vmap_seeds=None reads the config file's `sweep_vmap_seeds`. `driver` is the command that
    trains one point, DRIVER by default (tests substitute a stub). parallel=None: as many as
    there are device slots (one on a CPU). devices_per_run=None: the config file's
    `sweep_devices_per_run`, else `devices.default_devices_per_run` on an accelerator (see
    the module docstring). `probe` asks a child process for the backend and device count.
    """
    points, module = build_points(config_spec, workdir, extra_flags, only)
    if not points:
        raise SweepError(f"--only: {only!r} matches no point of the grid")
    if driver is None:  # the real driver: its points must match the runs in their workdirs
        points = check_drift(module, points)
    options = None
    if backend == "slurm":
        options = _slurm_options(
            module, config_spec, parallel, devices_per_run, timeout, slurm_flags
        )
    if vmap_seeds is None:
        wanted = getattr(module, "sweep_vmap_seeds", False)
        if callable(wanted):
            wanted = _call_with_arg(wanted, split_config_spec(config_spec)[1])
        if wanted == "accelerator":  # a SLURM task has an accelerator if it asks for GPUs
            vmap_seeds = bool(options.gpus) if options else default_backend() != "cpu"
        else:
            vmap_seeds = bool(wanted)
    if options is not None:
        from experiments import slurm

        status = slurm.run_sweep(
            config_spec,
            workdir,
            points,
            make_jobs=lambda todo: make_jobs(
                todo, vmap_seeds=vmap_seeds, driver=driver, seeds_driver=seeds_driver
            ),
            options=options,
            wait=wait,
            poll=poll,
            dry_run=dry_run,
        )
        if status and wait and not status.get("detached"):
            report(status, [p.name for p in points], workdir)
        return status
    pool = _device_pool(module, points, probe(), devices_per_run)
    if parallel is None:
        parallel = (pool.capacity if pool else None) or 1
    jobs = make_jobs(points, vmap_seeds=vmap_seeds, driver=driver, seeds_driver=seeds_driver)
    skipped = len(points) - sum(len(j.points) for j in jobs)
    print(
        f"[sweep] {len(points)} points in {workdir}: {skipped} already DONE, "
        f"{sum(len(j.points) for j in jobs)} to run as {len(jobs)} programs, {parallel} at once",
        flush=True,
    )
    if dry_run:
        for job in jobs:
            print(" ".join(job.argv))
        return {}
    Path(workdir).mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        sweep = Sweep(Path(workdir), points, config_spec=config_spec, parallel=parallel, pool=pool)
        stopped = sweep.run(jobs, child_env(parallel), timeout)
    if stopped:
        sweep.status["stopped"] = signal.Signals(stopped).name
        sweep._set([])
        print("[sweep] stopped; re-run the same command to resume the points that are not DONE")
        return sweep.status
    report(sweep.status, sweep.names, workdir)
    return sweep.status


def report(status: dict, names: Sequence[str], workdir: str | Path) -> None:
    """Record and print the points of `names` that are not DONE (either backend)."""
    failed = {n: status["points"][n] for n in names if status["points"][n]["status"] != "done"}
    status["failed"] = sorted(failed)
    status["updated"] = _now()
    atomic_write_json(Path(workdir) / STATUS_FILE, status)
    if failed:
        print(f"[sweep] {len(failed)} of {len(names)} points FAILED:", flush=True)
        for name, s in failed.items():
            print(
                f"  {name}: exit {s.get('returncode')}: {s.get('error')}\n    log: {s.get('log')}"
            )
        print("[sweep] re-run the same command to retry only the points that are not DONE")
    else:
        print(f"[sweep] all {len(names)} points DONE; status in {Path(workdir) / STATUS_FILE}")


def _slurm_options(module, config_spec, parallel, devices_per_run, timeout, flags):
    """SLURM options: the config file's `sweep_slurm` (a dict, or a callable of the :arg)
    under the flags given; the local backend's device and timeout flags are refused."""
    from experiments import slurm

    if devices_per_run is not None:
        raise SweepError(
            "--devices_per_run: a local-backend flag; with --backend slurm each task gets "
            "--slurm_gpus GPUs"
        )
    if timeout is not None:
        raise SweepError(
            "--timeout: a local-backend flag; with --backend slurm the time limit is "
            "--slurm_time (minutes)"
        )
    from_config = getattr(module, "sweep_slurm", None)
    if callable(from_config):
        from_config = _call_with_arg(from_config, split_config_spec(config_spec)[1])
    if from_config is not None and not isinstance(from_config, Mapping):
        raise SweepError(f"sweep_slurm: a dict of {', '.join(slurm.OPTION_KEYS)}")
    flags = dict(flags or {})
    if parallel is not None:
        flags["array_parallelism"] = parallel
    return slurm.options_from(from_config, **flags)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="sweep",
        description="Run every point of a config's get_sweep() grid as an isolated subprocess.",
        epilog="Extra --config.<field>=<value> arguments apply to every point.",
    )
    parser.add_argument("--config", help="config file with get_sweep(), [:arg]")
    parser.add_argument("--workdir", help="root; one sub-directory per point")
    parser.add_argument(
        "--status",
        metavar="WORKDIR",
        default=None,
        help="show the points of the sweep in WORKDIR (queued, running, done, failed) and exit",
    )
    parser.add_argument(
        "--backend",
        choices=("local", "slurm"),
        default="local",
        help="local subprocesses, or a SLURM job array through submitit (experiments/slurm.py)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="points running at once (default: one per device slot on an accelerator, else 1)",
    )
    parser.add_argument(
        "--devices_per_run",
        type=int,
        default=None,
        help="devices each point sees (0: all; default: 1 for models under 100M parameters "
        "on an accelerator); on a CPU, its number of emulated devices",
    )
    parser.add_argument("--only", default=None, help="regex; run only points whose name matches")
    parser.add_argument(
        "--vmap_seeds",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train seeds of one shape together under jax.vmap (default: the config's choice)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per program")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    slurm = parser.add_argument_group("--backend slurm (default: the config's sweep_slurm)")
    slurm.add_argument("--slurm_partition", default=None, help="partition to submit to")
    slurm.add_argument("--slurm_time", type=int, default=None, help="minutes per task (240)")
    slurm.add_argument("--slurm_mem", type=float, default=None, help="GB of memory per task")
    slurm.add_argument("--slurm_gpus", type=int, default=None, help="GPUs per task (--gres)")
    slurm.add_argument("--slurm_cpus", type=int, default=None, help="CPUs per task")
    slurm.add_argument(
        "--slurm_param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. account=abc or qos=high (repeatable)",
    )
    slurm.add_argument(
        "--no_wait", action="store_true", help="submit and return (follow with --status)"
    )
    slurm.add_argument("--poll", type=float, default=10.0, help="seconds between queue looks")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.status is not None:
        return show_status(args.status)
    if not args.config or not args.workdir:
        parser.error("the following arguments are required: --config, --workdir")
    parser.check(args.poll > 0, "--poll", "seconds, > 0")
    parser.check(args.parallel is None or args.parallel >= 1, "--parallel", "must be >= 1")
    parser.check(args.timeout is None or args.timeout > 0, "--timeout", "seconds, > 0")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as e:
            parser.error(f"--only: {args.only!r} is not a regular expression ({e})")
    try:
        status = run_sweep(
            args.config,
            args.workdir,
            parallel=args.parallel,
            devices_per_run=args.devices_per_run,
            only=args.only,
            vmap_seeds=args.vmap_seeds,
            extra_flags=extra,
            timeout=args.timeout,
            dry_run=args.dry_run,
            backend=args.backend,
            slurm_flags=_slurm_flags(args) if args.backend == "slurm" else None,
            wait=not args.no_wait,
            poll=args.poll,
        )
    except (SweepError, ConfigError) as e:
        print(f"sweep: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"sweep: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    stopped = status.get("stopped") or status.get("detached")
    if stopped:
        return 128 + int(getattr(signal, stopped))
    return 1 if status.get("failed") else 0


def _slurm_flags(args) -> dict:
    from experiments import slurm

    return {
        "partition": args.slurm_partition,
        "time_min": args.slurm_time,
        "mem_gb": args.slurm_mem,
        "gpus": args.slurm_gpus,
        "cpus": args.slurm_cpus,
        "params": slurm.parse_params(args.slurm_param),
    }


STATUS_ORDER = ("running", "queued", "pending", "failed", "stopped", "not started", "done")


def _local_sweep_alive(root: Path) -> bool:
    """Whether a local sweep holds the root's lock (a crashed one does not)."""
    import fcntl

    try:
        fd = os.open(root / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no flock on this filesystem: cannot tell
    finally:
        os.close(fd)  # closing the descriptor drops a lock we took
    return False


def show_status(workdir: str | Path) -> int:
    """`--status WORKDIR`: every point of the sweep and where it is, for either backend (the
    SLURM one asks the queue first and records what it learns when no sweep holds WORKDIR)."""
    root = Path(workdir)
    status = _read_json(root / STATUS_FILE)
    if not status or not isinstance(status.get("points"), dict):
        print(f"sweep: no {STATUS_FILE} in {root}: not a sweep workdir", file=sys.stderr)
        return 2
    backend = status.get("backend", "local")
    points = status["points"]
    if backend == "slurm":
        import shutil

        from experiments import slurm

        if shutil.which("squeue") is None:
            print("(no squeue on this machine: the states as last recorded)")
        if slurm.refresh(status, root=root):
            with contextlib.suppress(RunError, OSError), workdir_lock(root):
                atomic_write_json(root / STATUS_FILE, status)
    elif not _local_sweep_alive(root):
        for s in points.values():  # left by a sweep that was killed
            if s["status"] in ("running", "pending"):
                s["status"] = "not started" if s["status"] == "pending" else "interrupted"
    counts: dict[str, int] = {}
    for s in points.values():
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    order = [k for k in STATUS_ORDER if k in counts] + sorted(set(counts) - set(STATUS_ORDER))
    print(
        f"{root}: {backend} sweep of {status.get('config')}, {len(points)} points: "
        + ", ".join(f"{counts[k]} {k}" for k in order)
        + f" (updated {status.get('updated')})"
    )
    rank = {k: i for i, k in enumerate(order)}
    width = max(len(n) for n in points)
    for name, s in sorted(points.items(), key=lambda kv: rank[kv[1]["status"]]):
        line = f"  {name:<{width}}  {s['status']:<11}"
        if s.get("slurm_job"):
            line += f" job {s['slurm_job']}"
        if s["status"] == "running" and s.get("host"):
            line += f" on {s['host']}"
        if s["status"] == "queued" and s.get("reason"):
            line += f" ({s['reason']})"
        if s["status"] == "done" and s.get("seconds") is not None:
            line += f" {s['seconds']:.0f} s"
        if s["status"] in ("failed", "stopped", "interrupted"):
            line += f" exit {s.get('returncode')}: {s.get('error')}\n    log: {s.get('log')}"
        print(line.rstrip())
    if any(s["status"] != "done" for s in points.values()):
        print(f"re-running the sweep's command resumes the points that are not DONE ({root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
