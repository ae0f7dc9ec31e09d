"""Host offload of saved activations: the stage's last layers' saved tensors wait for their
chunk's backward in host memory.

A chunk's action may offload its stage's last ``offload_layers`` layers (`Action.offload_layers`).
While those layers run forward, `saved_tensors_hooks` hand every tensor autograd saves to an
`Offloader`, which records it instead of letting autograd hold it. That includes the input a
recomputed layer's non-reentrant checkpoint saves (checkpoint saves its arguments under the
hooks around it, before pushing its own), an elementwise layer's reduced set and a stored
layer's activations. Left on the device: parameters and the stage's input (leaves that require
grad), the split sequence's K/V store (later slices read it) and what every layer shares (the
chunk's metadata and RoPE tables). Each storage moves once, however many saved tensors view it.

Once the chunk's forward ends its storages are copied device->host into a `HostTier` (one slab,
pinned on CUDA, grown only between steps) and the device copies are dropped when the copy is
known to be done; the copy back starts at the beginning of the action ``reload_lead`` places
before the chunk's backward, the backward waits for it where autograd first unpacks a tensor, and
its device bytes go where autograd lets go of the last saved tensor that views them, as they
would have had they never left.

Every wait goes through a `CopyEngine`: CUDA streams and events (`CudaCopies`), copies done at
once (`ImmediateCopies`, CPU), or `LateCopies`, the CPU emulation of asynchronous copies
(``INFINIPIPE_LATE_COPIES=1``): each copy completes on a worker thread after a delay
(``INFINIPIPE_LATE_COPIES_MS``, default 10) and its destination holds garbage (NaN) until then,
so a missing wait shows as a wrong loss or gradient in the exactness tests.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..contract.ir import Action
from . import live_bytes

LATE_COPIES_VAR = "INFINIPIPE_LATE_COPIES"
LATE_COPIES_MS_VAR = "INFINIPIPE_LATE_COPIES_MS"
DEFAULT_LATE_COPIES_MS = 10.0

Direction = Literal["out", "in"]


def late_copies_from_env() -> bool:
    return os.environ.get(LATE_COPIES_VAR, "") not in ("", "0")


def late_copy_delay_s() -> float:
    return float(os.environ.get(LATE_COPIES_MS_VAR, DEFAULT_LATE_COPIES_MS)) / 1000.0


def reload_points(actions: Sequence[Action]) -> dict[int, list[int]]:
    """Action index -> chunks whose reload starts when the stage begins that action."""
    out: dict[int, list[int]] = {}
    for i, a in enumerate(actions):
        if a.kind == "B" and a.offload_layers:
            out.setdefault(i - a.reload_lead, []).append(a.chunk_id)
    return out


def bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A storage as a flat byte tensor: copies move storages, whatever dtype their views read."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class _Ready:
    """An event that has already happened: what a CPU compute stream records (work runs in order)."""


_READY = _Ready()


class CopyEngine:
    """Copies between device and host on a device->host and a host->device stream, and the waits
    between them and the compute stream. ``copy`` makes the copy wait for the compute stream's
    work so far (the producing kernels of what goes out, the allocation of what comes in) and for
    ``after``; ``compute_waits`` makes the compute stream wait for an event; ``done`` asks whether
    an event has happened, without waiting."""

    def device_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """Device bytes for a reload, allocated on the compute stream (whose order frees them)."""
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def refill(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Give a storage emptied by ``resize_(0)`` its ``nbytes`` back for a copy in, allocated on
        the compute stream as `device_buffer` is: the tensors viewing it stay the same objects."""
        storage.resize_(nbytes)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, direction: Direction, after: Sequence[object]) -> object:
        raise NotImplementedError

    def done(self, event: object) -> bool:
        raise NotImplementedError

    def compute_waits(self, event: object) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop what the engine runs besides the caller (worker threads)."""


class ImmediateCopies(CopyEngine):
    """CPU copies done when issued: every event has happened by the time it is returned."""

    def copy(self, dst, src, direction, after):
        dst.copy_(src)
        return _READY

    def done(self, event):
        return True

    def compute_waits(self, event):
        return None


class CudaCopies(CopyEngine):
    """Copies on two side streams. The compute stream is read before entering a copy stream's
    context (inside it, `current_stream` is the copy stream itself) and the copy stream waits for
    an event recorded on it; the compute stream waits for a copy's event before reading its result.
    Sources are kept alive by the `Offloader` until their copy's event has happened."""

    def __init__(self, device: torch.device):
        self.device = device
        self.streams = {d: torch.cuda.Stream(device) for d in ("out", "in")}

    def copy(self, dst, src, direction, after):
        compute = torch.cuda.current_stream(self.device)
        produced = torch.cuda.Event()
        produced.record(compute)
        stream = self.streams[direction]
        stream.wait_event(produced)
        for event in after:
            stream.wait_event(event)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        return copied

    def done(self, event):
        return event.query()

    def compute_waits(self, event):
        torch.cuda.current_stream(self.device).wait_event(event)


