"""Reliability: every promise of the "Reliability" issue, each as a test that injects the fault.

The tests drive the real entry point (`python -m experiments.main --mode train ...`) in
subprocesses on tiny smoke configs, and check from outside what a user would see: exit
status, the one line on stderr, and the files in the workdir. Kill points are chosen from the
run's own progress (metrics.jsonl rows, checkpoint directories appearing), polled every few
milliseconds, so no hook in the driver is needed.

Promises (issue "Reliability"), and where each is tested:
  1 kill -9 anywhere -> resume -> bit-identical params and results: test_kill9_*
  2 SIGTERM / SIGINT -> checkpoint, pending writes finished, documented status: test_stop_*
  3 corrupt / truncated latest checkpoint -> one line, previous good step, continue:
    test_corrupt_latest_checkpoint_*
  4 non-finite loss -> message with step and last good checkpoint; skip mode counts skips:
    test_nonfinite_*
  5 two processes on one workdir -> the second refuses: test_second_process_*
  6 bad input -> one line naming the field and what is allowed, no traceback:
    test_bad_input_*, test_disk_full_*
  7 sweep with crashing points -> others finish, failures listed, rerun only those:
    test_sweep_*
  8 results.json / table.md / table.csv atomic: test_atomic_*
  9 sharded vs unsharded agree to 1e-5, checkpoints move between meshes: test_sharded_*

Run: `.venv/bin/python -m pytest -q tests/test_reliability.py` (fast subset);
add `-m slow` for the rest of the kill matrix and mesh shapes.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import checkpoint as ck
from experiments import workdir as wd

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SMOKE = "smoke=true"
# A run long enough to be interrupted at several places: checkpoints at 4, 8, 12, then the
# final one at 16, then the evaluation.
KILL_FLAGS = ("--config.train.steps=16", "--config.train.ckpt_every=4")
# Wall-clock fields (the date, and every "*_s" duration or rate, e.g. compile_s, eval_s,
# steps_per_s); everything else in metrics.jsonl and results.json must reproduce exactly.
TIMESTAMP_KEYS = {"date"}
ENTRY_POINT = REPO / "experiments" / "main.py"

pytestmark = pytest.mark.skipif(
    not ENTRY_POINT.exists(), reason="experiments/main.py (the driver's entry point) is missing"
)


def config_spec(arg: str = SMOKE) -> str:
    """The smoke config: configs/formal.py once it exists, else configs/base.py (same schema)."""
    name = "formal.py" if (REPO / "configs" / "formal.py").exists() else "base.py"
    return f"configs/{name}:{arg}"


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env.update(
        XLA_FLAGS=flags.strip(),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
    )
    return env


# An audit hook (PEP 578) in the child records every open-for-writing and rename of the
# files that must be written atomically, so test_atomic_* can prove how they were written.
_AUDIT_WRAPPER = textwrap.dedent(
    """
    import os, runpy, sys
    log_fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    WATCHED = {"results.json", "table.md", "table.csv", "config.json", "sweep_status.json"}
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return
            name = os.path.basename(os.fsdecode(path))
            if isinstance(mode, str):
                writing = any(c in mode for c in "wax+")
            else:
                writing = bool((flags or 0) & (os.O_WRONLY | os.O_RDWR))
            if writing and name in WATCHED:
                os.write(log_fd, f"direct-write {os.fsdecode(path)}\\n".encode())
        elif event == "os.rename":
            dst = os.fsdecode(args[1])
            if os.path.basename(dst) in WATCHED:
                os.write(log_fd, f"rename {dst}\\n".encode())
    sys.addaudithook(hook)
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)

# Fault injection for the disk-full case: the N-th checkpoint save hits a full disk on its
# last write (orbax's finalize thread), as it would when the disk fills during a run.
_DISK_FULL_WRAPPER = textwrap.dedent(
    """
    import errno, runpy, sys
    from experiments import checkpoint
    fail_at = int(sys.argv[1])
    seal = checkpoint.Checkpointer._seal
    calls = []
    def full_disk_seal(self):
        calls.append(1)
        if len(calls) >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        seal(self)
    checkpoint.Checkpointer._seal = full_disk_seal
    sys.argv = ["experiments.main"] + sys.argv[2:]
    runpy.run_module("experiments.main", run_name="__main__", alter_sys=True)
    """
)


def train_argv(workdir: Path, *flags: str, arg: str = SMOKE) -> list[str]:
    return ["--mode", "train", "--config", config_spec(arg), "--workdir", str(workdir), *flags]


