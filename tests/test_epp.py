"""The epp planner end to end: valid plans that fit, ablations that behave as named, K search."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from infinipipe.contract.ir import validate_plan
from infinipipe.planners.epp import NoPlanError, convex_floor, slice_count_ladder
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.planners.search_trials import token_capacity
from infinipipe.sim.simulator import simulate
from synthetic_cost import COST

LENGTHS = [30000, 12000, 7000, 3000, 2500, 2000, 1500, 900, 600, 400, 300, 200, 100, 50]
STAGES = 4


def request(memory: float, **options) -> PlanRequest:
    return PlanRequest(LENGTHS, COST, STAGES, memory, options=PlannerOptions(**options))


def no_recompute_peak() -> float:
    plan = make_plan("epp-no-ckpt", request(1e12))
    return max(simulate(plan, COST).peak_memory_bytes)


def test_epp_plan_is_valid_fits_and_reports_its_search():
    budget = no_recompute_peak() * 0.6
    plan = make_plan("epp", request(budget))
    validate_plan(plan)
    sim = simulate(plan, COST, budget)
    assert sim.feasible
    meta = plan.metadata
    assert meta["planner"] == "epp" and meta["feasible"]
    assert meta["iteration_time_s"] == pytest.approx(sim.iteration_time_s)
    assert meta["chosen"] in {t["candidate"] for t in meta["search"]}
    assert meta["checkpointing"]["status"] in ("optimal", "no_recompute_needed", "time_limit")
    fitting = [t["iteration_time_s"] for t in meta["search"] if t["feasible"]]
    assert sim.iteration_time_s == pytest.approx(min(fitting))


def test_ablations_recompute_nothing_and_everything():
    roomy = no_recompute_peak() * 1.5
    none = make_plan("epp-no-ckpt", request(roomy))
    full = make_plan("epp-full-ckpt", request(roomy))
    assert all(a.recompute_layers == 0 for acts in none.stage_actions for a in acts)
    assert all(a.recompute_layers == full.layers_per_stage[s]
               for s, acts in enumerate(full.stage_actions) for a in acts)
    assert none.metadata["planner"] == "epp-no-ckpt" and full.metadata["planner"] == "epp-full-ckpt"


def test_epp_fits_where_no_checkpointing_cannot_and_beats_full_checkpointing():
    budget = no_recompute_peak() * 0.3
    none = make_plan("epp-no-ckpt", request(budget, token_capacity=10**6))
    assert not none.metadata["feasible"]
    assert not simulate(none, COST, budget).feasible
    epp = simulate(make_plan("epp", request(budget)), COST, budget)
    full = simulate(make_plan("epp-full-ckpt", request(budget)), COST, budget)
    assert epp.feasible and full.feasible
    assert epp.iteration_time_s <= full.iteration_time_s
    assert epp.recompute_time_s < full.recompute_time_s


def test_fixed_slice_count_is_used():
    plan = make_plan("epp", request(no_recompute_peak(), num_slices=3))
    assert plan.metadata["num_slices"] == 3 and len(plan.metadata["search"]) == 1


def test_budget_below_model_states_names_the_stage_and_the_smallest_budget():
    with pytest.raises(NoPlanError, match=r"any plan needs at least .* \(stage \d+: .* of model states") as err:
        make_plan("epp", request(1e5))
    assert err.value.bound.bytes > err.value.bound.states > 1e5
    assert err.value.closest_bytes >= err.value.bound.bytes and err.value.metadata["search"] == []


def test_slice_count_ladder_is_increasing_and_spans_the_range():
    ladder = slice_count_ladder(3, 40)
    assert ladder[0] == 3 and ladder[-1] == 40 and ladder == sorted(set(ladder))


@settings(max_examples=200, deadline=None)
@given(kinks=st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 3.0)), min_size=1, max_size=4),
       tilt=st.floats(-4.0, 4.0), xs=st.lists(st.integers(0, 20), min_size=2, max_size=8, unique=True),
       x=st.floats(0.0, 6.0))
def test_convex_floor_never_exceeds_a_convex_curve_through_the_points(kinks, tilt, xs, x):
    """The ladder stops and skips refinement on this floor: it must stay below any convex curve
    through the screened points, at ``x`` or, past the last point, anywhere up to ``x``."""
    def f(z: float) -> float:
        return tilt * z + sum(w * abs(z - a) for a, w in kinks)

    xs = sorted(i / 4 for i in xs)  # points apart as log K of distinct slice counts are
    floor = convex_floor([(z, f(z)) for z in xs], x)
    if x > xs[-1]:
        lowest = min(f(xs[-1] + (x - xs[-1]) * i / 64) for i in range(1, 65))
    else:
        lowest = f(x)
    assert floor <= lowest + 1e-6 * (1 + abs(lowest))


def test_convex_floor_extends_the_nearest_lines():
    points = [(0.0, 10.0), (1.0, 6.0), (2.0, 4.0), (3.0, 5.0)]
    assert convex_floor(points, 2.5) == pytest.approx(4.0 - 2.0 * 0.5)  # (1, 6)-(2, 4) extended; no pair on the right
    assert convex_floor(points, 5.0) == pytest.approx(5.0)  # rising past the last point: its own value
    assert convex_floor(points[:3], 4.0) == pytest.approx(4.0 - 2.0 * 2.0)
    assert convex_floor(points[:1], 0.5) == -math.inf


def test_token_capacity_is_the_largest_single_chunk_that_fits():
    layers = (2, 2, 2, 2)
    budget = no_recompute_peak() * 0.4
    cap = token_capacity(COST, layers, budget, 10**6, full_recompute=True)
    assert 1 <= cap < 10**6
    assert token_capacity(COST, layers, budget * 2, 10**6, full_recompute=True) > cap


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 20000), min_size=1, max_size=12),
       stages=st.sampled_from([1, 2, 4]), frac=st.floats(0.2, 1.2))
def test_every_epp_plan_fits_its_budget_in_simulation(lengths, stages, frac):
    roomy = PlanRequest(lengths, COST, stages, 1e12)
    peak = max(simulate(make_plan("epp-no-ckpt", roomy), COST).peak_memory_bytes)
    budget = peak * frac
    request = PlanRequest(lengths, COST, stages, budget)
    try:
        plan = make_plan("epp", request)
    except ValueError as exc:
        # A refusal must be honest: not even recomputing every layer fits this budget.
        assert "fits" in str(exc)
        with pytest.raises(ValueError, match="fits"):
            make_plan("epp-full-ckpt", request)
        return
    validate_plan(plan)
    sim = simulate(plan, COST, budget)
    assert sim.feasible, sim.oom


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 20000), min_size=8, max_size=8),
       stages=st.sampled_from([4, 8]), frac=st.floats(0.2, 1.2))
@example(lengths=[1, 1, 1, 1, 1, 1, 3613, 9403], stages=8, frac=0.21875)  # only tiny chunks fit: frugal wins
def test_epp_is_never_slower_than_its_ablations(lengths, stages, frac):
    roomy = PlanRequest(lengths, COST, stages, 1e12)
    budget = max(simulate(make_plan("epp-no-ckpt", roomy), COST).peak_memory_bytes) * frac
    req = PlanRequest(lengths, COST, stages, budget)
    try:
        full = simulate(make_plan("epp-full-ckpt", req), COST, budget)
    except ValueError:
        # The full-recompute ablation can miss a plan (it searches EPP's own chunkings only)
        # where epp, which also searches the baselines' chunkings, finds one: that plan must fit.
        try:
            plan = make_plan("epp", req)
        except ValueError as exc:
            assert "fits" in str(exc)
            return
        assert simulate(plan, COST, budget).feasible
        return
    epp = simulate(make_plan("epp", req), COST, budget)
    assert epp.feasible
    assert epp.iteration_time_s <= full.iteration_time_s * (1 + 1e-9)
    none = simulate(make_plan("epp-no-ckpt", req), COST, budget)
    if none.feasible:
        assert epp.iteration_time_s <= none.iteration_time_s * (1 + 1e-9)
