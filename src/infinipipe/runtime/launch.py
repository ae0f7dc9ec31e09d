"""Start the processes of a job: a local launcher for one machine, and torchrun's environment.

The local launcher spawns one process per rank with a localhost rendezvous, sets the collective
timeout and threads per process, and watches them: the first rank that raises or dies gets the
others killed at once, and `RankFailed` names it with its own traceback (ranks that only saw
their peer vanish are not blamed). Nothing waits forever: a job that outlives ``timeout_s`` is
killed too.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_COLLECTIVE_TIMEOUT_S = 30.0


class RankFailed(RuntimeError):
    """A rank of a local job raised or died; ``rank`` is the first one, ``detail`` its traceback."""

    def __init__(self, rank: int, detail: str, others: Sequence[str] = ()):
        self.rank, self.detail = rank, detail
        extra = "".join(f"\n  also: {o}" for o in others)
        super().__init__(f"rank {rank} failed:\n{detail}{extra}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class _Job:
    fn: Callable[..., Any]
    args: tuple
    world_size: int
    port: int
    backend: str
    threads: int
    timeout_s: float
    outdir: str


def _child(rank: int, job: _Job) -> None:
    out = Path(job.outdir)
    try:
        torch.set_num_threads(job.threads)
        dist.init_process_group(job.backend, init_method=f"tcp://127.0.0.1:{job.port}", rank=rank,
                                world_size=job.world_size, timeout=datetime.timedelta(seconds=job.timeout_s))
        try:
            result = job.fn(*job.args)
        finally:
            dist.destroy_process_group()
        (out / f"{rank}.result").write_bytes(pickle.dumps(result))
    except BaseException:
        (out / f"{rank}.error").write_text(f"{time.time()!r}\n{traceback.format_exc()}")
        os._exit(1)


def launch_local(fn: Callable[..., Any], nprocs: int, args: tuple = (), *, backend: str = "gloo",
                 threads: int = 1, collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
                 timeout_s: float = 600.0) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes joined in one process group.

    ``fn`` must be importable (a module-level function); each rank's return value is pickled back
    and returned in rank order. Raises `RankFailed` for the first rank that raised or was killed,
    `TimeoutError` if the job runs past ``timeout_s``.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="infinipipe-launch-") as outdir:
        job = _Job(fn, tuple(args), nprocs, free_port(), backend, threads, collective_timeout_s, outdir)
        procs = [ctx.Process(target=_child, args=(r, job), daemon=False) for r in range(nprocs)]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + timeout_s
            live = {p.sentinel: r for r, p in enumerate(procs)}
            failed: list[int] = []
            while live and not failed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"local job of {nprocs} ranks ran past {timeout_s:.0f} s; killed it")
                for sentinel in wait(list(live), timeout=min(left, 1.0)):
                    r = live.pop(sentinel)
                    procs[r].join()
                    if procs[r].exitcode != 0:
                        failed.append(r)
            if failed:
                # Peers of a dead rank fail within moments; give them a second to exit on their own
                # so the rank that died first is told apart from those that merely lost it.
                exited = failed + [live.pop(s) for s in wait(list(live), timeout=1.0)]
                for r in exited:
                    procs[r].join()
                codes = {r: procs[r].exitcode for r in exited}
                raise _blame(codes, Path(outdir), failed[0])
        finally:
            _kill(procs)  # ranks are not daemons (they may start a planning process): never orphan them
        return [pickle.loads((Path(outdir) / f"{r}.result").read_bytes()) for r in range(nprocs)]


def _kill(procs: Sequence[mp.Process], grace_s: float = 3.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _blame(codes: dict[int, int], outdir: Path, first_seen: int) -> RankFailed:
    """A rank killed by a signal is the cause; otherwise the rank that raised earliest."""
    killed = sorted(r for r, code in codes.items() if code < 0)
    if killed:
        r = killed[0]
        return RankFailed(r, f"killed by signal {signal.Signals(-codes[r]).name} (no Python traceback)",
                          _errors(outdir, exclude=r))
    errors = []
    for f in outdir.glob("*.error"):
        stamp, _, tb = f.read_text().partition("\n")
        errors.append((float(stamp), int(f.stem), tb))
    if not errors:
        return RankFailed(first_seen, f"exited with code {codes[first_seen]} and left no traceback")
    errors.sort()
    _, r, tb = errors[0]
    return RankFailed(r, tb.rstrip(), _errors(outdir, exclude=r))


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
    device to run on. Multi-node jobs use torchrun's usual rendezvous flags.
    """
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
