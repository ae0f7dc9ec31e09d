"""Planning that keeps up: a deadline that cuts only what could improve a plan, a pool that
changes nothing but the wall time, and a warm start from the last step's winner."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from infinipipe.config import load_config
from infinipipe.contract.cost import MIXED_PRECISION_ADAM, CostModel, default_profile
from infinipipe.contract.model_config import preset
from infinipipe.data.dataset import BatchSampler
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners import search_pool
from infinipipe.planners.candidates import Candidate, WarmStart
from infinipipe.planners.deadline import Deadline
from infinipipe.planners.epp import alone_and_rest, plan_in_parts
from infinipipe.planners.explain import explain_lines
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.planners.schedule import Order
from infinipipe.sim.simulator import simulate
from infinipipe.train.planning import PlanAsks, StepPlanner

GIB = 2**30


@pytest.fixture(scope="module")
def cost():
    return CostModel(default_profile("llama-7b"), preset("llama-7b"), MIXED_PRECISION_ADAM)


def request(cost, n=48, max_len=65536, memory=80 * GIB, **options) -> PlanRequest:
    return PlanRequest(sample_lengths("github", n, max_len, seed=3), cost, 4, memory,
                       options=PlannerOptions(**options))


def what_runs(plan):
    """What the runtime executes, and what the search tried: all but the timings."""
    search = [{k: v for k, v in t.items() if k != "planning_s"} for t in plan.metadata["search"]]
    return plan.chunks, plan.stage_actions, plan.pipelines, search


def test_without_a_deadline_the_plan_is_the_same_for_any_pool_size(cost):
    alone = make_plan("epp", request(cost))
    pooled = make_plan("epp", request(cost, pool_size=2))
    assert pooled.metadata["pool_size"] == 2 and alone.metadata["pool_size"] == 0
    assert what_runs(pooled) == what_runs(alone)
    assert alone.metadata["deadline_s"] is None and alone.metadata["skipped_for_time"] == []


def test_past_the_deadline_the_search_returns_its_first_fitting_plan_and_says_what_it_skipped(cost):
    full = make_plan("epp", request(cost))
    cut = make_plan("epp", request(cost, deadline_s=1e-6))
    meta = cut.metadata
    assert meta["feasible"] and simulate(cut, cost, 80 * GIB).feasible
    assert len(meta["search"]) < len(full.metadata["search"]) and meta["skipped_for_time"]
    assert meta["deadline_s"] == pytest.approx(1e-6)
    assert any(line.startswith(f"  not planned for time ({len(meta['skipped_for_time'])})")
               for line in explain_lines(cut))
    assert meta["iteration_time_s"] >= full.metadata["iteration_time_s"]


def test_the_deadline_is_a_share_of_the_step_the_request_names_else_of_the_best_plan(cost):
    behind = make_plan("epp", dataclasses.replace(request(cost, deadline_share=0.01), step_s=40.0))
    assert behind.metadata["deadline_s"] == pytest.approx(0.4)
    alone = make_plan("epp", request(cost, deadline_share=0.01))
    assert alone.metadata["deadline_s"] == pytest.approx(0.01 * alone.metadata["iteration_time_s"])
    clock = Deadline(time.monotonic(), share=0.5)
    assert clock.limit(None) is None and clock.for_part(None).start >= clock.start
    assert not Deadline(0.0).active and Deadline(0.0).limit(10.0) is None


def test_a_warm_start_plans_the_last_winner_in_full_first_then_screens_its_neighbours(cost):
    cold = make_plan("epp", request(cost))
    warm = WarmStart.from_plan(cold)
    won = Candidate.from_json(cold.metadata["winner"])
    assert warm.choice == won and won.label == cold.metadata["chosen"]
    hot = make_plan("epp", dataclasses.replace(request(cost), warm=warm))
    base = dataclasses.replace(won, order=Order()) if won.order.kind == "timed" else won
    lead = [base.label] + ([won.label] if base != won else [])  # a timed order reorders its 1F1B trial
    first = hot.metadata["search"][:len(lead) + 2]
    assert [t["candidate"] for t in first[:len(lead)]] == lead and not any(t["screened"] for t in first[:len(lead)])
    assert all(t["screened"] and t["family"] == won.family for t in first[len(lead):])
    assert hot.metadata["iteration_time_s"] <= cold.metadata["iteration_time_s"] * (1 + 1e-9)


def test_a_warm_start_under_a_deadline_keeps_the_last_winner(cost):
    """What the deadline leaves is the likely rest: the hinted winner is planned before it binds."""
    cold = make_plan("epp", request(cost))
    hot = make_plan("epp", dataclasses.replace(request(cost, deadline_s=1e-6), warm=WarmStart.from_plan(cold)))
    assert hot.metadata["iteration_time_s"] == pytest.approx(cold.metadata["iteration_time_s"], rel=1e-9)
    assert hot.metadata["skipped_for_time"]


def test_a_composite_warm_start_plans_its_rule_first_and_records_what_won_each_kind_of_part(cost):
    lengths = sample_lengths("github", 40, 65536, seed=1, at_cap=3)
    req = PlanRequest(lengths, cost, 4, 80 * GIB)
    joined = plan_in_parts(req, alone_and_rest(lengths, lambda n: n == max(lengths)))
    won = {kind: Candidate.from_json(c) for kind, c in joined.metadata["part_winners"].items()}
    assert set(won) == {"alone", "rest"}
    hint = WarmStart(Candidate("composite", 3, rule="capped"), won["alone"], won["rest"])
    assert hint.for_part(True) == WarmStart(won["alone"]) and hint.for_part(False) == WarmStart(won["rest"])
    plan = make_plan("epp", dataclasses.replace(req, warm=hint))
    first = plan.metadata["search"][0]
    assert first["family"] == "composite" and first["candidate"] == "3 longest alone + rest"
    chosen = WarmStart.from_plan(dataclasses.replace(joined, metadata={**joined.metadata,
                                                                      "winner": hint.choice.to_json()}))
    assert chosen == hint


@pytest.mark.parametrize("cores,ranks,size", [(96, 8, 8), (16, 8, 7), (4, 0, 3), (4, 2, 0), (2, 0, 0)])
def test_the_automatic_pool_leaves_the_training_ranks_and_the_planner_a_core_each(monkeypatch, cores, ranks, size):
    monkeypatch.setattr(search_pool, "usable_cores", lambda: cores)
    assert search_pool.resolve_pool_size(search_pool.AUTO, ranks) == size
    assert search_pool.resolve_pool_size(5, ranks) == 5


@pytest.mark.parametrize("word,field", [("--epp.deadline_share=-0.5", "epp.deadline_share"),
                                        ("--epp.deadline_s=0", "epp.deadline_s"),
                                        ("--epp.pool_size=-2", "epp.pool_size")])
def test_a_bad_planning_budget_is_refused_naming_the_field(word, field):
    with pytest.raises(ValueError, match=field):
        load_config(None, [word])


def test_runs_and_commands_plan_behind_a_step_and_the_library_plans_on_inputs_alone():
    assert load_config(None, []).epp.deadline_share == 0.1 and load_config(None, []).epp.pool_size == -1
    assert PlannerOptions().deadline_share == 0 and PlannerOptions().pool_size == 0
    assert PlannerOptions.behind_a_step({"pool_size": 0}).deadline_share == 0.1


def test_each_step_is_asked_with_the_last_steps_time_and_starts_from_the_last_plans_winners(cost):
    sampler = BatchSampler(np.array(sample_lengths("github", 400, 65536, seed=5)), seed=0, global_batch_size=24)
    planner = StepPlanner(cost, sampler, "epp", 4, 2, 80 * GIB, (8, 8, 8, 8), PlannerOptions(deadline_share=0.5))
    asks = PlanAsks(0, 3)
    seen = []
    for step, plans in enumerate(asks.planned_by(planner)):
        seen.append(plans)
        assert plans.step == step and len(plans.plans) == 2
        asks.stepped(60.0)
    first, second, third = seen
    assert first.deadline_s is not None  # a share of each replica's best plan: none measured yet
    assert second.deadline_s == pytest.approx(30.0) and third.deadline_s == pytest.approx(30.0)
    hinted = [p.metadata["search"][0] for p in third.plans]
    assert ([(h["family"], h["size"]) for h in hinted]  # the size as this batch can plan it (its own token capacity)
            == [(p.metadata["winner"]["family"], p.metadata["winner"]["size"]) for p in second.plans])
    assert not any(h["screened"] for h in hinted)
