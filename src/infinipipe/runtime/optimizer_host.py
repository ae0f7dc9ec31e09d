"""The optimizer state waits on the host during a step (plan metadata ``offload_optimizer``).

Only the optimizer step reads the AdamW moments and, under mixed precision, the fp32 master
weights (the bf16 weights compute, gradients accumulate in the masters' ``.grad``), and it runs
after the step: a step that parks them on the host frees their device bytes for activations.
At the step's start every storage of that state is copied device->host into the host tier
(`offload.HostTier`, the activations' slab: the simulator's host peak counts both), and each is
emptied (``resize_(0)``) once its copy is known to be done (asked without waiting at each
action; waited for by the compute stream at the copy back at the latest). Emptying a storage in
place keeps every tensor that views it the same object: the optimizer's state dict, the master
parameters and their ``.grad`` (which stays on the device and keeps accumulating), FSDP's
sharded parameters. The copy back starts when the stage begins the action
``optimizer_reload_lead[stage]`` places before the end of its action list (0: after its last
action), into the same storages refilled on the compute stream; before the optimizer step the
compute stream waits for it (`OptimizerOffload.arrive`, a stream wait, not a host sync).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from ..contract.ir import Plan
from . import live_bytes
from .offload import CopyEngine, HostTier, _Region, bytes_of


def optimizer_back_at(plan: Plan, stage: int) -> int | None:
    """The index of the action at whose start the stage's optimizer state starts its copy back
    (the number of actions: after the last one); None where it stays on the device this step."""
    if not plan.metadata.get("offload_optimizer"):
        return None
    leads = plan.metadata.get("optimizer_reload_lead")
    if leads is None or len(leads) != plan.num_stages:
        raise ValueError(f"the plan keeps the optimizer state on the host but its optimizer_reload_lead is {leads!r}, "
                         f"not one entry per stage ({plan.num_stages})")
    lead, n = leads[stage], len(plan.stage_actions[stage])
    if lead is None:
        return None
    if not 0 <= lead <= n:
        raise ValueError(f"optimizer_reload_lead {lead} of stage {stage} is outside its {n} actions")
    return n - lead


def optimizer_out_wait(plan: Plan, stage: int) -> bool:
    """Whether the stage's first action waits for the optimizer state's copy out (the plan's
    actions at the step's start have no room for the state beside their own bytes)."""
    waits = plan.metadata.get("optimizer_out_wait")
    if waits is None:
        return False
    if len(waits) != plan.num_stages:
        raise ValueError(f"the plan's optimizer_out_wait is {waits!r}, not one entry per stage ({plan.num_stages})")
    return bool(waits[stage]) and optimizer_back_at(plan, stage) is not None


@dataclass
class _Parked:
    """One device storage of the optimizer state: ``source`` keeps its bytes alive until the copy
    out has happened; ``host`` is its region's view until the copy back has."""

    storage: torch.UntypedStorage
    nbytes: int
    region: _Region
    host: torch.Tensor
    source: torch.Tensor | None
    copied_out: object
    copied_in: object = None


class OptimizerOffload:
    """One step of a stage's optimizer state on the host: `leave` at the step's start, `poll` at
    each action, `back` at the reload point, `arrive` before the optimizer step. ``tensors``: the
    state that moves (a DTensor moves its local shard; each storage once)."""

    def __init__(self, copies: CopyEngine, tier: HostTier, device: torch.device, tensors: Iterable[torch.Tensor]):
        self.copies, self.tier, self.device = copies, tier, device
        storages: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            local = t.to_local() if isinstance(t, DTensor) else t
            storage = local.untyped_storage()
            if storage.data_ptr() != 0 and local.device == self.device:
                storages.setdefault(storage.data_ptr(), storage)
        self.storages = list(storages.values())
        self._parked: list[_Parked] = []
        self._refused: list[int] = []

    def room(self) -> int:
        """The host-tier bytes the state takes: known at the step's start, so the tier grows to
        hold it before the first step that moves it."""
        return HostTier.room_for(s.nbytes() for s in self.storages)

    def leave(self) -> None:
        """Copy every storage out; one the tier has no room for (beside what the plan predicted
        for activations) stays on the device this step."""
        for storage in self.storages:
            nbytes = storage.nbytes()
            region = self.tier.take(nbytes)
            if region is None:
                self._refused.append(nbytes)
                continue
            source = bytes_of(storage, self.device)
            host = self.tier.view(region, nbytes)
            copied = self.copies.copy(host, source, "out", region.fences)
            self._parked.append(_Parked(storage, nbytes, region, host, source, copied))
        self.poll()

    def poll(self) -> None:
        """Empty the storages whose copy out has happened, asked without waiting."""
        for p in self._parked:
            if p.source is not None and self.copies.done(p.copied_out):
                self._empty(p)

    def _empty(self, p: _Parked) -> None:
        live_bytes.storage_emptied(p.storage)
        p.source = None
        p.storage.resize_(0)

    def wait_out(self) -> None:
        """The compute stream waits for every copy out, and the storages are emptied: what runs
        next holds none of the state (its blocks are reused only after the copies read them)."""
        for p in self._parked:
            if p.source is not None:
                self.copies.compute_waits(p.copied_out)
                self._empty(p)

    def back(self) -> None:
        """Start the copy back: a storage whose copy out is not known to be done is waited for
        (the compute stream, not the host) and emptied first, then every storage is refilled on
        the compute stream and copied into after its copy out."""
        self.wait_out()
        for p in self._parked:
            self.copies.refill(p.storage, p.nbytes)
            live_bytes.storage_refilled(p.storage)
            p.copied_in = self.copies.copy(bytes_of(p.storage, self.device), p.host, "in", [p.copied_out])

    def arrive(self) -> None:
        """Before the optimizer step: the compute stream waits for every copy back, and the host
        regions are given back (a later copy into them waits for the copy that read them)."""
        for p in self._parked:
            if p.copied_in is None:
                raise RuntimeError("the optimizer state's copy back never started")
            self.copies.compute_waits(p.copied_in)
            self.tier.give_back(p.region, p.nbytes, p.copied_in)
        for nbytes in self._refused:
            self.tier.refuse(nbytes)
        self._parked, self._refused = [], []
