"""A workdir's files and the process around them: what lets a run survive faults.

A workdir is the run (README "Run outputs"), so everything here protects a workdir without
knowing what trains in it (checkpoints are experiments/checkpoint.py):

- `atomic_write_text` / `atomic_write_json` (tmp file in the same directory, fsync,
  os.replace) so a reader never sees a partial results.json or table; `append_jsonl` writes
  one whole row per call, and `rewind_jsonl` drops rows past a restored step (and a torn last
  line) so a resumed run's metrics.jsonl reads as if it had never been interrupted.
- `workdir_lock` keeps a second process off a workdir that is in use (fcntl.flock, which the
  kernel releases when the holder dies, even by kill -9). On a filesystem without flock (some
  NFS mounts without a lock daemon, FUSE filesystems) it falls back to a lock file created
  with O_EXCL that names its holder (host and pid): one left by a dead process of the same
  host is taken over; one from another host cannot be checked and is reported.
- `StopSignals`: SIGTERM / SIGINT become a flag the training loop polls.
- `RunError`: a one-line, user-facing runtime failure (exit status 1, no traceback); disk and
  writability checks that raise it.

Imports nothing heavy (no JAX, no orbax): sweep and compare use it for their files.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
DONE = "DONE"
SWEEP_STATUS_FILE = "sweep_status.json"  # a sweep root's point -> state record


class RunError(RuntimeError):
    """A one-line, user-facing runtime failure: the entry point prints it and exits with 1."""


class SweepError(ValueError):
    """A sweep that cannot start (bad config file or grid). One line; sweep and its SLURM
    backend both raise it."""


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


# errnos with which flock says the filesystem cannot lock (rather than that the lock is held)
FLOCK_UNSUPPORTED = frozenset(
    {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, *, process_index: int = 0) -> Iterator[Path]:
    """Hold an exclusive lock on `workdir` for the duration of the block.

    Uses fcntl.flock on workdir/.lock (one lock file per JAX process index, so the processes
    of one multi-process run do not block each other, while a second run on the same workdir
    is refused). The kernel drops the lock when the holder exits, however it exits, so a
    stale lock file never blocks a rerun. A second holder gets a one-line RunError naming the
    process that holds it. Where the filesystem has no flock, `exclusive_lock_file` on
    `<lock>.excl` takes its place (one warning says so).
    """
    workdir = ensure_writable_dir(workdir)
    name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.{process_index}"
    lock_path = workdir / name
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(
                f"workdir {workdir} is in use by process {holder} (lock {lock_path})"
            ) from None
        except OSError as e:
            if e.errno not in FLOCK_UNSUPPORTED:
                raise
            log.warning(
                "flock is not available on the filesystem of %s (%s); locking with an "
                "exclusive lock file instead",
                workdir,
                e.strerror or e,
            )
            flock = False
        if not flock:
            with exclusive_lock_file(lock_path.with_name(lock_path.name + ".excl"), workdir):
                yield lock_path
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield lock_path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def exclusive_lock_file(path: Path, workdir) -> Iterator[Path]:
    """A lock without flock: create `path` with O_CREAT | O_EXCL (atomic on NFSv3+ and local
    filesystems), holding "host pid"; remove it on exit. A file whose holder is a dead process
    on this host is stale and taken over; a holder on another host cannot be checked, so the
    RunError says how to remove the file if that run is gone."""
    host = socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder_host, holder_pid = path.read_text().split()
                pid = int(holder_pid)
            except (OSError, ValueError):
                holder_host, pid = "?", -1  # being written, or torn by a crash
            if holder_host == host and pid > 0 and not _pid_alive(pid):
                log.warning("removing stale lock %s of dead process %d", path, pid)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise RunError(
                f"workdir {workdir} is in use by process {pid} on {holder_host} (lock file "
                f"{path}; this filesystem has no flock: if that run is gone, delete the file)"
            ) from None
        try:
            os.write(fd, f"{host} {os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        break
    else:
        raise RunError(f"workdir {workdir}: could not take the lock file {path}")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().split() == [host, str(os.getpid())]:
                path.unlink()


# ----------------------------------------------------------------------------- signals


class Stopped(Exception):
    """Raised where work stops early on a signal (between evaluation lengths); `signum`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Turn SIGTERM / SIGINT into a flag the train loop polls, so it can save and exit cleanly.

    Use as a context manager in the main thread. The first signal sets `.received` (the
    signal name); the loop then saves a checkpoint, calls `Checkpointer.wait()` and exits. The
    same signal again within REPEAT_GRACE_S is the double delivery of a process-group kill
    (coreutils `timeout` signals the child and its group) and is ignored, so the stop
    checkpoint is not lost; a signal after that restores the default handler and re-raises
    it, for a user who insists.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_GRACE_S = 5.0

    def __init__(self):
        self.received: str | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            if name == self.received and time.monotonic() - self._at < self.REPEAT_GRACE_S:
                log.warning("received %s again: still stopping", name)
                return
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received, self._at = name, time.monotonic()
        log.warning("received %s: saving a checkpoint and stopping", self.received)

    def check(self) -> None:
        """Raise Stopped if a signal came (for work that stops between its pieces)."""
        if self.received is not None:
            raise Stopped(int(getattr(signal, self.received)))

    def __enter__(self) -> "StopSignals":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def exit_on_signals(program: str) -> None:
    """Until a StopSignals takes over: SIGTERM / SIGINT end the process at once with one line
    and status 128 + signal (nothing has been written that a stop would need to save)."""

    def handle(signum, frame):
        name = signal.Signals(signum).name
        print(f"{program}: stopped by {name} before any work was saved", file=sys.stderr)
        sys.stderr.flush()
        # Not sys.exit: a SystemExit raised inside an import can be swallowed by the module
        # being imported, and the process then went on to train (found with a signal at 0.5 s).
        os._exit(128 + signum)

    for s in StopSignals.SIGNALS:
        signal.signal(s, handle)


def write_done(workdir: str | os.PathLike) -> None:
    """Mark a run finished: workdir/DONE holds the UTC time it finished."""
    atomic_write_text(Path(workdir) / DONE, time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
