"""Unit tests of experiments/workdir.py: atomic files, jsonl, disk checks, the workdir lock
and stop signals. Fast: no JAX."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import workdir as wd

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- files


def test_atomic_write_replaces_whole_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "results.json"
    wd.atomic_write_json(path, {"a": 1})
    wd.atomic_write_json(path, {"a": 2, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "table.md"
    wd.atomic_write_text(path, "old\n")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wd.os, "replace", no_space)
    with pytest.raises(OSError):
        wd.atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_jsonl_append_read_and_rewind_skip_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in range(1, 6):
        wd.append_jsonl(path, {"step": step, "split": "train", "loss": 1.0 / step})
    with open(path, "a") as f:
        f.write('{"step": 6, "split": "tr')  # a kill mid-append
    assert [r["step"] for r in wd.read_jsonl(path)] == [1, 2, 3, 4, 5]
    assert wd.rewind_jsonl(path, 3) == 3
    wd.append_jsonl(path, {"step": 4, "split": "train", "loss": 0.25})
    assert [r["step"] for r in wd.read_jsonl(path)] == [1, 2, 3, 4]
    assert path.read_text().count("\n") == 4
    wd.append_jsonl(path, {"step": 4, "split": "eval", "length": 8, "loss": 0.5})
    assert wd.rewind_jsonl(path, 4, keep=lambda r: r["split"] == "train") == 4
    assert [r["split"] for r in wd.read_jsonl(path)] == ["train"] * 4


def test_check_disk_space(tmp_path):
    wd.check_disk_space(tmp_path, 1)
    with pytest.raises(wd.RunError, match="MiB free"):
        wd.check_disk_space(tmp_path / "not" / "yet", wd.free_bytes(tmp_path) + 2**40)


def test_is_disk_full_follows_cause_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise ValueError("tensorstore write failed") from inner
    except ValueError as e:
        assert wd.is_disk_full(e)
    assert not wd.is_disk_full(ValueError("shape mismatch"))


# ----------------------------------------------------------------------------- lock


def test_workdir_lock_refuses_second_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from experiments.workdir import workdir_lock\n"
            "with workdir_lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(60)\n",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(wd.RunError) as e:
            with wd.workdir_lock(tmp_path):
                pass
        assert str(e.value) == (
            f"workdir {tmp_path} is in use by process {holder.pid} (lock {tmp_path / '.lock'})"
        )
        # Another process index of the same run has its own lock file.
        with wd.workdir_lock(tmp_path, process_index=1):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with wd.workdir_lock(tmp_path) as lock:
            assert lock.read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


def test_workdir_lock_is_reentrant_after_release(tmp_path):
    with wd.workdir_lock(tmp_path):
        with pytest.raises(wd.RunError, match="is in use by process"):
            with wd.workdir_lock(tmp_path):
                pass
    with wd.workdir_lock(tmp_path):
        pass


def test_stop_signals_sets_flag_instead_of_dying():
    with wd.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while stop.received is None and time.time() < deadline:
            time.sleep(0.01)
        assert stop.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not stop._handle
