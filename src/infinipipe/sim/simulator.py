"""Event-driven simulation of a `Plan` on a `CostModel`: timeline, bubbles and memory.

Each stage runs its actions in plan order; an action starts when the stage is free and its input
has arrived (a forward needs the previous stage's forward of the chunk, a backward the next
stage's backward), transfers paying the hop's link latency plus bytes over bandwidth (by default
the links `StageLayout.hop_links` places the stages on). Memory of a
stage is its model states plus what every chunk holds from its forward to the end of its
backward, plus the running action's transient (`ChunkMemory`: the output or incoming gradient,
a layer's backward work, the rematerialised layer of a fully recomputed chunk, the loss's working
memory on the last stage), plus each split sequence's dK/dV over its backwards. A stage whose
parameters are sharded and gathered once per step (see `StageLayout`) starts with that all-gather
and ends with the gradients' reduce-scatter; every other intra-stage cost (Ulysses all-to-alls,
per-chunk FSDP) is inside an action's duration.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..contract.cost import CostModel
from ..contract.ir import Plan, deferred_chunks, gradient_store_spans, play_order
from ..contract.layout import LinkModel
from ..contract.shapes import ChunkShape
from ..contract.units import format_bytes
from . import idle
from .copy_lanes import Copy, CopyLanes
from .host_schedule import optimizer_back_leads
from .idle import IdleBreakdown, IdleSpan
from .interval import Interval


@dataclass(frozen=True)
class OutOfMemory:
    """Stage ``stage`` first passes its budget at ``time_s``; its worst excess is ``over_bytes``."""

    stage: int
    time_s: float
    over_bytes: float
    peak_bytes: float
    budget: float
    tier: str = "device"

    def __str__(self) -> str:
        where = "" if self.tier == "device" else "host "
        return (f"stage {self.stage} exceeds its {where}{format_bytes(self.budget)} budget at "
                f"t={self.time_s:.4f}s by up to {format_bytes(self.over_bytes)}")


@dataclass(frozen=True)
class SimResult:
    """``peak_memory_bytes`` is the whole stage (model states, what chunks hold, the running
    action's transient); ``peak_step_bytes`` the same less what exists before a step starts
    (weights and optimizer state: all model states but the gradients), the quantity a step's
    live-byte count measures; ``peak_activation_bytes`` only what chunks keep from forward to
    backward; ``step_fsdp_s`` each stage's once-per-step all-gather and reduce-scatter (seconds)."""

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
    peak_host_bytes: tuple[float, ...] = ()
    offloaded_bytes: tuple[float, ...] = ()
    exposed_copy_s: tuple[float, ...] = ()
    optimizer_wait_s: tuple[float, ...] = ()
    optimizer_out_wait_s: tuple[float, ...] = ()
    host_memory_budget: float | None = None
    copies: tuple[tuple[int, str, float, float], ...] = ()
    step_fsdp_s: tuple[tuple[float, float], ...] = ()

    @property
    def idle_s(self) -> tuple[float, ...]:
        return tuple(self.iteration_time_s - b for b in self.busy_s)

    @functools.cached_property
    def idle_breakdown(self) -> tuple[IdleBreakdown, ...]:
        """Each stage's idle time by what it waited for (`sim/idle.py`), worked out when first
        asked: planners simulate thousands of plans and read none of it."""
        return idle.idle_breakdown(self.idle_spans(), len(self.busy_s))

    def idle_spans(self) -> list[IdleSpan]:
        """Every stretch of idle time with its category, per stage in time order."""
        return idle.idle_spans(self.intervals, len(self.busy_s), self.step_fsdp_s, self.optimizer_wait_s,
                               self.iteration_time_s)

    @property
    def bubble_ratio(self) -> float:
        """Idle share of all stages' time over the iteration."""
        total = self.iteration_time_s * len(self.busy_s)
        return sum(self.idle_s) / total if total > 0 else 0.0

    @property
    def imbalance_s(self) -> tuple[float, ...]:
        """Per stage, idle that no order of these actions removes: how much longer the busiest
        stage is busy (more layers, the embedding or the LM head, more recompute)."""
        most = max(self.busy_s, default=0.0)
        return tuple(most - b for b in self.busy_s)

    @property
    def schedule_bubble_ratio(self) -> float:
        """The bubble less the stages' imbalance, which is the busiest stage's idle share: its fill,
        drain and waits, what the order of the same actions decides."""
        if not self.busy_s or self.iteration_time_s <= 0:
            return 0.0
        return max(0.0, 1.0 - max(self.busy_s) / self.iteration_time_s)

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
            "schedule_bubble_ratio": self.schedule_bubble_ratio,
            "imbalance_s": list(self.imbalance_s),
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
            "idle_breakdown": [b.to_json() for b in self.idle_breakdown],
            "idle_totals": IdleBreakdown.summed(self.idle_breakdown).to_json(),
            "recompute_per_stage_s": list(self.recompute_s),
            "peak_host_bytes": list(self.peak_host_bytes),
            "offloaded_bytes": list(self.offloaded_bytes),
            "exposed_copy_s": list(self.exposed_copy_s),
            "optimizer_wait_s": list(self.optimizer_wait_s),
            "optimizer_out_wait_s": list(self.optimizer_out_wait_s),
            "host_memory_budget": self.host_memory_budget,
            "oom": [{"stage": o.stage, "time_s": o.time_s, "over_bytes": o.over_bytes, "tier": o.tier,
                     "message": str(o)} for o in self.oom],
        }


