"""Attention over a chunk: causal inside each segment, bottom-right aligned, never across segments.

A segment with a cached prefix of ``C`` tokens has queries for its own ``s`` tokens and keys for
``C + s`` tokens; query ``i`` sees keys ``0 .. C + i``. The segment of a split sequence reads its
keys as one range (prefix and slice together, from the sequence's K/V store), never a
concatenation. Back-ends:

- ``sdpa``: ``scaled_dot_product_attention`` once per segment (CPU and any device);
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash, CUDA) over all segments at once;
- ``naive``: explicit masked softmax, the reference the others are tested against.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from itertools import accumulate

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "varlen", "naive")

@functools.cache
def _varlen_api() -> tuple[Callable | None, bool]:
    """``varlen_attn`` and whether it takes ``enable_gqa``, imported on first use on CUDA: the
    module pulls in ``torch._dynamo`` (over a second of start-up), which a CPU process never needs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without the varlen API
        return None, False
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and _varlen_api()[0] is not None


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` picks flash varlen on CUDA in half precision, SDPA otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name == "varlen" and not varlen_available(device):
        raise ValueError("attention backend 'varlen' needs CUDA and torch.nn.attention.varlen (torch>=2.10)")
    if name != "auto":
        return name
    if varlen_available(device) and dtype in (torch.float16, torch.bfloat16):
        return "varlen"
    return "sdpa"


def _segments(seg_lens, starts, seq_kv, k, v):
    """Yield (query offset, length, keys, values, prefix) per segment; the split sequence's
    segment takes its key range from ``seq_kv``."""
    off = 0
    for i, (s, c) in enumerate(zip(seg_lens, starts)):
        if seq_kv is not None and seq_kv[0] == i:
            ks, vs = seq_kv[1], seq_kv[2]
        else:
            ks, vs = k[off:off + s], v[off:off + s]
        yield off, s, ks, vs, c
        off += s


def _check_seq_kv(seg_lens, starts, seq_kv, k) -> None:
    for i, c in enumerate(starts):
        if c > 0 and (seq_kv is None or seq_kv[0] != i):
            raise ValueError(f"segment {i} with start {c} needs the K/V range of its sequence's first {c + seg_lens[i]} tokens")
    if seq_kv is None:
        return
    i, pk, pv = seq_kv
    want = (starts[i] + seg_lens[i], k.shape[1], k.shape[2])
    if tuple(pk.shape) != want or tuple(pv.shape) != want:
        raise ValueError(f"K/V range shapes {tuple(pk.shape)}/{tuple(pv.shape)} do not match segment {i}'s {want}")


def _sdpa(q, k, v, seg_lens, starts, seq_kv):
    outs = []
    gqa = q.shape[1] != k.shape[1]
    for off, s, ks, vs, c in _segments(seg_lens, starts, seq_kv, k, v):
        # A batch dimension of 1 matters: without one SDPA falls back to its math kernel on CPU,
        # which is several times slower and keeps the whole score matrix for backward.
        qh, kh, vh = (x.transpose(0, 1)[None] for x in (q[off:off + s], ks, vs))
        if c == 0:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)
        else:
            mask = torch.ones(s, c + s, dtype=torch.bool, device=q.device).tril(diagonal=c)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def _naive(q, k, v, seg_lens, starts, seq_kv):
    outs = []
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    for off, s, ks, vs, c in _segments(seg_lens, starts, seq_kv, k, v):
        kh = ks.repeat_interleave(rep, dim=1).transpose(0, 1)
        vh = vs.repeat_interleave(rep, dim=1).transpose(0, 1)
        qh = q[off:off + s].transpose(0, 1)
        scores = qh @ kh.transpose(-1, -2) * scale
        mask = torch.ones(s, c + s, dtype=torch.bool, device=q.device).tril(diagonal=c)
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append((scores.softmax(-1) @ vh).transpose(0, 1))
    return torch.cat(outs)


def _varlen(q, k, v, seg_lens, starts, seq_kv, cu_seqlens=None):
    """A split chunk passes its key range as is; a chunk of several segments packs their keys.
    ``cu_seqlens`` (queries, keys: int32 on the device) come with the chunk's metadata; without
    them they are built here, with a copy the host waits for."""
    keys, values = [], []
    for _, _, ks, vs, _ in _segments(seg_lens, starts, seq_kv, k, v):
        keys.append(ks)
        values.append(vs)
    kk, vv = (keys[0], values[0]) if len(keys) == 1 else (torch.cat(keys), torch.cat(values))
    key_lens = [c + s for s, c in zip(seg_lens, starts)]
    if cu_seqlens is None:
        cu_seqlens = tuple(torch.tensor([0, *accumulate(n)], dtype=torch.int32, device=q.device)
                           for n in (seg_lens, key_lens))
    cu_q, cu_kt = cu_seqlens
    max_k = max(key_lens)
    gqa = q.shape[1] != k.shape[1]
    varlen_attn, has_gqa = _varlen_api()
    kwargs = {}
    if gqa and has_gqa:
        kwargs["enable_gqa"] = True
    elif gqa:
        rep = q.shape[1] // k.shape[1]
        kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
    return varlen_attn(q, kk, vv, cu_q, cu_kt, max(seg_lens), max_k, window_size=(-1, 0), **kwargs)


_IMPL: dict[str, Callable] = {"sdpa": _sdpa, "naive": _naive, "varlen": _varlen}


def chunk_attention(q, k, v, seg_lens, starts, seq_kv=None, backend: str = "sdpa",
                    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q: [T, H, d]; k, v: [T, H_kv, d] -> [T, H, d].

    ``seq_kv`` is ``(i, keys, values)`` for the chunk's segment of a split sequence: segment ``i``
    attends ``keys``/``values`` ``[C + s_i, H_kv, d]`` (its prefix and itself) instead of its rows
    of ``k``/``v``; None when no segment belongs to a split sequence. ``cu_seqlens``: the varlen
    back-end's cumulative query and key lengths (`ChunkMeta.cu_seqlens`).
    """
    _check_seq_kv(seg_lens, starts, seq_kv, k)
    if backend == "varlen":
        return _varlen(q, k, v, seg_lens, starts, seq_kv, cu_seqlens)
    return _IMPL[backend](q, k, v, seg_lens, starts, seq_kv)
