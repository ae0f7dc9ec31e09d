"""MEASURED single-process executor vs the SIMULATOR on this machine's CPU profile (one stage).

One stage holds the whole ``tiny`` model (embedding, 4 layers, final norm, head and blocked loss),
so the simulated iteration time is the sum of the cost model's per-action times. Each action is
timed with the thread's CPU time and one intra-op thread, as the profile was measured, keeping the
lowest of a few repetitions. Plans: every sequence cut into 512-token slices (slices attend to
cached K/V), and whole sequences with half of the layers recomputed. The target is agreement
within 10%; on a shared machine the same code runs several percent slower or faster from one
minute to the next, which is why this is a benchmark and not a unit test.

Usage: ``python benchmarks/sim_vs_executor.py [--reps 5] [--profile cpu-fp32-tiny]``.
"""
from __future__ import annotations

import argparse
import time

import torch

from infinipipe.contract.cost import CostModel, load_profile
from infinipipe.contract.ir import Plan
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.local import build_stages
from infinipipe.runtime.stage_compute import StageCompute
from infinipipe.sim.simulator import simulate

MODEL = "tiny"
LENGTHS = [2048, 700, 300, 200, 150, 90, 64, 40]
PLANS = {
    "split": ("seq1f1b", 3.0, {"chunk_tokens": 512}),
    "recompute": ("batch-1f1b", 1.0, {}),
}


def one_stage_plan(cost: CostModel, planner: str, budget_share: float, **options) -> Plan:
    """A one-stage plan whose budget holds ``budget_share`` of the longest sequence's activations."""
    n = cost.model.layers
    full = cost.activation_bytes(ChunkShape((max(LENGTHS),)), n, 0, True, True)
    memory = cost.model_state_bytes(n, True, True) + budget_share * full
    return make_plan(planner, PlanRequest(LENGTHS, cost, 1, memory, options=PlannerOptions(**options)))


def measured_action_times(plan: Plan, reps: int) -> list[float]:
    """Per action, the lowest thread CPU seconds over ``reps`` runs of the plan (after one warm-up)."""
    cfg = preset(MODEL)
    (model,) = build_stages(cfg, [cfg.layers])
    g = torch.Generator().manual_seed(0)
    batch = Batch(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in plan.seq_lengths))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", default="cpu-fp32-tiny")
    parser.add_argument("--actions", action="store_true", help="also print every action")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cost = CostModel(load_profile(args.profile), preset(MODEL))
    print(f"MEASURED (thread CPU time, 1 thread, best of {args.reps}) vs SIMULATED (profile {args.profile})")
    print(f"{'plan':<10} {'actions':>7} {'measured s':>10} {'simulated s':>11} {'meas/sim':>8}")
    for name, (planner, share, options) in PLANS.items():
        plan = one_stage_plan(cost, planner, share, **options)
        times = measured_action_times(plan, args.reps)
        sim = simulate(plan, cost)
        print(f"{name:<10} {len(times):>7} {sum(times):>10.4f} {sim.iteration_time_s:>11.4f} "
              f"{sum(times) / sim.iteration_time_s:>8.3f}")
        if args.actions:
            for t, iv in zip(times, sim.intervals):
                shape = ChunkShape.of(plan.chunks[iv.chunk_id], plan.seq_lengths)
                print(f"    {iv.kind}{iv.chunk_id:<3} segments {shape.seg_lens} prefix {shape.prefix}: "
                      f"{t * 1e3:.1f} ms measured, {(iv.end_s - iv.start_s) * 1e3:.1f} ms simulated")


if __name__ == "__main__":
    main()
