"""One run at a time per output directory: an exclusive lock on `OUTPUT/.lock`.

Two runs of the same config (two `ppoflow train`, two flow runs, or one of each) share one output
directory: its checkpoints, prepared data and metrics, and the flow's cached stages. The first holds
an exclusive `flock` on `OUTPUT/.lock` for its whole run; the second waits for it, logging who holds
it, then finds the work done and reuses it (the flow's stages come back Cached; `ppoflow train`
finds the final checkpoint). With `flow.lock_timeout_seconds` set, the second gives up after that
long with a one-line error naming the holder; the default (null) waits as long as it takes.

The kernel releases the lock when its holder exits, however it dies (SIGKILL included), so there
are no stale locks to clean up. The lock file is never deleted: a waiter holds it open, and a new
file would let a third run lock a different inode. Within one process the lock is reentrant (the
flow holds it while its tasks, threads of the same process, run the stages). Under `accelerate
launch` only the main process takes it: it is the one that writes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ppoflow.errors import ConfigError, PpoflowError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
WAITING_LOG_SECONDS = 60.0

_held: dict[Path, tuple[int, int]] = {}  # output dir -> (open fd, depth); this process's locks
_held_guard = threading.Lock()


class OutputDirLocked(PpoflowError):
    """Another run holds the output directory and did not let go within `flow.lock_timeout_seconds`."""


def _holder(lock_path: Path) -> str:
    """Who holds the lock, as its holder wrote it: `pid 123 on host since 2026-11-24T01:02:03Z`."""
    try:
        about = json.loads(lock_path.read_text() or "{}")
        return f"pid {about['pid']} on {about['host']} since {about['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _open_lock_file(output_dir: Path) -> int:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Read-only: flock needs no write access, and a file held open for writing would keep the
        # file system from being remounted read-only for the whole run.
        return os.open(output_dir / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(
            "output_dir", f"{output_dir} is not writable ({exc.strerror})", "choose a directory you can write to"
        ) from None


def _acquire(output_dir: Path, timeout: float | None, poll_seconds: float) -> int:
    fd = _open_lock_file(output_dir)
    lock_path = output_dir / LOCK_FILE
    began = time.monotonic()
    next_log = began
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - began
                if timeout is not None and waited >= timeout:
                    raise OutputDirLocked(
                        f"config field `output_dir`: {output_dir} is in use by another run ({_holder(lock_path)}; "
                        f"waited {waited:.0f} s of flow.lock_timeout_seconds={timeout:g}) — wait for that run to "
                        "finish and run again (its finished work is reused), raise flow.lock_timeout_seconds "
                        "(null waits as long as it takes), or choose another output_dir"
                    ) from None
                if time.monotonic() >= next_log:
                    log.warning(
                        "%s is in use by another run (%s): waiting for it to finish", output_dir, _holder(lock_path)
                    )
                    next_log = time.monotonic() + WAITING_LOG_SECONDS
                time.sleep(poll_seconds if timeout is None else max(min(poll_seconds, timeout - waited), 0.0))
        if time.monotonic() - began > poll_seconds:
            log.info("%s is free again: going on (finished work is reused)", output_dir)
        since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:  # who holds it, for the runs that wait; nothing depends on it
            lock_path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
        except OSError as exc:
            log.debug("cannot note the lock holder in %s: %s", lock_path, exc.strerror)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def output_dir_lock(output_dir: Path, timeout: float | None = None, *, poll_seconds: float = 0.2) -> Iterator[Path]:
    """Hold `output_dir/.lock` exclusively for the block; wait up to `timeout` seconds (None: no limit).

    Raises `OutputDirLocked` on timeout and `ConfigError` when the directory cannot be written.
    Reentrant within a process.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    with _held_guard:
        held = _held.get(output_dir)
        if held is not None:
            _held[output_dir] = (held[0], held[1] + 1)
    if held is None:
        fd = _acquire(output_dir, timeout, poll_seconds)
        with _held_guard:
            _held[output_dir] = (fd, 1)
    try:
        yield output_dir / LOCK_FILE
    finally:
        with _held_guard:
            fd, depth = _held[output_dir]
            if depth > 1:
                _held[output_dir] = (fd, depth - 1)
            else:
                del _held[output_dir]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
