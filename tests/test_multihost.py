"""Multi-host hygiene: one restore step for all processes, a workdir lock without flock, and
the text corpus as a memory-mapped uint8 file."""

import errno
import fcntl
import logging
import socket
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoint as ck
from experiments import tasks
from experiments.tasks import tfds_builders
from experiments.tasks.base import EOS, NUM_SPECIAL
from experiments.workdir import RunError, workdir_lock


def _state(x: float) -> dict:
    return {"w": jnp.full((4,), x, jnp.float32), "step": jnp.int32(int(x))}


def _checkpoints(tmp_path, steps=(1, 2, 3)):
    with ck.Checkpointer(tmp_path, keep=5) as c:
        for s in steps:
            c.save(s, _state(s))


def test_process_0_chooses_the_restore_step_and_others_follow(tmp_path, monkeypatch):
    """Process 1 neither verifies nor quarantines: it restores the step process 0 broadcast,
    even when its own view of the directory would pick another."""
    _checkpoints(tmp_path)
    sent = []
    monkeypatch.setattr(ck, "broadcast_step", lambda step: sent.append(step) or 2)
    monkeypatch.setattr(ck, "processes", lambda: (1, 2))
    monkeypatch.setattr(ck, "verify_step_dir", lambda *_: pytest.fail("process 1 verified"))
    with ck.Checkpointer(tmp_path, keep=5) as c:
        state, step = c.restore(_state(0))
    assert sent == [None] and step == 2 and float(state["w"][0]) == 2.0


def test_process_0_quarantines_then_broadcasts_its_choice(tmp_path, monkeypatch, caplog):
    _checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "3" / ck.MANIFEST).unlink()
    sent = []
    monkeypatch.setattr(ck, "broadcast_step", lambda step: sent.append(step) or step)
    monkeypatch.setattr(ck, "processes", lambda: (0, 2))
    caplog.set_level(logging.WARNING, logger=ck.__name__)
    with ck.Checkpointer(tmp_path, keep=5) as c:
        _, step = c.restore(_state(0))
    assert sent == [2] and step == 2
    assert [p.name.split("-")[0] for p in (tmp_path / ck.QUARANTINE).iterdir()] == ["3"]
    # No checkpoint at all: process 0 broadcasts "none" and nobody restores.
    monkeypatch.setattr(ck, "broadcast_step", lambda step: sent.append(step) or step)
    with ck.Checkpointer(tmp_path / "empty", keep=5) as c:
        assert c.restore(_state(0)) == (None, None)
    assert sent[-1] is None


def _no_flock(monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


def test_lock_without_flock_uses_an_exclusive_lock_file(tmp_path, monkeypatch, caplog):
    _no_flock(monkeypatch)
    caplog.set_level(logging.WARNING)
    with workdir_lock(tmp_path) as lock:
        excl = lock.with_name(lock.name + ".excl")
        host, pid = excl.read_text().split()
        assert int(pid) > 0 and host
        with pytest.raises(RunError, match=f"in use by process {pid} on {host}.*delete the file"):
            with workdir_lock(tmp_path):
                pass
    assert not excl.exists()
    assert any("flock is not available" in r.getMessage() for r in caplog.records)


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    dead = subprocess.Popen(["true"])
    dead.wait()
    excl = tmp_path / ".lock.excl"
    excl.write_text(f"{socket.gethostname()} {dead.pid}\n")
    with workdir_lock(tmp_path):
        assert excl.read_text().split()[1] != str(dead.pid)
    excl.write_text("otherhost 1\n")  # another host's holder cannot be checked: refused
    with pytest.raises(RunError, match="in use by process 1 on otherhost"):
        with workdir_lock(tmp_path):
            pass


def test_flock_errors_other_than_unsupported_still_raise(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(OSError, match="Bad file descriptor"):
        with workdir_lock(tmp_path):
            pass


def test_text_stream_is_memory_mapped_uint8_equal_to_the_decoded_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    docs = {f"m{i}.py": f"x = {i}\n" * (i + 1) + "é\n" for i in range(30)}
    for name, text in docs.items():
        (root / name).write_text(text)
    task = tasks.build({"name": "text", "source": str(root), "data_dir": str(tmp_path / "d")})
    stream = task.stream("train")
    source = tfds_builders.prepare(task.builder()).as_data_source(split="train")
    want = np.concatenate(
        [
            np.append(source[i]["bytes"].astype(np.int32) + NUM_SPECIAL, EOS)
            for i in range(len(source))
        ]
    )
    assert len(stream) == len(want)
    np.testing.assert_array_equal(stream[:], want)
    idx = np.random.default_rng(0).integers(0, len(want), (5, 7))
    np.testing.assert_array_equal(stream[idx], want[idx])
    assert isinstance(stream._bytes, np.memmap) and stream._bytes.dtype == np.uint8
    data, eos = tfds_builders.text_stream_files(tfds_builders.prepare(task.builder()), "train")
    assert data.stat().st_size == len(want) - len(source)  # one byte per byte token
    assert (stream[np.load(eos)] == EOS).all()
    with pytest.raises(IndexError):
        stream[len(want)]
