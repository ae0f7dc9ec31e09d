"""Forward and backward of one chunk on one stage, with the K/V store of split sequences.

Per split sequence the stage keeps one K/V store per layer (`LayerKV`), allocated at the
sequence's first slice for its whole length (its dK/dV at the sequence's first backward) and
dropped after that slice's backward. Every slice
writes its K/V into it and attends to it in place; the gradients later slices give to earlier
slices' K/V accumulate in the store's dK/dV and flow into each earlier slice's graph when its
own backward runs (slices run backward in reverse order).

With sequence parallelism (`SequenceParallel`) each SP rank computes its share of every chunk's
tokens, receives and sends only that share, and stores its attention heads' K/V.

A chunk that offloads layers (`offload.Offloader`) has their saved tensors copied to the host
when its forward ends and back from `reload` on; the K/V stores and the chunk's metadata stay.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..contract.cost import LOSS_BLOCK_TOKENS
from ..contract.ir import Chunk
from ..model.kv_store import LayerKV
from ..model.layers import ChunkMeta, WeightGrads, deferring
from ..model.loss import HeadGradients
from ..model.stage import StageModel
from .batch import Batch
from .offload import HostTier, Offloader, copy_engine
from .sequence_parallel import SequenceParallel


@dataclass
class _SequenceKV:
    """The K/V stores of one split sequence (one per layer) and its slices awaiting backward."""

    layers: list[LayerKV]
    pending: set[int] = field(default_factory=set)


@dataclass
class _Live:
    """What a chunk's forward leaves for its backward."""

    inp: torch.Tensor | None
    out: torch.Tensor