def start(
    workdir: Path,
    *flags: str,
    devices: int = 1,
    arg: str = SMOKE,
    audit: bool = False,
    argv: list[str] | None = None,
    module: str = "experiments.main",
) -> subprocess.Popen:
    """Start the entry point; stdout+stderr go to <workdir>.log (kept for failure messages)."""
    argv = argv if argv is not None else train_argv(workdir, *flags, arg=arg)
    log = open(f"{workdir}.log", "ab")  # noqa: SIM115 - closed by finish()
    if audit:
        cmd = [PY, "-c", _AUDIT_WRAPPER, f"{workdir}.audit", module, *argv]
    else:
        cmd = [PY, "-m", module, *argv]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=log, stderr=subprocess.PIPE)
    proc.log = log
    proc.workdir = workdir
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for the process; return (exit status, stderr text)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.log.close()
    err = err.decode(errors="replace")
    with open(f"{proc.workdir}.log", "a") as f:
        f.write(err)
    return proc.returncode, err


def run(workdir: Path, *flags: str, timeout: float = 300, **kw) -> tuple[int, str]:
    return finish(start(workdir, *flags, **kw), timeout)


def train_rows(workdir: Path) -> list[dict]:
    return [r for r in wd.read_jsonl(workdir / "metrics.jsonl") if r.get("split") == "train"]


def last_train_step(workdir: Path) -> int:
    rows = train_rows(workdir)
    return max((int(r["step"]) for r in rows), default=0)


def committed(workdir: Path, step: int) -> bool:
    return (workdir / "checkpoints" / str(step) / ck.MANIFEST).exists()


def saving(workdir: Path) -> bool:
    return any((workdir / "checkpoints").glob(f"*{ocp.step.TMP_DIR_SUFFIX}"))


def evaluating(workdir: Path) -> bool:
    rows = wd.read_jsonl(workdir / "metrics.jsonl")
    return (
        any(r.get("split") not in ("train", None) for r in rows)
        and not (workdir / "results.json").exists()
    )


def wait_for(proc: subprocess.Popen, predicate, timeout: float = 240, poll: float = 0.003) -> bool:
    """Poll until predicate() (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")


def kill_when(workdir: Path, predicate, *flags: str, devices: int = 1) -> None:
    """Start a run, SIGKILL it the moment predicate() holds; fail if it finished first."""
    proc = start(workdir, *flags, devices=devices)
    reached = wait_for(proc, predicate)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    code, err = finish(proc)
    assert reached and code == -signal.SIGKILL, (
        f"kill point never reached (exit {code}); stderr tail: {err[-2000:]}"
    )


def strip_timing(obj):
    if isinstance(obj, dict):
        return {
            k: strip_timing(v)
            for k, v in obj.items()
            if k not in TIMESTAMP_KEYS and not k.endswith("_s")
        }
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def final_arrays(workdir: Path) -> tuple[int, dict[str, np.ndarray]]:
    """The newest checkpoint's arrays by tree path (typed PRNG keys as their key data)."""
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    step = max(steps)
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(workdir / "checkpoints" / str(step) / "default")
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return step, out


def assert_bit_identical(run_dir: Path, reference: Path) -> None:
    """Same final checkpoint bytes and the same results.json (minus timings) and DONE."""
    step, arrays = final_arrays(run_dir)
    ref_step, ref_arrays = final_arrays(reference)
    assert step == ref_step
    assert arrays.keys() == ref_arrays.keys()
    for key, value in arrays.items():
        ref = ref_arrays[key]
        assert value.dtype == ref.dtype and value.shape == ref.shape, key
        assert value.tobytes() == ref.tobytes(), f"{key} differs from the uninterrupted run"
    results = json.loads((run_dir / "results.json").read_text())
    ref_results = json.loads((reference / "results.json").read_text())
    assert strip_timing(results) == strip_timing(ref_results)
    assert (run_dir / "DONE").exists()


def assert_same_metrics(run_dir: Path, reference: Path) -> None:
    """metrics.jsonl reads as if the run had never been interrupted (no duplicate rows)."""
    rows = strip_timing(wd.read_jsonl(run_dir / "metrics.jsonl"))
    ref_rows = strip_timing(wd.read_jsonl(reference / "metrics.jsonl"))
    keys = [(r["step"], r["split"], r.get("length")) for r in rows]
    ref_keys = [(r["step"], r["split"], r.get("length")) for r in ref_rows]
    extra = [k for k in keys if keys.count(k) > ref_keys.count(k)]
    assert keys == ref_keys, (
        f"metrics.jsonl rows (step, split, length) repeated after resume: {extra}"
    )
    assert rows == ref_rows


