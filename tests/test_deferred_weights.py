"""W actions: a backward that leaves its layers' weight gradients for later stays exact, is timed
and held in memory as the simulator says, and the list schedule puts W where a stage would wait."""
import random

import pytest
import torch

from chunking import random_chunks, with_offload, with_weight_actions
from infinipipe.contract.ir import Action, Chunk, Plan, Segment, play_order, validate_plan
from infinipipe.contract.shapes import ChunkShape
from infinipipe.planners.schedule import epp_schedule
from infinipipe.planners.timed_order import list_schedule
from infinipipe.runtime.local import build_stages, run_plan_local
from infinipipe.sim.simulator import simulate
from reference_check import assert_matches_reference
from test_exactness import CFG, TOL, _grads, _random_batch, _reference
from test_schedule import COST


def _mixed_plans(seed: int, layers=(2, 2)) -> tuple[Plan, Plan]:
    """Random chunks with random whole, elementwise and offloaded layers; and the same plan with
    most backwards deferred."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(6)]
    lengths[0] = 38
    chunks = random_chunks(lengths, rng)
    modes = {}
    for s, n in enumerate(layers):
        for c in chunks:
            whole = rng.randint(0, n)
            modes[s, c.id] = (whole, rng.randint(0, n - whole), rng.randint(0, n))
    plan = with_offload(epp_schedule(chunks, lengths, len(layers), layers), lambda s, c, n: modes[s, c],
                        lambda lo, hi: rng.randint(lo, hi))
    return plan, with_weight_actions(plan, rng)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deferred_weight_gradients_equal_the_full_sequence_reference(seed, dtype):
    _, plan = _mixed_plans(seed)
    assert any(a.kind == "W" for actions in plan.stage_actions for a in actions)
    batch = _random_batch(plan.seq_lengths, 7)
    stages = build_stages(CFG, list(plan.layers_per_stage), dtype=dtype)
    loss = run_plan_local(plan, stages, batch)
    assert_matches_reference(loss, _grads(stages), *_reference(batch, dtype), TOL[dtype])


def test_w_actions_are_checked_and_round_trip():
    chunks = (Chunk(0, (Segment(0, 0, 5),)),)
    ok = Plan((5,), chunks, ((Action("F", 0), Action("B", 0), Action("W", 0)),), (4,))
    assert Plan.loads(ok.dumps()) == ok and len(play_order(ok)) == 3
    for actions, match in (((Action("F", 0), Action("W", 0), Action("B", 0)), "precedes its backward"),
                           ((Action("F", 0), Action("B", 0), Action("W", 0), Action("W", 0)), "appears twice")):
        with pytest.raises(ValueError, match=match):
            validate_plan(Plan((5,), chunks, (actions,), (4,)))
    with pytest.raises(ValueError, match="recomputes and offloads nothing"):
        Action("W", 0, 1)


def _two_chunk_plan(deferred: bool) -> Plan:
    """One stage: F0 F1 B1 (W1) B0, so a W of chunk 1 holds its stash over B0."""
    chunks = (Chunk(0, (Segment(0, 0, 4096),)), Chunk(1, (Segment(1, 0, 4096),)))
    acts = [Action("F", 0), Action("F", 1), Action("B", 1), Action("B", 0)] + ([Action("W", 1)] if deferred else [])
    return Plan((4096, 4096), chunks, (tuple(acts),), (32,))


def test_a_deferred_backward_is_shorter_by_its_weight_gradients_which_the_w_takes():
    plain, deferred = simulate(_two_chunk_plan(False), COST), simulate(_two_chunk_plan(True), COST)
    shape = ChunkShape((4096,))
    w = COST.weight_grad_ms(shape, 32) / 1e3
    assert 0 < w < COST.backward_ms(shape, 32) / 1e3
    b1 = next(i for i in deferred.intervals if i.kind == "B" and i.chunk_id == 1)
    wi = next(i for i in deferred.intervals if i.kind == "W")
    assert b1.end_s - b1.start_s == pytest.approx(COST.backward_ms(shape, 32, True, True) / 1e3 - w)
    assert wi.end_s - wi.start_s == pytest.approx(w)
    assert deferred.iteration_time_s == pytest.approx(plain.iteration_time_s)


def test_a_deferred_backward_holds_its_stash_until_its_w():
    plain, deferred = simulate(_two_chunk_plan(False), COST), simulate(_two_chunk_plan(True), COST)
    stash = COST.deferred_weight_bytes(ChunkShape((4096,)), 32)
    levels = dict(deferred.memory_timeline[0])
    b0 = next(i for i in deferred.intervals if i.kind == "B" and i.chunk_id == 0)
    plain_b0 = next(i for i in plain.intervals if i.kind == "B" and i.chunk_id == 0)
    assert levels[b0.end_s] - dict(plain.memory_timeline[0])[plain_b0.end_s] == pytest.approx(stash)
    assert deferred.memory_timeline[0][-1][1] == pytest.approx(plain.memory_timeline[0][-1][1])


def test_the_list_schedule_runs_w_where_a_stage_would_wait_and_keeps_at_most_its_cap_pending():
    forward = backward = [0, 1, 2, 3]

    def duration(s, kind, c):
        return {"F": 1.0, "B": 2.0}[kind]

    for defer in (1, 2):
        out = list_schedule(forward, backward, 3, duration, lambda hop, c: 0.0, caps=[3, 2, 1], defer=defer,
                            weights=lambda s, c: 1.0)
        assert all(any(kind == "W" for kind, _ in actions) for actions in out[1:])
        for actions in out:
            deferred = {c for kind, c in actions if kind == "W"}
            pending: set[int] = set()
            for kind, c in actions:
                if kind in "FB":
                    assert len(pending) <= defer
                if kind == "B" and c in deferred:
                    pending.add(c)
                elif kind == "W":
                    pending.remove(c)
    # With one pending at most, stage 1 waits for its gradient from stage 2 after B1: W0 fills it.
    out = list_schedule(forward, backward, 3, duration, lambda hop, c: 0.0, caps=[3, 2, 1], defer=1,
                        weights=lambda s, c: 1.0)
    assert out[1][:7] == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("W", 0), ("F", 3)]
    plain = list_schedule(forward, backward, 3, duration, lambda hop, c: 0.0, caps=[3, 2, 1])
    assert not any(kind == "W" for actions in plain for kind, _ in actions)


def test_a_w_right_after_its_own_backward_is_merged_into_it():
    """The last stage never waits between its backwards here: a pending W runs when forced, right
    after the backward that forced it, and the final one right after the last backward."""
    forward, backward = [0, 1, 2], [0, 1, 2]
    out = list_schedule(forward, backward, 2, lambda s, k, c: 1.0, lambda hop, c: 0.0, caps=[3, 3], defer=0,
                        weights=lambda s, c: 0.5)
    assert not any(kind == "W" for actions in out for kind, _ in actions)
    forced = list_schedule(forward, backward, 2, lambda s, k, c: 1.0, lambda hop, c: 0.0, caps=[3, 3], defer=1,
                           weights=lambda s, c: 0.5)
    last = [a for a in forced[1] if a[0] != "F"]
    assert last[-2:] == [("W", 1), ("W", 2)] or ("B", 2) == last[-1]


def test_offloaded_deferred_plans_equal_those_that_keep_weight_gradients():
    """W actions change when weight gradients are made, never what they are."""
    kept, plan = _mixed_plans(5)
    batch = _random_batch(plan.seq_lengths, 3)
    grads = []
    for p in (plan, kept):
        stages = build_stages(CFG, list(p.layers_per_stage), dtype=torch.float64)
        run_plan_local(p, stages, batch)
        grads.append(_grads(stages))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12)
