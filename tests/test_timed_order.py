"""Timed orders: list-scheduled interleavings that stay valid, hold what their cap allows, fill the
wait a split sequence's backward chain leaves, and get checkpointed per stage."""
import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunking import random_chunks, timed_plan
from infinipipe.contract.cost import CostModel, load_profile
from infinipipe.contract.ir import Plan, validate_plan
from infinipipe.contract.layout import StageLayout
from infinipipe.contract.model_config import ModelConfig, preset
from infinipipe.contract.units import GIB
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners.candidates import Candidate
from infinipipe.planners.ilp import solve_checkpointing
from infinipipe.planners.ilp_problem import diagonal_variables
from infinipipe.planners.packing import fixed_size_chunks
from infinipipe.planners.processor import process_sequences
from infinipipe.planners.schedule import Order, epp_schedule, plan_order
from infinipipe.planners.timed_order import least_in_flight, list_schedule
from infinipipe.runtime.local import build_stages, run_plan_local
from infinipipe.sim.simulator import simulate
from reference_check import assert_matches_reference
from test_exactness import TOL, _grads, _random_batch, _reference
from test_schedule import COST, layers_for, pipelines_by_sequence

CFG = ModelConfig(vocab_size=97, hidden=32, layers=4, heads=4, kv_heads=2, ffn=64)


def _in_flight_peaks(plan: Plan) -> list[int]:
    peaks = []
    for actions in plan.stage_actions:
        held = peak = 0
        for a in actions:
            held += 1 if a.kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 256 * 1024), min_size=1, max_size=30), k=st.integers(1, 12),
       stages=st.integers(1, 8), lead=st.integers(0, 12), slack=st.integers(0, 8), groups=st.integers(1, 3))
def test_timed_orders_pass_the_validator_and_hold_no_more_than_their_cap(lengths, k, stages, lead, slack, groups):
    chunks = process_sequences(lengths, COST, k, 10**9)
    pipes = pipelines_by_sequence(chunks, groups)
    plan = epp_schedule(chunks, lengths, stages, layers_for(stages), pipelines=pipes,
                        order=Order("timed", lead, slack), cost=COST)
    validate_plan(plan)
    assert plan_order(plan) == Order("timed", lead, slack)
    if len(pipes) == 1:
        forward = [a.chunk_id for a in plan.stage_actions[0] if a.kind == "F"]
        backward = [a.chunk_id for a in plan.stage_actions[0] if a.kind == "B"]
        whole = sum(all(s.length == lengths[s.seq_id] for s in c.segments) for c in chunks)
        n_split = max([sum(any(s.seq_id == q for s in c.segments) for c in chunks)
                       for q in range(len(lengths)) if any(s.seq_id == q and s.length < lengths[q]
                                                           for c in chunks for s in c.segments)] or [1])
        for s, peak in enumerate(_in_flight_peaks(plan)):
            cap = stages - 1 - s + n_split + min(lead, whole) + slack
            assert peak <= max(cap, least_in_flight(forward, backward))


def test_the_lead_lightest_whole_chunks_run_first_in_both_orders():
    chunks = fixed_size_chunks([3000, 2500, 900, 700, 500, 300, 200, 120, 100], 1024)
    lengths = [3000, 2500, 900, 700, 500, 300, 200, 120, 100]
    plan = epp_schedule(chunks, lengths, 3, layers_for(3), order=Order("timed", 2, 0), cost=COST)
    forward = [a.chunk_id for a in plan.stage_actions[0] if a.kind == "F"]
    backward = [a.chunk_id for a in plan.stage_actions[0] if a.kind == "B"]
    whole = [c for c in chunks if all(s.length == lengths[s.seq_id] for s in c.segments)]
    lightest = sorted(whole, key=lambda c: c.tokens)[:2]
    assert forward[:2] == backward[:2] == [c.id for c in lightest]


def test_a_list_schedule_never_idles_a_stage_whose_next_action_could_run():
    """Two stages, unit times: stage 0 fills the wait for its first backward with forwards while
    its cap allows, and a backward wins a tie."""
    forward, backward = [0, 1, 2, 3], [1, 0, 2, 3]  # chunks 0 and 1 one split sequence

    def duration(s, kind, c):
        return 1.0 if kind == "F" else 2.0

    out = list_schedule(forward, backward, 2, duration, lambda hop, c: 0.0, caps=[10, 10])
    # Stage 0 runs F0 F1 (t=0..2); stage 1 F0 F1 (1..3) then B1 (3..5), so stage 0 runs F2 F3
    # (2..4) and B1 once its gradient arrives at 5.
    assert out[0] == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 1), ("B", 0), ("B", 2), ("B", 3)]
    capped = list_schedule(forward, backward, 2, duration, lambda hop, c: 0.0, caps=[3, 2])
    assert capped[0][:4] == [("F", 0), ("F", 1), ("F", 2), ("B", 1)]
    assert capped[1][:3] == [("F", 0), ("F", 1), ("B", 1)]


