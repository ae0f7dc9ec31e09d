"""The executor's synchronisation points, and an emulation of NCCL's semantics for them on gloo.

gloo completes each point-to-point op on its own, so a schedule that deadlocks under NCCL can
pass every CPU test. Three NCCL facts matter to a pipeline stage: a device-wide synchronize waits
for every posted receive (whose sender may be waiting for this stage); the ops of one
`batch_isend_irecv` call complete together; and one process's groups on a communicator run one
after another on its stream, in the order they were posted (a group's kernel starts only once the
one before it ended, whatever the host does meanwhile).

With emulation on (`RuntimeSettings.nccl_semantics`, or ``INFINIPIPE_NCCL_SEMANTICS=1``) a
process's groups go to a thread that plays that stream: it issues a group only after the one
before it completed, and a group completes when all its ops have. Waiting for one op waits for its
whole group, `device_synchronize` for every group posted, and a group that outlasts the process
group's timeout raises `NcclHang` at its wait (as does every group posted after it). Anything that
hangs under NCCL fails here instead. One process's groups are taken to share one communicator:
the pipeline's, the only one the executor posts P2P groups on.
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist

ENV_VAR = "INFINIPIPE_NCCL_SEMANTICS"


def emulation_from_env() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


class NcclHang(RuntimeError):
    """A wait that would never return under NCCL."""


class P2PGroup:
    """The ops of one `batch_isend_irecv` call.

    Without emulation they are issued at once: one work per op on gloo (completing one by one),
    one for the group on NCCL. A gloo receive's ``wait`` waits for the next message each time it
    is called, so every work is waited at most once. ``what`` names the ops for a hang's message.
    """

    def __init__(self, ops: Sequence[dist.P2POp], what: list[str], emulate: bool):
        self.ops, self.what, self.emulate = list(ops), what, emulate
        self.works: list = []
        self._waited: list[bool] = []
        self._complete = threading.Event()
        self._error: str | None = None
        if emulate:
            _stream().post(self)
        else:
            self._issue()

    def _issue(self) -> None:
        self.works = dist.batch_isend_irecv(self.ops)
        self._waited = [False] * len(self.works)

    def _ops(self, index: int) -> range:
        return range(index, index + 1) if len(self.works) > 1 else range(len(self.works))

    def wait(self, index: int) -> None:
        """Wait for op ``index`` (under emulation: for the whole group, after every earlier one)."""
        if self.emulate:
            self._complete.wait()
            if self._error is not None:
                raise NcclHang(f"the P2P group [{', '.join(self.what)}] did not complete within the process "
                               f"group's timeout; under NCCL this wait never returns ({self._error})")
            return
        for i in self._ops(index):
            if not self._waited[i]:
                self.works[i].wait()
                self._waited[i] = True

    def done(self, index: int) -> bool:
        """Whether op ``index`` has completed, without waiting (under emulation: its whole group)."""
        if self.emulate:
            return self._complete.is_set() and self._error is None
        return all(self._waited[i] or self.works[i].is_completed() for i in self._ops(index))


class _Stream:
    """NCCL's stream for one process's P2P groups: a thread that issues each group once the one
    before it completed and waits for all its ops."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[P2PGroup] = queue.SimpleQueue()
        self._last: P2PGroup | None = None
        self._broken: str | None = None
        threading.Thread(target=self._run, name="nccl-stream-emulation", daemon=True).start()

    def post(self, group: P2PGroup) -> None:
        self._last = group
        self._queue.put(group)

    def synchronize(self) -> None:
        if self._last is not None:
            self._last.wait(0)

    def _run(self) -> None:
        while True:
            group = self._queue.get()
            if self._broken is None:
                try:
                    group._issue()
                    for w in group.works:
                        w.wait()
                except RuntimeError as err:
                    self._broken = str(err)
            group._error = self._broken
            group._complete.set()


_streams: dict[int, _Stream] = {}


def _stream() -> _Stream:
    """This process's stream (a process spawned from one that had a stream gets its own)."""
    pid = os.getpid()
    if pid not in _streams:
        _streams[pid] = _Stream()
    return _streams[pid]


def device_synchronize(device: torch.device) -> None:
    """Wait for all work on the device, P2P included: on CUDA the real call, under emulation a wait
    for every group this process posted (what `torch.cuda.synchronize` does to NCCL kernels)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if os.getpid() in _streams:
        _streams[os.getpid()].synchronize()
