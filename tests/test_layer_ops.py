"""The decoder layer's fused parts compute what the plain layer computes, and keep only what their
backward needs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infinipipe.contract.model_config import ModelConfig
from infinipipe.model.attention import chunk_attention
from infinipipe.model.layers import ChunkMeta, DecoderLayer, RMSNorm, _QKVRope, _SwiGLU
from infinipipe.model.stage import init_weights
from infinipipe.runtime.memory import SavedTensorMeter

CFG = ModelConfig(vocab_size=50, hidden=48, layers=1, heads=6, kv_heads=2, ffn=80, rope_theta=500.0)


def _plain_norm(x, weight, eps):
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _plain_rope(x, positions, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat([positions.double()[:, None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1) * sin


def plain_layer(layer: DecoderLayer, h: torch.Tensor, meta: ChunkMeta) -> torch.Tensor:
    """The layer as plain autograd ops with separate projections (the weights' row blocks)."""
    cfg, t = layer.cfg, h.shape[0]
    wq, wk, wv = layer.wqkv.weight.split(list(layer.wqkv.parts.values()))
    bq, bk, bv = layer.wqkv.bias.split(list(layer.wqkv.parts.values())) if cfg.qkv_bias else (None,) * 3
    w_gate, w_up = layer.w_gate_up.weight.split(list(layer.w_gate_up.parts.values()))
    x = _plain_norm(h, layer.attn_norm.weight, cfg.norm_eps)
    q = _plain_rope(F.linear(x, wq, bq).view(t, cfg.heads, -1), meta.positions, cfg.rope_theta)
    k = _plain_rope(F.linear(x, wk, bk).view(t, cfg.kv_heads, -1), meta.positions, cfg.rope_theta)
    v = F.linear(x, wv, bv).view(t, cfg.kv_heads, -1)
    o = chunk_attention(q, k, v, meta.seg_lens, meta.starts, backend="naive")
    h = h + layer.wo(o.reshape(t, -1))
    x = _plain_norm(h, layer.mlp_norm.weight, cfg.norm_eps)
    return h + layer.w_down(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_layer_output_and_every_gradient_equal_the_plain_layer(dtype, tol, qkv_bias):
    cfg = ModelConfig(**{**CFG.to_json(), "qkv_bias": qkv_bias})
    layer = DecoderLayer(cfg, backend="naive").to(dtype)
    init_weights(layer, seed=1)
    with torch.no_grad():  # norms away from 1, so their weights' gradients matter
        layer.attn_norm.weight.uniform_(0.5, 1.5)
        layer.mlp_norm.weight.uniform_(0.5, 1.5)
    meta = ChunkMeta.build([7, 12, 5], [0, 0, 0])
    h = torch.randn(24, cfg.hidden, dtype=dtype, requires_grad=True)
    grad = torch.randn(24, cfg.hidden, dtype=dtype)
    ours = layer(h, meta)
    got = torch.autograd.grad(ours, [h, *layer.parameters()], grad)
    plain = plain_layer(layer, h, meta)
    want = torch.autograd.grad(plain, [h, *layer.parameters()], grad)
    torch.testing.assert_close(ours, plain, rtol=tol, atol=tol)
    for (name, _), a, b in zip([("input", h), *layer.named_parameters()], got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")




@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_elementwise_layer_output_and_every_gradient_equal_the_stored_layer(dtype, tol, qkv_bias):
    cfg = ModelConfig(**{**CFG.to_json(), "qkv_bias": qkv_bias})
    layer = DecoderLayer(cfg, backend="naive").to(dtype)
    init_weights(layer, seed=2)
    with torch.no_grad():
        layer.attn_norm.weight.uniform_(0.5, 1.5)
        layer.mlp_norm.weight.uniform_(0.5, 1.5)
    meta = ChunkMeta.build([9, 4, 11], [0, 0, 0])
    h = torch.randn(24, cfg.hidden, dtype=dtype, requires_grad=True)
    grad = torch.randn(24, cfg.hidden, dtype=dtype)
    runs = []
    for elementwise in (False, True):
        out = layer(h, meta, elementwise=elementwise)
        runs.append((out, torch.autograd.grad(out, [h, *layer.parameters()], grad)))
    (stored, want), (ours, got) = runs
    torch.testing.assert_close(ours, stored, rtol=tol, atol=tol)
    for (name, _), a, b in zip([("input", h), *layer.named_parameters()], got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_elementwise_layer_keeps_neither_normalised_input_nor_the_swiglu_product():
    layer = DecoderLayer(CFG, backend="naive").to(torch.bfloat16)
    t = 32
    meta = ChunkMeta.build([t], [0])
    h = torch.randn(t, CFG.hidden, dtype=torch.bfloat16, requires_grad=True)
    kept = []
    for elementwise in (False, True):
        meter = SavedTensorMeter(exclude=list(layer.parameters()))
        with meter:
            out = layer(h, meta, elementwise=elementwise)
        kept.append(meter.current)
        out.sum().backward()
        assert meter.current == 0
    assert kept[0] - kept[1] == t * (2 * CFG.hidden + CFG.ffn) * 2


def test_rmsnorm_keeps_its_input_and_one_reciprocal_rms_per_token():
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    x = torch.randn(10, 64, dtype=torch.bfloat16, requires_grad=True)
    meter = SavedTensorMeter(exclude=list(norm.parameters()))
    with meter:
        y = norm(x)
    assert meter.current == 10 * 64 * 2 + 10 * 4  # bf16 input, fp32 1/rms
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(_plain_norm(x, norm.weight, 1e-6).sum(), x)[0],
                               rtol=1e-2, atol=1e-2)


def test_rope_and_swiglu_keep_only_the_rope_tables_and_the_gate_up_projection():
    layer = DecoderLayer(CFG, backend="naive")
    t = 16
    meta = ChunkMeta.build([t], [0])
    x = torch.randn(t, CFG.hidden, requires_grad=True)
    qkv = layer.wqkv(x)
    cos, sin = meta.rope(0, t, CFG.head_dim, CFG.rope_theta, x.dtype)
    meter = SavedTensorMeter(exclude=list(layer.parameters()))
    with meter:
        q, k, v = _QKVRope.apply(qkv, cos, sin, CFG.heads, CFG.kv_heads)
    assert meter.current == 2 * t * CFG.head_dim * 4  # cos and sin, nothing of q or k
    assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()
    gate_up = layer.w_gate_up(x)
    meter = SavedTensorMeter(exclude=list(layer.parameters()))
    with meter:
        out = _SwiGLU.apply(gate_up)
    assert meter.current == t * 2 * CFG.ffn * 4  # gate and up: silu and the product are recomputed
    del out
    assert meter.current == 0


def test_a_share_of_no_tokens_runs_forward_and_backward():
    """Under sequence parallelism a rank's share of a short chunk can be empty; its backward still
    runs (its all-to-alls are collectives)."""
    layer = DecoderLayer(CFG, backend="naive")
    x = torch.zeros(0, CFG.hidden, requires_grad=True)
    cos = sin = torch.zeros(0, 1, CFG.head_dim)
    q, k, v = _QKVRope.apply(layer.wqkv(layer.attn_norm(x)), cos, sin, CFG.heads, CFG.kv_heads)
    out = _SwiGLU.apply(layer.w_gate_up(x)).sum() + q.sum() + k.sum() + v.sum()
    out.backward()
    assert x.grad.shape == (0, CFG.hidden) and layer.wqkv.weight.grad.abs().sum() == 0