def assert_one_error_line(err: str, *needles: str) -> str:
    """stderr ends with the one-line 'error: ...' holding every needle; no traceback.

    Log lines (absl INFO/WARNING) may come before it; the error itself is one line, the last.
    """
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], (
        "no single last 'error:' line:\n" + (err[-3000:])
    )
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """One uninterrupted run of the kill-test config (also audited for atomic writes)."""
    workdir = tmp_path_factory.mktemp("baseline") / "run"
    code, err = run(workdir, *KILL_FLAGS, audit=True)
    assert code == 0, err[-3000:]
    assert (workdir / "results.json").exists() and (workdir / "DONE").exists()
    return workdir


# ----------------------------------------------------------------------------- 1 kill -9

KILL_POINTS = {
    "during_second_async_save": lambda w: lambda: committed(w, 4) and saving(w),
    "during_first_async_save": lambda w: lambda: saving(w),
    "before_first_checkpoint": lambda w: lambda: last_train_step(w) >= 2 and not committed(w, 4),
    "during_step_between_checkpoints": lambda w: (
        lambda: committed(w, 8) and last_train_step(w) >= 9
    ),
    "after_final_checkpoint_before_eval": lambda w: lambda: committed(w, 16),
    "during_eval": lambda w: lambda: evaluating(w),
}
# The slow matrix: kill sequences (one kill each, and one run killed twice).
KILL_SEQUENCES = {
    "during_first_async_save": ["during_first_async_save"],
    "before_first_checkpoint": ["before_first_checkpoint"],
    "during_step_between_checkpoints": ["during_step_between_checkpoints"],
    "after_final_checkpoint_before_eval": ["after_final_checkpoint_before_eval"],
    "during_eval": ["during_eval"],
    "twice": ["before_first_checkpoint", "during_step_between_checkpoints"],
}


def _kill_then_resume(workdir: Path, points: list[str]) -> Path:
    for name in points:
        kill_when(workdir, KILL_POINTS[name](workdir), *KILL_FLAGS)
        assert not (workdir / "DONE").exists()
    code, err = run(workdir, *KILL_FLAGS)
    assert code == 0, err[-3000:]
    return workdir


@pytest.fixture(scope="module")
def killed_during_save(tmp_path_factory) -> Path:
    """A run killed -9 while saving its second checkpoint, then re-run to the end."""
    workdir = tmp_path_factory.mktemp("killed") / "run"
    return _kill_then_resume(workdir, ["during_second_async_save"])


def test_kill9_during_async_save_resumes_bit_identical(killed_during_save, baseline):
    assert_bit_identical(killed_during_save, baseline)


def test_kill9_resumed_metrics_have_no_duplicate_rows(killed_during_save, baseline):
    assert_same_metrics(killed_during_save, baseline)


@pytest.fixture(scope="module", params=list(KILL_SEQUENCES))
def killed_at(request, tmp_path_factory) -> Path:
    """A run killed -9 at each place of KILL_SEQUENCES, then re-run to the end."""
    workdir = tmp_path_factory.mktemp(f"killed_{request.param}") / "run"
    return _kill_then_resume(workdir, KILL_SEQUENCES[request.param])


@pytest.mark.slow
def test_kill9_matrix_resumes_bit_identical(killed_at, baseline):
    assert_bit_identical(killed_at, baseline)


@pytest.mark.slow
def test_kill9_matrix_metrics_have_no_duplicate_rows(killed_at, baseline):
    assert_same_metrics(killed_at, baseline)


# ----------------------------------------------------------------------------- 2 signals

LONG_FLAGS = ("--config.train.steps=100000", "--config.train.ckpt_every=100000")


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_stop_signal_saves_and_exits_with_documented_status(tmp_path, sig):
    workdir = tmp_path / "run"
    proc = start(workdir, *LONG_FLAGS)
    assert wait_for(proc, lambda: last_train_step(workdir) >= 3), "training never started"
    sent = time.monotonic()
    proc.send_signal(sig)
    code, err = finish(proc, timeout=60)
    took = time.monotonic() - sent
    assert code == 128 + sig, f"exit {code}, documented 128+{int(sig)}; {err[-2000:]}"
    assert took < 30, f"took {took:.1f} s to stop"
    assert "Traceback" not in err
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3, steps
    stopped_at = steps[0]
    assert ck.verify_step_dir(workdir / "checkpoints" / str(stopped_at)) is None
    assert not saving(workdir), "a checkpoint write was left unfinished"
    assert not (workdir / "DONE").exists() and not (workdir / "results.json").exists()
    # The same command resumes from there: metrics continue, with no duplicated step.
    proc = start(workdir, *LONG_FLAGS)
    assert wait_for(proc, lambda: last_train_step(workdir) >= stopped_at + 2)
    proc.send_signal(sig)
    code, err = finish(proc, timeout=60)
    assert code == 128 + sig, err[-2000:]
    logged = [int(r["step"]) for r in train_rows(workdir)]
    assert logged == list(range(1, len(logged) + 1)), "metrics rows not contiguous on resume"


