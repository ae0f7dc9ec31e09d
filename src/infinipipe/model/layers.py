"""LLaMA-style decoder layer that processes one chunk (segments concatenated, no batch dim)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.ir import Chunk
from ..contract.model_config import ModelConfig
from .attention import chunk_attention, resolve_backend
from .kv_store import LayerKV


@dataclass(frozen=True)
class ChunkMeta:
    """Segment lengths, their absolute starts (= cached prefix) and every token's position.

    ``split`` is the index of the segment that belongs to a split sequence (it reads and writes the
    sequence's K/V store), None if there is none; a segment with a prefix is always that one.
    """

    seg_lens: tuple[int, ...]
    starts: tuple[int, ...]
    positions: torch.Tensor
    split: int | None = None

    @classmethod
    def build(cls, seg_lens: Sequence[int], starts: Sequence[int], device=None, split: int | None = None) -> "ChunkMeta":
        seg_lens, starts = tuple(int(s) for s in seg_lens), tuple(int(s) for s in starts)
        if len(seg_lens) != len(starts) or not seg_lens or min(seg_lens) < 1 or min(starts) < 0:
            raise ValueError(f"invalid chunk layout: seg_lens={seg_lens} starts={starts}")
        if sum(1 for s in starts if s > 0) > 1:
            raise ValueError(f"at most one segment may have a cached prefix, starts={starts}")
        prefixed = next((i for i, c in enumerate(starts) if c > 0), None)
        if split is None:
            split = prefixed
        if split is not None and (not 0 <= split < len(seg_lens) or prefixed not in (None, split)):
            raise ValueError(f"segment {split} cannot be the split sequence's, starts={starts}")
        positions = torch.cat([torch.arange(c, c + s, device=device) for s, c in zip(seg_lens, starts)])
        return cls(seg_lens, starts, positions, split)

    @classmethod
    def of(cls, chunk: Chunk, device=None, split: int | None = None) -> "ChunkMeta":
        return cls.build([s.length for s in chunk.segments], [s.start for s in chunk.segments], device, split)

    @property
    def tokens(self) -> int:
        return sum(self.seg_lens)


class HeadExchange(Protocol):
    """Sequence parallelism seen from a layer: this rank's token range of the chunk, and the
    exchanges that give attention every token for a share of the heads and take it back."""

    lo: int
    hi: int

    def heads_of_all_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor): ...

    def tokens_of_all_heads(self, o: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for absolute positions (HF 'rotate_half' layout); computed in >= fp32."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    freqs = positions.to(work)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP; the split sequence's segment goes through its K/V store."""

    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        d, hd = cfg.hidden, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.wq = nn.Linear(d, cfg.heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.w_gate = nn.Linear(d, cfg.ffn, bias=False)
        self.w_up = nn.Linear(d, cfg.ffn, bias=False)
        self.w_down = nn.Linear(cfg.ffn, d, bias=False)

    def forward(self, h: torch.Tensor, meta: ChunkMeta, store: LayerKV | None = None,
                sp: HeadExchange | None = None) -> torch.Tensor:
        """``h`` holds the chunk's tokens, or with ``sp`` this rank's range ``[sp.lo, sp.hi)`` of them."""
        cfg = self.cfg
        t = h.shape[0]
        lo, hi = (0, meta.tokens) if sp is None else (sp.lo, sp.hi)
        if t != hi - lo:
            raise ValueError(f"hidden states have {t} tokens, this rank holds {hi - lo} of the chunk")
        x = self.attn_norm(h)
        q = self.wq(x).view(t, cfg.heads, cfg.head_dim)
        k = self.wk(x).view(t, cfg.kv_heads, cfg.head_dim)
        v = self.wv(x).view(t, cfg.kv_heads, cfg.head_dim)
        cos, sin = rope_cos_sin(meta.positions[lo:hi], cfg.head_dim, cfg.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if sp is not None:
            q, k, v = sp.heads_of_all_tokens(q, k, v)
        backend = resolve_backend(self.backend, h.device, q.dtype)
        seq_kv = None
        if (store is None) != (meta.split is None):
            raise ValueError("a K/V store goes with exactly the chunks that hold a split sequence's segment")
        if store is not None:
            i = meta.split
            off, s = sum(meta.seg_lens[:i]), meta.seg_lens[i]
            seq_kv = (i, *store.attend(k[off:off + s], v[off:off + s], meta.starts[i]))
        o = chunk_attention(q, k, v, meta.seg_lens, meta.starts, seq_kv, backend)
        if sp is not None:
            o = sp.tokens_of_all_heads(o)
        h = h + self.wo(o.reshape(t, cfg.heads * cfg.head_dim))
        x = self.mlp_norm(h)
        return h + self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
