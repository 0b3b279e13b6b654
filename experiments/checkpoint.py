"""Checkpoints, run-directory locking and atomic file writes: what lets a run survive faults.

A workdir is the run (DESIGN.md section 2), so everything here protects a workdir:

- `Checkpointer` wraps an orbax `CheckpointManager` in `workdir/checkpoints` (async saves,
  keep the last N). Orbax commits a step by writing it into `<step>.orbax-checkpoint-tmp`,
  adding `commit_success.txt` and renaming the directory, so a kill during a save leaves only
  a tmp directory, which is cleaned on the next start. On top of that, just before orbax
  commits, we write `attn_manifest.json` (size and SHA-256 of every file) into the step, so a
  step that is later truncated or corrupted on disk is detected at restore. A bad latest step
  is quarantined (renamed, never deleted) and the previous good step is restored, with one
  log line saying so.
- `workdir_lock` keeps a second process off a workdir that is in use (fcntl.flock, which the
  kernel releases when the holder dies, even by kill -9).
- `atomic_write_text` / `atomic_write_json` (tmp file in the same directory, fsync,
  os.replace) so a reader never sees a partial results.json or table; `append_jsonl` writes
  one whole row per call, and `rewind_jsonl` drops rows past a restored step (and a torn last
  line) so a resumed run's metrics.jsonl reads as if it had never been interrupted.
- `RunError`: a one-line, user-facing runtime failure (exit status 1, no traceback).

Orbax: https://orbax.readthedocs.io (CheckpointManager, StandardSave / StandardRestore).
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from attn.registry import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "attn_manifest.json"
COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE
QUARANTINE = "checkpoints_quarantine"
LOCK_FILE = ".lock"
# Files orbax rewrites after our manifest is sealed (commit time stamp, commit marker).
_UNSEALED = {COMMIT_MARKER, "_CHECKPOINT_METADATA"}
_HASH_CHUNK = 1 << 20


class RunError(RuntimeError):
    """A one-line, user-facing runtime failure: the entry point prints it and exits with 1."""


def one_line(error: BaseException | str, limit: int = 240) -> str:
    """An exception (or text) squeezed onto one line, for messages that must stay one line."""
    text = error if isinstance(error, str) else (f"{type(error).__name__}: {error}")
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_disk_full(error: BaseException) -> bool:
    """True if `error` (or anything in its cause chain) says the disk or quota is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # tensorstore and orbax re-raise OS errors as ValueError/RuntimeError text.
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# ----------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some filesystems cannot fsync a directory; the rename is still atomic.
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never a part.

    The text goes to a tmp file in the same directory (same filesystem, so the rename is
    atomic), is fsynced, then os.replace'd over `path`. A failure leaves `path` untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """atomic_write_text of `obj` as JSON (keys in insertion order, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON row to a .jsonl file with a single write, flushed and fsynced.

    One os.write on an O_APPEND descriptor: a kill leaves at most a torn last line, which
    `read_jsonl` and `rewind_jsonl` skip.
    """
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The complete rows of a .jsonl file; a torn line (from a kill mid-append) is skipped."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


def rewind_jsonl(
    path: str | os.PathLike, step: int, *, keep: Callable[[dict], bool] | None = None
) -> int:
    """Keep only the rows of `path` with row["step"] <= step (atomically); return how many.

    Called on resume from checkpoint `step`: the rows logged after it will be logged again,
    so without this a resumed run would have duplicates (and maybe a torn line). `keep`
    drops more rows that will be logged again, e.g. the final evaluation's rows when the
    run resumes from its final checkpoint to redo that evaluation.
    """
    if not Path(path).exists():
        return 0
    rows = [
        r for r in read_jsonl(path) if int(r.get("step", -1)) <= step and (keep is None or keep(r))
    ]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk_space(path: str | os.PathLike, need_bytes: int) -> None:
    """RunError if the filesystem of `path` has fewer than `need_bytes` free."""
    free = free_bytes(path)
    if free < need_bytes:
        raise RunError(
            f"{path}: only {free / 2**20:.1f} MiB free on its filesystem, "
            f"need at least {need_bytes / 2**20:.1f} MiB"
        )


def ensure_writable_dir(directory: str | os.PathLike, what: str = "workdir") -> Path:
    """Create `directory` if needed and prove it is writable; RunError (one line) if not."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or one_line(e)
        if is_disk_full(e):
            reason = "disk full"
        raise RunError(f"{what} {directory} is not writable: {reason}") from None
    return directory