def test_two_sigterms_close_together_keep_the_stop_checkpoint(tmp_path):
    """coreutils `timeout` signals the child and then its process group: the repeat must not
    kill the process while it saves."""
    workdir = tmp_path / "run"
    proc = start(workdir, *LONG_FLAGS)
    assert wait_for(proc, lambda: last_train_step(workdir) >= 3), "training never started"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=60)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3, steps
    assert ck.verify_step_dir(workdir / "checkpoints" / str(steps[0])) is None


def test_signal_before_training_starts_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    proc = start(workdir, *LONG_FLAGS)
    time.sleep(0.5)  # the entry point is importing JAX: no training, nothing to save yet
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=60)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    if "checkpoint saved" in last:  # a quiet machine can reach step 0 within the sleep
        assert last.endswith("step 0: stopped by SIGTERM; checkpoint saved"), last
        assert ck.verify_step_dir(workdir / "checkpoints" / "0") is None
    else:
        assert last == "experiments.main: stopped by SIGTERM before any work was saved"


def test_sigint_during_the_final_evaluation_stops_between_lengths(tmp_path):
    workdir = tmp_path / "run"
    lengths = "--lengths=4,64,128,256,384,512"
    proc = start(workdir, "--config.train.steps=2", "--config.eval.num_examples=64", lengths)

    def evaluating():
        return any(r.get("eval") == "final" for r in wd.read_jsonl(workdir / "metrics.jsonl"))

    assert wait_for(proc, evaluating), "the final evaluation never started"
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc, timeout=120)
    assert code == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err
    assert not (workdir / "DONE").exists() and not (workdir / "results.json").exists()
    # Re-running resumes at the final checkpoint and evaluates again, each length once.
    code, err = run(workdir, "--config.train.steps=2", "--config.eval.num_examples=64", lengths)
    assert code == 0, err[-2000:]
    final = [r["length"] for r in wd.read_jsonl(workdir / "metrics.jsonl") if r.get("eval")]
    assert final == [4, 64, 128, 256, 384, 512]


def test_generate_beside_a_training_run_leaves_it_alone(tmp_path):
    """generate opens the checkpoints read-only: it never deletes the tmp directory of the
    save the training run has under way (it did, and the run died saving)."""
    workdir = tmp_path / "run"
    argv = [
        "--mode", "train", "--config", "configs/algorithmic.py:smoke=true",
        "--workdir", str(workdir), "--config.train.steps=100000", "--config.train.ckpt_every=2",
    ]  # fmt: skip
    proc = start(workdir, argv=argv)
    assert wait_for(proc, lambda: last_train_step(workdir) >= 6), "training never started"
    for _ in range(3):
        out = subprocess.run(
            [PY, "-m", "experiments.generate", "--workdir", str(workdir), "--prompt", "1 2"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
    before = last_train_step(workdir)
    assert wait_for(proc, lambda: last_train_step(workdir) >= before + 4)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=60)
    assert code == 128 + signal.SIGTERM, err[-2000:]  # not 1: "could not save checkpoint"


# ----------------------------------------------------------------------------- 3 corruption


@pytest.mark.parametrize("damage", ["truncate", pytest.param("flip", marks=pytest.mark.slow)])
def test_corrupt_latest_checkpoint_falls_back_and_continues(tmp_path, baseline, damage):
    workdir = tmp_path / "run"
    kill_when(workdir, lambda: committed(workdir, 8), *KILL_FLAGS)
    step_dir = workdir / "checkpoints" / "8"
    files = json.loads((step_dir / ck.MANIFEST).read_text())["files"]
    victim = step_dir / max(files, key=lambda rel: files[rel]["bytes"])
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 3])
    else:
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0xFF
        victim.write_bytes(bytes(flipped))
    before = {p.name for p in (workdir / "checkpoints").iterdir()}
    assert "4" in before

    code, err = run(workdir, *KILL_FLAGS)
    assert code == 0, err[-3000:]
    lines = [line for line in err.splitlines() if "is unreadable" in line]
    assert len(lines) == 1, err[-3000:]
    assert "checkpoint step 8 is unreadable (" in lines[0]
    assert "falling back to step 4" in lines[0]
    # Nothing still needed was deleted: the bad step is quarantined byte for byte.
    (quarantined,) = (workdir / ck.QUARANTINE).iterdir()
    assert quarantined.name.startswith("8-")
    assert (quarantined / victim.relative_to(step_dir)).read_bytes() != data
    assert_bit_identical(workdir, baseline)
    assert_same_metrics(workdir, baseline)


