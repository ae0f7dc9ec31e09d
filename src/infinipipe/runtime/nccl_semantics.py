"""The executor's synchronisation points, and an emulation of NCCL's semantics for them on gloo.

gloo completes each point-to-point op on its own, so a schedule that deadlocks under NCCL can
pass every CPU test. Two NCCL facts matter to a pipeline stage: a device-wide synchronize waits
for every posted receive (whose sender may be waiting for this stage), and the ops of one
`batch_isend_irecv` call complete together. With emulation on (`RuntimeSettings.nccl_semantics`,
or ``INFINIPIPE_NCCL_SEMANTICS=1``), waiting for one op of a group waits for the whole group and
`device_synchronize` waits for every group this process posted; a wait that outlasts the process
group's timeout raises `NcclHang`. Anything that hangs under NCCL fails here instead.
"""
from __future__ import annotations

import os
import weakref

import torch

ENV_VAR = "INFINIPIPE_NCCL_SEMANTICS"


def emulation_from_env() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


class NcclHang(RuntimeError):
    """A wait that would never return under NCCL."""


_posted: "weakref.WeakSet[P2PGroup]" = weakref.WeakSet()


class P2PGroup:
    """The works of one `batch_isend_irecv` call: one per op on gloo, one for the group on NCCL.

    A gloo receive's ``wait`` waits for the next message each time it is called, so every work is
    waited at most once. ``what`` names the ops for the message of a hang.
    """

    def __init__(self, works: list, what: list[str], emulate: bool):
        self.works, self.what, self.emulate = works, what, emulate
        self._waited = [False] * len(works)
        if emulate:
            _posted.add(self)

    def _ops(self, index: int) -> range:
        if self.emulate or len(self.works) == 1:
            return range(len(self.works))
        return range(index, index + 1)

    def wait(self, index: int) -> None:
        """Wait for op ``index`` (under emulation: for every op of the group)."""
        for i in self._ops(index):
            if not self._waited[i]:
                self._wait_one(i)

    def _wait_one(self, i: int) -> None:
        try:
            self.works[i].wait()
        except RuntimeError as err:
            if not self.emulate:
                raise
            raise NcclHang(f"the P2P group [{', '.join(self.what)}] did not complete within the process "
                           f"group's timeout; under NCCL this wait never returns ({err})") from None
        self._waited[i] = True

    def done(self, index: int) -> bool:
        return all(self._waited[i] or self.works[i].is_completed() for i in self._ops(index))

    def pending(self) -> bool:
        return not all(self._waited)


def device_synchronize(device: torch.device) -> None:
    """Wait for all work on the device, P2P included: on CUDA the real call, under emulation a wait
    for every posted group of this process (what `torch.cuda.synchronize` does to NCCL kernels)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for group in list(_posted):
        if group.pending():
            for i in range(len(group.works)):
                group.wait(i)

