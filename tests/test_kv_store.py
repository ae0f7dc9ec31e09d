"""A split sequence keeps one K/V store per layer: exact for any number of slices, and the bytes it
holds do not grow with the number of slices, checkpointed or not."""
from __future__ import annotations

import pytest
import torch

from chunking import sequential_plan
from infinipipe.contract.ir import Chunk, Segment
from infinipipe.contract.model_config import ModelConfig
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.full_sequence import reference_loss
from infinipipe.runtime.live_bytes import LiveBytesMeter
from infinipipe.runtime.local import build_stages, run_plan_local
from infinipipe.runtime.stage_compute import StageCompute
from reference_check import assert_matches_reference

CFG = ModelConfig(vocab_size=97, hidden=64, layers=4, heads=4, kv_heads=2, ffn=128)


def _slices(length: int, k: int, seq_id: int = 0) -> list[Segment]:
    b = [i * length // k for i in range(k + 1)]
    return [Segment(seq_id, b[i], b[i + 1]) for i in range(k)]


@pytest.mark.parametrize("recompute", [0, 2, 4], ids=["none", "partial", "full"])
def test_sixteen_slices_and_a_hybrid_tail_give_the_full_sequence_gradients(recompute):
    lengths = [160, 9, 5]
    g = torch.Generator().manual_seed(3)
    batch = Batch(tuple(torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in lengths))
    segs = _slices(160, 16)
    chunks = [Chunk(i, (s,)) for i, s in enumerate(segs[:-1])]
    chunks.append(Chunk(15, (Segment(1, 0, 9), segs[-1], Segment(2, 0, 5))))
    plan = sequential_plan(chunks, lengths, [2, 2], {c.id: recompute for c in chunks})
    stages = build_stages(CFG, [2, 2], dtype=torch.float64)
    loss = run_plan_local(plan, stages, batch)
    (ref,) = build_stages(CFG, [CFG.layers], dtype=torch.float64)
    ref_loss = reference_loss(ref, batch)
    ref_loss.backward()
    grads = {n: p.grad for m in stages for n, p in m.named_parameters()}
    assert_matches_reference(loss, grads, ref_loss.item(), {n: p.grad for n, p in ref.named_parameters()}, 1e-6)


def _live_bytes_after_forwards(slices: int, recompute: int) -> int:
    (model,) = build_stages(CFG, [CFG.layers])
    batch = Batch((torch.randint(0, CFG.vocab_size, (1024,), generator=torch.Generator().manual_seed(0)),))
    compute = StageCompute(model, batch)
    chunks = [Chunk(i, (s,)) for i, s in enumerate(_slices(1024, slices))]
    with LiveBytesMeter(torch.device("cpu")) as meter:
        for c in chunks:
            compute.forward(c, None, recompute)
        held = meter.current
        for c in reversed(chunks):
            compute.backward(c)
    return held


@pytest.mark.parametrize("recompute", [0, CFG.layers], ids=["stored", "checkpointed"])
def test_bytes_a_split_sequence_holds_do_not_grow_with_its_number_of_slices(recompute):
    two, sixteen = _live_bytes_after_forwards(2, recompute), _live_bytes_after_forwards(16, recompute)
    assert sixteen <= two * 1.05, (two, sixteen)