# ----------------------------------------------------------------------------- 4 non-finite

NAN_FLAGS = (
    "--config.train.optimizer.lr=1e30",
    "--config.train.steps=6",
    "--config.train.ckpt_every=1",
)


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    code, err = run(workdir, *NAN_FLAGS)
    assert code == 1, err[-3000:]
    line = assert_one_error_line(err, "non-finite", "last good checkpoint")
    step = int(re.search(r"at step (\d+)", line).group(1))
    good = re.search(r"checkpoint: step (\d+) in (\S+)", line)
    assert good, line
    good_step = int(good.group(1))
    assert good_step < step
    # The checkpoint it names exists, verifies, and holds only finite numbers.
    good_dir = workdir / "checkpoints" / str(good_step)
    assert ck.verify_step_dir(good_dir) is None
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(good_dir / "default")
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, np.floating):
            assert np.isfinite(np.asarray(leaf)).all()
    assert not (workdir / "DONE").exists()


def test_nonfinite_skip_mode_stops_past_the_cap_on_skipped_updates(tmp_path):
    workdir = tmp_path / "run"
    code, err = run(
        workdir, *NAN_FLAGS, "--config.train.skip_nonfinite=true", "--config.train.max_skipped=1"
    )
    assert code == 1, err[-3000:]
    line = assert_one_error_line(err, "train.max_skipped: 2 updates skipped by step", "cap of 1")
    assert "the run diverged" in line
    assert not (workdir / "DONE").exists()


def test_nonfinite_skip_mode_counts_skips_and_finishes(tmp_path):
    workdir = tmp_path / "run"
    code, err = run(workdir, *NAN_FLAGS, "--config.train.skip_nonfinite=true")
    assert code == 0, err[-3000:]
    rows = train_rows(workdir)
    assert rows and rows[-1]["step"] == 6
    skipped = [int(r["skipped"]) for r in rows]
    assert skipped == sorted(skipped) and skipped[-1] > 0, skipped
    # Each row counts the updates skipped up to and including its own step (not one ahead).
    nonfinite = [r["loss"] is None for r in rows]
    assert skipped == [sum(nonfinite[: i + 1]) for i in range(len(rows))], (skipped, nonfinite)
    results = json.loads((workdir / "results.json").read_text())
    assert results["skipped_updates"] == skipped[-1]
    # The run says how much it skipped (the summary goes to stdout, in the run's log).
    log = Path(f"{workdir}.log").read_text()
    assert f"{workdir}: {skipped[-1]} of 6 updates skipped (non-finite loss or gradients)" in log
    _, arrays = final_arrays(workdir)
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating):
            assert np.isfinite(value).all(), f"{key} is not finite despite skip mode"


# ----------------------------------------------------------------------------- 5 lock


def test_second_process_on_same_workdir_refuses(tmp_path):
    workdir = tmp_path / "run"
    first = start(workdir, *LONG_FLAGS)
    try:
        assert wait_for(first, lambda: last_train_step(workdir) >= 1)
        code, err = run(workdir, *LONG_FLAGS)
        assert code == 1
        assert_one_error_line(
            err, f"workdir {workdir} is in use by process {first.pid} (lock {workdir / '.lock'})"
        )
        assert first.poll() is None, "the first run must be unaffected"
    finally:
        first.send_signal(signal.SIGKILL)
        finish(first)
    # kill -9 released the lock: the same command now runs (and is stopped again at once).
    second = start(workdir, *LONG_FLAGS)
    assert wait_for(second, lambda: last_train_step(workdir) >= 1)
    second.send_signal(signal.SIGKILL)
    finish(second)


# ----------------------------------------------------------------------------- 6 bad input

