"""The memory lower bound: no plan beats it, a budget under it is refused at once naming it, and on
cap-heavy batches EPP plans close above it."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinipipe.contract.cost import CostModel, default_profile
from infinipipe.contract.model_config import preset
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners.bound import memory_lower_bound
from infinipipe.planners.compare import BASELINES
from infinipipe.planners.epp import NoPlanError
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.sim.simulator import simulate

GiB = 2**30
COST = CostModel(default_profile("llama-7b"), preset("llama-7b"))
FAST = PlannerOptions(time_limit_s=1.0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long=st.lists(st.integers(4096, 64 * 1024), min_size=1, max_size=3),
       short=st.lists(st.integers(64, 4000), min_size=2, max_size=20), stages=st.sampled_from([2, 4]))
def test_no_plan_of_any_planner_peaks_under_the_bound(long, short, stages):
    lengths = long + short
    request = PlanRequest(lengths, COST, stages, 10**15, options=FAST)
    bound = memory_lower_bound(COST, request.layers, lengths)
    for name in ("epp", "epp-full-ckpt", *BASELINES):
        plan = make_plan(name, request)
        full = plan.__class__(plan.seq_lengths, plan.chunks,
                              tuple(tuple(a.with_mode(plan.layers_per_stage[s]) for a in acts)
                                    for s, acts in enumerate(plan.stage_actions)), plan.layers_per_stage, plan.pipelines)
        assert max(simulate(full, COST).peak_memory_bytes) >= bound.bytes * (1 - 1e-9), name


def test_budget_under_the_bound_is_refused_at_once_with_the_stage_and_the_budget_that_plans():
    lengths = sample_lengths("github", 64, 65536, seed=1, at_cap=4)
    bound = memory_lower_bound(COST, PlanRequest(lengths, COST, 4, GiB).layers, lengths)
    with pytest.raises(NoPlanError, match=rf"stage {bound.stage}: .* for the 65,536-token sequence") as err:
        make_plan("epp", PlanRequest(lengths, COST, 4, bound.bytes * 0.99, options=FAST))
    assert err.value.bound == bound and err.value.metadata["search"] == []
    assert err.value.closest_bytes <= bound.bytes * 1.1
    assert f"epp plans it from {err.value.closest_bytes / GiB:.2f} GiB" in str(err.value)


def test_cap_heavy_batch_plans_within_ten_percent_of_the_bound():
    """Four sequences at the cap of a 64K corpus: EPP plans at 1.1x the bound (each capped
    sequence alone in a pipeline is in its search), and just under the bound nothing can."""
    lengths = sample_lengths("github", 64, 65536, seed=3, at_cap=4)
    layers = PlanRequest(lengths, COST, 4, GiB).layers
    bound = memory_lower_bound(COST, layers, lengths)
    plan = make_plan("epp", PlanRequest(lengths, COST, 4, bound.bytes * 1.1, options=FAST))
    sim = simulate(plan, COST, bound.bytes * 1.1)
    assert sim.feasible and bound.bytes <= max(sim.peak_memory_bytes) <= bound.bytes * 1.1


def test_the_budget_a_refusal_names_plans_the_batch():
    """Under the bound, and between the bound and the frugal plan's peak, the error names the
    budget from which EPP plans; at that budget it does."""
    lengths = sample_lengths("github", 48, 32768, seed=5, at_cap=3)
    layers = PlanRequest(lengths, COST, 4, GiB).layers
    bound = memory_lower_bound(COST, layers, lengths)
    for budget in (bound.bytes * 0.9, bound.bytes * 1.001):
        try:
            make_plan("epp", PlanRequest(lengths, COST, 4, budget, options=FAST))
            continue
        except NoPlanError as exc:
            named = exc.closest_bytes
        assert named >= bound.bytes
        plan = make_plan("epp", PlanRequest(lengths, COST, 4, named, options=FAST))
        assert simulate(plan, COST, named).feasible
