"""Checkpoints: an orbax CheckpointManager plus the integrity checks orbax does not have.

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager` in `workdir/checkpoints`. Orbax
does the saving (async), the keep-the-last-N policy, the save interval
(`save_interval_steps`, asked through `should_save`), the preemption notice of a cluster
(`reached_preemption`) and the atomic commit (a step is written into
`<step>.orbax-checkpoint-tmp`, `commit_success.txt` is added, then the directory is renamed,
so a kill during a save leaves only a tmp directory). On top of it, just before orbax
commits, we write `attn_manifest.json` (size and SHA-256 of every file) into the step, so a
step that is later truncated or corrupted on disk is detected at restore: a bad latest step is
quarantined (renamed to `workdir/checkpoints_quarantine`, never deleted) and the previous good
step is restored, with one log line saying so. Orbax has neither. With several processes,
process 0 alone verifies, quarantines and chooses the step to restore, and broadcasts it; the
others restore that step (`broadcast_step`).

A reader (`read_only=True`: eval, generate, compare's attention maps) never deletes or writes
anything, so it can open the checkpoints of a run that is training.

Orbax: https://orbax.readthedocs.io (CheckpointManager, StandardSave / StandardRestore).
"""

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from attn.registry import ConfigError
from experiments.workdir import (
    RunError,
    atomic_write_json,
    ensure_writable_dir,
    free_bytes,
    is_disk_full,
    one_line,
)

log = logging.getLogger(__name__)

MANIFEST = "attn_manifest.json"
COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE
QUARANTINE = "checkpoints_quarantine"
# Files orbax rewrites after our manifest is sealed (commit time stamp, commit marker).
_UNSEALED = {COMMIT_MARKER, "_CHECKPOINT_METADATA"}
_HASH_CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _manifest_files(step_dir: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name not in _UNSEALED and p.name != MANIFEST:
            files[p.relative_to(step_dir).as_posix()] = {
                "bytes": p.stat().st_size,
                "sha256": _file_digest(p),
            }
    return files


def verify_step_dir(step_dir: str | os.PathLike) -> str | None:
    """None if the checkpoint step directory is complete and intact, else the problem (short)."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "missing"
    if not (step_dir / COMMIT_MARKER).exists():
        return f"no {COMMIT_MARKER}: the save never committed"
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {one_line(e, 80)}"
    for rel, want in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{rel} is truncated or resized ({size} of {want['bytes']} bytes)"
        if _file_digest(p) != want["sha256"]:
            return f"{rel} fails its checksum"
    return None


def processes() -> tuple[int, int]:
    """(this process's index, process count)."""
    return jax.process_index(), jax.process_count()


def broadcast_step(step: int | None) -> int | None:
    """Process 0's `step` (None: no checkpoint) on every process; a collective call."""
    from jax.experimental import multihost_utils

    value = multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step))
    return None if int(value) < 0 else int(value)


def _restore_target(x):
    # Orbax restores a scalar leaf only as a 0-d array.
    return ocp.utils.to_shape_dtype_struct(np.asarray(x) if np.isscalar(x) else x)


