"""Start the processes of a job: a local launcher for one machine, and torchrun's environment.

The local launcher spawns one process per rank with a rendezvous in a file of its results folder
(a TCP port picked free could be taken, by another job's connection, before rank 0 listened on
it), sets the collective
timeout and threads per process, and watches them: the first rank that raises or dies gets the
others killed at once, and `RankFailed` names it with its own traceback (ranks that only saw
their peer vanish are not blamed; when peers time out waiting, the rank that neither finished
nor failed is named). Nothing waits forever: a job that outlives ``timeout_s`` is killed too.
SIGTERM/SIGINT to the launcher are passed on to the ranks, which stop at a step boundary
(`signals.StopRequest`); a second signal kills them at once. A stop before every rank has started
its function (still importing, or waiting in the rendezvous for the others) starts no further
rank and kills the started ones at once: they hold nothing to save. Ranks start with SIGINT and
SIGTERM blocked, so a stop sent to the whole process group cannot break their start-up (a rank
killed before it has read its pickled job would leave the launcher blocked writing it) and waits
until they listen; the launcher keeps passing a stop on until they end, so ranks that were not
yet listening get it too. Ranks die with the launcher (killed outright while they start, sent
SIGTERM once they listen); ranks that outlive a killed launcher remove its results folder as they
leave.
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import reduction, resource_tracker, util
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .signals import STOP_GRACE_S, STOP_SIGNALS, JobStopped, StopSignals, exit_with_parent

DEFAULT_COLLECTIVE_TIMEOUT_S = 30.0
_LEFT_FOR_STOP = {128 + s for s in STOP_SIGNALS}  # a rank's exit status after it left for a stop


class RankFailed(RuntimeError):
    """A rank of a local job raised or died; ``rank`` is the first one, ``detail`` its traceback."""

    def __init__(self, rank: int, detail: str, others: Sequence[str] = ()):
        self.rank, self.detail = rank, detail
        extra = "".join(f"\n  also: {o}" for o in others)
        super().__init__(f"rank {rank} failed:\n{detail}{extra}")

    @property
    def last_line(self) -> str:
        """The last line of the rank's traceback: the exception's qualified type and message."""
        return self.detail.rstrip().splitlines()[-1]

    @property
    def headline(self) -> str:
        """One line: the rank and the last line of its traceback."""
        return f"rank {self.rank} failed: {self.last_line}"


class _Inherited:
    """A file descriptor a rank holds open, the same open file as the launcher's (a spawned
    process keeps only descriptors registered while it is pickled)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self) -> tuple:
        return _rebuild_inherited, (reduction.DupFd(self.fd),)


def _rebuild_inherited(dup: Any) -> _Inherited:
    return _Inherited(dup.detach())


@dataclass(frozen=True)
class _Job:
    fn: Callable[..., Any]
    args: tuple
    world_size: int
    backend: str
    threads: int
    timeout_s: float
    outdir: str
    parent_pid: int
    inherited: tuple[_Inherited, ...] = ()


def _child(rank: int, job: _Job) -> None:
    out = Path(job.outdir)
    try:
        exit_with_parent(job.parent_pid, signal.SIGKILL)  # nothing to save until it runs ``fn``
        torch.set_num_threads(job.threads)
        dist.init_process_group(job.backend, init_method=(out / "rendezvous").as_uri(), rank=rank,
                                world_size=job.world_size, timeout=datetime.timedelta(seconds=job.timeout_s))
        try:
            exit_with_parent(job.parent_pid)  # from here a stop, so it can write a checkpoint
            (out / f"{rank}.started").touch()  # the launcher passes stops on from here, it kills before
            result = job.fn(*job.args)
        finally:
            dist.destroy_process_group()
        (out / f"{rank}.result").write_bytes(pickle.dumps(result))
    except BaseException:
        # Renamed into place: the parent may read it while this rank is still writing.
        with contextlib.suppress(OSError):  # a launcher that died took its reader with it
            part = out / f"{rank}.error.part"
            part.write_text(f"{time.time()!r}\n{traceback.format_exc()}")
            os.replace(part, out / f"{rank}.error")
        _leave(job, 1)
    _leave(job, 0)


