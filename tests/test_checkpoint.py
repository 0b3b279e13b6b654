"""Unit tests of experiments/checkpoint.py, the orbax Checkpointer: round trip, retention,
save interval, tmp cleanup, read-only readers, corruption fallback, disk full, restore onto
another mesh. Fast: tiny pytrees, no training."""

import errno
import json
import logging
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]


def _state(seed: int = 0) -> dict:
    model = nnx.Sequential(
        nnx.Linear(8, 16, rngs=nnx.Rngs(seed)), nnx.Dropout(0.1, rngs=nnx.Rngs(dropout=seed))
    )
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    return {
        "model": nnx.state(model),
        "opt": nnx.state(opt),
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.key(seed),
        "data_position": np.asarray(10 * seed, np.int64),
        "epoch": np.int64(seed),
    }


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(step_dir: Path) -> Path:
    manifest = json.loads((step_dir / ck.MANIFEST).read_text())["files"]
    return step_dir / max(manifest, key=lambda rel: manifest[rel]["bytes"])


# ----------------------------------------------------------------------------- checkpoints


def test_unwritable_workdir_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ck.RunError, match=r"^workdir .*file/run is not writable: ") as e:
        ck.ensure_writable_dir(blocker / "run")
    assert "\n" not in str(e.value)
    with pytest.raises(ck.RunError, match="not writable"):
        ck.Checkpointer(blocker / "run", keep=2)


def test_round_trip_keep_last_n_and_manifest(tmp_path):
    with ck.Checkpointer(tmp_path, keep=2) as c:
        assert c.latest_step() is None
        assert c.restore(_state(0)) == (None, None)
        for step in (1, 2, 3):
            assert c.save(step, _state(step))
        assert not c.save(3, _state(3))  # never overwrites
        c.wait()
        assert c.all_steps() == [2, 3]
        restored, step = c.restore(_state(0))
        assert step == 3
        _assert_same(restored, _state(3))
        restored, step = c.restore(_state(0), step=2)
        _assert_same(restored, _state(2))
    for s in (2, 3):
        assert ck.verify_step_dir(tmp_path / "checkpoints" / str(s)) is None
    assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_a_reader_restores_without_orbax_notices(tmp_path, caplog):
    with ck.Checkpointer(tmp_path, keep=1) as c:
        c.save(1, _state(1))
    with caplog.at_level(logging.WARNING, logger="absl"):
        with ck.Checkpointer(tmp_path, read_only=True) as reader:
            restored, step = reader.restore(_state(0))
    assert step == 1
    _assert_same(restored, _state(1))
    assert not [r for r in caplog.records if "read only" in r.getMessage().replace("_", " ")]


def test_sync_save_is_committed_on_return(tmp_path):
    c = ck.Checkpointer(tmp_path, keep=1, async_save=False)
    c.save(7, _state(7))
    assert ck.verify_step_dir(tmp_path / "checkpoints" / "7") is None
    c.close()