def simulate(plan: Plan, cost: CostModel, memory_budget: float | None = None,
             link: LinkModel | None = None, host_memory_budget: float | None = None) -> SimResult:
    """Run ``plan`` on ``cost``; ``memory_budget`` (per device) defaults to the plan's metadata;
    ``link`` (every hop's) to the cost model's layout's hop links. Offloaded layers and an
    optimizer state kept on the host (``metadata.offload_optimizer``) copy over the profile's
    `HostLink`; host memory is checked against ``host_memory_budget`` (default: the plan's
    ``metadata.host_memory_budget``)."""
    budget = memory_budget if memory_budget is not None else plan.metadata.get("memory_budget")
    host_budget = (host_memory_budget if host_memory_budget is not None
                   else plan.metadata.get("host_memory_budget", cost.host_budget or None))
    cost = plan_cost(plan, cost)
    run = _play(plan, cost, link, record=True)
    stages, shapes, intervals = plan.num_stages, run.shapes, run.intervals
    last = stages - 1

    by_stage: list[list[Interval]] = [[] for _ in range(stages)]
    for iv in intervals:
        by_stage[iv.stage].append(iv)
    roles: dict[tuple[int, bool, bool], np.ndarray] = {}
    timelines, peaks, step_peaks, act_peaks, ooms, host_peaks = [], [], [], [], [], []
    for s in range(stages):
        n, first, is_last = plan.layers_per_stage[s], s == 0, s == last
        if (n, first, is_last) not in roles:  # per chunk: the terms of `ChunkMemory.row`
            roles[(n, first, is_last)] = np.array([cost.chunk_memory(sh, n, first, is_last).row()
                                                   for sh in shapes]).reshape(len(shapes), 9)
        terms = roles[(n, first, is_last)]
        ivs = by_stage[s]
        rec = {a.chunk_id: (a.recompute_layers, a.elementwise_layers) for a in plan.stage_actions[s] if a.kind != "W"}
        cid = np.array([iv.chunk_id for iv in ivs], dtype=np.int64)
        fwd = np.array([iv.kind == "F" for iv in ivs], dtype=bool)
        wgt = np.array([iv.kind == "W" for iv in ivs], dtype=bool)
        r, e = np.array([rec[c] for c in cid.tolist()], dtype=float).reshape(len(ivs), 2).T
        base, slope, fwd_work, fwd_extra, bwd_work, bwd_extra, e_slope, fwd_e_extra, bwd_e_extra = terms[cid].T
        held_r = base - r * slope - e * e_slope
        # A backward that leaves its weight gradients to a W keeps what they need until the W.
        stash_of, fresh_of = deferred_bytes(plan, s, cost, shapes)
        stash = stash_of[cid]
        delta = np.where(fwd, held_r, np.where(wgt, -stash, stash - held_r))
        grads_during, grads_after = gradient_store_bytes(plan, s, cost, shapes)
        after = np.cumsum(delta) + grads_after
        # While it runs, a forward's chunk holds its activations already and a backward's still.
        extra = np.where(wgt, 0.0, np.where(r == n, np.where(fwd, fwd_extra, bwd_extra),
                                            np.where((e > 0) & (r + e == n), np.where(fwd, fwd_e_extra, bwd_e_extra),
                                                     0.0)))
        # A deferring backward's stash grows layer by layer while each layer frees what it held:
        # in its last layer, the others' share of both, and that layer's new output gradients.
        growth = np.where(~fwd & ~wgt & (stash > 0), np.maximum((n - 1) / n * (stash - held_r), 0.0) + fresh_of[cid],
                          0.0)
        during = (np.where(fwd, after, after - delta) - grads_after + grads_during
                  + np.where(fwd, fwd_work, np.where(wgt, 0.0, bwd_work)) + extra + growth)
        states = cost.model_state_bytes(n, first, is_last)
        times = np.empty(2 * len(ivs) + 1)
        levels = np.empty(2 * len(ivs) + 1)
        times[0], levels[0] = 0.0, states
        times[1::2] = [iv.start_s for iv in ivs]
        times[2::2] = [iv.end_s for iv in ivs]
        levels[1::2] = states + during
        levels[2::2] = states + after
        times, levels = _with_copies(times, levels, run.device_events[s])
        peak = float(levels.max())
        step_peaks.append(peak - cost.all_model_state_bytes(n, first, is_last) + cost.grad_bytes(n, first, is_last))
        act_peaks.append(float(max(after.max(initial=0.0), 0.0)))
        timelines.append(tuple(zip(times.tolist(), levels.tolist())))
        peaks.append(peak)
        if budget is not None and peak > budget:
            when = float(times[np.argmax(levels > budget)])
            ooms.append(OutOfMemory(s, when, peak - budget, peak, float(budget)))
        host_time, host_level = _host_levels(run.host_events[s])
        host_peaks.append(float(host_level.max(initial=0.0)))
        if host_budget is not None and host_peaks[-1] > host_budget:
            when = float(host_time[np.argmax(host_level > host_budget)])
            ooms.append(OutOfMemory(s, when, host_peaks[-1] - host_budget, host_peaks[-1], float(host_budget), "host"))

    return SimResult(
        planner=str(plan.metadata.get("planner", "")),
        iteration_time_s=run.iteration_time_s,
        busy_s=tuple(run.busy_s),
        recompute_s=tuple(run.recompute_s),
        peak_memory_bytes=tuple(peaks),
        peak_step_bytes=tuple(step_peaks),
        peak_activation_bytes=tuple(act_peaks),
        memory_budget=None if budget is None else float(budget),
        oom=tuple(ooms),
        num_chunks=len(plan.chunks),
        num_pipelines=len(plan.pipelines),
        intervals=tuple(intervals),
        memory_timeline=tuple(timelines),
        peak_host_bytes=tuple(host_peaks),
        offloaded_bytes=tuple(run.offloaded_bytes),
        exposed_copy_s=tuple(run.exposed_copy_s),
        optimizer_wait_s=tuple(run.optimizer_wait_s),
        optimizer_out_wait_s=tuple(run.optimizer_out_wait_s),
        host_memory_budget=None if host_budget is None else float(host_budget),
        copies=tuple(run.copies),
        step_fsdp_s=tuple(run.step_fsdp_s),
    )


