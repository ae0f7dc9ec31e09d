"""LLaMA-style decoder layer that processes one chunk (segments concatenated, no batch dim)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.ir import Chunk
from ..contract.model_config import ModelConfig
from .attention import chunk_attention, resolve_backend
from .kv_store import LayerKV


def to_device(parts: Sequence[torch.Tensor], device) -> list[torch.Tensor]:
    """Host int64 tensors on ``device`` through one copy: pinned and non-blocking on CUDA, so a
    chunk's metadata reaches the device without the host waiting for it."""
    sizes = [int(t.numel()) for t in parts]
    flat = torch.cat([t.reshape(-1).to(torch.long) for t in parts])
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return list(flat.split(sizes))


@dataclass(frozen=True)
class ChunkMeta:
    """Segment lengths, their absolute starts (= cached prefix) and every token's position.

    ``split`` is the index of the segment that belongs to a split sequence (it reads and writes the
    sequence's K/V store), None if there is none; a segment with a prefix is always that one.
    Everything the device needs of a chunk (positions, cumulative query and key lengths for the
    varlen kernel, and ``carried``: tensors a caller sends along, such as token ids and labels)
    arrives in one copy when the chunk's metadata is built; RoPE tables are computed on the device
    once per chunk and stage (`rope`) and shared by its layers.
    """

    seg_lens: tuple[int, ...]
    starts: tuple[int, ...]
    positions: torch.Tensor
    split: int | None = None
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None
    carried: tuple[torch.Tensor, ...] = ()
    _tables: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, seg_lens: Sequence[int], starts: Sequence[int], device=None, split: int | None = None,
              carry: Sequence[torch.Tensor] = ()) -> "ChunkMeta":
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
        positions = torch.cat([torch.arange(c, c + s) for s, c in zip(seg_lens, starts)])
        cu_q = torch.tensor([0, *accumulate(seg_lens)])
        cu_k = torch.tensor([0, *accumulate(c + s for s, c in zip(seg_lens, starts))])
        positions, cu_q, cu_k, *carried = to_device([positions, cu_q, cu_k, *carry], device)
        return cls(seg_lens, starts, positions, split, (cu_q.to(torch.int32), cu_k.to(torch.int32)), tuple(carried))

    @classmethod
    def of(cls, chunk: Chunk, device=None, split: int | None = None,
           carry: Sequence[torch.Tensor] = ()) -> "ChunkMeta":
        return cls.build([s.length for s in chunk.segments], [s.start for s in chunk.segments], device, split, carry)

    @property
    def tokens(self) -> int:
        return sum(self.seg_lens)

    def rope(self, lo: int, hi: int, head_dim: int, theta: float, dtype: torch.dtype):
        """cos/sin of tokens ``[lo, hi)``, computed once per chunk and shared by every layer."""
        key = (lo, hi, head_dim, theta, dtype)
        if key not in self._tables:
            self._tables[key] = rope_cos_sin(self.positions[lo:hi], head_dim, theta, dtype)
        return self._tables[key]

    def shared_tensors(self) -> list[torch.Tensor]:
        """Every device tensor of the chunk's metadata, the RoPE tables made so far included: what
        every layer reads, so no layer's offload may move it."""
        tables = [t for pair in self._tables.values() for t in pair]
        return [self.positions, *(self.cu_seqlens or ()), *self.carried, *tables]

    def forget_rope(self) -> None:
        """Drop the tables once a pass over the layers is done: stored layers keep them for their
        backward, and recomputed layers build them again there, so a chunk whose layers are all
        recomputed holds no table between its forward and its backward."""
        self._tables.clear()


class HeadExchange(Protocol):
    """Sequence parallelism seen from a layer: this rank's token range of the chunk, and the
    exchanges that give attention every token for a share of the heads and take it back."""

    lo: int
    hi: int

    def heads_of_all_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor): ...

    def tokens_of_all_heads(self, o: torch.Tensor) -> torch.Tensor: ...


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _RMSNormFn(torch.autograd.Function):
    """``weight * (x / rms(x))``, normalised in >= fp32 as Hugging Face does. Backward keeps only the
    input and the per-token reciprocal RMS; the normalised values are recomputed from them."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = _upcast(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = _rms_norm_backward(grad, x, weight, rstd, ctx.needs_input_grad[1])
        return dx, dweight, None


def _rms_norm_backward(grad, x, weight, rstd, weight_grad: bool):
    """Gradients of ``weight * (x / rms(x))`` from its input and per-token reciprocal RMS."""
    xhat = _upcast(x) * rstd
    dweight = (grad * xhat.to(x.dtype)).sum(dim=tuple(range(grad.dim() - 1))) if weight_grad else None
    dxhat = _upcast(grad * weight)
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dweight


def rms_normalised(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """RMSNorm's output from its input and per-token reciprocal RMS: what an elementwise-recompute
    layer's backward recomputes for each projection group (the profiler times it alone)."""
    return weight * (_upcast(x) * rstd).to(x.dtype)


