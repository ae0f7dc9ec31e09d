"""Any chunking, ordering and recompute gives the loss and gradients of the full-sequence run."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunking import HAND_CHUNKS, HAND_LENGTHS, random_chunks, sequential_plan
from infinipipe.contract.ir import Action, Chunk, Plan, Segment
from infinipipe.contract.model_config import ModelConfig
from infinipipe.model.kv_store import LayerKV
from infinipipe.model.layers import ChunkMeta
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.full_sequence import reference_loss
from infinipipe.runtime.local import build_stages, run_plan_local
from reference_check import assert_matches_reference

CFG = ModelConfig(vocab_size=97, hidden=32, layers=4, heads=4, kv_heads=2, ffn=64)
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def _random_batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return Batch(tuple(torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in lengths))


def _reference(batch, dtype, seed=0):
    (model,) = build_stages(CFG, [CFG.layers], seed=seed, dtype=dtype)
    loss = reference_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _grads(stages):
    return {n: p.grad.clone() for m in stages for n, p in m.named_parameters() if p.grad is not None}


lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=6).filter(lambda ls: sum(ls) > len(ls))


@settings(max_examples=25, deadline=None)
@given(lengths=lengths_st, seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_exact_random_chunking_single_stage(lengths, seed, dtype):
    rng = random.Random(seed)
    batch = _random_batch(lengths, seed)
    chunks = random_chunks(lengths, rng)
    recompute = {c.id: rng.randint(0, CFG.layers) for c in chunks}
    plan = sequential_plan(chunks, lengths, [CFG.layers], recompute)
    stages = build_stages(CFG, [CFG.layers], dtype=dtype)
    loss = run_plan_local(plan, stages, batch, loss_block_tokens=rng.choice([3, 16, 2048]))
    assert_matches_reference(loss, _grads(stages), *_reference(batch, dtype), TOL[dtype])


@settings(max_examples=15, deadline=None)
@given(lengths=lengths_st, seed=st.integers(0, 10_000), split=st.sampled_from([(1, 3), (2, 2), (1, 1, 1, 1)]))
def test_exact_random_chunking_multi_stage_in_process(lengths, seed, split):
    rng = random.Random(seed)
    batch = _random_batch(lengths, seed)
    chunks = random_chunks(lengths, rng)
    recompute = {c.id: rng.randint(0, 2) for c in chunks}
    plan = sequential_plan(chunks, lengths, split, recompute)
    stages = build_stages(CFG, split, dtype=torch.float64)
    loss = run_plan_local(plan, stages, batch)
    assert_matches_reference(loss, _grads(stages), *_reference(batch, torch.float64), TOL[torch.float64])


def test_exact_slices_of_length_one_and_sequences_of_length_one():
    lengths = [5, 1, 3]
    batch = _random_batch(lengths, 3)
    chunks = [
        Chunk(0, (Segment(0, 0, 1), Segment(1, 0, 1))),
        Chunk(1, (Segment(0, 1, 2),)),
        Chunk(2, (Segment(0, 2, 5), Segment(2, 0, 3))),
    ]
    plan = sequential_plan(chunks, lengths, [CFG.layers], {0: 4, 1: 2, 2: 0})
    stages = build_stages(CFG, [CFG.layers], dtype=torch.float64)
    loss = run_plan_local(plan, stages, batch)
    assert_matches_reference(loss, _grads(stages), *_reference(batch, torch.float64), TOL[torch.float64])


def test_exact_interleaved_backward_one_sequence_done_before_next_starts():
    lengths = [12, 7, 9]
    batch = _random_batch(lengths, 5)
    chunks = [Chunk(0, (Segment(0, 0, 6),)), Chunk(1, (Segment(0, 6, 12), Segment(1, 0, 7))),
              Chunk(2, (Segment(2, 0, 4),)), Chunk(3, (Segment(2, 4, 9),))]
    order = [Action("F", 0), Action("F", 1, 1), Action("B", 1, 1), Action("B", 0),
             Action("F", 2, 3), Action("F", 3, 2), Action("B", 3, 2), Action("B", 2, 3)]
    plan = Plan(tuple(lengths), tuple(chunks), [order], (CFG.layers,))
    stages = build_stages(CFG, [CFG.layers], dtype=torch.float64)
    loss = run_plan_local(plan, stages, batch)
    assert_matches_reference(loss, _grads(stages), *_reference(batch, torch.float64), TOL[torch.float64])


def test_two_slice_run_gives_the_logits_of_the_whole_sequence():
    torch.manual_seed(0)
    (model,) = build_stages(CFG, [CFG.layers], dtype=torch.float64)
    seq = torch.randint(0, CFG.vocab_size, (20,))

    stores = [LayerKV(20, CFG.kv_heads, CFG.head_dim, torch.float64, torch.device("cpu")) for _ in range(CFG.layers)]

    def run(h, meta, stores=None):
        for j, layer in enumerate(model.ordered_layers()):
            h = layer(h, meta, None if stores is None else stores[j])
        return model.head(model.norm(h))

    full = run(model.embed_tokens(seq), ChunkMeta.build([20], [0]))
    first = run(model.embed_tokens(seq[:8]), ChunkMeta.build([8], [0], split=0), stores)
    second = run(model.embed_tokens(seq[8:]), ChunkMeta.build([12], [8]), stores)
    torch.testing.assert_close(torch.cat([first, second]), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bad, message", [
    (lambda: [Chunk(0, (Segment(0, 0, 4),)), Chunk(1, (Segment(0, 3, 6),))], "overlap"),
    (lambda: [Chunk(0, (Segment(0, 0, 3),)), Chunk(1, (Segment(0, 4, 6),))], "in no chunk"),
    (lambda: [Chunk(0, (Segment(0, 2, 6), Segment(1, 1, 3)))], "cached prefix"),
])
def test_invalid_chunk_lists_are_rejected_with_the_reason(bad, message):
    from infinipipe.contract.ir import check_coverage
    with pytest.raises(ValueError, match=message):
        check_coverage(bad(), [6, 3])


def test_out_of_range_token_ids_are_rejected():
    lengths = [4]
    batch = Batch.of([[1, 2, CFG.vocab_size + 5, 3]])
    plan = sequential_plan([Chunk(0, (Segment(0, 0, 4),))], lengths, [CFG.layers])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run_plan_local(plan, build_stages(CFG, [CFG.layers]), batch)


def test_mismatched_cache_is_rejected():
    (model,) = build_stages(CFG, [CFG.layers], dtype=torch.float64)
    layer = model.ordered_layers()[0]
    h = torch.randn(5, CFG.hidden, dtype=torch.float64)
    store = LayerKV(20, CFG.kv_heads, CFG.head_dim, torch.float64, torch.device("cpu"))
    with pytest.raises(ValueError, match="earlier slices first"):
        layer(h, ChunkMeta.build([5], [4]), store)
    with pytest.raises(ValueError, match="K/V store"):
        layer(h, ChunkMeta.build([5], [4]), None)
    with pytest.raises(ValueError, match="outside the store"):
        layer(torch.randn(30, CFG.hidden, dtype=torch.float64), ChunkMeta.build([30], [0], split=0), store)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_exact_random_chunking_on_cuda(dtype, tol):
    """fp32 runs SDPA, bf16 runs varlen flash attention; bf16 is compared at bf16 tolerance."""
    rng = random.Random(7)
    lengths = [300, 41, 7, 1, 120]
    batch = Batch(tuple(s.cuda() for s in _random_batch(lengths, 7).sequences))
    chunks = random_chunks(lengths, rng)
    plan = sequential_plan(chunks, lengths, [CFG.layers], {c.id: rng.randint(0, CFG.layers) for c in chunks})
    stages = [m.cuda() for m in build_stages(CFG, [CFG.layers], dtype=dtype)]
    loss = run_plan_local(plan, stages, batch)
    (ref,) = [m.cuda() for m in build_stages(CFG, [CFG.layers], dtype=dtype)]
    ref_loss = reference_loss(ref, batch)
    ref_loss.backward()
    assert_matches_reference(loss, _grads(stages), ref_loss.item(), {n: p.grad for n, p in ref.named_parameters()}, tol)


def test_exact_parts_planned_apart_and_joined_with_whole_chunks_between_split_sequences():
    """Two split sequences, each with whole chunks between its slices' backward and the next
    sequence (one pipeline), and the same chunks as three pipelines planned apart and joined."""
    from infinipipe.planners.compose import join_plans
    from infinipipe.planners.grouping import sub_batch
    from infinipipe.planners.schedule import Order, epp_schedule

    lengths = [30, 24, 5, 4, 6, 3, 7]
    batch = _random_batch(lengths, 11)
    chunks = [Chunk(0, (Segment(0, 0, 12),)), Chunk(1, (Segment(0, 12, 22),)), Chunk(2, (Segment(0, 22, 30),)),
              Chunk(3, (Segment(1, 0, 14),)), Chunk(4, (Segment(1, 14, 24), Segment(2, 0, 5))),
              Chunk(5, (Segment(3, 0, 4), Segment(4, 0, 6))), Chunk(6, (Segment(5, 0, 3),)), Chunk(7, (Segment(6, 0, 7),))]
    split = [2, 2]
    rng = random.Random(3)
    rec = {(s, c.id): rng.randint(0, 2) for s in range(2) for c in chunks}
    one = epp_schedule(chunks, lengths, 2, split, recompute=lambda s, c: rec[s, c], order=Order("interleaved"))
    forward = [a.chunk_id for a in one.stage_actions[0] if a.kind == "F"]
    assert forward.index(3) - forward.index(2) > 1  # whole chunks sit between the two sequences
    parts = []
    for ids in ([0, 1, 2], [3, 4], [5, 6, 7]):
        sub, sub_lengths = sub_batch(chunks, lengths, ids)
        seq_ids = list(dict.fromkeys(s.seq_id for c in ids for s in chunks[c].segments))
        parts.append((epp_schedule(sub, sub_lengths, 2, split, recompute=lambda s, c, ids=ids: rec[s, ids[c]]), seq_ids))
    joined = join_plans(parts, lengths)
    assert len(joined.pipelines) == 3
    for plan in (one, joined):
        stages = build_stages(CFG, split, dtype=torch.float64)
        loss = run_plan_local(plan, stages, batch)
        assert_matches_reference(loss, _grads(stages), *_reference(batch, torch.float64), TOL[torch.float64])


@pytest.mark.parametrize("kind", sorted(HAND_CHUNKS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_with_store_elementwise_and_whole_recompute_mixed_per_chunk_and_stage(kind, dtype):
    """Each chunk on each stage stores some layers, recomputes some whole and some elementwise
    (split, packed and hybrid chunks; 1F1B over two stages)."""
    from infinipipe.planners.schedule import epp_schedule

    chunks = HAND_CHUNKS[kind]
    split = [2, 3]
    modes = [(0, 0), (0, 2), (1, 1), (0, 1), (2, 0), (1, 2), (0, 3)]
    pick = {}
    for s in range(2):  # (whole, elementwise) layers, cycling through the modes a stage can take
        fits = [m for m in modes if sum(m) <= split[s]]
        pick |= {(s, c.id): fits[(s * len(chunks) + c.id) % len(fits)] for c in chunks}
    base = epp_schedule(chunks, HAND_LENGTHS, 2, split)
    plan = Plan(base.seq_lengths, base.chunks, tuple(
        tuple(Action(a.kind, a.chunk_id, *pick[s, a.chunk_id]) for a in acts) for s, acts in enumerate(base.stage_actions)),
        base.layers_per_stage, base.pipelines)
    cfg = ModelConfig(**{**CFG.to_json(), "layers": sum(split)})
    batch = _random_batch(HAND_LENGTHS, 5)
    stages = build_stages(cfg, split, dtype=dtype)
    loss = run_plan_local(plan, stages, batch)
    (model,) = build_stages(cfg, [cfg.layers], dtype=dtype)
    ref = reference_loss(model, batch)
    ref.backward()
    assert_matches_reference(loss, _grads(stages), ref.item(), {n: p.grad for n, p in model.named_parameters()}, TOL[dtype])
