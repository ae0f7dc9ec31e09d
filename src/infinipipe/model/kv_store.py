"""One K/V store per split sequence and layer: the slices of a sequence share it, none copies it.

The store holds the whole sequence's keys and values from its first slice on, and their
gradients from the sequence's first backward (its last slice's) on: a sequence whose slices are
still running forward, or waiting for their backward behind other work, holds no gradient
buffer. Each slice writes its K/V into its rows and attends to rows ``[0, end)`` as one key range, an
alias of the store, so attention of slice ``j`` keeps nothing that grows with ``j`` and a
checkpointed layer holds the store object, never a copy. Rows are written once and never
change afterwards (a recompute writes the same values again), which is why the alias can skip
autograd's version check.

Gradients: the backward of slice ``j`` adds the gradient of its prefix rows into the dK/dV
store, and takes the gradient of its own rows as what attention gave them plus what later slices
accumulated there. Backward runs slices in reverse order, so by then every later slice has added
its part: the earlier slice's graph needs no extra roots.
"""
from __future__ import annotations

import torch


def _alias(buf: torch.Tensor, end: int) -> torch.Tensor:
    """Rows ``[0, end)`` of ``buf`` as a new tensor on the same storage (its own version counter)."""
    return buf.new_empty(0).set_(buf.untyped_storage(), buf.storage_offset(), (end, *buf.shape[1:]), buf.stride())


class LayerKV:
    """K, V, dK and dV of one split sequence on one layer, each ``[length, kv_heads, head_dim]``;
    dK and dV exist once `gradients` is first called."""

    def __init__(self, length: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        size = (length, kv_heads, head_dim)
        self.k, self.v = (torch.empty(size, dtype=dtype, device=device) for _ in range(2))
        self.dk: torch.Tensor | None = None
        self.dv: torch.Tensor | None = None
        self.filled = 0

    @property
    def length(self) -> int:
        return self.k.shape[0]

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dK and dV, zeroed when first asked for: by the backward of the sequence's last slice."""
        if self.dk is None or self.dv is None:
            self.dk, self.dv = (torch.zeros_like(self.k) for _ in range(2))
        return self.dk, self.dv

    def attend(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a slice's K/V at ``start``; return keys and values of ``[0, start + len)``."""
        if start > self.filled:
            raise ValueError(f"the K/V store holds tokens [0, {self.filled}); a slice at {start} needs [0, {start}) "
                             "first: run the sequence's earlier slices first")
        if start + k.shape[0] > self.length:
            raise ValueError(f"slice [{start}, {start + k.shape[0]}) outside the store's {self.length} tokens")
        return _KeyRange.apply(k, v, self, start)


class _KeyRange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, store: LayerKV, start: int):
        end = start + k.shape[0]
        store.k[start:end].copy_(k)
        store.v[start:end].copy_(v)
        store.filled = max(store.filled, end)
        ctx.store, ctx.start, ctx.end = store, start, end
        return _alias(store.k, end), _alias(store.v, end)

    @staticmethod
    def backward(ctx, dk_range, dv_range):
        st, end, store = ctx.start, ctx.end, ctx.store
        out = []
        for d, acc in zip((dk_range, dv_range), store.gradients()):
            if d is None:
                out.append(acc[st:end].clone())
                continue
            acc[:st] += d[:st]
            out.append(d[st:] + acc[st:end])
        return out[0], out[1], None, None