def swiglu_product(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the down projection's input, from the fused gate/up output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _weight_grad(grad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """``grad^T inp`` over every token: a projection's weight gradient."""
    return grad.reshape(-1, grad.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])


def _bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """A projection's bias gradient: its output gradient summed over every token."""
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class WeightGrads:
    """Projections' weight gradients a backward left for later (a plan's W action): each entry is
    the weight, its bias (or None), the projection's input and its output gradient. `run` turns
    them into gradients through autograd, so they accumulate as the backward's own would (and
    whatever hooks a gradient's accumulation fires, fires)."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []

    def run(self) -> None:
        if not self.entries:
            return
        total = sum(_AccumulateWeightGrad.apply(w, b, x, g) for w, b, x, g in self.entries)
        self.entries.clear()
        total.backward()


class _Deferral:
    """Where the projections' backwards put their weight gradients: None computes them at once.
    A plain attribute, not thread-local: autograd runs a CUDA backward on its own thread."""

    target: WeightGrads | None = None


@contextlib.contextmanager
def deferring(grads: WeightGrads | None) -> Iterator[None]:
    """Context in which projections' backwards leave their weight gradients in ``grads``."""
    _Deferral.target = grads
    try:
        yield
    finally:
        _Deferral.target = None


def _projection_grads(grad, inp, weight, bias, needs_weight: bool, needs_bias: bool):
    """A projection's weight and bias gradients, or None and None where they are deferred. ``weight``
    and ``bias`` must be the parameters the forward was given (not tensors a saved-tensor hook
    unpacked: a checkpointed layer's recomputation unpacks aliases, whose gradients go nowhere)."""
    if _Deferral.target is not None and (needs_weight or needs_bias):
        # A copy of the gradient: autograd may add a residual branch's gradient into it in place.
        _Deferral.target.entries.append((weight, bias if needs_bias else None, inp.detach(), grad.detach().clone()))
        return None, None
    dweight = _weight_grad(grad, inp) if needs_weight else None
    return dweight, _bias_grad(grad) if needs_bias else None


class _AccumulateWeightGrad(torch.autograd.Function):
    """A zero whose backward gives a deferred projection's weight (and bias) gradient."""

    @staticmethod
    def forward(ctx, weight, bias, inp, grad):
        ctx.save_for_backward(inp, grad)
        ctx.has_bias = bias is not None
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        inp, grad = ctx.saved_tensors
        return _weight_grad(grad, inp), _bias_grad(grad) if ctx.has_bias else None, None, None


class _Linear(torch.autograd.Function):
    """``F.linear`` whose backward may defer the weight gradient (`deferring`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.params = (weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dweight, dbias = _projection_grads(grad, x, *ctx.params, ctx.needs_input_grad[1],
                                           ctx.params[1] is not None and ctx.needs_input_grad[2])
        return grad @ weight if ctx.needs_input_grad[0] else None, dweight, dbias


def linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """``module(x)`` through `_Linear`."""
    return _Linear.apply(x, module.weight, module.bias)


class _NormLinear(torch.autograd.Function):
    """RMSNorm then a projection (an elementwise-recompute layer's Q/K/V or gate/up): keeps the
    norm's input and reciprocal RMS but not the normalised input, which backward recomputes
    (elementwise) for the projection's weight gradient."""

    @staticmethod
    def forward(ctx, x, norm_weight, weight, bias, eps: float):
        xf = _upcast(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, norm_weight, weight, rstd)
        ctx.has_bias = bias is not None
        ctx.params = (weight, bias)
        return F.linear(rms_normalised(x, norm_weight, rstd), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, weight, rstd = ctx.saved_tensors
        dweight = dbias = None
        if ctx.needs_input_grad[2] or (ctx.has_bias and ctx.needs_input_grad[3]):
            dweight, dbias = _projection_grads(grad, rms_normalised(x, norm_weight, rstd), *ctx.params,
                                               ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3])
        dx, dnorm = _rms_norm_backward(grad @ weight, x, norm_weight, rstd, ctx.needs_input_grad[1])
        return dx, dnorm, dweight, dbias, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for absolute positions (HF 'rotate_half' layout); computed in >= fp32."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    freqs = positions.to(work)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _rotate_back(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of `_rotate` applied to an output gradient."""
    half = g.shape[-1] // 2
    gs = g * sin
    return g * cos + torch.cat([gs[..., half:], -gs[..., :half]], dim=-1)


class _QKVRope(torch.autograd.Function):
    """Split the fused projection into Q, K and V and rotate Q and K. Backward needs only the shared
    cos/sin. K and V are written into one new buffer, so what attention keeps of them does not
    hold the projection's output (Q's rows included) alive."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, heads: int, kv_heads: int):
        t, head_dim = qkv.shape[0], cos.shape[-1]
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        kv = qkv.new_empty(2, t, kv_heads, head_dim)
        kv[0] = _rotate(k.view(t, kv_heads, head_dim), cos, sin)
        kv[1] = v.view(t, kv_heads, head_dim)
        ctx.save_for_backward(cos, sin)
        return _rotate(q.view(t, heads, head_dim), cos, sin), kv[0], kv[1]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        parts = (_rotate_back(dq, cos, sin), _rotate_back(dk, cos, sin), dv)
        return torch.cat([p.flatten(1) for p in parts], dim=-1), None, None, None, None


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of the fused gate/up projection, keeping only that projection's output:
    silu and the product are recomputed in backward (elementwise, no matmul)."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        dgate = torch.ops.aten.silu_backward(grad * up, gate)
        return torch.cat([dgate, grad * F.silu(gate)], dim=-1)


class _SwiGLUDown(torch.autograd.Function):
    """``w_down(silu(gate) * up)`` keeping only the gate/up projection's output (an
    elementwise-recompute layer's MLP): the product the down projection reads is recomputed in
    backward for its weight gradient, and silu again for the gate's."""

    @staticmethod
    def forward(ctx, gate_up, weight):
        ctx.save_for_backward(gate_up, weight)
        ctx.param = weight
        return F.linear(swiglu_product(gate_up), weight)

    @staticmethod
    def backward(ctx, grad):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight, _ = _projection_grads(grad, swiglu_product(gate_up), ctx.param, None, True, False)
        dprod = grad @ weight
        dgate = torch.ops.aten.silu_backward(dprod * up, gate)
        return torch.cat([dgate, dprod * F.silu(gate)], dim=-1), dweight


class FusedLinear(nn.Linear):
    """Several projections of one input as one GEMM. ``parts`` names each projection and its output
    rows, in order: the weight is their weights stacked, which is how Hugging Face checkpoints are
    split and joined and how each part's initial weights are drawn (`stage.init_weights`)."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = dict(parts)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP; the split sequence's segment goes through its K/V store.

    Q/K/V are one projection and gate/up another. Per token, backward keeps the layer's input, the
    two norms' inputs and reciprocal RMS, each projection group's normalised input, rotated Q and
    K, V, the attention output (and its log-sum-exp), gate and up, and the down projection's input.
    Run ``elementwise``, it keeps neither normalised input nor the down projection's input and
    recomputes them in backward (elementwise, no matmul): ``2 x hidden + ffn`` values per token fewer.
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        d, hd = cfg.hidden, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.wqkv = FusedLinear(d, {"wq": cfg.heads * hd, "wk": cfg.kv_dim, "wv": cfg.kv_dim}, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.w_gate_up = FusedLinear(d, {"w_gate": cfg.ffn, "w_up": cfg.ffn}, bias=False)
        self.w_down = nn.Linear(cfg.ffn, d, bias=False)

    def forward(self, h: torch.Tensor, meta: ChunkMeta, store: LayerKV | None = None,
                sp: HeadExchange | None = None, elementwise: bool = False) -> torch.Tensor:
        """``h`` holds the chunk's tokens, or with ``sp`` this rank's range ``[sp.lo, sp.hi)`` of them."""
        cfg = self.cfg
        t = h.shape[0]
        lo, hi = (0, meta.tokens) if sp is None else (sp.lo, sp.hi)
        if t != hi - lo:
            raise ValueError(f"hidden states have {t} tokens, this rank holds {hi - lo} of the chunk")
        if (store is None) != (meta.split is None):
            raise ValueError("a K/V store goes with exactly the chunks that hold a split sequence's segment")
        cos, sin = meta.rope(lo, hi, cfg.head_dim, cfg.rope_theta, h.dtype)
        if elementwise:
            qkv = _NormLinear.apply(h, self.attn_norm.weight, self.wqkv.weight, self.wqkv.bias, cfg.norm_eps)
        else:
            qkv = linear(self.attn_norm(h), self.wqkv)
        q, k, v = _QKVRope.apply(qkv, cos, sin, cfg.heads, cfg.kv_heads)
        if sp is not None:
            q, k, v = sp.heads_of_all_tokens(q, k, v)
        backend = resolve_backend(self.backend, h.device, q.dtype)
        seq_kv = None
        if store is not None:
            i = meta.split
            off, s = sum(meta.seg_lens[:i]), meta.seg_lens[i]
            seq_kv = (i, *store.attend(k[off:off + s], v[off:off + s], meta.starts[i]))
        o = chunk_attention(q, k, v, meta.seg_lens, meta.starts, seq_kv, backend, meta.cu_seqlens)
        if sp is not None:
            o = sp.tokens_of_all_heads(o)
        h = h + linear(o.reshape(t, cfg.heads * cfg.head_dim), self.wo)
        if elementwise:
            gate_up = _NormLinear.apply(h, self.mlp_norm.weight, self.w_gate_up.weight, None, cfg.norm_eps)
            return h + _SwiGLUDown.apply(gate_up, self.w_down.weight)
        return h + linear(_SwiGLU.apply(linear(self.mlp_norm(h), self.w_gate_up)), self.w_down)