# ----------------------------------------------------------------------------- lock


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, *, process_index: int = 0) -> Iterator[Path]:
    """Hold an exclusive lock on `workdir` for the duration of the block.

    Uses fcntl.flock on workdir/.lock (one lock file per JAX process index, so the processes
    of one multi-process run do not block each other, while a second run on the same workdir
    is refused). The kernel drops the lock when the holder exits, however it exits, so a
    stale lock file never blocks a rerun. A second holder gets a one-line RunError naming the
    process that holds it.
    """
    workdir = ensure_writable_dir(workdir)
    name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.{process_index}"
    lock_path = workdir / name
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(
                f"workdir {workdir} is in use by process {holder} (lock {lock_path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield lock_path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- signals


class StopSignals:
    """Turn SIGTERM / SIGINT into a flag the train loop polls, so it can save and exit cleanly.

    Use as a context manager in the main thread. The first signal sets `.received` (the
    signal name); the loop then saves a checkpoint, calls `Checkpointer.wait()` and exits. A
    second signal restores the default handler and re-raises it, for a user who insists.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint and stopping", self.received)

    def __enter__(self) -> "StopSignals":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- checkpoints


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


class _QuietOrbaxErrors(logging.Filter):
    """Drops orbax's own ERROR logs (with tracebacks) while a Checkpointer is open.

    Every orbax failure reaches the caller of save/wait/restore as a one-line RunError (the
    orbax exception chained to it), so the user sees that one line instead of two tracebacks
    logged from orbax's threads.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _abstract_leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.generic | int | float):
        return np.asarray(x)  # orbax restores scalars only as 0-d arrays
    return x


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
        keep: int,
        async_save: bool = True,
        timeout_secs: int = 1200,
    ):
        if keep < 1:
            raise ConfigError(f"train.keep_checkpoints: must be >= 1, got {keep}")
        self.workdir = Path(workdir)
        self.directory = ensure_writable_dir(self.workdir / "checkpoints", "checkpoint directory")
        self.async_save = async_save
        self._pending: int | None = None
        self.last_save_seconds: dict[str, float] = {}
        self.last_restore_seconds: float | None = None
        self._last_bytes = 0
        self._save_started = 0.0
        self._quiet = _QuietOrbaxErrors()
        logging.getLogger("absl").addFilter(self._quiet)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
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
            logging.getLogger("absl").removeFilter(self._quiet)
            raise RunError(
                f"checkpoint directory {self.directory} is not usable: {one_line(e)}"
            ) from None

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
            self._check_space(step)
            self._pending = step
            self._save_started = time.perf_counter()
            saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
            self.last_save_seconds = {"dispatch": time.perf_counter() - self._save_started}
        except RunError:
            raise
        except Exception as e:
            raise self._save_error(step, e) from e
        if not saved:
            self._pending = None
        elif not self.async_save:
            self.wait()
        return saved

    def _check_space(self, step: int) -> None:
        """Refuse to start a save that cannot fit: the size of the last one must be free.

        Cheaper and clearer than failing half-way, and on some filesystems a full disk
        surfaces from the writer threads as something less recognisable than ENOSPC.
        """
        if self._last_bytes and free_bytes(self.directory) < self._last_bytes:
            error = OSError(errno.ENOSPC, f"need {self._last_bytes} bytes free")
            raise self._save_error(step, error)

    def wait(self) -> None:
        """Block until the pending save (if any) has committed; RunError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(self._pending, e) from e
        if self._pending is not None:
            self.last_save_seconds["total"] = time.perf_counter() - self._save_started
            with contextlib.suppress(OSError, ValueError, KeyError):
                manifest = json.loads((self.directory / str(self._pending) / MANIFEST).read_text())
                self._last_bytes = sum(f["bytes"] for f in manifest["files"].values())
        self._pending = None

    def close(self) -> None:
        """Finish pending writes and release orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()
            logging.getLogger("absl").removeFilter(self._quiet)

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

        A latest step that fails verification is quarantined and the previous good one is
        restored, logging exactly one line:
        "checkpoint step N is unreadable (...); falling back to step M". With an explicit
        `step` there is no fallback: a bad step is a RunError.
        """
        self.wait()
        self._manager.reload()
        abstract = jax.tree.map(_abstract_leaf, abstract_state)
        if step is not None:
            problem = verify_step_dir(self.directory / str(step))
            if problem:
                raise RunError(
                    f"checkpoint step {step} in {self.directory} is unreadable ({problem})"
                )
            return self._restore_step(step, abstract), step
        bad: list[tuple[int, str]] = []
        for candidate in sorted(self._manager.all_steps(), reverse=True):
            problem = verify_step_dir(self.directory / str(candidate))
            if problem is None:
                restored = self._restore_step(candidate, abstract)
                if bad:
                    self._log_fallback(bad, f"falling back to step {candidate}")
                return restored, candidate
            if jax.process_index() == 0:
                self.quarantine(candidate, problem)
            bad.append((candidate, problem))
        if bad:
            self._log_fallback(bad, "no earlier good checkpoint: starting from step 0")
            self._manager.reload()
        return None, None

    def _log_fallback(self, bad: list[tuple[int, str]], then: str) -> None:
        (step, problem), others = bad[0], bad[1:]
        also = f" (also unreadable: {', '.join(str(s) for s, _ in others)})" if others else ""
        log.warning(
            "checkpoint step %d is unreadable (%s); %s%s; moved to %s",
            step,
            problem,
            then,
            also,
            self.workdir / QUARANTINE,
        )
        self._manager.reload()

    def _restore_step(self, step: int, abstract: Any) -> Any:
        started = time.perf_counter()
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:
            raise RunError(
                f"checkpoint step {step} in {self.directory} does not fit this run's state "
                f"(changed config?): {one_line(e)}"
            ) from e
        self.last_restore_seconds = time.perf_counter() - started
        return restored