class _LateEvent:
    """A late copy's completion; an error on the worker thread is raised where it is waited for."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.flag.wait()
        if self.error is not None:
            raise self.error


@dataclass
class _LateCopy:
    """One emulated copy: it starts once its waits have happened and the copies before it on its
    stream are done, reads its source then, and writes its destination ``delay`` after it was
    issued. A source whose last reference went before that is garbage (the caching allocator
    would have handed its block to the next kernel)."""

    dst: torch.Tensor
    src: weakref.ref
    after: list
    due: float
    event: _LateEvent = field(default_factory=_LateEvent)

    def run(self) -> None:
        try:
            for e in self.after:
                if isinstance(e, _LateEvent):
                    e.wait()
            src = self.src()
            read = None if src is None else src.clone()
            del src
            self.dst.fill_(255)  # all bits set: NaN in every floating dtype
            time.sleep(max(0.0, self.due - time.monotonic()))
            if read is not None and self.src() is not None:
                self.dst.copy_(read)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            self.event.error = err
        self.event.flag.set()


class LateCopies(CopyEngine):
    """CPU emulation of asynchronous copies: one worker thread per copy stream runs its copies in
    order, each completing ``delay_s`` after it was issued; destinations hold garbage until then,
    fresh device buffers from the moment they are allocated."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self._queues: dict[str, queue.SimpleQueue] = {d: queue.SimpleQueue() for d in ("out", "in")}
        self._threads = [threading.Thread(target=self._serve, args=(q,), daemon=True) for q in self._queues.values()]
        for t in self._threads:
            t.start()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            job.run()

    def device_buffer(self, nbytes, device):
        return torch.full((nbytes,), 255, dtype=torch.uint8, device=device)

    def refill(self, storage, nbytes):
        storage.resize_(nbytes)
        bytes_of(storage, storage.device).fill_(255)

    def copy(self, dst, src, direction, after):
        job = _LateCopy(dst, weakref.ref(src), list(after), time.monotonic() + self.delay_s)
        self._queues[direction].put(job)
        return job.event

    def done(self, event):
        return not isinstance(event, _LateEvent) or event.flag.is_set()

    def compute_waits(self, event):
        if isinstance(event, _LateEvent):
            event.wait()

    def close(self):
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join()


def copy_engine(device: torch.device, late: bool = False) -> CopyEngine:
    """CUDA streams on a GPU; on CPU the late-copy emulation when asked for, else copies at once."""
    if device.type == "cuda":
        return CudaCopies(device)
    return LateCopies(late_copy_delay_s()) if late else ImmediateCopies()


@dataclass
class _Region:
    """Bytes ``[offset, offset + size)`` of the host slab; ``fences``: copies still reading it
    when it was given back, which a copy writing it must wait for."""

    offset: int
    size: int
    fences: list = field(default_factory=list)