def plan_cost(plan: Plan, cost: CostModel) -> CostModel:
    """``cost`` as the plan runs: with its optimizer state on the host where the plan says so (a
    plan being planned says nothing and runs on its planner's cost model)."""
    on_host = plan.metadata.get("offload_optimizer")
    if on_host is None or cost.optimizer_on_host == bool(on_host):
        return cost
    return dataclasses.replace(cost, optimizer_on_host=bool(on_host))


def _with_copies(times: np.ndarray, levels: np.ndarray, events: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """A stage's device timeline (levels from each time on) with the copies' changes added: each
    (time, bytes) changes the level from that time on, so a point is added where one lands."""
    if not events:
        return times, levels
    at, delta = np.array(events).reshape(-1, 2).T
    all_times = np.concatenate([times, at])
    order = np.argsort(all_times, kind="stable")
    all_times = all_times[order]
    base = levels[np.searchsorted(times, all_times, side="right") - 1]
    by_time = np.argsort(at, kind="stable")
    shift = np.concatenate([[0.0], np.cumsum(delta[by_time])])[np.searchsorted(at[by_time], all_times, side="right")]
    return all_times, base + shift


def _host_levels(events: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Host bytes after each change (time, bytes) of one stage."""
    if not events:
        return np.zeros(0), np.zeros(0)
    at, delta = np.array(events).reshape(-1, 2).T
    order = np.argsort(at, kind="stable")
    return at[order], np.cumsum(delta[order])


def gradient_store_bytes(plan: Plan, stage: int, cost: CostModel,
                         shapes: list[ChunkShape] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of split sequences' dK/dV alive on ``stage`` during and after each of its actions
    (in plan order): each is allocated by the backward of its sequence's last slice and dropped
    after the backward of its first slice."""
    actions = plan.stage_actions[stage]
    during = np.zeros(len(actions))
    after = np.zeros(len(actions))
    spans = gradient_store_spans(plan.chunks, plan.seq_lengths)
    if not spans:
        return during, after
    shapes = shapes if shapes is not None else [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    at = {a.chunk_id: i for i, a in enumerate(actions) if a.kind == "B"}
    n = plan.layers_per_stage[stage]
    for first, last in spans:
        size = cost.dkv_bytes(shapes[first], n)
        during[at[last]:at[first] + 1] += size
        after[at[last]:at[first]] += size
    return during, after


def deferred_bytes(plan: Plan, stage: int, cost: CostModel,
                    shapes: list[ChunkShape]) -> tuple[np.ndarray, np.ndarray]:
    """Per chunk, what its backward on ``stage`` keeps for a W action, and of that the output
    gradients one layer allocates anew (zero for a chunk whose backward keeps its weight gradients)."""
    stash, fresh = np.zeros(len(shapes)), np.zeros(len(shapes))
    n = plan.layers_per_stage[stage]
    for c in deferred_chunks(plan.stage_actions[stage]):
        stash[c] = cost.deferred_weight_bytes(shapes[c], n)
        fresh[c] = cost.deferred_weight_bytes(shapes[c], 1, grads_only=True)
    return stash, fresh


def deferred_weight_store(plan: Plan, stage: int, cost: CostModel,
                          shapes: list[ChunkShape] | None = None) -> np.ndarray:
    """Bytes that backwards which left their weight gradients to a W action keep on ``stage``
    during each of its actions (in plan order): from the action after the backward to the W."""
    actions = plan.stage_actions[stage]
    held = np.zeros(len(actions))
    if not any(a.kind == "W" for a in actions):
        return held
    shapes = shapes if shapes is not None else [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    n = plan.layers_per_stage[stage]
    b_at: dict[int, int] = {}
    for i, a in enumerate(actions):
        if a.kind == "B":
            b_at[a.chunk_id] = i
        elif a.kind == "W":
            held[b_at[a.chunk_id] + 1:i + 1] += cost.deferred_weight_bytes(shapes[a.chunk_id], n)
    return held


def iteration_time(plan: Plan, cost: CostModel, link: LinkModel | None = None) -> float:
    """`simulate`'s iteration time alone: what a planner's bound needs, without the memory
    section or the per-action record."""
    return _play(plan, plan_cost(plan, cost), link, record=False).iteration_time_s


@dataclass
class _Run:
    """What the timing pass yields: chunk shapes, each stage's busy and recompute time, the
    iteration; with a host tier each stage's copies as changes of device and host bytes
    (time, bytes), the bytes it copied out and the time it waited for copies; each stage's
    once-per-step all-gather and reduce-scatter."""

    shapes: list[ChunkShape]
    busy_s: list[float]
    recompute_s: list[float]
    iteration_time_s: float
    intervals: list[Interval]
    device_events: list[list[tuple[float, float]]]
    host_events: list[list[tuple[float, float]]]
    offloaded_bytes: list[float]
    exposed_copy_s: list[float]
    optimizer_wait_s: list[float]
    optimizer_out_wait_s: list[float]
    copies: list[tuple[int, str, float, float]]
    step_fsdp_s: list[tuple[float, float]]


class _HostTier:
    """The copies of one plan's stages: activations offloaded after forwards and copied back
    ahead of backwards (`Action.offload_layers`, `Action.reload_lead`), and the optimizer state
    copied out at the step's start and back from the start of the action
    ``metadata.optimizer_reload_lead`` places before the stage's end (`optimizer_back_leads`
    where the plan does not say); a stage ``metadata.optimizer_out_wait`` marks starts its first
    action once the copy out has ended."""

    def __init__(self, plan: Plan, cost: CostModel, shapes: list[ChunkShape]):
        link = cost.host_link
        stages, last = plan.num_stages, plan.num_stages - 1
        self.lanes = [CopyLanes(link) for _ in range(stages)] if link is not None else []
        self.moved: list[dict[int, float]] = []
        self.reload_at: list[dict[int, list[int]]] = []
        self.out: list[dict[int, Copy]] = [{} for _ in range(stages)]
        self.back: list[dict[int, Copy]] = [{} for _ in range(stages)]
        opt = [cost.optimizer_host_bytes(n, s == 0, s == last) if cost.optimizer_on_host else 0.0
               for s, n in enumerate(plan.layers_per_stage)]
        leads = plan.metadata.get("optimizer_reload_lead") or (
            optimizer_back_leads(plan, cost, shapes) if any(opt) and link is not None else [None] * stages)
        # A stage whose step is too short for the round trip (lead None) keeps its state on the device.
        self.optimizer = [0.0 if lead is None else nbytes for nbytes, lead in zip(opt, leads)]
        self.kept = [nbytes if lead is None else 0.0 for nbytes, lead in zip(opt, leads)]
        self.optimizer_back_at = [len(actions) - (lead or 0) for actions, lead in zip(plan.stage_actions, leads)]
        self.out_wait = plan.metadata.get("optimizer_out_wait") or [False] * stages
        self.optimizer_out: list[Copy | None] = [None] * stages
        self.optimizer_in: list[Copy | None] = [None] * stages
        self.exposed = [0.0] * stages
        self.optimizer_wait = [0.0] * stages
        self.optimizer_out_wait = [0.0] * stages
        for s, actions in enumerate(plan.stage_actions):
            n = plan.layers_per_stage[s]
            moved = {a.chunk_id: cost.offloaded_bytes(shapes[a.chunk_id], n, a.recompute_layers, a.elementwise_layers,
                                                      a.offload_layers, s == 0)
                     for a in actions if a.kind == "B" and a.offload_layers}
            at: dict[int, list[int]] = {}
            for i, a in enumerate(actions):
                if a.kind == "B" and a.offload_layers:
                    at.setdefault(i - a.reload_lead, []).append(a.chunk_id)
            self.moved.append(moved)
            self.reload_at.append(at)
        if link is None and (any(self.moved) or any(opt)):
            raise ValueError("the plan offloads to the host but the profile has no host_link (`HostLink`)")
        for s, nbytes in enumerate(self.optimizer):
            if nbytes:
                self.optimizer_out[s] = self.lanes[s].add("d2h", 0.0, nbytes)

    def before(self, stage: int, index: int, kind: str, cid: int, start: float) -> float:
        """Release the copies back that start with this action; return when it can start."""
        out = self.optimizer_out[stage]
        if index == 0 and self.out_wait[stage] and out is not None:
            self.lanes[stage].finish(out)
            if out.done_s > start:
                self.exposed[stage] += out.done_s - start
                self.optimizer_out_wait[stage] = out.done_s - start
                start = out.done_s
        for c in self.reload_at[stage].get(index, ()):
            self.back[stage][c] = self.lanes[stage].add("h2d", start, self.moved[stage][c], self.out[stage][c])
        if index == self.optimizer_back_at[stage] and self.optimizer[stage]:
            self.optimizer_in[stage] = self.lanes[stage].add("h2d", start, self.optimizer[stage],
                                                             self.optimizer_out[stage])
        if kind == "B" and cid in self.moved[stage]:
            back = self.back[stage][cid]
            self.lanes[stage].finish(back)
            if back.done_s > start:
                self.exposed[stage] += back.done_s - start
                return back.done_s
        return start

    def after(self, stage: int, kind: str, cid: int, stop: float) -> None:
        if kind == "F" and cid in self.moved[stage]:
            self.out[stage][cid] = self.lanes[stage].add("d2h", stop, self.moved[stage][cid])

    def end(self, stage: int, stop: float) -> float:
        """When the stage's step ends: after its last action and its optimizer state's copy back
        (released here where it starts after the last action)."""
        if not self.lanes:
            return stop
        if self.optimizer[stage] and self.optimizer_in[stage] is None:
            self.optimizer_in[stage] = self.lanes[stage].add("h2d", stop, self.optimizer[stage],
                                                             self.optimizer_out[stage])
        self.lanes[stage].finish()
        back = self.optimizer_in[stage]
        if back is not None and back.done_s > stop:
            self.exposed[stage] += back.done_s - stop
            self.optimizer_wait[stage] = back.done_s - stop
            return back.done_s
        return stop

    def events(self, stage: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]], float,
                                          list[tuple[int, str, float, float]]]:
        """Device and host byte changes, bytes copied out, and the copies as drawn."""
        device, host, copies = [], [], []
        for c, nbytes in self.moved[stage].items():
            out, back = self.out[stage][c], self.back[stage][c]
            device += [(out.done_s, -nbytes), (back.release_s, nbytes)]
            host += [(out.release_s, nbytes), (back.done_s, -nbytes)]
            copies += [(stage, "d2h", out.start_s, out.done_s), (stage, "h2d", back.start_s, back.done_s)]
        if self.kept[stage]:
            device.append((0.0, self.kept[stage]))
        if self.optimizer[stage]:
            out, back = self.optimizer_out[stage], self.optimizer_in[stage]
            device += [(0.0, self.optimizer[stage]), (out.done_s, -self.optimizer[stage])]
            host.append((0.0, self.optimizer[stage]))
            copies.append((stage, "d2h", out.start_s, out.done_s))
            if back is not None:
                device.append((back.release_s, self.optimizer[stage]))
                copies.append((stage, "h2d", back.start_s, back.done_s))
        return device, host, sum(self.moved[stage].values()), copies


def _play(plan: Plan, cost: CostModel, link: LinkModel | None, record: bool) -> _Run:
    """Time every action, visiting them in `play_order`'s order without building it: sweep the
    stages, each running on until an action's input has not been produced yet."""
    if sum(plan.layers_per_stage) != cost.model.layers:
        raise ValueError(
            f"plan splits {sum(plan.layers_per_stage)} layers, the cost model's model has {cost.model.layers}"
        )
    stages, n = plan.num_stages, len(plan.chunks)
    last = stages - 1
    shapes = [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    fsdp = [cost.step_fsdp_s(plan.layers_per_stage[s], s == 0, s == last) for s in range(stages)]
    hops = cost.layout.hop_links(stages) if link is None else (link,) * (stages - 1)
    sent = [cost.boundary_bytes(sh) for sh in shapes]
    by_link = {h: [h.transfer_s(b) for b in sent] for h in set(hops)}
    wire = [by_link[h] for h in hops]  # wire[hop][cid]: the hop between stages hop and hop + 1
    tier = _HostTier(plan, cost, shapes)
    copying = bool(tier.lanes) and (any(tier.moved) or any(tier.optimizer) or any(tier.kept))

    @functools.cache  # stages with the same role and layer count cost a chunk alike
    def duration(n_layers: int, first: bool, is_last: bool, kind: str, cid: int, rec: int,
                 elem: int, deferred: bool) -> tuple[float, float]:
        ms = cost.action_ms(kind, shapes[cid], n_layers, first, is_last, deferred) / 1e3
        if kind != "B":
            return ms, 0.0
        r = cost.recompute_ms(shapes[cid], rec, elem) / 1e3
        return r + ms, r

    deferred = [deferred_chunks(actions) for actions in plan.stage_actions]

    # end[s][kind][cid]: when stage s finished that action (nan: not yet run).
    end = [{"F": [math.nan] * n, "B": [math.nan] * n, "W": [math.nan] * n} for _ in range(stages)]
    free = [gather for gather, _ in fsdp]
    busy, recompute = [0.0] * stages, [0.0] * stages
    intervals: list[Interval] = []
    ptr, placed = [0] * stages, 0
    progressed = True
    while progressed:
        progressed = False
        for s, actions in enumerate(plan.stage_actions):
            n_layers, first, is_last = plan.layers_per_stage[s], s == 0, s == last
            mine = end[s]
            i = ptr[s]
            while i < len(actions):
                a = actions[i]
                kind, cid = a.kind, a.chunk_id
                src = s - 1 if kind == "F" else (s + 1 if kind == "B" else -1)
                if 0 <= src < stages:
                    done = end[src][kind][cid]
                    if done != done:  # nan: the input is not there yet
                        break
                    ready = done + wire[min(s, src)][cid]
                else:
                    ready = 0.0
                start = max(free[s], ready)
                if copying:
                    start = tier.before(s, i, kind, cid, start)
                dur, rec = duration(n_layers, first, is_last, kind, cid, a.recompute_layers, a.elementwise_layers,
                                    kind == "B" and cid in deferred[s])
                free[s] = mine[kind][cid] = stop = start + dur
                busy[s] += stop - start
                recompute[s] += rec
                if copying:
                    tier.after(s, kind, cid, stop)
                if record:
                    intervals.append(Interval(s, kind, cid, start, stop, rec, ready))
                i += 1
            if i != ptr[s]:
                placed += i - ptr[s]
                ptr[s] = i
                progressed = True
    if placed != sum(len(a) for a in plan.stage_actions):
        play_order(plan)  # raises its deadlock error naming where the stages wait
    ends = [tier.end(s, f + reduce) if copying else f + reduce for s, (f, (_, reduce)) in enumerate(zip(free, fsdp))]
    device, host, moved, copies = [], [], [], []
    for s in range(stages):
        d, h, m, c = tier.events(s) if copying else ([], [], 0.0, [])
        device.append(d)
        host.append(h)
        moved.append(m)
        copies += c
    return _Run(shapes, busy, recompute, max(ends), intervals, device, host, moved, list(tier.exposed),
                list(tier.optimizer_wait), list(tier.optimizer_out_wait), copies, fsdp)
