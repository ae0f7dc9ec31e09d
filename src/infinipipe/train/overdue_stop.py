"""A stop that cannot wait for the next step boundary: the rank drops what it is doing and leaves.

On GPUs a long-context step takes minutes while a scheduler kills a job 30 s after its SIGTERM
(Slurm's KillWait), so a stop asked for mid-step is the normal case there, not a failure. The
rank leaves with the exit status of a stop (128 + signal; 0 under torchrun, which reads anything
else as a failure and prints its own traceback), and rank 0 says in one line which step was
dropped and which checkpoint a rerun resumes from (the last one written: checkpoints are atomic).
A rank that leaves first tells the others through the process group's store, so a rank whose
peer vanished under it (its collective failed) knows that a stop, not a fault, took the peer.
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ..runtime.launch import under_torchrun
from ..runtime.signals import signal_name

_STOPPED_KEY = "infinipipe/stopped"
_STORE_WAIT = datetime.timedelta(seconds=2)


@dataclass
class JobProgress:
    """Where a rank is, for the line an overdue stop leaves: ``phase`` is "start-up", "step"
    (training step ``done + 1``), "checkpoint" (writing step ``done``'s) or "between" steps."""

    steps: int
    grace_s: float
    checkpoint_enabled: bool
    done: int = 0
    checkpoint: Path | None = None
    phase: str = "start-up"


def stop_line(signum: int, progress: JobProgress) -> str:
    """Rank 0's one line for a stop that ended the job at once: what was dropped, what is kept."""
    sig, p = signal_name(signum), progress
    grace = f"job.stop_grace_seconds = {p.grace_s:g}"
    if p.phase == "start-up":
        resumes = f"; a rerun resumes from {p.checkpoint}" if p.checkpoint is not None else ""
        return f"stopped by {sig} during start-up; nothing was trained{resumes}"
    if p.phase == "checkpoint":
        where = f"stopped by {sig} after step {p.done} of {p.steps}, whose checkpoint could not be written within {grace}"
    else:
        where = (f"stopped by {sig} during step {p.done + 1} of {p.steps}, which could not end within {grace}; "
                 f"the step was dropped")
    if p.checkpoint is not None:
        return f"{where}; last checkpoint {p.checkpoint}; to resume from it, run the same command again"
    if not p.checkpoint_enabled:
        return f"{where}; no checkpoint (checkpoint.enable is false), so a rerun starts from step 0"
    return f"{where}; no checkpoint yet, so a rerun starts from step 0"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Nothing on this process's stderr: a store whose host has left logs its lost connection
    there (several lines from the communication library) before it raises."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peer_stopped() -> int:
    """The signal another rank left for (0 when none did, or the store cannot say)."""
    if not dist.is_initialized():
        return 0
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(_STORE_WAIT)  # a store whose host hangs must not hold a failing rank
        with _quiet_stderr():
            if store.check([_STOPPED_KEY]):
                return int(store.get(_STOPPED_KEY))
    except Exception:  # a store gone with its host: no rank can say anything else either
        return 0
    return 0


def leave_now(signum: int, progress: JobProgress) -> None:
    """Tell the other ranks, say where the job stopped (rank 0), and end this process at once,
    without running interpreter teardown (a collective in flight cannot be waited for)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.write(2, (stop_line(signum, progress) + "\n").encode())
    else:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # rank 0 speaks for the job; it may be gone already
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(_STORE_WAIT)
            store.set(_STOPPED_KEY, str(signum))
    with contextlib.suppress(Exception):  # semaphores of the planning pool, which the resource tracker would report
        multiprocessing.util._run_finalizers(0)
    os._exit(0 if under_torchrun() else 128 + signum)
