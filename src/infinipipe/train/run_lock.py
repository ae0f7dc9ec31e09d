"""One job per run directory: an exclusive ``flock`` on ``RUN_DIR/job.lock``.

The kernel drops a ``flock`` when its holder exits, however it exits, so a crashed job never
leaves the directory locked; the file itself stays and only records who holds it (pid, host,
start time) for the message a second job gets. The lock belongs to the open file, so a process
that inherits the descriptor (a local job's ranks) holds it too: a killed launcher does not free
the directory while its ranks still run. Run directories on network filesystems need working
``flock`` there (NFSv4 and Lustre with ``flock`` mount option do).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "job.lock"


class RunDirBusy(ValueError):
    """Another live job holds the run directory."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[int]:
    """Hold ``run_dir`` for this job; raise `RunDirBusy` naming the holder if another job has it.

    Yields the lock's file descriptor, for processes that are to hold the lock with this one.
    """
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "a job that has not yet written its name"
            raise RunDirBusy(f"run directory {run_dir} is in use by {holder} (lock {path}); "
                             f"wait for that job to end or choose another --run-dir") from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (started {started})\n".encode())
        try:
            yield fd
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
