"""The one-stage comparison plans exercise what they claim, and the simulator sums their actions.

The timing comparison itself (measured executor vs simulator, within 10%) is a benchmark,
``benchmarks/sim_vs_executor.py``: timings on a shared machine do not belong in unit tests.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from infinipipe.contract.cost import CostModel, load_profile
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.sim.simulator import simulate

_spec = importlib.util.spec_from_file_location(
    "sim_vs_executor", Path(__file__).parents[1] / "benchmarks" / "sim_vs_executor.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _cost() -> CostModel:
    return CostModel(load_profile("cpu-fp32-tiny"), preset(bench.MODEL))


def test_plans_exercise_split_sequences_and_recompute():
    cost = _cost()
    split = bench.one_stage_plan(cost, *bench.PLANS["split"][:2], **bench.PLANS["split"][2])
    assert any(ChunkShape.of(c, split.seq_lengths).prefix > 0 for c in split.chunks)
    whole = bench.one_stage_plan(cost, *bench.PLANS["recompute"][:2], **bench.PLANS["recompute"][2])
    assert all(0 < a.recompute_layers < cost.model.layers for a in whole.stage_actions[0])


@pytest.mark.parametrize("name", sorted(bench.PLANS))
def test_one_stage_simulation_is_the_sum_of_its_actions(name):
    cost = _cost()
    plan = bench.one_stage_plan(cost, *bench.PLANS[name][:2], **bench.PLANS[name][2])
    sim = simulate(plan, cost)
    total = 0.0
    for a in plan.stage_actions[0]:
        shape = ChunkShape.of(plan.chunks[a.chunk_id], plan.seq_lengths)
        n = cost.model.layers
        if a.kind == "F":
            total += cost.forward_ms(shape, n, True, True)
        else:
            total += cost.backward_ms(shape, n, True, True) + cost.recompute_ms(shape, a.recompute_layers)
    assert sim.iteration_time_s == pytest.approx(total / 1e3, rel=1e-9)
    assert sim.busy_s[0] == pytest.approx(sim.iteration_time_s)


def test_executor_timing_helper_times_every_action_of_a_plan():
    cost = _cost()
    plan = bench.one_stage_plan(cost, *bench.PLANS["split"][:2], **bench.PLANS["split"][2])
    times = bench.measured_action_times(plan, reps=1)
    assert len(times) == len(plan.stage_actions[0]) and all(t > 0 for t in times)
