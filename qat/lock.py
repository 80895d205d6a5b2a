"""One process per run directory: an OS lock on `<run.dir>/.lock`, held while a command runs.

The lock is `flock` on the file, so the kernel releases it when the holder dies, however it dies:
a `.lock` file nobody holds is a stale one, taken over with a warning that names the old holder.
The file's content (pid, host, start time) is only there to name the holder in the refusal.
Under multi-worker training only the chief locks (the other workers write nothing there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator

from qat.errors import RunDirError

LOCK_NAME = ".lock"
log = logging.getLogger("qat")


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}


def _open_locked(path: str, command: str) -> int:
    """Open `path` and take its lock, or raise naming the holder. Retries when the file it
    locked was unlinked meanwhile by a releasing holder (then the lock guards nothing)."""
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)  # a releasing holder may remove it
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"{os.path.dirname(path)} is in use by another qat process "
                f"({_describe(holder)}, running {holder.get('command', '?')}): wait for it, or "
                "use another run.dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _missing_dirs(path: str) -> list[str]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        path = "" if parent == path else parent
    return missing


@contextlib.contextmanager
def run_lock(run_dir: str, command: str = "qat") -> Iterator[None]:
    """Hold the lock on `run_dir` for the block's duration. A run dir created for the lock is
    removed again if the block left it empty (a command that failed early writes nothing)."""
    run_dir = os.path.abspath(run_dir)
    created = _missing_dirs(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot write to run.dir={run_dir} ({exc.strerror}): choose a "
                          "writable run.dir") from exc
    path = os.path.join(run_dir, LOCK_NAME)
    fd = _open_locked(path, command)
    try:
        stale = _read_holder(fd)
        if stale:
            log.warning("run.dir=%s: taking over a lock its holder left (%s): that process is "
                        "gone", run_dir, _describe(stale))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before closing: a waiter then never locks a file still in use
        os.close(fd)
        for directory in created:
            try:
                os.rmdir(directory)  # only if empty
            except OSError:
                break