class _ReadOnlyNotices(logging.Filter):
    """Drops orbax's warnings that a read-only manager is read-only (three per reader)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("read_only=True, setting" in text or "directory is read only" in text)


class _HeldOrbaxErrors(logging.Filter):
    """Holds back orbax's own ERROR records (logged with tracebacks from its threads) from the
    dispatch of a save until it has committed, and during a restore.

    When that operation fails, the caller gets one RunError line (the orbax exception chained
    to it) and the held records are dropped: they describe the same failure. When it
    succeeds, they are logged after all, so no orbax error is ever swallowed silently.
    """

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.active = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.active and record.levelno >= logging.ERROR and "orbax" in record.pathname:
            self.held.append(record)
            return False
        return True

    def start(self) -> None:
        self.active = True

    def finish(self, ok: bool) -> None:
        """Stop holding: log what was held if the operation succeeded, drop it if not."""
        self.active = False
        held, self.held = self.held, []
        for record in held if ok else ():
            logging.getLogger(record.name).handle(record)

    @contextlib.contextmanager
    def hold(self):
        self.start()
        try:
            yield
        except BaseException:
            self.finish(ok=False)
            raise
        self.finish(ok=True)


class Checkpointer:
    """Orbax CheckpointManager over workdir/checkpoints with integrity checks and fallback.

    `state` is any pytree of arrays (jax or numpy; typed PRNG keys included), e.g.
    {"model": nnx.State, "opt": nnx.State, "step": int32[], "rng": key, "data": int64[]}.

    - save(step, state): dispatches an async save and returns (the arrays are copied off the
      device first, so training may mutate/donate them at once). The next save, wait() or
      close() waits for it. An existing step is never overwritten (returns False).
    - restore(abstract_state): the newest step that passes verification; shardings in
      `abstract_state` (jax.ShapeDtypeStruct or arrays) decide where arrays land, so a
      checkpoint written on one mesh restores onto another.
    - Failures while saving (disk full, unwritable directory) become one-line RunErrors that
      say the previous checkpoint is intact: old steps are deleted only after a newer one
      commits.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 1,
        every: int = 1,
        read_only: bool = False,
        async_save: bool = True,
        timeout_secs: int = 1200,
    ):
        if keep < 1:
            raise ConfigError(f"train.keep_checkpoints: must be >= 1, got {keep}")
        if every < 1:
            raise ConfigError(f"train.ckpt_every: must be >= 1, got {every}")
        self.workdir = Path(workdir)
        self.directory = self.workdir / "checkpoints"
        if not read_only:
            ensure_writable_dir(self.directory, "checkpoint directory")
        elif not self.directory.is_dir():
            raise RunError(f"no checkpoint in {self.directory}")
        self.read_only = read_only
        self.async_save = async_save
        self._pending: int | None = None
        self.last_save_seconds: dict[str, float] = {}
        self.last_restore_seconds: float | None = None
        self._last_bytes = 0
        self._save_started = 0.0
        self._failed = False  # a save failed and was reported
        self._held = _HeldOrbaxErrors()
        logging.getLogger("absl").addFilter(self._held)
        quiet = _ReadOnlyNotices() if read_only else None  # orbax says what we asked for
        if quiet:
            logging.getLogger("absl").addFilter(quiet)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Every `every` steps, or when a preemption is noticed (not orbax's default
            # extra save of the first step of a run).
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
                [
                    ocp.checkpoint_managers.FixedIntervalPolicy(every),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]
            ),
            # A save still being written must not make should_save skip a due step.
            enable_should_save_is_saving_in_progress_check=False,
            create=not read_only,
            read_only=read_only,
            # A reader must not delete the tmp directory of a save that is under way.
            cleanup_tmp_directories=not read_only,
            # Always the async checkpointer: post_finalization_callback needs it; a
            # synchronous save is an async one we wait for.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(
                timeout_secs=timeout_secs, post_finalization_callback=self._seal
            ),
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            logging.getLogger("absl").removeFilter(self._held)
            raise RunError(
                f"checkpoint directory {self.directory} is not usable: {one_line(e)}"
            ) from None
        finally:
            if quiet:
                logging.getLogger("absl").removeFilter(quiet)

    # -- saving

    def _seal(self) -> None:
        """Write the integrity manifest into the step's tmp dir before orbax commits it.

        Orbax calls this on its finalize thread, on the primary process, after every process
        has written its shards and before commit_success.txt and the rename, so the manifest
        is part of the same atomic commit.
        """
        step = self._pending
        final = self.directory / str(step)
        tmp = self.directory / f"{step}{ocp.step.TMP_DIR_SUFFIX}"
        step_dir = tmp if tmp.is_dir() else final
        manifest = {"format": 1, "step": step, "files": _manifest_files(step_dir)}
        atomic_write_json(step_dir / MANIFEST, manifest, indent=1)

    def _good_steps(self, excluding: int | None = None) -> list[int]:
        """Steps on disk that look committed (cheap check: marker and manifest present)."""
        steps = []
        for p in self.directory.iterdir() if self.directory.is_dir() else []:
            if p.name.isdigit() and int(p.name) != excluding:
                if (p / COMMIT_MARKER).exists() and (p / MANIFEST).exists():
                    steps.append(int(p.name))
        return sorted(steps)

    def _save_error(self, step: int | None, error: BaseException) -> RunError:
        self._pending = None
        self._failed = True
        with contextlib.suppress(Exception):
            self._manager.reload()
        good = self._good_steps(excluding=step)
        intact = (
            f"the previous checkpoint (step {good[-1]}) is intact"
            if good
            else "no earlier checkpoint exists"
        )
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        if is_disk_full(error):
            return RunError(f"disk full while saving {what} in workdir {self.workdir}; {intact}")
        return RunError(
            f"could not save {what} in workdir {self.workdir} ({one_line(error)}); {intact}"
        )

    def should_save(self, step: int) -> bool:
        """Orbax's decision: `step` is a multiple of `every`, or a preemption was noticed."""
        return self._manager.should_save(int(step))

    def reached_preemption(self, step: int) -> bool:
        """True once the cluster announced a preemption (JAX's preemption notifier, set up by
        jax.distributed on TPU pods and some schedulers), agreed on by every process."""
        return self._manager.reached_preemption(int(step))

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Save `state` as checkpoint `step`; False if that step already exists.

        force=True saves even when orbax's save-decision policy would skip the step (use it
        for the final and the preemption save); it never overwrites an existing step.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        try:
            # Blocks on the previous async save first: its failure surfaces here.
            self.wait()
            self._check_space(step, state)
            self._pending = step
            self._save_started = time.perf_counter()
            self._held.start()  # until wait() sees the save commit (or fail)
            saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
            self.last_save_seconds = {"dispatch": time.perf_counter() - self._save_started}
        except RunError:
            raise
        except Exception as e:
            self._held.finish(ok=False)
            raise self._save_error(step, e) from e
        if not saved:
            self._pending = None
            self._held.finish(ok=True)
        elif not self.async_save:
            self.wait()
        return saved

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse to start a save that cannot fit: as many bytes as the last save took (or,
        before the first, as the arrays hold) must be free.

        Cheaper and clearer than failing half-way in orbax's writer threads, where a full
        disk surfaces as something less recognisable than ENOSPC (and as tracebacks).
        """
        need = self._last_bytes or sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
        if need and free_bytes(self.directory) < need:
            error = OSError(errno.ENOSPC, f"need {need} bytes free")
            raise self._save_error(step, error)

    def wait(self) -> None:
        """Block until the pending save (if any) has committed; RunError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._held.finish(ok=False)
            raise self._save_error(self._pending, e) from e
        self._held.finish(ok=True)
        if self._pending is not None:
            self.last_save_seconds["total"] = time.perf_counter() - self._save_started
            with contextlib.suppress(OSError, ValueError, KeyError):
                manifest = json.loads((self.directory / str(self._pending) / MANIFEST).read_text())
                self._last_bytes = sum(f["bytes"] for f in manifest["files"].values())
        self._pending = None

    def close(self) -> None:
        """Finish pending writes and release orbax's threads. After a save failed (its
        RunError already said so), closing reports nothing more."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:
                    raise
            finally:
                logging.getLogger("absl").removeFilter(self._held)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step on disk (not yet verified; restore() verifies)."""
        return self._manager.latest_step()

    def quarantine(self, step: int, reason: str) -> Path:
        """Move checkpoint `step` out of the way (workdir/checkpoints_quarantine); never delete."""
        dest_root = self.workdir / QUARANTINE
        dest_root.mkdir(exist_ok=True)
        dest = dest_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        n = 0
        while dest.exists():
            n += 1
            dest = dest_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}-{n}"
        os.replace(self.directory / str(step), dest)
        with contextlib.suppress(OSError):
            (dest / "QUARANTINED.txt").write_text(reason + "\n")
        return dest

    def restore(self, abstract_state: Any, *, step: int | None = None) -> tuple[Any, int | None]:
        """Restore the newest intact step (or `step`); returns (state, step), or (None, None).

        A latest step that fails verification is quarantined (by a writer; a reader only
        passes over it) and the previous good one is restored, logging exactly one line:
        "checkpoint step N is unreadable (...); falling back to step M". With an explicit
        `step` there is no fallback: a bad step is a RunError. `abstract_state` holds arrays
        or jax.ShapeDtypeStructs whose shardings say where the restored arrays land.

        With several processes, process 0 verifies, quarantines and chooses the step, and
        every process restores that one (`broadcast_step`): processes that chose on their
        own could restore different steps while process 0 moves bad ones away.
        """
        self.wait()
        self._manager.reload()
        abstract = jax.tree.map(_restore_target, abstract_state)
        if step is not None:
            problem = verify_step_dir(self.directory / str(step))
            if problem:
                raise RunError(
                    f"checkpoint step {step} in {self.directory} is unreadable ({problem})"
                )
            return self._restore_step(step, abstract), step
        index, count = processes()
        chosen = self._choose_step() if index == 0 else None
        if count > 1:
            chosen = broadcast_step(chosen)
            self._manager.reload()  # process 0 may have quarantined steps
        if chosen is None:
            return None, None
        return self._restore_step(chosen, abstract), chosen

    def _choose_step(self) -> int | None:
        """The newest step that passes verification (quarantining bad newer ones), or None."""
        bad: list[tuple[int, str]] = []
        for candidate in sorted(self._manager.all_steps(), reverse=True):
            problem = verify_step_dir(self.directory / str(candidate))
            if problem is None:
                if bad:
                    self._log_fallback(bad, f"falling back to step {candidate}")
                return candidate
            if not self.read_only:
                self.quarantine(candidate, problem)
            bad.append((candidate, problem))
        if bad:
            self._log_fallback(bad, "no earlier good checkpoint: starting from step 0")
            self._manager.reload()
        return None

    def _log_fallback(self, bad: list[tuple[int, str]], then: str) -> None:
        (step, problem), others = bad[0], bad[1:]
        also = f" (also unreadable: {', '.join(str(s) for s, _ in others)})" if others else ""
        where = (
            "left in place (read-only)"
            if self.read_only
            else f"moved to {self.workdir / QUARANTINE}"
        )
        log.warning(
            "checkpoint step %d is unreadable (%s); %s%s; %s", step, problem, then, also, where
        )
        self._manager.reload()

    def _restore_step(self, step: int, abstract: Any) -> Any:
        started = time.perf_counter()
        try:
            with self._held.hold():
                restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:
            raise RunError(
                f"checkpoint step {step} in {self.directory} does not fit this run's state "
                f"(changed config?): {one_line(e)}"
            ) from e
        self.last_restore_seconds = time.perf_counter() - started
        return restored
