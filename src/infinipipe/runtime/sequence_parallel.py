"""Ulysses sequence parallelism inside a stage: tokens spread over the SP ranks, heads for attention.

Each SP rank holds a contiguous share of a chunk's tokens and runs the linear layers on it. Before
attention one all-to-all regroups Q, K and V so every rank holds all the chunk's tokens for
``heads / sp`` heads, attention runs per segment exactly as on one rank, and the inverse
all-to-all brings the output back to the token shares. Shares are equal token counts: attention
sees every token after the exchange, so only the linear work (proportional to tokens) depends on
where tokens sit, and segment boundaries do not matter.

A split sequence's K/V store on a rank holds that rank's heads for the whole sequence. Key/value
heads are sharded when ``kv_heads % sp == 0``; otherwise each rank receives the key/value heads
its query heads read, repeated per query head (more bytes, same result).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..contract.model_config import ModelConfig


def token_shares(tokens: int, sp: int) -> tuple[int, ...]:
    """Token counts of the SP ranks' contiguous shares (equal up to one token, earlier ranks first)."""
    base, extra = divmod(tokens, sp)
    return tuple(base + (r < extra) for r in range(sp))


class _AllToAll(torch.autograd.Function):
    """All-to-all along dim 0; its backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, out_splits, in_splits):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return _exchange(x, group, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.in_splits, ctx.out_splits), None, None, None


def _exchange(x: torch.Tensor, group, out_splits: Sequence[int], in_splits: Sequence[int]) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


@dataclass(frozen=True)
class SequenceShard:
    """One SP rank's part of one chunk: its token range and the head/token exchanges."""

    group: object
    rank: int
    shares: tuple[int, ...]
    heads: int
    kv_heads: int

    @property
    def lo(self) -> int:
        return sum(self.shares[:self.rank])

    @property
    def hi(self) -> int:
        return self.lo + self.shares[self.rank]

    def heads_of_all_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """[t, H, d], [t, H_kv, d] x2 on this rank's tokens -> every token for this rank's heads."""
        sp, t, d = len(self.shares), q.shape[0], q.shape[-1]
        if k.shape[1] != self.kv_heads:
            rep = self.kv_heads // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gq, gk = self.heads // sp, self.kv_heads // sp
        x = torch.cat([q.view(t, sp, gq, d), k.view(t, sp, gk, d), v.view(t, sp, gk, d)], dim=2)
        x = x.transpose(0, 1).reshape(sp * t, gq + 2 * gk, d)
        x = _AllToAll.apply(x, self.group, self.shares, (t,) * sp)
        return x[:, :gq], x[:, gq:gq + gk], x[:, gq + gk:]

    def tokens_of_all_heads(self, o: torch.Tensor) -> torch.Tensor:
        """[T, H/sp, d] for every token -> [t, H, d] for this rank's tokens."""
        sp, t = len(self.shares), self.shares[self.rank]
        o = _AllToAll.apply(o, self.group, (t,) * sp, self.shares)
        return o.view(sp, t, *o.shape[1:]).transpose(0, 1).reshape(t, sp * o.shape[1], o.shape[2])


@dataclass(frozen=True)
class SequenceParallel:
    """An SP group of one stage. The distributed executor also shards the stage's weights over it
    (FSDP); `reduce_gradients` serves runs whose stages are whole (the in-process runner)."""

    group: object
    rank: int
    size: int

    @classmethod
    def of(cls, group=None) -> "SequenceParallel":
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def kv_heads(self, cfg: ModelConfig) -> int:
        """Key/value heads one rank stores: a share of the model's, or of the repeated ones."""
        if cfg.heads % self.size:
            raise ValueError(f"sequence parallel degree {self.size} must divide the model's {cfg.heads} heads")
        per_rank = cfg.kv_heads if cfg.kv_heads % self.size == 0 else cfg.heads
        return per_rank // self.size

    def shard(self, tokens: int, cfg: ModelConfig) -> SequenceShard:
        return SequenceShard(self.group, self.rank, token_shares(tokens, self.size), cfg.heads,
                             self.kv_heads(cfg) * self.size)

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum each parameter's gradient over the SP ranks (each saw only its tokens' share)."""
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)

    def reduce_loss(self, loss: float) -> float:
        t = torch.tensor(loss, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t)
