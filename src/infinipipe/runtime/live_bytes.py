"""Every tensor byte alive, on any device: the allocator's peak on CUDA, a storage count on CPU.

Counting what autograd saves misses tensors held otherwise (a checkpointed layer's arguments,
the layer rematerialised in a checkpointed backward, gradient buffers, an all-reduce's flatten
copy). On CUDA the caching allocator counts every live byte; the CPU has no such counter, so a
dispatch mode sees the storage of every tensor an operator returns and a finalizer on the
storage says when it is freed. Storages that exist before the meter starts (parameters, inputs)
are not counted.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageCounter(TorchDispatchMode):
    def __init__(self, meter: "LiveBytesMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided:
                self.meter._see(t.untyped_storage())
        return out


class LiveBytesMeter:
    """Context manager: ``peak`` is the most tensor bytes alive at once while it was active,
    counted from ``current`` = 0 at entry (bytes already alive then are left out)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.current = self.peak = 0
        self._live: dict[int, int] = {}
        self._base = 0
        self._mode = None if self.cuda else _StorageCounter(self)

    def __enter__(self) -> "LiveBytesMeter":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.current = torch.cuda.memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)

    def _see(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key == 0 or key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
