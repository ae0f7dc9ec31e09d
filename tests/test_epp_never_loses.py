"""EPP's search contains every baseline's chunking, so on the simulator it is never slower than a
baseline that fits, and it fits wherever one does."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinipipe.contract.cost import CostModel, default_profile
from infinipipe.contract.model_config import preset
from infinipipe.planners.compare import BASELINES, compute_floor_s
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.sim.simulator import simulate

GiB = 2**30
COST = CostModel(default_profile("llama-7b"), preset("llama-7b"))
FAST = PlannerOptions(time_limit_s=1.0)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long=st.lists(st.integers(8192, 96 * 1024), min_size=1, max_size=3),
       short=st.lists(st.integers(64, 6000), min_size=4, max_size=40),
       stages=st.sampled_from([2, 4, 8]), memory_gib=st.sampled_from([40, 64, 80]))
def test_epp_is_never_slower_than_a_feasible_baseline(long, short, stages, memory_gib):
    check_never_slower(sorted(long + short, reverse=True), stages, memory_gib)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cap=st.sampled_from([32768, 65536, 98304]), at_cap=st.integers(2, 5),
       short=st.lists(st.integers(64, 8000), min_size=8, max_size=40),
       stages=st.sampled_from([4, 8]), memory_gib=st.sampled_from([64, 80]))
def test_epp_is_never_slower_than_a_feasible_baseline_on_cap_heavy_batches(cap, at_cap, short, stages, memory_gib):
    """Several sequences at the context length, as in a corpus truncated there."""
    check_never_slower([cap] * at_cap + [min(n, cap) for n in short], stages, memory_gib)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long=st.lists(st.integers(8192, 96 * 1024), min_size=1, max_size=3),
       short=st.lists(st.integers(64, 6000), min_size=4, max_size=40),
       stages=st.sampled_from([4, 8]), memory_gib=st.sampled_from([40, 64, 80]), host_gib=st.sampled_from([16, 128]))
def test_epp_with_the_host_tier_is_never_slower_than_a_feasible_baseline(long, short, stages, memory_gib, host_gib):
    """Offloading to the host (the committed profile's published link figures) keeps the guarantee."""
    check_never_slower(sorted(long + short, reverse=True), stages, memory_gib, host_gib)


def check_never_slower(lengths, stages, memory_gib, host_gib=0):
    request = PlanRequest(lengths, COST, stages, memory_gib * GiB, options=FAST, host_memory_budget=host_gib * GiB)
    baselines = {}
    for name in BASELINES:
        sim = simulate(make_plan(name, request), COST, request.memory_budget)
        if sim.feasible:
            baselines[name] = sim.iteration_time_s
    try:
        plan = make_plan("epp", request)
    except ValueError as exc:
        assert not baselines, f"epp refused ({exc}) where {sorted(baselines)} fit"
        return
    epp = simulate(plan, COST, request.memory_budget)
    assert epp.feasible  # EPP may also fit where no baseline does (grouping, per-chunk recompute)
    assert compute_floor_s(COST, lengths, stages) <= epp.iteration_time_s * (1 + 1e-9)
    for name, time_s in baselines.items():
        assert epp.iteration_time_s <= time_s * (1 + 1e-9), (name, epp.iteration_time_s, time_s)
