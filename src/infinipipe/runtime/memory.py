"""Saved-tensor accounting: the bytes autograd keeps alive for backward, on any device.

The CUDA allocator can say how much memory a forward pass grew, but the CPU has no such counter,
and even on GPU allocator growth mixes what backward needs with caching. Counting the storages
that autograd saves (each counted once, however many views of it are saved) gives the quantity
the cost model predicts and the runtime budgets: activation memory held from forward to backward.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    if storage.data_ptr() == 0:
        return None
    return (str(t.device), storage.data_ptr())


class _Packed:
    """What autograd holds instead of the tensor; its death means the tensor is released."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Context manager that counts unique storage bytes saved for backward while it is active.

    ``current`` is what is still held (it falls as backward frees saved tensors, also after the
    context has exited); ``peak`` is the largest ``current`` seen. Storages of ``exclude`` (pass
    the module's parameters) are not activations and are not counted.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {k for k in (_storage_key(t) for t in exclude) if k is not None}
        self._refs: dict[tuple[str, int], int] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.current

    def hold(self, t: torch.Tensor) -> None:
        """Count a tensor kept outside autograd's saved tensors (cached K/V, their gradients)
        until `release`; a storage already counted is not counted twice."""
        key = _storage_key(t)
        if key is not None and key not in self._excluded:
            self._acquire(key, t)

    def release(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is not None and key in self._refs:
            self._release(key)

    def _acquire(self, key: tuple[str, int], t: torch.Tensor) -> None:
        n = self._refs.get(key, 0)
        if n == 0:
            self._sizes[key] = t.untyped_storage().nbytes()
            self.current += self._sizes[key]
            self.peak = max(self.peak, self.current)
        self._refs[key] = n + 1

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key is None or key in self._excluded:
            return t
        packed = _Packed(t.detach())  # the graph keeps the pack: holding the output itself would cycle
        self._acquire(key, t)
        weakref.finalize(packed, self._release, key)
        return packed

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def _release(self, key: tuple[str, int]) -> None:
        n = self._refs[key] - 1
        if n:
            self._refs[key] = n
            return
        del self._refs[key]
        self.current -= self._sizes.pop(key)
