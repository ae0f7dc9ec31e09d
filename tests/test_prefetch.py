"""Background planning: plans arrive in order, the queue stays bounded, failures surface intact."""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading

import pytest

from infinipipe.contract.cost import CostModel, LinearTerm, Profile
from infinipipe.contract.ir import validate_plan
from infinipipe.contract.model_config import PRESETS
from infinipipe.planners.epp import NoPlanError
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.train.prefetch import PlanningProcessDied, PlanPrefetcher

MODEL = PRESETS["tiny"].with_layers(4)
COST = CostModel(Profile(
    model=MODEL, device="synthetic", dtype="float16",
    layer_fwd=LinearTerm({"attn": 2e-6, "tokens": 1e-3, "chunk": 0.05}),
    layer_bwd=LinearTerm({"attn": 4e-6, "tokens": 2e-3, "chunk": 0.05}),
    layer_act_bytes=LinearTerm({"tokens": 2048.0})), MODEL)


def batches() -> list[PlanRequest]:
    return [PlanRequest([4000 + 100 * i, 900, 300, 50 * (i + 1)], COST, 2, 2**30) for i in range(4)]


def test_a_planning_process_with_a_search_pool_of_its_own_plans_the_same_and_ends_when_closed():
    """The planning process is a multiprocessing child: it must stop its pool's workers before
    it joins its children, or it never ends."""
    requests = [dataclasses.replace(r, options=PlannerOptions(pool_size=2)) for r in batches()[:2]]
    got = []

    def run() -> None:
        with PlanPrefetcher(functools.partial(make_plan, "epp"), requests) as plans:
            got.extend(plans)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the planning process did not end"
    assert [p.metadata["pool_size"] for p in got] == [2, 2]
    direct = [make_plan("epp", dataclasses.replace(r, options=PlannerOptions())) for r in requests]
    assert [p.stage_actions for p in got] == [p.stage_actions for p in direct]


def test_prefetched_plans_match_direct_planning_in_order():
    requests = batches()
    with PlanPrefetcher(functools.partial(make_plan, "epp"), requests, depth=2) as plans:
        got = []
        for plan in plans:
            assert plans.in_flight <= 2
            got.append(plan)
    assert [p.seq_lengths for p in got] == [r.lengths for r in requests]
    for plan, request in zip(got, requests):
        validate_plan(plan)
        assert plan.stage_actions == make_plan("epp", request).stage_actions


def test_planning_error_is_reraised_in_the_consumer_with_its_message():
    requests = batches()
    with PlanPrefetcher(functools.partial(make_plan, "no-such-planner"), requests) as plans:
        with pytest.raises(ValueError, match="unknown planner 'no-such-planner'") as err:
            next(plans)
    assert any("iteration 0" in note for note in err.value.__notes__)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        PlanPrefetcher(functools.partial(make_plan, "epp"), [], depth=0)


def test_no_plan_error_crosses_the_planning_process_with_the_bound_and_the_smallest_budget():
    request = PlanRequest([4000, 900, 300], COST, 2, 1024)
    with pytest.raises(NoPlanError) as direct:
        make_plan("epp", request)
    with PlanPrefetcher(functools.partial(make_plan, "epp"), [request]) as plans:
        with pytest.raises(NoPlanError) as crossed:
            next(plans)
    assert str(crossed.value) == str(direct.value)
    assert "any plan needs at least" in str(crossed.value) and "epp plans it from" in str(crossed.value)
    assert crossed.value.bound == direct.value.bound
    assert crossed.value.closest_bytes == direct.value.closest_bytes >= direct.value.bound.bytes


def _die(_request) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_planning_process_is_reported_as_the_planner_dying():
    with PlanPrefetcher(_die, range(3)) as plans:
        with pytest.raises(PlanningProcessDied, match="the planning process ended abruptly while planning iteration 0"):
            next(plans)
