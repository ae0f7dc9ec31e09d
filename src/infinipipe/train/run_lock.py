"""One job per run directory: an exclusive ``flock`` on ``RUN_DIR/job.lock``.

The kernel drops a ``flock`` when its holder exits, however it exits, so a crashed job never
leaves the directory locked; the file itself stays and only records who holds it (pid, host,
start time) for the message a second job gets. The lock belongs to the open file, so a process
that inherits the descriptor (a local job's ranks) holds it too: a killed launcher does not free
the directory while its ranks still run, and a new job waits for them (they end within their
stop grace, which the new job takes to be its own) rather than overlap them or be refused for a
job already gone. Run directories
on network filesystems need working ``flock`` there (NFSv4 and Lustre with ``flock`` mount option
do).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..runtime.signals import STOP_GRACE_S
from .notices import warn

LOCK_FILE = "job.lock"
_ORPHAN_SLACK_S = 5.0  # ranks end this soon after their stop grace, once their launcher died
_HOLDER = re.compile(r"pid (\d+) on host (\S+) ")


class RunDirBusy(ValueError):
    """Another live job holds the run directory."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, stop_grace_s: float = STOP_GRACE_S) -> Iterator[int]:
    """Hold ``run_dir`` for this job; raise `RunDirBusy` naming the holder if another job has it.

    Yields the lock's file descriptor, for processes that are to hold the lock with this one.
    """
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not (_launcher_gone(holder) and _wait_for(fd, run_dir, holder, stop_grace_s + _ORPHAN_SLACK_S)):
                raise _busy(run_dir, holder) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (started {started})\n".encode())
        try:
            yield fd
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def check_free(run_dir: str | Path) -> None:
    """Raise `RunDirBusy` if a live job holds ``run_dir``, without creating or writing its lock
    file, so a job refused for any other reason leaves the directory as it found it. (A job
    whose launcher has ended is left to `run_dir_lock`, which waits for its ranks.)"""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file yet: no job has held the directory
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(Path(run_dir) / LOCK_FILE)
        if not _launcher_gone(holder):
            raise _busy(run_dir, holder) from None
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    return path.read_text().strip() or "a job that has not yet written its name"


def _busy(run_dir: str | Path, holder: str) -> RunDirBusy:
    return RunDirBusy(f"run directory {run_dir} is in use by {holder} (lock {Path(run_dir) / LOCK_FILE}); "
                      f"wait for that job to end or choose another --run-dir")


def _launcher_gone(holder: str) -> bool:
    """Whether the recorded holder, a process on this host, has ended: the lock is then held by
    the ranks it started, which follow it within their stop grace."""
    match = _HOLDER.match(holder)
    if match is None or match.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _wait_for(fd: int, run_dir: str | Path, holder: str, wait_s: float) -> bool:
    """Wait (up to ``wait_s``) for the ranks of a job whose launcher is gone to release the
    lock, so a rerun never overlaps them; True once this process holds it."""
    warn(f"run directory {run_dir} is still held by the processes of {holder}, which has ended; "
         f"waiting up to {wait_s:g} s for them to end")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.1)
    return False