def _leave(job: _Job, code: int) -> None:
    """End the rank without running interpreter teardown, where destroying the communication
    library's threads has aborted a finished rank ("terminate called without an active
    exception") and turned a good job into a failed one. A rank whose launcher is gone removes
    the results folder nobody will read."""
    if os.getppid() != job.parent_pid:
        shutil.rmtree(job.outdir, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch_local(fn: Callable[..., Any], nprocs: int, args: tuple = (), *, backend: str = "gloo",
                 threads: int = 1, collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
                 timeout_s: float = 600.0, inherit_fds: Sequence[int] = (),
                 stop_grace_s: float = STOP_GRACE_S) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes joined in one process group.

    ``fn`` must be importable (a module-level function); each rank's return value is pickled back
    and returned in rank order. Every rank holds ``inherit_fds`` open until it exits (a lock the
    ranks are to share). Raises `RankFailed` for the first rank that raised or was killed,
    `TimeoutError` if the job runs past ``timeout_s``, `JobStopped` if a stop signal could not
    end the ranks in order within ``stop_grace_s`` (ranks that stop in order return normally; a
    rank that exits with 128 + a stop signal's number left its step for a stop).
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="infinipipe-launch-") as outdir:
        job = _Job(fn, tuple(args), nprocs, backend, threads, collective_timeout_s, outdir, os.getpid(),
                   tuple(_Inherited(fd) for fd in inherit_fds))
        procs = [ctx.Process(target=_child, args=(r, job), daemon=False) for r in range(nprocs)]
        try:
            with _PassStop(procs, stop_grace_s, Path(outdir)) as stop:
                with children_deaf_to_stops():
                    for p in procs:
                        if stop.signum:
                            break  # a stop during start-up starts nothing more
                        p.start()
                _watch(procs, stop, timeout_s, Path(outdir))
        finally:
            _kill(procs)  # ranks are not daemons (they may start a planning process): never orphan them
        return [pickle.loads((Path(outdir) / f"{r}.result").read_bytes()) for r in range(nprocs)]


@contextlib.contextmanager
def children_deaf_to_stops() -> Iterator[None]:
    """Processes spawned inside start with SIGINT and SIGTERM blocked (until they listen for stop
    signals, which unblocks them), so a Ctrl-C or a group's SIGTERM cannot break their imports into
    tracebacks (or kill one that has not read its pickled job, which would leave this process
    blocked writing it) and is taken, not lost, once they listen; this process's own handling of
    them is untouched.

    multiprocessing's spawn clears the signal mask of the processes it starts, so they are
    started through ``posix_spawn``, which sets it; the descriptors a child is to keep are made
    inheritable for the call. Main thread only; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    resource_tracker.ensure_running()  # started the usual way: it must not block stop signals
    fork_exec = util.spawnv_passfds

    def spawn_blocked(path: str, args: Sequence[str], passfds: Sequence[int]) -> int:
        fds = sorted({int(fd) for fd in passfds})
        inheritable = [os.get_inheritable(fd) for fd in fds]
        for fd in fds:
            os.set_inheritable(fd, True)
        try:
            return os.posix_spawn(path, list(args), os.environ, setsigmask=set(STOP_SIGNALS))
        finally:
            for fd, was in zip(fds, inheritable):
                os.set_inheritable(fd, was)

    util.spawnv_passfds = spawn_blocked
    try:
        yield
    finally:
        util.spawnv_passfds = fork_exec


class _PassStop(StopSignals):
    """The launcher's stop signals: the first is passed on to every rank, a second kills them now."""

    def __init__(self, procs: Sequence[mp.Process], grace_s: float, outdir: Path):
        super().__init__()
        self.procs = procs
        self.grace_s = grace_s
        self.outdir = outdir
        self.signum = 0
        self.deadline = float("inf")
        self._started = False

    def started(self) -> bool:
        """Whether every rank has started its function (and so listens for stops)."""
        self._started = self._started or all((self.outdir / f"{r}.started").exists() for r in range(len(self.procs)))
        return self._started

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signum:
            _kill(self.procs, grace_s=0.0)
            raise JobStopped(signum, "a second signal killed the ranks without a checkpoint")
        self.signum = signum
        self.deadline = time.monotonic() + self.grace_s + 3.0
        self.pass_on()

    def pass_on(self) -> None:
        """Send the stop to every live rank; a rank already stopping ignores it, one still starting
        (stop signals blocked until it listens) takes it then."""
        if not self.signum:
            return
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, self.signum)

    def __enter__(self) -> "_PassStop":
        # signal handlers belong to the main thread; a launch from another thread passes none on
        return super().__enter__() if threading.current_thread() is threading.main_thread() else self


def _watch(procs: Sequence[mp.Process], stop: _PassStop, timeout_s: float, outdir: Path) -> None:
    """Wait for every rank to exit 0; raise for the first that did not, or past a deadline."""
    deadline = time.monotonic() + timeout_s
    _stopped_starting(stop)
    live = {p.sentinel: r for r, p in enumerate(procs)}
    failed: list[int] = []
    while live and not failed:
        _stopped_starting(stop)
        left = min(deadline, stop.deadline) - time.monotonic()
        if left <= 0:
            if stop.signum:
                raise JobStopped(stop.signum, f"the ranks did not stop within {stop.grace_s:g} s; killed them")
            raise TimeoutError(f"local job of {len(procs)} ranks ran past {timeout_s:.0f} s; killed it")
        stop.pass_on()
        for sentinel in wait(list(live), timeout=min(left, 0.1 if stop.signum else 1.0)):
            r = live.pop(sentinel)
            procs[r].join()
            if procs[r].exitcode != 0:
                failed.append(r)
    if not failed:
        return
    if procs[failed[0]].exitcode in _LEFT_FOR_STOP:
        _left_for_stop(procs, live, stop)
    # Peers of a dead rank fail within moments; give them a second to exit on their own
    # so the rank that died first is told apart from those that merely lost it.
    exited = failed + [live.pop(s) for s in wait(list(live), timeout=1.0)]
    for r in exited:
        procs[r].join()
    codes = {r: procs[r].exitcode for r in exited}
    err = _blame(codes, outdir, failed[0], {r: procs[r].pid for r in live.values()})
    if stop.signum:
        raise JobStopped(stop.signum, err.headline) from err
    raise err