# Fork server: the heavy imports happen once; every case is a fork that runs the real entry
# point (`runpy` of experiments.main, absl flags fresh in each child) with its own argv.
_FORK_SERVER = textwrap.dedent(
    """
    import json, os, runpy, sys
    import jax, flax.nnx, optax, orbax.checkpoint, ml_collections, absl.app  # noqa
    import attn.models, experiments.train, experiments.evaluate  # noqa
    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    for i, argv in enumerate(cases):
        pid = os.fork()
        if pid == 0:
            fd = os.open(f"{out}/{i}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["experiments/main.py"] + argv
            code = 0
            try:
                runpy.run_module("experiments.main", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        with open(f"{out}/{i}.rc", "w") as f:
            f.write(str(os.waitstatus_to_exitcode(status)))
    """
)


def run_cli_cases(tmp_path: Path, cases: list[list[str]]) -> list[tuple[int, str]]:
    out = tmp_path / "cases"
    out.mkdir()
    subprocess.run(
        [PY, "-c", _FORK_SERVER, json.dumps(cases), str(out)],
        cwd=REPO,
        env=_env(),
        check=True,
        timeout=600,
    )
    return [
        (int((out / f"{i}.rc").read_text()), (out / f"{i}.err").read_text(errors="replace"))
        for i in range(len(cases))
    ]


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (argv, substrings the one error line must hold: field, then what is allowed)."""
    wd = str(tmp_path / "wd")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    no_get_config = tmp_path / "no_get_config.py"
    no_get_config.write_text('"""A config file without get_config."""\n')
    empty = tmp_path / "empty_workdir"
    empty.mkdir()

    def train(arg_extra: str = "", *flags: str, workdir: str = wd) -> list[str]:
        arg = SMOKE + (f",{arg_extra}" if arg_extra else "")
        return train_argv(Path(workdir), *flags, arg=arg)

    return {
        "unknown_pe": (train("pe=nope"), ("pe", "'nope'", "valid names", "rope")),
        "unknown_sampler": (train("sampler=nope"), ("positions", "'nope'", "valid names")),
        "unknown_scorer": (train("scorer=nope"), ("scorer", "'nope'", "valid names", "dot")),
        "unknown_model": (train("model=nope"), ("model", "'nope'", "valid names", "encoder")),
        "unknown_task": (train("task=nope"), ("task", "'nope'", "valid names")),
        "unknown_optimizer": (
            train("", "--config.train.optimizer.name=nope"),
            ("train.optimizer", "nope", "adam"),
        ),
        "kv_heads_not_dividing_heads": (
            train("", "--config.model.num_heads=4", "--config.model.num_kv_heads=3"),
            ("num_kv_heads",),
        ),
        "odd_head_dim_for_rope": (
            train("pe=rope", "--config.model.head_dim=7"),
            ("head_dim", "even"),
        ),
        "window_below_one": (train("", "--config.model.window=-2"), ("window",)),
        "eval_length_past_learned_table": (
            train("pe=learned", "--config.model.pe.max_len=8"),
            ("max_len", "extension"),
        ),
        "eval_length_zero": (train("", "--lengths", "0"), ("--lengths", "positive")),
        "eval_length_negative": (train("", "--lengths=-4"), ("--lengths", "positive")),
        "eval_missing_workdir": (
            ["--mode", "eval", "--workdir", str(tmp_path / "missing")],
            ("--workdir", "missing"),
        ),
        "eval_empty_workdir": (["--mode", "eval", "--workdir", str(empty)], ("--workdir",)),
        "train_no_workdir": (
            ["--mode", "train", "--config", config_spec()],
            ("--workdir", "required"),
        ),
        "config_file_missing": (
            ["--mode", "train", "--config", "configs/nope.py", "--workdir", wd],
            ("--config", "configs/nope.py", "configs/"),
        ),
        "config_without_get_config": (
            ["--mode", "train", "--config", str(no_get_config), "--workdir", wd],
            ("--config", "get_config"),
        ),
        "unknown_config_field": (
            train("", "--config.train.stepz=3"),
            ("config.train.stepz", "steps"),
        ),
        "mesh_not_matching_devices": (
            train("", "--config.train.mesh.data=3"),
            ("train.mesh", "device"),
        ),
        "unwritable_workdir": (
            train(workdir=str(blocker / "run")),
            (f"workdir {blocker / 'run'} is not writable",),
        ),
    }


def test_bad_input_is_one_line_naming_field_and_allowed(tmp_path):
    cases = _bad_input_cases(tmp_path)
    results = run_cli_cases(tmp_path, [argv for argv, _ in cases.values()])
    failures = []
    for (name, (argv, needles)), (code, err) in zip(cases.items(), results, strict=True):
        try:
            assert code in (1, 2), f"exit status {code}"
            assert_one_error_line(err, *needles)
        except AssertionError as e:
            failures.append(
                f"{name}: {' '.join(argv)}\n    {str(e).splitlines()[0]}\n    "
                + "\n    ".join(err.strip().splitlines()[-3:])
            )
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "wd" / "checkpoints").exists(), "a bad config started training"


def test_a_whole_run_on_a_filling_filesystem_never_hangs(tmp_path):
    """A real 8 MiB tmpfs with 48 KiB left: metrics.jsonl and TensorBoard fill it first (each
    reported once and dropped, training goes on), then the checkpoint at step 200 cannot fit.
    The run ends with that one line (exit 1), no traceback, never blocked on a logging writer
    whose thread died."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root to mount a tmpfs; the injected disk-full cases still run")
    try:
        (mnt / "ballast").write_bytes(b"\0" * (8 * 2**20 - 48 * 2**10))
        workdir = mnt / "run"
        flags = ("--config.train.steps=100000", "--config.train.ckpt_every=200")
        argv = train_argv(workdir, *flags, "--config.train.log_every=1")
        proc = subprocess.run(  # its output goes to the test, not to the full disk
            [PY, "-m", "experiments.main", *argv],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        code, err = proc.returncode, proc.stderr
        assert code == 1, err[-3000:]
        assert_one_error_line(
            err, f"disk full while saving checkpoint step 200 in workdir {workdir}"
        )
        assert f"{workdir}: TensorBoard stopped" in err and "metrics.jsonl stopped" in err
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_during_save_is_one_line_and_keeps_previous(tmp_path):
    workdir = tmp_path / "run"
    code, err = _run_disk_full(workdir)
    assert code == 1, err[-3000:]
    assert_one_error_line(
        err,
        f"disk full while saving checkpoint step 8 in workdir {workdir}; "
        "the previous checkpoint (step 4) is intact",
    )
    assert ck.verify_step_dir(workdir / "checkpoints" / "4") is None
    assert not (workdir / "DONE").exists()


def _run_disk_full(workdir: Path) -> tuple[int, str]:
    log = open(f"{workdir}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [PY, "-c", _DISK_FULL_WRAPPER, "2", *train_argv(workdir, *KILL_FLAGS)],
        cwd=REPO,
        env=_env(),
        stdout=log,
        stderr=subprocess.PIPE,
    )
    proc.log, proc.workdir = log, workdir
    return finish(proc)


# ----------------------------------------------------------------------------- 7 sweep

_SWEEP_CONFIG = textwrap.dedent(
    """
    \"\"\"Test sweep: smoke config over seeds; seed=1 dies by SIGKILL while CRASH exists.\"\"\"
    import importlib.util, os, signal
    spec = importlib.util.spec_from_file_location("smoke_base", {base!r})
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)

    def get_config(arg=None):
        if os.environ.get("ATTN_SWEEP_POINT") == "seed=1" and os.path.exists({crash!r}):
            os.kill(os.getpid(), signal.SIGKILL)
        return base.get_config({smoke!r})

    def get_sweep():
        return {{"seed": [0, 1]}}
    """
)


def test_sweep_finishes_other_points_lists_failures_and_reruns_only_those(tmp_path):
    crash = tmp_path / "CRASH"
    crash.write_text("")
    config = tmp_path / "sweep_config.py"
    base = REPO / config_spec().split(":")[0]
    config.write_text(_SWEEP_CONFIG.format(base=str(base), crash=str(crash), smoke=SMOKE))
    root = tmp_path / "sweep"
    cmd = [PY, "-m", "experiments.sweep", "--config", str(config), "--workdir", str(root)]

    first = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stdout + first.stderr
    status = json.loads((root / "sweep_status.json").read_text())["points"]
    assert status["seed=0"]["status"] == "done"
    assert status["seed=1"]["status"] == "failed"
    assert "seed=1" in first.stdout + first.stderr
    done_mark = (root / "seed=0" / "DONE").stat().st_mtime_ns
    results_mark = (root / "seed=0" / "results.json").stat().st_mtime_ns

    crash.unlink()
    second = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 already DONE" in second.stdout
    status = json.loads((root / "sweep_status.json").read_text())["points"]
    assert {p["status"] for p in status.values()} == {"done"}
    assert (root / "seed=0" / "DONE").stat().st_mtime_ns == done_mark
    assert (root / "seed=0" / "results.json").stat().st_mtime_ns == results_mark
    assert (root / "seed=1" / "results.json").exists()


# ----------------------------------------------------------------------------- 8 atomic


def test_atomic_run_outputs_are_renamed_into_place(baseline):
    events = Path(f"{baseline}.audit").read_text().splitlines()
    direct = [e for e in events if e.startswith("direct-write")]
    assert not direct, f"written in place (a reader could see half a file): {direct}"
    renamed = {Path(e.split(" ", 1)[1]).name for e in events if e.startswith("rename")}
    assert {"results.json", "config.json"} <= renamed, events


def test_atomic_compare_tables_are_renamed_into_place(tmp_path, baseline):
    out = tmp_path / "report"
    proc = start(
        tmp_path / "compare",
        audit=True,
        module="experiments.compare",
        argv=[str(baseline.parent), "--out", str(out)],
    )
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert (out / "table.md").exists() and (out / "table.csv").exists()
    events = Path(f"{tmp_path / 'compare'}.audit").read_text().splitlines()
    assert not [e for e in events if e.startswith("direct-write")], events
    renamed = {Path(e.split(" ", 1)[1]).name for e in events if e.startswith("rename")}
    assert {"table.md", "table.csv"} <= renamed, events


_REWRITER = textwrap.dedent(
    """
    import json, sys
    from experiments.workdir import atomic_write_json
    i = 0
    while True:
        i += 1
        atomic_write_json(sys.argv[1], {"i": i, "pad": "x" * (1 << 20) * (1 + i % 4)})
    """
)


def test_atomic_write_survives_kill_mid_write(tmp_path):
    """A reader never sees a partial file, even when the writer is killed mid-write."""
    target = tmp_path / "results.json"
    for delay in (0.3, 0.6):
        proc = subprocess.Popen([PY, "-c", _REWRITER, str(target)], cwd=REPO, env=_env())
        deadline = time.monotonic() + 30
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = 0
        end = time.monotonic() + delay
        while time.monotonic() < end:
            json.loads(target.read_text())  # raises on a partial file
            seen += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        json.loads(target.read_text())
        assert seen > 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "results.json"]
    assert all(name.startswith(".results.json.tmp-") for name in leftovers)