class HostTier:
    """Host memory for offloaded storages: one byte slab (pinned on CUDA, so copies are
    asynchronous) with views handed out first-fit. Any dtype's storage is bytes, so one slab
    serves them all. The slab grows only between steps (`begin_step`), to the most a step asked
    for: pinning memory may synchronise the device. A storage that does not fit stays on the
    device for that step. ``in_use_peak``: the most bytes in use at once since the step began.
    """

    ALIGN = 512

    def __init__(self, device: torch.device, reserve_bytes: int = 0):
        self.pinned = device.type == "cuda"
        self._slab = torch.empty(0, dtype=torch.uint8)
        self._free: list[_Region] = []
        self.in_use = self.in_use_peak = 0
        self._asked = self._asked_peak = 0
        self._grow(reserve_bytes)

    @property
    def capacity(self) -> int:
        return self._slab.numel()

    def _grow(self, nbytes: int) -> None:
        nbytes = -(-nbytes // self.ALIGN) * self.ALIGN
        if nbytes <= self.capacity:
            return
        live_bytes.host_tier_storage(self._slab.untyped_storage(), False)
        if self.pinned:
            self._slab = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            live_bytes.host_tier_storage(self._slab.untyped_storage(), True)
        else:
            storage = torch.UntypedStorage(nbytes)  # made outside any operator: no meter sees it as device bytes
            live_bytes.host_tier_storage(storage, True)
            self._slab = torch.empty(0, dtype=torch.uint8).set_(storage)
        self._free = [_Region(0, nbytes)]

    @classmethod
    def room_for(cls, sizes: Iterable[int]) -> int:
        """The slab bytes that storages of ``sizes`` bytes take at once."""
        return sum(-(-n // cls.ALIGN) * cls.ALIGN for n in sizes)

    def begin_step(self, room: int = 0) -> None:
        """Grow to what the last step asked for, or to ``room`` (what the plan is predicted to ask
        for) where that is more; the slab is empty between steps."""
        if self.in_use:
            raise RuntimeError(f"{self.in_use} host bytes are still in use between steps")
        self._grow(max(self._asked_peak, room))
        self._free = [_Region(0, self.capacity)] if self.capacity else []
        self._asked = self._asked_peak = self.in_use_peak = 0

    def take(self, nbytes: int) -> _Region | None:
        """A region of ``nbytes`` (first fit), or None where none is free."""
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        self._asked += size
        self._asked_peak = max(self._asked_peak, self._asked)
        for i, r in enumerate(self._free):
            if r.size >= size:
                if r.size == size:
                    del self._free[i]
                else:
                    self._free[i] = _Region(r.offset + size, r.size - size, list(r.fences))
                self.in_use += nbytes
                self.in_use_peak = max(self.in_use_peak, self.in_use)
                live_bytes.host_tier_bytes(nbytes)
                return _Region(r.offset, size, list(r.fences))
        return None

    def view(self, region: _Region, nbytes: int) -> torch.Tensor:
        return self._slab[region.offset:region.offset + nbytes]

    def give_back(self, region: _Region, nbytes: int, fence: object) -> None:
        """Return a region whose last reader is the copy ``fence``; neighbours merge."""
        self.in_use -= nbytes
        self._asked -= region.size
        live_bytes.host_tier_bytes(-nbytes)
        self._free.append(_Region(region.offset, region.size, [fence]))
        self._free.sort(key=lambda r: r.offset)
        merged = [self._free[0]]
        for r in self._free[1:]:
            last = merged[-1]
            if last.offset + last.size == r.offset:
                merged[-1] = _Region(last.offset, last.size + r.size, last.fences + r.fences)
            else:
                merged.append(r)
        self._free = merged

    def refuse(self, region_size: int) -> None:
        """A storage that did not fit has reached its reload: it no longer asks for room."""
        self._asked -= -(-region_size // self.ALIGN) * self.ALIGN


class _Moved:
    """One device storage saved by an offloaded layer: copied out once and back once, however many
    saved tensors view it. ``source`` keeps the device bytes alive until the copy out has happened;
    ``home`` is where the backward reads them (the source itself where the host tier had no room)
    until autograd lets go of the last of its ``views``."""

    def __init__(self, source: torch.Tensor):
        self.source: torch.Tensor | None = source
        self.nbytes = source.numel()
        self.views = 0
        self.home: torch.Tensor | None = None
        self.region: _Region | None = None
        self.host: torch.Tensor | None = None
        self.copied_out: object = None
        self.copied_in: object = None
        self.waited = False


@dataclass(frozen=True)
class _SavedView:
    """What autograd holds for an offloaded saved tensor: its storage's record and its geometry."""

    moved: _Moved
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class Offloader:
    """A stage's offloaded storages during one step, per chunk: recorded during the forward
    (`saving`), copied out when it ends (`offload`), copied back at the reload point (`reload`),
    read by the backward (the hooks' unpack) and released as autograd lets go of them; `drop`
    forgets the chunk when its backward has ended."""

    def __init__(self, copies: CopyEngine, tier: HostTier, device: torch.device):
        self.copies, self.tier, self.device = copies, tier, device
        self._chunks: dict[int, dict[int, _Moved]] = {}
        self._shared: dict[int, Callable[[], Iterable[torch.Tensor]]] = {}
        self._leaving: list[_Moved] = []
        self._arriving: list[_Moved] = []
        self.moved_bytes = 0

    def saving(self, chunk_id: int, shared: Callable[[], Iterable[torch.Tensor]]) -> torch.autograd.graph.saved_tensors_hooks:
        """Hooks for the chunk's offloaded layers; ``shared`` gives the tensors that stay (K/V
        stores, the chunk's metadata and RoPE tables), read when a tensor is saved because the
        tables are made inside the first layer. Autograd keeps the hooks with every tensor saved
        under them until the backward, so ``shared`` is held apart and let go when the forward
        ends (`offload`): hooks that held it would keep the chunk's metadata on the device."""
        moved = self._chunks.setdefault(chunk_id, {})
        self._shared[chunk_id] = shared

        def pack(t: torch.Tensor):
            if not self._movable(t, self._shared[chunk_id]):
                return t
            storage = t.untyped_storage()
            record = moved.get(storage.data_ptr())
            if record is None:
                record = moved[storage.data_ptr()] = _Moved(bytes_of(storage, t.device))
            view = _SavedView(record, t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            record.views += 1
            weakref.finalize(view, self._released, record)
            return view

        return torch.autograd.graph.saved_tensors_hooks(pack, self._unpack)

    def _movable(self, t: torch.Tensor, shared: Callable[[], Iterable[torch.Tensor]]) -> bool:
        """Parameters and the stage's input are leaves that require grad (a linear saves its
        weight's transpose: a view of one); a shared tensor stays."""
        base = t if t._base is None else t._base
        if (base.is_leaf and base.requires_grad) or t.device != self.device or t.layout != torch.strided:
            return False
        ptr = t.untyped_storage().data_ptr()
        return ptr != 0 and all(s.untyped_storage().data_ptr() != ptr for s in shared())

    def _unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        home = self._arrived(saved.moved)
        return torch.empty(0, dtype=saved.dtype, device=self.device).set_(
            home.untyped_storage(), saved.offset, saved.size, saved.stride)

    def _released(self, moved: _Moved) -> None:
        """Autograd let go of a saved view (its node's backward ran). Once no view of a storage is
        left, the backward has read it for the last time and its device bytes go, as a saved tensor
        that was never offloaded goes: held until the chunk's backward ended, a reloaded layer's
        bytes would sit beside the layers that backward runs after it."""
        moved.views -= 1
        if moved.views or moved.home is None:
            return
        if moved.copied_in is not None:
            self._arrived(moved)  # never read: a block the allocator reuses must have been written
        moved.home = None

    def _arrived(self, moved: _Moved) -> torch.Tensor:
        """The device bytes of a storage for its backward: the compute stream waits for the reload."""
        if moved.home is None:
            raise RuntimeError("an offloaded tensor was read before its reload started")
        if moved.copied_in is not None and not moved.waited:
            self.copies.compute_waits(moved.copied_in)
            moved.waited = True
            self._settle(moved)
        return moved.home

    def offload(self, chunk_id: int) -> None:
        """The chunk's forward has ended: copy its recorded storages out."""
        del self._shared[chunk_id]
        self.poll()
        for moved in self._chunks.get(chunk_id, {}).values():
            moved.region = self.tier.take(moved.nbytes)
            if moved.region is None:
                moved.home, moved.source = moved.source, None
                continue
            moved.host = self.tier.view(moved.region, moved.nbytes)
            moved.copied_out = self.copies.copy(moved.host, moved.source, "out", moved.region.fences)
            self.moved_bytes += moved.nbytes
            self._leaving.append(moved)
        self.poll()

    def reload(self, chunk_id: int) -> None:
        """Start copying the chunk's storages back (the reload waits for their copies out)."""
        self.poll()
        for moved in self._chunks.get(chunk_id, {}).values():
            if moved.region is None:
                self.tier.refuse(moved.nbytes)
                continue
            moved.home = self.copies.device_buffer(moved.nbytes, self.device)
            moved.copied_in = self.copies.copy(moved.home, moved.host, "in", [moved.copied_out])
            self._arriving.append(moved)
        self.poll()

    def poll(self) -> None:
        """Drop device sources whose copy out has happened, and give back host regions whose copy
        in has: asked without waiting, so memory is released as early as is known to be safe."""
        leaving = []
        for moved in self._leaving:
            if self.copies.done(moved.copied_out):
                moved.source = None
            else:
                leaving.append(moved)
        self._leaving = leaving
        for moved in [m for m in self._arriving if self.copies.done(m.copied_in)]:
            self._settle(moved)

    def _settle(self, moved: _Moved) -> None:
        """The copy in has happened (or the compute stream waits for it): the host region is free
        for copies that wait for it."""
        if moved.region is not None:
            self.tier.give_back(moved.region, moved.nbytes, moved.copied_in)
            moved.region = moved.host = None
            self._arriving.remove(moved)

    def drop(self, chunk_id: int) -> None:
        """After the chunk's backward: a storage autograd never read is waited for and released."""
        for moved in self._chunks.pop(chunk_id, {}).values():
            if moved.region is not None and moved.copied_in is not None:
                self._arrived(moved)
        self.poll()

    def finish(self) -> None:
        """End of the step: the compute stream waits for every copy still running, so the next
        step's copies (which wait for it) never overtake them."""
        if self._chunks:
            raise RuntimeError(f"chunks {sorted(self._chunks)} were offloaded and never ran backward")
        for moved in self._leaving:
            self.copies.compute_waits(moved.copied_out)
            moved.source = None
        self._leaving = []
        self.poll()