def test_stale_tmp_directory_of_killed_save_is_cleaned(tmp_path):
    with ck.Checkpointer(tmp_path, keep=2) as c:
        c.save(1, _state(1))
    stale = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    (stale / "default").mkdir(parents=True)
    (stale / "default" / "half_written").write_bytes(b"\0" * 10)
    with ck.Checkpointer(tmp_path, keep=2) as c:
        assert c.all_steps() == [1]
        c.save(2, _state(2))
        c.wait()
        restored, step = c.restore(_state(0))
    assert step == 2
    _assert_same(restored, _state(2))
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "commit"])
def test_corrupt_latest_falls_back_with_one_line(tmp_path, caplog, damage):
    with ck.Checkpointer(tmp_path, keep=3) as c:
        for step in (1, 2):
            c.save(step, _state(step))
    step_dir = tmp_path / "checkpoints" / "2"
    victim = _largest_file(step_dir)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:7])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "manifest":
        (step_dir / ck.MANIFEST).unlink()
    else:
        (step_dir / ck.COMMIT_MARKER).unlink()
    caplog.set_level(logging.WARNING, logger=ck.__name__)
    with ck.Checkpointer(tmp_path, keep=3) as c:
        restored, step = c.restore(_state(0))
        assert step == 1
        _assert_same(restored, _state(1))
        # Training goes on and saves step 2 again without colliding with the bad one.
        assert c.save(2, _state(2))
    lines = [r.getMessage() for r in caplog.records if r.name == ck.__name__]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("checkpoint step 2 is unreadable (")
    assert "; falling back to step 1" in lines[0]
    quarantined = list((tmp_path / ck.QUARANTINE).iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("2-")
    assert (quarantined[0] / "QUARANTINED.txt").exists()
    assert ck.verify_step_dir(tmp_path / "checkpoints" / "2") is None


def test_explicit_bad_step_is_an_error_and_all_bad_starts_over(tmp_path, caplog):
    with ck.Checkpointer(tmp_path, keep=2) as c:
        c.save(1, _state(1))
    victim = _largest_file(tmp_path / "checkpoints" / "1")
    victim.write_bytes(b"")
    with ck.Checkpointer(tmp_path, keep=2) as c:
        with pytest.raises(ck.RunError, match=r"checkpoint step 1 .* is unreadable \(.*truncated"):
            c.restore(_state(0), step=1)
        assert (tmp_path / "checkpoints" / "1").exists()
        caplog.set_level(logging.WARNING, logger=ck.__name__)
        assert c.restore(_state(0)) == (None, None)
        assert c.latest_step() is None
    assert "no earlier good checkpoint" in caplog.records[-1].getMessage()
    assert len(list((tmp_path / ck.QUARANTINE).iterdir())) == 1


def test_restore_into_a_changed_state_is_a_run_error_not_a_quarantine(tmp_path):
    with ck.Checkpointer(tmp_path, keep=2) as c:
        c.save(1, {"w": jnp.zeros((4,))})
        with pytest.raises(ck.RunError, match="does not fit this run's state"):
            c.restore({"w": jnp.zeros((5,))})
    assert ck.verify_step_dir(tmp_path / "checkpoints" / "1") is None


def test_disk_full_during_async_save_keeps_previous_checkpoint(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    c = ck.Checkpointer(tmp_path, keep=1)
    c.save(1, _state(1))
    c.wait()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The last write of a save, on orbax's background thread, hits a full disk.
    monkeypatch.setattr(ck, "atomic_write_json", disk_full)
    c.save(2, _state(2))
    with pytest.raises(ck.RunError) as e:
        c.wait()
    assert str(e.value) == (
        f"disk full while saving checkpoint step 2 in workdir {tmp_path}; "
        "the previous checkpoint (step 1) is intact"
    )
    # The user sees that one line, not orbax's own error logs with their tracebacks.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    monkeypatch.undo()
    assert ck.verify_step_dir(tmp_path / "checkpoints" / "1") is None
    c.close()
    with ck.Checkpointer(tmp_path, keep=1) as c:
        restored, step = c.restore(_state(0))
    assert step == 1
    _assert_same(restored, _state(1))


def test_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    with ck.Checkpointer(tmp_path, keep=2) as c:
        c.save(1, _state(1))
        c.wait()
        monkeypatch.setattr(ck, "free_bytes", lambda path: 10)
        with pytest.raises(
            ck.RunError,
            match=r"^disk full while saving checkpoint step 2 .*"
            r"the previous checkpoint \(step 1\) is intact$",
        ):
            c.save(2, _state(2))
        assert not list((tmp_path / "checkpoints").glob("2*"))
        monkeypatch.undo()
        assert c.save(2, _state(2))


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)]).returncode
        == 0
    )


def test_disk_full_on_a_real_tiny_filesystem(tmp_path):
    mnt = tmp_path / "tiny"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root to mount a 4 MiB tmpfs; the monkeypatched case above still runs")
    noise = np.random.default_rng(0).standard_normal
    try:
        c = ck.Checkpointer(mnt, keep=2)
        c.save(1, {"w": noise((64, 1024)).astype(np.float32)})  # 256 KiB
        c.wait()
        with pytest.raises(ck.RunError) as e:
            c.save(2, {"w": noise((1024, 1024)).astype(np.float32)})  # 4 MiB cannot fit
            c.wait()
        assert str(e.value) == (
            f"disk full while saving checkpoint step 2 in workdir {mnt}; "
            "the previous checkpoint (step 1) is intact"
        )
        assert ck.verify_step_dir(mnt / "checkpoints" / "1") is None
        c.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_checkpoint_written_on_one_mesh_restores_on_another(tmp_path):
    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh_a = Mesh(devices.reshape(8, 1), ("data", "model"))
    mesh_b = Mesh(devices.reshape(2, 4), ("data", "model"))
    w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
    state = {"w": jax.device_put(w, NamedSharding(mesh_a, P("data", None))), "step": jnp.int32(3)}
    with ck.Checkpointer(tmp_path, keep=1) as c:
        c.save(3, state)
    target = NamedSharding(mesh_b, P(None, "model"))
    abstract = {
        "w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=target),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh_b, P())),
    }
    with ck.Checkpointer(tmp_path, keep=1) as c:
        restored, step = c.restore(abstract)
        single, _ = c.restore({"w": jnp.zeros_like(w), "step": jnp.int32(0)})
    assert step == 3
    assert restored["w"].sharding == target
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(single["w"]), np.asarray(w))
