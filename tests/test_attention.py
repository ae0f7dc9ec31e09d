"""Attention back-ends agree with each other and with a naive masked reference."""
from __future__ import annotations

import pytest
import torch

from infinipipe.model.attention import chunk_attention, resolve_backend


def _inputs(seg_lens, starts, heads=4, kv_heads=2, d=8, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(sum(seg_lens) + sum(starts))
    t = sum(seg_lens)
    q = torch.randn(t, heads, d, generator=g, dtype=dtype).to(device)
    k = torch.randn(t, kv_heads, d, generator=g, dtype=dtype).to(device)
    v = torch.randn(t, kv_heads, d, generator=g, dtype=dtype).to(device)
    c = max(starts)
    seq_kv = None
    if c:
        i = starts.index(c)
        off, s = sum(seg_lens[:i]), seg_lens[i]
        prefix = [torch.randn(c, kv_heads, d, generator=g, dtype=dtype).to(device) for _ in range(2)]
        seq_kv = (i, torch.cat([prefix[0], k[off:off + s]]), torch.cat([prefix[1], v[off:off + s]]))
    return q, k, v, seq_kv


LAYOUTS = [([7], [0]), ([5, 3, 1], [0, 0, 0]), ([4, 6], [9, 0]), ([1], [30]), ([3, 2, 5], [0, 11, 0])]


@pytest.mark.parametrize("seg_lens, starts", LAYOUTS)
def test_sdpa_matches_naive_masked_attention(seg_lens, starts):
    q, k, v, pkv = _inputs(seg_lens, starts)
    torch.testing.assert_close(chunk_attention(q, k, v, seg_lens, starts, pkv, "sdpa"),
                               chunk_attention(q, k, v, seg_lens, starts, pkv, "naive"))


def test_naive_reference_never_attends_across_segments_or_to_the_future():
    q, k, v, _ = _inputs([3, 4], [0, 0])
    base = chunk_attention(q, k, v, [3, 4], [0, 0], None, "naive")
    k2, v2 = k.clone(), v.clone()
    k2[5:], v2[5:] = 0.0, 1.0  # future tokens of segment 2 and nothing of segment 1
    other = chunk_attention(q, k2, v2, [3, 4], [0, 0], None, "naive")
    torch.testing.assert_close(other[:5], base[:5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seg_lens, starts", LAYOUTS)
def test_varlen_flash_matches_sdpa_on_cuda(seg_lens, starts):
    q, k, v, pkv = _inputs(seg_lens, starts, d=64, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(chunk_attention(q, k, v, seg_lens, starts, pkv, "varlen").float(),
                               chunk_attention(q, k, v, seg_lens, starts, pkv, "naive").float(),
                               atol=2e-2, rtol=2e-2)


def test_auto_backend_uses_sdpa_on_cpu_and_unknown_names_are_rejected():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flashy", torch.device("cpu"), torch.float32)