def _bench_like():
    """Sp 8 on 4 stages of 13B, a GitHub-like batch: long split sequences and many short ones."""
    cost = CostModel(load_profile("h100-bf16-llama-13b"), preset("llama-13b"))
    cost = dataclasses.replace(cost, layout=StageLayout(sp=8, fsdp=8))
    lengths = sample_lengths("github", 160, 98304, seed=0, at_cap=2)
    chunks = fixed_size_chunks(lengths, 65536)
    return cost, lengths, chunks, (10, 10, 10, 10)


def _wait_for_first_backward(sim, stage: int) -> float:
    """Idle time of ``stage`` before its first backward starts."""
    mine = sorted((i for i in sim.intervals if i.stage == stage), key=lambda i: i.start_s)
    first_b = next(i for i in mine if i.kind == "B")
    return first_b.start_s - sum(i.end_s - i.start_s for i in mine if i.end_s <= first_b.start_s)


def test_a_timed_order_fills_stage_zeros_wait_for_the_split_sequences_backward_chain():
    cost, lengths, chunks, layers = _bench_like()
    one_f_one_b = simulate(epp_schedule(chunks, lengths, 4, layers), cost)
    timed = simulate(epp_schedule(chunks, lengths, 4, layers, order=Order("timed", 6, 8), cost=cost), cost)
    assert _wait_for_first_backward(timed, 0) < 0.5 * _wait_for_first_backward(one_f_one_b, 0)
    assert timed.iteration_time_s < one_f_one_b.iteration_time_s


def test_timed_orders_get_a_recompute_variable_per_stage_and_chunk():
    """A diagonal ties stage s's recompute to stage s + i's; a timed order interleaves each stage its
    own way, so a stage with memory to spare recomputes nothing whatever another stage needs."""
    cost, lengths, chunks, layers = _bench_like()
    plan = epp_schedule(chunks, lengths, 4, layers, order=Order("timed", 6, 8), cost=cost)
    var_of, _ = diagonal_variables(plan)
    assert len(set(var_of.values())) == len(var_of) == 4 * len(chunks)
    diagonal, _ = diagonal_variables(epp_schedule(chunks, lengths, 4, layers))
    assert len(set(diagonal.values())) == len(chunks) + 3
    budget = 60 * GIB
    solved = solve_checkpointing(plan, cost, budget)
    sim = simulate(solved, cost, budget)
    assert sim.feasible and sim.recompute_s[0] > 0
    roomy = [s for s in range(4) if simulate(plan, cost).peak_memory_bytes[s] <= budget]
    assert roomy and all(sim.recompute_s[s] == 0 for s in roomy)


def test_candidates_round_trip_their_order_and_read_the_older_interleave_flag():
    cand = Candidate("fixed", 65536, order=Order("timed", 6, 2, 3))
    assert Candidate.from_json(cand.to_json()) == cand
    assert cand.label == "fixed 65536 tokens timed lead=6 slack=2 defer=3"
    assert Candidate.from_json({"family": "epp", "size": 4, "interleave": True}).order == Order("interleaved")
    assert Candidate.from_json({"family": "epp", "size": 4}).order == Order()
    with pytest.raises(ValueError, match="only for a timed order"):
        Order("1f1b", lead=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_timed_order_with_recompute_in_process(dtype):
    rng = random.Random(11)
    lengths = [rng.randint(1, 40) for _ in range(6)]
    lengths[0] = 38
    chunks = random_chunks(lengths, rng)
    layers = [2, 2]
    rec = {(s, c.id): rng.randint(0, 2) for s in range(2) for c in chunks}
    plan = timed_plan(chunks, lengths, layers, CFG, lambda s, c: rec[s, c], rng)
    batch = _random_batch(lengths, 7)
    stages = build_stages(CFG, layers, dtype=dtype)
    loss = run_plan_local(plan, stages, batch)
    assert_matches_reference(loss, _grads(stages), *_reference(batch, dtype), TOL[dtype])


def test_the_search_keeps_a_timed_order_only_where_it_simulates_faster_than_its_1f1b_trial():
    from infinipipe.planners.options import PlannerOptions
    from infinipipe.planners.registry import make_plan
    from infinipipe.planners.request import PlanRequest

    cost, lengths, _, layers = _bench_like()
    plan = make_plan("epp", PlanRequest(lengths, cost, 4, 80 * GIB, layers, PlannerOptions(deadline_share=0, timed_orders=True)))
    order = plan_order(plan)
    trials = {t["candidate"]: t for t in plan.metadata["search"] if not t["screened"] and t["feasible"]}
    won = Candidate.from_json(plan.metadata["winner"])
    base = dataclasses.replace(won, order=Order()).label
    assert order.kind == "timed" and base in trials
    assert plan.metadata["iteration_time_s"] <= trials[base]["iteration_time_s"]
    assert simulate(plan, cost, 80 * GIB).iteration_time_s == pytest.approx(plan.metadata["iteration_time_s"])