def _stopped_starting(stop: _PassStop) -> None:
    """A stop before every rank has started its function ends the job now: no rank trained."""
    if stop.signum and not stop.started():
        _kill(stop.procs, grace_s=0.0)
        raise JobStopped(stop.signum, "during start-up; nothing was trained", startup=True)


def _left_for_stop(procs: Sequence[mp.Process], live: dict[Any, int], stop: _PassStop) -> None:
    """A rank left its step for a stop: the others follow as soon as they notice (their grace,
    or a collective with it failing). Rank 0 then has said where the job stopped."""
    end = time.monotonic() + stop.grace_s + 3.0
    while live and time.monotonic() < end:
        for sentinel in wait(list(live), timeout=0.1):
            procs[live.pop(sentinel)].join()
    _kill(procs)
    code = procs[0].exitcode
    if code in _LEFT_FOR_STOP:
        raise JobStopped(code - 128, "", said=True)
    signum = next(c - 128 for p in procs if (c := p.exitcode) in _LEFT_FOR_STOP)
    raise JobStopped(signum, f"a rank left its step for the stop and rank 0 ended with status {code}")


def _kill(procs: Sequence[mp.Process], grace_s: float = 3.0) -> None:
    procs = [p for p in procs if p.pid is not None]  # a stop during start-up left some unstarted
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _blame(codes: dict[int, int], outdir: Path, first_seen: int, alive: dict[int, int]) -> RankFailed:
    """A rank killed by a signal is the cause; then a stopped rank (its peers' timeouts, and their
    peers' lost connections, follow from it); then a rank still alive when the first error was a
    timeout waiting for it; otherwise the rank that raised earliest."""
    killed = sorted(r for r, code in codes.items() if code < 0)
    if killed:
        r = killed[0]
        return RankFailed(r, f"killed by signal {signal.Signals(-codes[r]).name} (no Python traceback)",
                          _errors(outdir, exclude=r))
    states = {r: _process_state(pid) for r, pid in alive.items()}
    stopped = sorted(r for r, state in states.items() if state == "stopped")
    errors = []
    for f in outdir.glob("*.error"):
        stamp, _, tb = f.read_text().partition("\n")
        errors.append((float(stamp), int(f.stem), tb))
    errors.sort()
    timed_out = bool(errors) and any(word in errors[0][2].lower() for word in ("timed out", "timeout"))
    if stopped or (alive and timed_out):
        r = stopped[0] if stopped else min(alive)
        return RankFailed(r, f"stopped responding (process {alive[r]} is {states[r]}); the ranks waiting "
                             f"for it timed out or lost their peers", _errors(outdir, exclude=r))
    if not errors:
        return RankFailed(first_seen, f"exited with code {codes[first_seen]} and left no traceback")
    _, r, tb = errors[0]
    return RankFailed(r, tb.rstrip(), _errors(outdir, exclude=r))


def _process_state(pid: int) -> str:
    """'stopped' for a stopped or traced process (Linux /proc), else 'still running'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "still running"
    return "stopped" if stat.rpartition(")")[2].split()[0] in ("T", "t") else "still running"


def _errors(outdir: Path, exclude: int) -> list[str]:
    out = []
    for f in sorted(outdir.glob("*.error")):
        if int(f.stem) != exclude:
            last = f.read_text().rstrip().splitlines()[-1]
            out.append(f"rank {f.stem}: {last}")
    return out


def init_from_env(backend: str | None = None,
                  collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> str:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Picks NCCL and this rank's GPU (LOCAL_RANK) when CUDA is present, gloo otherwise; returns the
    device to run on. Multi-node jobs use torchrun's usual rendezvous flags. The rank gets SIGTERM
    (a step-boundary stop) if torchrun's agent, its parent, dies.
    """
    exit_with_parent(os.getppid())
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"not started by torchrun: environment lacks {', '.join(missing)}")
    cuda = torch.cuda.is_available() and backend in (None, "nccl")
    device = "cpu"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), init_method="env://",
                            timeout=datetime.timedelta(seconds=collective_timeout_s),
                            device_id=torch.device(device) if cuda else None)
    return device


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