# ----------------------------------------------------------------------------- 9 sharding


def _assert_rows_close(rows: list[dict], ref_rows: list[dict], tol: float = 1e-5) -> None:
    assert [(r["step"], r["split"], r.get("length")) for r in rows] == [
        (r["step"], r["split"], r.get("length")) for r in ref_rows
    ]
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("loss", "token_acc", "seq_acc"):
            if key in ref and ref[key] is not None:
                assert math.isclose(row[key], ref[key], rel_tol=0, abs_tol=tol), (key, row, ref)


@pytest.mark.slow  # ~17 s; fast tests: test_sharding_driver (4x2 mesh == 1 device) and
# test_checkpoint (a checkpoint restores onto another mesh)
def test_sharded_run_matches_unsharded_and_resumes_on_another_mesh(tmp_path, baseline):
    """Steps 1-8 on a 4x2 (data x model) mesh of 8 devices, killed, resumed on 1 device."""
    workdir = tmp_path / "run"
    mesh = ("--config.train.mesh.data=4", "--config.train.mesh.model=2")
    kill_when(workdir, lambda: committed(workdir, 8), *KILL_FLAGS, *mesh, devices=8)
    sharded_rows = train_rows(workdir)
    assert sharded_rows
    code, err = run(workdir, *KILL_FLAGS, "--config.train.mesh.data=1", devices=1)
    assert code == 0, err[-3000:]
    assert "unreadable" not in err
    _assert_rows_close(
        wd.read_jsonl(workdir / "metrics.jsonl"), wd.read_jsonl(baseline / "metrics.jsonl")
    )
    _, arrays = final_arrays(workdir)
    _, ref_arrays = final_arrays(baseline)
    for key, value in arrays.items():
        np.testing.assert_allclose(value, ref_arrays[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("data,model", [(8, 1), (2, 4), (1, 8)])
def test_sharded_mesh_shapes_match_unsharded(tmp_path, baseline, data, model):
    workdir = tmp_path / "run"
    mesh = (f"--config.train.mesh.data={data}", f"--config.train.mesh.model={model}")
    code, err = run(workdir, *KILL_FLAGS, *mesh, devices=8)
    assert code == 0, err[-3000:]
    _assert_rows_close(
        wd.read_jsonl(workdir / "metrics.jsonl"), wd.read_jsonl(baseline / "metrics.jsonl")
    )
