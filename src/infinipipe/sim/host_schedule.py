"""When host copies may start, from a plan's actions timed back to back on the cost model.

Recompute and idle time only lengthen the time between two of a stage's actions, so timing
them back to back at their recompute-free durations gives the least time a copy started at one
action has before another: copies planned on it are never late for that reason.
"""
from __future__ import annotations

import numpy as np

from ..contract.cost import CostModel
from ..contract.ir import Plan, deferred_chunks
from ..contract.shapes import ChunkShape


def action_starts(plan: Plan, cost: CostModel, stage: int, shapes: list[ChunkShape],
                  memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each action's start and end on ``stage`` (seconds) with actions back to back, recompute-free;
    ``memo`` keeps each chunk shape's durations across calls (planners ask for many plans)."""
    n, last = plan.layers_per_stage[stage], plan.num_stages - 1
    first, is_last = stage == 0, stage == last
    memo = {} if memo is None else memo
    dur = np.empty(len(plan.stage_actions[stage]))
    deferred = deferred_chunks(plan.stage_actions[stage])
    for i, a in enumerate(plan.stage_actions[stage]):
        later = a.kind == "B" and a.chunk_id in deferred
        key = ("back_to_back", a.kind, shapes[a.chunk_id], n, first, is_last, later)
        if key not in memo:
            memo[key] = cost.action_ms(a.kind, shapes[a.chunk_id], n, first, is_last, later) / 1e3
        dur[i] = memo[key]
    end = np.cumsum(dur)
    return end - dur, end


def optimizer_back_lead(cost: CostModel, stage: int, layers: int, last_stage: int, start: np.ndarray,
                        end: np.ndarray) -> int | None:
    """How many actions before a stage's end the optimizer state's copy back starts, so that it
    ends with the stage's last backward; None where that is before its copy out at the step's
    start ends (the step is too short for the round trip: the state stays on the device)."""
    link = cost.host_link
    nbytes = cost.optimizer_host_bytes(layers, stage == 0, stage == last_stage)
    at = int(np.searchsorted(start, end[-1] - link.latency_s - nbytes / link.h2d_Bps, side="right")) - 1
    lead = min(max(len(start) - max(at, 0), 1), len(start))
    return None if start[len(start) - lead] < optimizer_out_s(cost, stage, layers, last_stage) else lead


def optimizer_out_s(cost: CostModel, stage: int, layers: int, last_stage: int) -> float:
    """How long the optimizer state's copy out at a step's start takes: it is the step's first copy
    out, and no copy back runs before a backward does, so at the direction's own bandwidth."""
    link = cost.host_link
    return link.latency_s + cost.optimizer_host_bytes(layers, stage == 0, stage == last_stage) / link.d2h_Bps


def optimizer_back_leads(plan: Plan, cost: CostModel, shapes: list[ChunkShape] | None = None,
                         memo: dict | None = None) -> list[int | None]:
    """`optimizer_back_lead` of every stage of ``plan``."""
    shapes = shapes if shapes is not None else [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    memo = {} if memo is None else memo
    return [optimizer_back_lead(cost, s, n, plan.num_stages - 1, *action_starts(plan, cost, s, shapes, memo))
            for s, n in enumerate(plan.layers_per_stage)]
