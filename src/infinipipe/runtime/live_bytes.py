"""Every tensor byte alive, on any device: the allocator's peak on CUDA, a storage count on CPU.

Counting what autograd saves misses tensors held otherwise (a checkpointed layer's arguments,
the layer rematerialised in a checkpointed backward, gradient buffers, an all-reduce's flatten
copy). On CUDA the caching allocator counts every live byte; the CPU has no such counter, so a
dispatch mode sees the storage of every tensor an operator returns and a finalizer on the
storage says when it is freed. Storages that exist before the meter starts (parameters, inputs)
are not counted.

Host memory that offloaded activations wait in (`offload.HostTier`) is counted apart
(``host_current``/``host_peak``): the tier reports the bytes it hands out and takes back, and its
slab is never counted as device bytes, also on CPU where both are the same memory.

The optimizer state leaves the device during a step by emptying its storages (``resize_(0)``)
and comes back by refilling them: storages that live on, older than the meter, which no operator
returns. On CUDA the allocator sees both; on CPU `storage_emptied` and `storage_refilled` tell
the open meters.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_open: list["LiveBytesMeter"] = []
_host_slabs: set[int] = set()


def host_tier_storage(storage: torch.UntypedStorage, held: bool) -> None:
    """A host-tier slab comes (``held``) or goes: operators on it are not device bytes. A slab
    also goes with its tier: its address may then start a device tensor, which is counted."""
    key = storage.data_ptr()
    if key and held:
        _host_slabs.add(key)
        weakref.finalize(storage, _host_slabs.discard, key)
    elif key:
        _host_slabs.discard(key)


def host_tier_bytes(delta: int) -> None:
    """The host tier handed out (``delta > 0``) or took back bytes: every open meter counts them."""
    for meter in _open:
        meter._host(delta)


def storage_emptied(storage: torch.UntypedStorage) -> None:
    """``storage`` is about to give its bytes back while it lives on: open CPU meters count them
    freed, also where the storage is older than the meter."""
    for meter in _open:
        if not meter.cuda:
            meter._drop(storage)


def storage_refilled(storage: torch.UntypedStorage) -> None:
    """``storage`` holds bytes again after `storage_emptied`: open CPU meters count them."""
    for meter in _open:
        if not meter.cuda:
            meter._see(storage)


class _StorageCounter(TorchDispatchMode):
    def __init__(self, meter: "LiveBytesMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:
            return out  # a view of a storage that exists already: it allocates nothing
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided:
                self.meter._see(t.untyped_storage())
        return out


class LiveBytesMeter:
    """Context manager: ``peak`` is the most tensor bytes alive at once since entry (or since
    `reset_peak`), counted from ``current`` = 0 at entry (bytes already alive then are left out);
    ``host_peak`` and ``host_current`` the same for the host tier's bytes in use.

    On CUDA the readings are the allocator's and need no synchronisation of their own: the
    caching allocator accounts a block when the host enqueues the kernel that uses it.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._current = self._peak = 0
        self.host_current = self.host_peak = 0
        self._live: dict[int, int] = {}
        self._base = 0
        self._open = False
        self._mode = None if self.cuda else _StorageCounter(self)

    def __enter__(self) -> "LiveBytesMeter":
        self._open = True
        _open.append(self)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._peak, self._current = self.peak, self.current
        else:
            self._mode.__exit__(*exc)
        self._open = False
        _open.remove(self)

    @property
    def current(self) -> int:
        if self.cuda and self._open:
            return torch.cuda.memory_allocated(self.device) - self._base
        return self._current

    @property
    def peak(self) -> int:
        if self.cuda and self._open:
            return torch.cuda.max_memory_allocated(self.device) - self._base
        return self._peak

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (to measure one phase, e.g. a backward)."""
        if self.cuda and self._open:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = self._current
        self.host_peak = self.host_current

    def _host(self, delta: int) -> None:
        self.host_current += delta
        self.host_peak = max(self.host_peak, self.host_current)

    def _see(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key == 0 or key in self._live or key in _host_slabs:
            return
        size = storage.nbytes()
        self._live[key] = size
        self._current += size
        self._peak = max(self._peak, self._current)
        weakref.finalize(storage, self._free, key)

    def _drop(self, storage: torch.UntypedStorage) -> None:
        self._current -= self._live.pop(storage.data_ptr(), storage.nbytes())

    def _free(self, key: int) -> None:
        self._current -= self._live.pop(key, 0)