class StageCompute:
    """Runs chunks through a `StageModel`; gradients accumulate in its parameters.

    ``dtype`` is the compute dtype, which the K/V stores hold; it defaults to the parameters' (under
    FSDP's mixed precision the stored parameters are fp32 shards, the computing ones bf16).
    ``offloader`` moves offloaded layers' saved tensors (default: copies done at once into a host
    tier of this step alone, which has no room in its first step: pass a lasting one).
    """

    def __init__(self, model: StageModel, batch: Batch, normaliser: int | None = None,
                 loss_block_tokens: int = LOSS_BLOCK_TOKENS, sp: SequenceParallel | None = None,
                 dtype: torch.dtype | None = None, offloader: Offloader | None = None):
        self.model = model
        self.batch = batch
        self.lengths = batch.lengths
        self.normaliser = batch.predicted_tokens if normaliser is None else normaliser
        self.loss_block_tokens = loss_block_tokens
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype if dtype is None else dtype
        self.sp = sp
        self.kv_heads = model.cfg.kv_heads if sp is None else sp.kv_heads(model.cfg)
        if model.first:
            batch.check_token_ids(model.cfg.vocab_size)
        self._live: dict[int, _Live] = {}
        self._kv: dict[int, _SequenceKV] = {}
        self._weights: dict[int, WeightGrads] = {}
        self._head_grads = HeadGradients()
        self.offloader = offloader or Offloader(copy_engine(self.device), HostTier(self.device), self.device)

    def _split(self, chunk: Chunk):
        """Index and segment of the chunk's slice of a split sequence, or (None, None)."""
        seg = chunk.partial_segment(self.lengths)
        return (None, None) if seg is None else (chunk.segments.index(seg), seg)

    def _store(self, chunk: Chunk, seg) -> _SequenceKV:
        """The sequence's stores; its first slice allocates them for the whole sequence."""
        seq = self._kv.get(seg.seq_id)
        if seg.start == 0:
            if seq is not None:
                raise ValueError(f"chunk {chunk.id}: sequence {seg.seq_id}'s first slice ran forward twice")
            cfg = self.model.cfg
            seq = _SequenceKV([LayerKV(self.lengths[seg.seq_id], self.kv_heads, cfg.head_dim, self.dtype, self.device)
                               for _ in self.model.layer_ids])
            self._kv[seg.seq_id] = seq
        elif seq is None or seq.layers[0].filled != seg.start:
            have = 0 if seq is None else seq.layers[0].filled
            raise ValueError(
                f"chunk {chunk.id}: sequence {seg.seq_id} needs cached K/V of tokens [0, {seg.start}) "
                f"on this stage, but only [0, {have}) is cached; run its earlier slices first"
            )
        return seq

    def forward(self, chunk: Chunk, x: torch.Tensor | None, recompute_layers: int = 0,
                elementwise_layers: int = 0, offload_layers: int = 0) -> torch.Tensor:
        """Returns the hidden states to send on (detached), or the loss on the last stage; the first
        ``recompute_layers`` layers are recomputed whole in backward, the next ``elementwise_layers``
        elementwise; the saved tensors of the last ``offload_layers`` go to the host tier when the
        forward ends."""
        if chunk.id in self._live:
            raise ValueError(f"chunk {chunk.id}: forward ran twice on this stage")
        model = self.model
        shard = None if self.sp is None else self.sp.shard(chunk.tokens, model.cfg)
        lo, hi = (0, chunk.tokens) if shard is None else (shard.lo, shard.hi)
        tokens = hi - lo
        # Token ids and labels travel to the device with the chunk's metadata, in one copy.
        carry = [self.batch.chunk_tokens(chunk)[lo:hi]] if model.first else []
        if model.last:
            carry.append(self.batch.chunk_labels(chunk)[lo:hi])
        index, seg = self._split(chunk)
        meta = ChunkMeta.of(chunk, self.device, index, carry)
        if model.first:
            inp = None
            x = meta.carried[0]
        else:
            if x is None or tuple(x.shape) != (tokens, model.cfg.hidden):
                got = None if x is None else tuple(x.shape)
                raise ValueError(
                    f"chunk {chunk.id}: stage input has shape {got}, expected {(tokens, model.cfg.hidden)}"
                )
            inp = x = x.detach().requires_grad_(True)
        stores = None
        if seg is not None:
            seq = self._store(chunk, seg)
            seq.pending.add(seg.start)
            stores = seq.layers
        labels = meta.carried[-1] if model.last else None
        hooks = None
        if offload_layers:
            kv = [t for store in stores or () for t in (store.k, store.v)]
            hooks = self.offloader.saving(chunk.id, lambda: [*meta.shared_tensors(), *kv])
        out = model(x, meta, stores, shard, recompute_layers, labels, self.normaliser, self.loss_block_tokens,
                    elementwise_layers, offload_layers, hooks, self._head_grads)
        self._live[chunk.id] = _Live(inp, out)
        if offload_layers:
            self.offloader.offload(chunk.id)
        return out.detach()

    def weights(self, chunk: Chunk) -> None:
        """The weight gradients the chunk's backward left (a plan's W action)."""
        later = self._weights.pop(chunk.id, None)
        if later is None:
            raise ValueError(f"chunk {chunk.id}: W without a backward that deferred its weight gradients")
        later.run()

    def reload(self, chunk: Chunk) -> None:
        """Start copying the chunk's offloaded tensors back (its backward waits for them)."""
        self.offloader.reload(chunk.id)

    def finish(self) -> None:
        """End of the step: no copy of this stage is left running, and every gradient the loss
        formed in forward went to a backward."""
        self.offloader.finish()
        if not self._head_grads.empty:
            raise ValueError("the LM head's weight gradient formed in forward was left without a backward to take it")

    def backward(self, chunk: Chunk, grad: torch.Tensor | None = None, defer: bool = False) -> torch.Tensor | None:
        """Runs the chunk's backward; returns the gradient of its input (None on the first stage).
        With ``defer`` its layers' projections leave their weight gradients to `weights`."""
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
        _, seg = self._split(chunk)
        if seg is not None:
            seq = self._kv[seg.seq_id]
            if any(start > seg.start for start in seq.pending):
                raise ValueError(
                    f"chunk {chunk.id}: backward of sequence {seg.seq_id}'s slice at {seg.start} "
                    "runs before the backward of its later slices"
                )
            seq.pending.discard(seg.start)
        pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
        self.offloader.poll()
        later = self._weights.setdefault(chunk.id, WeightGrads()) if defer else None
        if pairs:
            with deferring(later):
                torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        self.offloader.drop(chunk.id)
        if seg is not None and seg.start == 0:
            del self._kv[seg.seq_id]
        if live.inp is None:
            return None
        # A chunk whose tokens predict nothing (sequences of one token) sends back zeros.
        return live.inp.grad if live.inp.grad is not None else torch.zeros_like(live.inp)
