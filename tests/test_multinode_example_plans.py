"""The 4-node example's layout (pp=4 across nodes, Ulysses sp=8 and FSDP inside each) plans a
batch holding a full 128K-token document within its memory budget, where one GPU per stage is
slower or does not fit at all."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from infinipipe.config import load_config
from infinipipe.contract.cost import CostModel, load_profile
from infinipipe.contract.layout import StageLayout
from infinipipe.contract.model_config import preset
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.runtime.parallel_dims import ParallelDims
from infinipipe.sim.simulator import simulate

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llama13b-4node.toml"


def _request(layout: StageLayout) -> tuple[PlanRequest, float]:
    cfg = load_config(EXAMPLE)
    dims = ParallelDims.from_config(cfg.parallelism, 32)
    cost = CostModel(load_profile("h100-bf16-llama-13b"), preset("llama-13b"), layout=layout)
    lengths = [*sample_lengths("github", 63, cfg.training.seq_len, seed=0), cfg.training.seq_len]
    budget = cfg.epp.memory_budget_bytes
    # Without the run's planning deadline: the comparison is of layouts, not of machine speed.
    options = dataclasses.replace(cfg.epp.planner_options(), deadline_share=0.0)
    return PlanRequest(lengths, cost, dims.pp, budget, options=options), budget


def test_llama13b_4node_example_plans_within_its_budget():
    cfg = load_config(EXAMPLE)
    dims = ParallelDims.from_config(cfg.parallelism, 32)
    assert dims.keeps_groups_in_nodes(8)
    request, budget = _request(cfg.cluster.stage_layout(dims.sp, dims.fsdp))
    plan = make_plan(cfg.epp.planner, request)
    result = simulate(plan, request.cost, budget)
    assert result.feasible and max(result.peak_memory_bytes) <= budget


def test_llama13b_4node_example_layout_beats_one_gpu_per_stage():
    cfg = load_config(EXAMPLE)
    dims = ParallelDims.from_config(cfg.parallelism, 32)
    sharded, budget = _request(cfg.cluster.stage_layout(dims.sp, dims.fsdp))
    alone, _ = _request(StageLayout())
    fast = simulate(make_plan("epp", sharded), sharded.cost, budget)
    assert fast.feasible
    try:
        slow = simulate(make_plan("epp", alone), alone.cost, budget)
    except ValueError as err:
        # One GPU per stage cannot even rematerialise one layer of the 128K document: no plan
        # can, by the memory lower bound.
        assert "any plan needs at least" in str(err)
    else:
        assert fast.iteration_time_s < slow.iteration_time_s
