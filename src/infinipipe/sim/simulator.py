"""Event-driven simulation of a `Plan` on a `CostModel`: timeline, bubbles and memory.

Each stage runs its actions in plan order; an action starts when the stage is free and its input
has arrived (a forward needs the previous stage's forward of the chunk, a backward the next
stage's backward), transfers paying the link's latency plus bytes over bandwidth. Memory of a
stage is its model states plus what every chunk holds from its forward to the end of its
backward, plus the running action's transient (`ChunkMemory`: the output or incoming gradient,
a layer's backward work, the rematerialised layer of a fully recomputed chunk, the loss's working
memory on the last stage). A stage whose parameters are sharded and gathered once per step (see
`StageLayout`) starts with that all-gather and ends with the gradients' reduce-scatter; every
other intra-stage cost (Ulysses all-to-alls, per-chunk FSDP) is inside an action's duration.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ..contract.cost import CostModel
from ..contract.ir import Plan, play_order, upstream_stage
from ..contract.layout import LinkModel
from ..contract.shapes import ChunkShape
from ..contract.units import format_bytes


@dataclass(frozen=True)
class Interval:
    """One action as it ran: ``recompute_s`` is the leading part of a backward spent recomputing."""

    stage: int
    kind: str
    chunk_id: int
    start_s: float
    end_s: float
    recompute_s: float = 0.0


@dataclass(frozen=True)
class OutOfMemory:
    """Stage ``stage`` first passes its budget at ``time_s``; its worst excess is ``over_bytes``."""

    stage: int
    time_s: float
    over_bytes: float
    peak_bytes: float
    budget: float

    def __str__(self) -> str:
        return (f"stage {self.stage} exceeds its {format_bytes(self.budget)} budget at "
                f"t={self.time_s:.4f}s by up to {format_bytes(self.over_bytes)}")


@dataclass(frozen=True)
class SimResult:
    """``peak_memory_bytes`` is the whole stage (model states, what chunks hold, the running
    action's transient); ``peak_step_bytes`` the same less what exists before a step starts
    (weights and optimizer state: all model states but the gradients), the quantity a step's
    live-byte count measures; ``peak_activation_bytes`` only what chunks keep from forward to
    backward."""

    planner: str
    iteration_time_s: float
    busy_s: tuple[float, ...]
    recompute_s: tuple[float, ...]
    peak_memory_bytes: tuple[float, ...]
    peak_step_bytes: tuple[float, ...]
    peak_activation_bytes: tuple[float, ...]
    memory_budget: float | None
    oom: tuple[OutOfMemory, ...]
    num_chunks: int
    num_pipelines: int
    intervals: tuple[Interval, ...]
    memory_timeline: tuple[tuple[tuple[float, float], ...], ...]

    @property
    def idle_s(self) -> tuple[float, ...]:
        return tuple(self.iteration_time_s - b for b in self.busy_s)

    @property
    def bubble_ratio(self) -> float:
        """Idle share of all stages' time over the iteration."""
        total = self.iteration_time_s * len(self.busy_s)
        return sum(self.idle_s) / total if total > 0 else 0.0

    @property
    def recompute_time_s(self) -> float:
        """Recompute time summed over stages."""
        return sum(self.recompute_s)

    @property
    def feasible(self) -> bool:
        return not self.oom

    def to_json(self) -> dict[str, Any]:
        return {
            "planner": self.planner,
            "iteration_time_s": self.iteration_time_s,
            "bubble_ratio": self.bubble_ratio,
            "recompute_time_s": self.recompute_time_s,
            "feasible": self.feasible,
            "peak_memory_bytes": list(self.peak_memory_bytes),
            "peak_step_bytes": list(self.peak_step_bytes),
            "peak_activation_bytes": list(self.peak_activation_bytes),
            "memory_budget": self.memory_budget,
            "num_chunks": self.num_chunks,
            "num_pipelines": self.num_pipelines,
            "busy_s": list(self.busy_s),
            "idle_s": list(self.idle_s),
            "recompute_per_stage_s": list(self.recompute_s),
            "oom": [{"stage": o.stage, "time_s": o.time_s, "over_bytes": o.over_bytes,
                     "message": str(o)} for o in self.oom],
        }


def simulate(plan: Plan, cost: CostModel, memory_budget: float | None = None,
             link: LinkModel = LinkModel()) -> SimResult:
    """Run ``plan`` on ``cost``; ``memory_budget`` (per device) defaults to the plan's metadata."""
    if sum(plan.layers_per_stage) != cost.model.layers:
        raise ValueError(
            f"plan splits {sum(plan.layers_per_stage)} layers, the cost model's model has {cost.model.layers}"
        )
    budget = memory_budget if memory_budget is not None else plan.metadata.get("memory_budget")
    stages = plan.num_stages
    last = stages - 1
    shapes = [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    wire = [link.transfer_s(cost.boundary_bytes(sh)) for sh in shapes]
    fsdp = [cost.step_fsdp_s(plan.layers_per_stage[s], s == 0, s == last) for s in range(stages)]

    @functools.cache  # stages with the same role and layer count cost a chunk alike
    def duration(n: int, first: bool, is_last: bool, kind: str, cid: int, rec: int) -> tuple[float, float]:
        if kind == "F":
            return cost.forward_ms(shapes[cid], n, first, is_last) / 1e3, 0.0
        r = cost.recompute_ms(shapes[cid], rec) / 1e3
        return r + cost.backward_ms(shapes[cid], n, first, is_last) / 1e3, r

    end: dict[tuple[str, int, int], float] = {}
    free = [gather for gather, _ in fsdp]
    intervals: list[Interval] = []
    for s, a in play_order(plan):
        src = upstream_stage(a.kind, s, stages)
        ready = end[(a.kind, src, a.chunk_id)] + wire[a.chunk_id] if src is not None else 0.0
        start = max(free[s], ready)
        dur, rec = duration(plan.layers_per_stage[s], s == 0, s == last, a.kind, a.chunk_id, a.recompute_layers)
        free[s] = end[(a.kind, s, a.chunk_id)] = start + dur
        intervals.append(Interval(s, a.kind, a.chunk_id, start, start + dur, rec))

    memory = functools.cache(lambda cid, n, first, is_last: cost.chunk_memory(shapes[cid], n, first, is_last))
    by_stage: list[list[Interval]] = [[] for _ in range(stages)]
    for iv in intervals:
        by_stage[iv.stage].append(iv)
    timelines, peaks, step_peaks, act_peaks, ooms = [], [], [], [], []
    for s in range(stages):
        n, first, is_last = plan.layers_per_stage[s], s == 0, s == last
        rec = {a.chunk_id: a.recompute_layers for a in plan.stage_actions[s]}
        states = cost.model_state_bytes(n, first, is_last)
        held = act_peak = 0.0
        timeline = [(0.0, states)]
        for iv in by_stage[s]:
            m, r = memory(iv.chunk_id, n, first, is_last), rec[iv.chunk_id]
            if iv.kind == "F":
                timeline.append((iv.start_s, states + held + m.during_forward(r)))
                held += m.held(r)
            else:
                timeline.append((iv.start_s, states + held - m.held(r) + m.during_backward(r)))
                held -= m.held(r)
            act_peak = max(act_peak, held)
            timeline.append((iv.end_s, states + held))
        peak = max(v for _, v in timeline)
        step_peaks.append(peak - states + cost.grad_bytes(n, first, is_last))
        act_peaks.append(act_peak)
        timelines.append(tuple(timeline))
        peaks.append(peak)
        if budget is not None and peak > budget:
            when = next(t for t, v in timeline if v > budget)
            ooms.append(OutOfMemory(s, when, peak - budget, peak, float(budget)))

    return SimResult(
        planner=str(plan.metadata.get("planner", "")),
        iteration_time_s=max(f + reduce for f, (_, reduce) in zip(free, fsdp)),
        busy_s=tuple(sum(i.end_s - i.start_s for i in intervals if i.stage == s) for s in range(stages)),
        recompute_s=tuple(sum(i.recompute_s for i in intervals if i.stage == s) for s in range(stages)),
        peak_memory_bytes=tuple(peaks),
        peak_step_bytes=tuple(step_peaks),
        peak_activation_bytes=tuple(act_peaks),
        memory_budget=None if budget is None else float(budget),
        oom=tuple(ooms),
        num_chunks=len(plan.chunks),
        num_pipelines=len(plan.pipelines),
        intervals=tuple(intervals),
        memory_timeline=tuple(timelines),
    )
