"""The simulator, fed the committed CPU profile of this machine, predicts the single-process executor.

One stage holds the whole ``tiny`` model (embedding, 4 layers, final norm, head and blocked loss),
so the iteration time is the sum of its actions. Each action is timed with the thread's CPU time
and one intra-op thread, as the profile was measured, and the lowest of a few repetitions is kept.
CPU time leaves out time other processes hold the cores but not their cache and memory-bandwidth
contention: on a machine busy with other work the same code runs up to 10-20% slower than when
the profile was measured, which is this bound's main risk.
"""
from __future__ import annotations

import time

import pytest
import torch

from infinipipe.model.config import preset
from infinipipe.plan.cost import ChunkShape, CostModel, load_profile
from infinipipe.plan.ir import Plan
from infinipipe.plan.planners import PlanRequest, make_plan
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.local import build_stages
from infinipipe.runtime.stage_compute import StageCompute
from infinipipe.sim.simulator import simulate

MODEL = "tiny"
PROFILE = "cpu-fp32-tiny"
LENGTHS = [2048, 700, 300, 200, 150, 90, 64, 40]
REPS = 5


def _cost() -> CostModel:
    return CostModel(load_profile(PROFILE), preset(MODEL))


def _plan(cost: CostModel, planner: str, budget_share: float, **options) -> Plan:
    """A one-stage plan whose budget holds ``budget_share`` of the longest sequence's activations."""
    n = cost.model.layers
    full = cost.activation_bytes(ChunkShape((max(LENGTHS),)), n, 0, True, True)
    memory = cost.model_state_bytes(n, True, True) + budget_share * full
    return make_plan(planner, PlanRequest(LENGTHS, cost, 1, memory, options=options))


PLANS = {
    # every sequence cut into 512-token chunks: slices attend to cached K/V of earlier slices
    "split": ("seq1f1b", 3.0, {"chunk_tokens": 512}),
    # whole sequences in two micro-batches, half of the layers recomputed
    "recompute": ("batch-1f1b", 1.0, {}),
}


def measured_action_times(plan: Plan, reps: int = REPS) -> list[float]:
    """Per action, the lowest thread CPU seconds over ``reps`` runs of the plan (after one warm-up)."""
    cfg = preset(MODEL)
    (model,) = build_stages(cfg, [cfg.layers])
    g = torch.Generator().manual_seed(0)
    batch = Batch(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in plan.seq_lengths))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = [float("inf")] * len(plan.stage_actions[0])
        for rep in range(reps + 1):
            model.zero_grad(set_to_none=True)
            compute = StageCompute(model, batch)
            for i, a in enumerate(plan.stage_actions[0]):
                chunk = plan.chunks[a.chunk_id]
                t0 = time.thread_time()
                if a.kind == "F":
                    compute.forward(chunk, None, a.recompute_layers)
                else:
                    compute.backward(chunk)
                if rep:
                    best[i] = min(best[i], time.thread_time() - t0)
        return best
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_one_stage_iteration_time_within_10_percent_of_simulated(name):
    planner, share, options = PLANS[name]
    plan = _plan(_cost(), planner, share, **options)
    assert plan.num_stages == 1
    times = measured_action_times(plan)
    sim = simulate(plan, _cost())
    measured = sum(times)
    assert measured == pytest.approx(sim.iteration_time_s, rel=0.10), (
        f"measured {measured:.4f}s, simulated {sim.iteration_time_s:.4f}s; per action (measured/simulated ms): "
        + ", ".join(f"{iv.kind}{iv.chunk_id} {t * 1e3:.1f}/{(iv.end_s - iv.start_s) * 1e3:.1f}"
                    for t, iv in zip(times, sim.intervals))
    )
    assert sim.busy_s[0] == pytest.approx(sim.iteration_time_s)


def test_plans_exercise_split_sequences_and_recompute():
    """The comparison above covers slices with cached prefixes and partial recompute."""
    cost = _cost()
    planner, share, options = PLANS["split"]
    split = _plan(cost, planner, share, **options)
    assert any(ChunkShape.of(c, split.seq_lengths).prefix > 0 for c in split.chunks)
    planner, share, options = PLANS["recompute"]
    whole = _plan(cost, planner, share, **options)
    assert all(0 < a.recompute_layers < cost.model.layers for a in whole.stage_actions[0])
