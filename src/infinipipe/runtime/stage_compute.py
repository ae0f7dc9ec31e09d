"""Forward and backward of one chunk on one stage, with the K/V hand-off of split sequences.

A split sequence's earlier slices keep their K/V on the stage as *detached* leaves that require
grad; later slices attend to them, so their gradients accumulate in the leaves' ``.grad`` without
running the earlier slice's graph early. When the earlier slice's own backward comes (later, in
reverse slice order) those gradients are fed in as extra roots next to the output gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ..contract.cost import LOSS_BLOCK_TOKENS
from ..contract.ir import Chunk
from ..model.layers import ChunkMeta
from ..model.loss import blocked_cross_entropy
from ..model.stage import StageModel
from .batch import Batch
from .memory import SavedTensorMeter


@dataclass
class _SliceKV:
    """K/V of one slice on every layer of the stage: graph tensors and the leaves others use."""

    end: int
    roots: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    leaves: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    held_grads: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Live:
    """What a chunk's forward leaves for its backward."""

    inp: torch.Tensor | None
    out: torch.Tensor


class StageCompute:
    """Runs chunks through a `StageModel`; gradients accumulate in its parameters."""

    def __init__(self, model: StageModel, batch: Batch, normaliser: int | None = None,
                 loss_block_tokens: int = LOSS_BLOCK_TOKENS, meter: SavedTensorMeter | None = None):
        self.model = model
        self.batch = batch
        self.lengths = batch.lengths
        self.normaliser = batch.predicted_tokens if normaliser is None else normaliser
        self.loss_block_tokens = loss_block_tokens
        self.device = next(model.parameters()).device
        self.meter = meter
        self._live: dict[int, _Live] = {}
        self._kv: dict[int, dict[int, _SliceKV]] = {}

    def _prefix(self, chunk: Chunk) -> list | None:
        """Per layer, the cached (k, v) of the chunk's prefixed segment, or None."""
        seg = chunk.prefixed_segment
        if seg is None:
            return None
        slices = self._kv.get(seg.seq_id, {})
        pos, parts = 0, []
        for start in sorted(st for st in slices if st < seg.start):
            if start != pos:
                break
            parts.append(slices[start])
            pos = slices[start].end
        if pos != seg.start:
            raise ValueError(
                f"chunk {chunk.id}: sequence {seg.seq_id} needs cached K/V of tokens [0, {seg.start}) "
                f"on this stage, but only [0, {pos}) is cached; run its earlier slices first"
            )
        per_layer = []
        for j in range(len(self.model.layer_ids)):
            ks = [p.leaves[j][0] for p in parts]
            vs = [p.leaves[j][1] for p in parts]
            per_layer.append((torch.cat(ks), torch.cat(vs)) if len(ks) > 1 else (ks[0], vs[0]))
        return per_layer

    def forward(self, chunk: Chunk, x: torch.Tensor | None, recompute_layers: int = 0) -> torch.Tensor:
        """Returns the hidden states to send on (detached), or the loss on the last stage."""
        if chunk.id in self._live:
            raise ValueError(f"chunk {chunk.id}: forward ran twice on this stage")
        model = self.model
        meta = ChunkMeta.of(chunk, self.device)
        if model.first:
            inp = None
            h = model.embed_tokens(self.batch.chunk_tokens(chunk).to(self.device))
        else:
            if x is None or tuple(x.shape) != (meta.tokens, model.cfg.hidden):
                got = None if x is None else tuple(x.shape)
                raise ValueError(
                    f"chunk {chunk.id}: stage input has shape {got}, expected {(meta.tokens, model.cfg.hidden)}"
                )
            inp = x.detach().requires_grad_(True)
            h = inp
        prefix = self._prefix(chunk)
        kept = chunk.kept_segment(self.lengths)
        if kept is not None:
            off = sum(s.length for s in chunk.segments[:chunk.segments.index(kept)])
            slice_kv = _SliceKV(end=kept.end)
        for j, layer in enumerate(model.ordered_layers()):
            pkv = prefix[j] if prefix is not None else None
            if j < recompute_layers:
                h, k, v = checkpoint(layer, h, meta, pkv, use_reentrant=False)
            else:
                h, k, v = layer(h, meta, pkv)
            if kept is not None:
                k_root, v_root = k[off:off + kept.length], v[off:off + kept.length]
                slice_kv.roots.append((k_root, v_root))
                slice_kv.leaves.append((k_root.detach().requires_grad_(True), v_root.detach().requires_grad_(True)))
        if kept is not None:
            self._kv.setdefault(kept.seq_id, {})[kept.start] = slice_kv
            if self.meter is not None:
                for pair in slice_kv.roots:
                    for t in pair:
                        self.meter.hold(t)
        if model.last:
            labels = self.batch.chunk_labels(chunk).to(self.device)
            out = blocked_cross_entropy(h, model.norm, model.head, labels, self.normaliser, self.loss_block_tokens)
        else:
            out = h
        self._live[chunk.id] = _Live(inp, out)
        return out.detach()

    def _meter_kv(self, chunk: Chunk, done: _SliceKV | None) -> None:
        """Count the cached K/V gradients this backward created; drop a finished slice's K/V."""
        seg = chunk.prefixed_segment
        for sl in self._kv.get(seg.seq_id, {}).values() if seg is not None else ():
            if not sl.held_grads:
                sl.held_grads = [leaf.grad for pair in sl.leaves for leaf in pair if leaf.grad is not None]
                for g in sl.held_grads:
                    self.meter.hold(g)
        if done is not None:
            for t in [t for pair in done.roots for t in pair] + done.held_grads:
                self.meter.release(t)

    def backward(self, chunk: Chunk, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        """Runs the chunk's backward; returns the gradient of its input (None on the first stage)."""
        live = self._live.pop(chunk.id, None)
        if live is None:
            raise ValueError(f"chunk {chunk.id}: backward without a pending forward on this stage")
        if self.model.last:
            roots, grads = [live.out], [None]
        else:
            if grad is None or grad.shape != live.out.shape:
                got = None if grad is None else tuple(grad.shape)
                raise ValueError(f"chunk {chunk.id}: output gradient shape {got}, expected {tuple(live.out.shape)}")
            roots, grads = [live.out], [grad]
        kept = chunk.kept_segment(self.lengths)
        if kept is not None:
            slices = self._kv[kept.seq_id]
            if any(start > kept.start for start in slices):
                raise ValueError(
                    f"chunk {chunk.id}: backward of sequence {kept.seq_id}'s slice at {kept.start} "
                    "runs before the backward of its later slices"
                )
            sl = slices.pop(kept.start)
            for (k_root, v_root), (k_leaf, v_leaf) in zip(sl.roots, sl.leaves):
                for root, leaf in ((k_root, k_leaf), (v_root, v_leaf)):
                    if leaf.grad is not None:
                        roots.append(root)
                        grads.append(leaf.grad)
            if not slices:
                del self._kv[kept.seq_id]
        pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        if self.meter is not None:
            self._meter_kv(chunk, sl if kept is not None else None)
        if live.inp is None:
            return None
        # A chunk whose tokens predict nothing (sequences of one token) sends back zeros.
        return live.inp.grad if live.inp.grad is not None else torch.zeros_like(live.inp)
