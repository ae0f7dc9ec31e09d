"""Grouping DP: keeps sequences whole, finds the cheapest contiguous grouping, splits only when it pays."""
from __future__ import annotations

import itertools
import math
import time

import pytest

from infinipipe.contract.ir import check_coverage
from infinipipe.planners.grouping import PipelineCoster, _cut_points, group_pipelines, sequence_units, sub_batch
from infinipipe.planners.processor import process_sequences
from infinipipe.planners.schedule import epp_schedule
from infinipipe.sim.simulator import simulate
from synthetic_cost import COST

LAYERS = (2, 2, 2, 2)
LENGTHS = [24000, 16000, 9000, 3000, 2500, 2000, 1500, 900, 600, 400, 300, 200]


def chunks_for(k: int = 4):
    return process_sequences(LENGTHS, COST, k, 10**6)


def peak_without_recompute(chunks) -> float:
    plan = epp_schedule(chunks, LENGTHS, len(LAYERS), LAYERS)
    return max(simulate(plan, COST).peak_memory_bytes)


def test_units_keep_every_sequence_in_one_unit():
    chunks = chunks_for()
    units = sequence_units(chunks)
    home = {}
    for u, ids in enumerate(units):
        for cid in ids:
            for seg in chunks[cid].segments:
                assert home.setdefault(seg.seq_id, u) == u
    assert sorted(c for u in units for c in u) == list(range(len(chunks)))


def test_sub_batch_renumbers_but_keeps_shapes():
    chunks = chunks_for()
    ids = sequence_units(chunks)[0]
    sub, lengths = sub_batch(chunks, LENGTHS, ids)
    check_coverage(sub, lengths)
    assert [c.seg_lens for c in sub] == [chunks[i].seg_lens for i in ids]


def test_roomy_memory_gives_one_pipeline_without_recompute():
    chunks = chunks_for()
    coster = PipelineCoster(chunks, LENGTHS, COST, LAYERS, peak_without_recompute(chunks) * 1.01)
    g = group_pipelines(coster)
    assert len(g.pipelines) == 1 and g.feasible and g.evaluated == 1


def _brute_force(coster: PipelineCoster, max_pipelines: int, max_cuts: int) -> float:
    units = sequence_units(coster.chunks)
    tokens = [sum(coster.chunks[c].tokens for c in u) for u in units]
    units = [units[i] for i in sorted(range(len(units)), key=lambda i: (-len(units[i]), -tokens[i], units[i][0]))]
    cuts = _cut_points([len(u) for u in units], max_cuts)
    inner = cuts[1:-1]
    best = math.inf
    for r in range(max_pipelines):
        for chosen in itertools.combinations(inner, r):
            bounds = [0, *chosen, len(units)]
            total = 0.0
            for a, b in zip(bounds, bounds[1:]):
                ids = [c for u in units[a:b] for c in u]
                total += coster.fill_ms(ids) + coster.recompute_ms(ids)
            best = min(best, total)
    return best


@pytest.mark.parametrize("frac", [0.35, 0.6, 0.85])
def test_dp_matches_brute_force_over_cut_points(frac):
    chunks = chunks_for()
    budget = peak_without_recompute(chunks) * frac
    dp = group_pipelines(PipelineCoster(chunks, LENGTHS, COST, LAYERS, budget, mip_gap=0.0), 3, 6)
    brute = _brute_force(PipelineCoster(chunks, LENGTHS, COST, LAYERS, budget, mip_gap=0.0), 3, 6)
    assert dp.cost_ms == pytest.approx(brute, rel=1e-9)


def test_past_its_deadline_the_dp_costs_no_new_group_and_answers_with_what_it_has():
    chunks = chunks_for()
    budget = peak_without_recompute(chunks) * 0.6
    free = group_pipelines(PipelineCoster(chunks, LENGTHS, COST, LAYERS, budget), 3, 6)
    assert free.evaluated > 1
    coster = PipelineCoster(chunks, LENGTHS, COST, LAYERS, budget)
    late = group_pipelines(coster, 3, 6, stop_at=time.monotonic() - 1.0)
    assert late.evaluated == 1 and late.pipelines == (tuple(range(len(chunks))),)
    assert late.cost_ms >= free.cost_ms
    assert group_pipelines(coster, 3, 6, stop_at=time.monotonic() + 3600).cost_ms == free.cost_ms


def test_splitting_rescues_a_batch_one_pipeline_cannot_hold():
    chunks = chunks_for()
    lo, hi = 1e5, peak_without_recompute(chunks)
    # Largest budget at which one pipeline is infeasible even with full recompute.
    for _ in range(40):
        mid = (lo + hi) / 2
        coster = PipelineCoster(chunks, LENGTHS, COST, LAYERS, mid)
        lo, hi = (mid, hi) if math.isinf(coster.recompute_ms(list(range(len(chunks))))) else (lo, mid)
    coster = PipelineCoster(chunks, LENGTHS, COST, LAYERS, lo)
    assert math.isinf(coster.recompute_ms(list(range(len(chunks)))))
    g = group_pipelines(coster, max_pipelines=4)
    assert g.feasible and len(g.pipelines) >= 2
    plan = epp_schedule(chunks, LENGTHS, len(LAYERS), LAYERS, pipelines=g.pipelines)
    assert len(plan.pipelines) == len(g.pipelines)


@pytest.mark.parametrize("mode", ["none", "full"])
def test_ablation_costs(mode):
    chunks = chunks_for()
    roomy = peak_without_recompute(chunks) * 1.01
    coster = PipelineCoster(chunks, LENGTHS, COST, LAYERS, roomy, checkpointing=mode)
    ids = list(range(len(chunks)))
    cost = coster.recompute_ms(ids)
    assert (cost == 0.0) if mode == "none" else (cost > 0.0)


def test_bad_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match="checkpointing"):
        PipelineCoster(chunks_for(), LENGTHS, COST, LAYERS, 1e9, checkpointing="sometimes")


def test_interleaved_order_puts_the_split_gap_of_whole_chunks_after_each_split_sequence():
    from infinipipe.contract.ir import Chunk, Segment
    from infinipipe.planners.grouping import ordered_units
    from infinipipe.planners.schedule import split_gap

    chunks, lengths = [], []
    for seq, k in enumerate((5, 4, 3)):
        lengths.append(100 * k)
        for j in range(k):
            chunks.append(Chunk(len(chunks), (Segment(seq, 100 * j, 100 * (j + 1)),)))
    for _ in range(20):
        lengths.append(50)
        chunks.append(Chunk(len(chunks), (Segment(len(lengths) - 1, 0, 50),)))
    plain = ordered_units(chunks, 4)
    assert [len(u) for u in plain] == [5, 4, 3] + [1] * 20
    mixed = [len(u) for u in ordered_units(chunks, 4, interleave=True)]
    gap = split_gap(4, 5)
    assert mixed == [5] + [1] * gap + [4] + [1] * gap + [3] + [1] * (20 - 2 * gap)
    assert sorted(c for u in ordered_units(chunks, 4, interleave=True) for c in u) == list(range(len(chunks)))
