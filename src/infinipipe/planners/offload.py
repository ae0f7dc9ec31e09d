"""Which chunks' saved tensors wait for their backward on the host, and when they move.

Offloading costs no compute, only link time, and more offload never holds more device memory
(a layer's bytes leave the device whatever its checkpointing mode), so per stage and chunk the
planner offloads the layers that save the most device memory over time that the link can carry
without delaying any action, before the checkpointing ILP decides recompute for what is left.
Copies are timed conservatively: each direction at the bandwidth it keeps while the other runs,
one copy at a time per direction, and actions back to back at their recompute-free durations
(recompute and idle time only lengthen the time between two actions). An offload starts when
its chunk's forward ends; the chunk's bytes count on the device up to the action in which the
copy may still run. The copy back starts with the action whose start leaves it enough time
before the backward (`Action.reload_lead`), copies back in backward order, so a chunk counts
on the device from that action on. In between (`Offload.between`) the device holds none of the
offloaded layers' bytes; the host holds them from the end of the forward to the start of the
backward, within its budget (less the optimizer state where that waits on the host too).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract.cost import CostModel
from ..contract.host import HostLink
from ..contract.ir import Plan
from ..contract.shapes import ChunkShape


@dataclass(frozen=True)
class StageOffload:
    """One stage's offload, per chunk id: layers offloaded, the first and last action index at
    which none of their bytes are on the device (``lo > hi``: none offloaded), and the reload's
    lead (actions before the backward at whose start the copy back begins)."""

    layers: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    lead: np.ndarray

    def between(self, action_index: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """Whether each (window at ``action_index``, ``chunk`` in it) pair has the chunk's
        offloaded layers on the host."""
        return (self.layers[chunk] > 0) & (self.lo[chunk] <= action_index) & (action_index <= self.hi[chunk])


@dataclass(frozen=True)
class Offload:
    """A plan's offload on every stage; where the optimizer state waits on the host, how long its
    copy out takes at the step's start (the device holds it until then) and how many actions
    before the stage's end its copy back starts (so the optimizer step need not wait for it)."""

    stages: tuple[StageOffload, ...]
    optimizer_out_s: tuple[float, ...]
    optimizer_back_lead: tuple[int, ...]

    @property
    def any(self) -> bool:
        return any(s.layers.any() for s in self.stages)

    def key(self) -> tuple:
        return (tuple((s.layers.tobytes(), s.lo.tobytes(), s.hi.tobytes()) for s in self.stages)
                + self.optimizer_out_s + self.optimizer_back_lead)


def host_tier(cost: CostModel) -> HostLink | None:
    """The link offload plans on, or None where the cost model has no host tier."""
    return cost.host_link if cost.host_budget > 0 and cost.host_link is not None else None


def action_starts(plan: Plan, cost: CostModel, stage: int, shapes: list[ChunkShape]) -> tuple[np.ndarray, np.ndarray]:
    """Each action's start and end on ``stage`` (seconds) with actions back to back, recompute-free."""
    n, last = plan.layers_per_stage[stage], plan.num_stages - 1
    first, is_last = stage == 0, stage == last
    dur = np.array([(cost.forward_ms if a.kind == "F" else cost.backward_ms)(shapes[a.chunk_id], n, first, is_last)
                    for a in plan.stage_actions[stage]]) / 1e3
    end = np.cumsum(dur)
    return end - dur, end


def plan_offload(plan: Plan, cost: CostModel, shapes: list[ChunkShape] | None = None,
                 binding: list[np.ndarray] | None = None) -> Offload | None:
    """Each stage's offload for ``plan`` on ``cost``'s host tier (None without one). ``binding``
    marks, per stage and action, the windows that exceed the budget without recompute: only
    bytes off the device there save anything, so only those count (every window, without it)."""
    link = host_tier(cost)
    if link is None:
        return None
    shapes = shapes if shapes is not None else [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    act = np.array([cost.layer_act_bytes(sh) for sh in shapes])
    stages, outs, backs = [], [], []
    last = plan.num_stages - 1
    for s in range(plan.num_stages):
        n, first, is_last = plan.layers_per_stage[s], s == 0, s == last
        host = cost.host_budget
        optimizer_out, back = 0.0, 0
        times = action_starts(plan, cost, s, shapes)
        if cost.optimizer_on_host:
            opt = cost.optimizer_host_bytes(n, first, is_last)
            host -= opt
            optimizer_out = link.latency_s + opt / link.d2h_Bps
            # The copy back runs beside the last backwards' copies back: at the concurrent rate.
            back = len(times[0]) - int(np.searchsorted(times[0], times[1][-1] - link.latency_s
                                                       - opt / link.h2d_concurrent_Bps, side="right")) + 1
        weight = np.ones(len(plan.stage_actions[s])) if binding is None else binding[s].astype(float)
        # Each copy holds its direction of the link for its whole size: a few chunks offloading
        # every layer can crowd out many offloading some, so the most layers any chunk offloads
        # is searched, keeping the cap that takes the most bytes off the binding windows.
        best = max((_stage_offload(plan, s, cap, act, *times, link, max(host, 0.0), optimizer_out, weight)
                    for cap in range(1, n + 1)), key=lambda o: o[1])
        stages.append(best[0])
        outs.append(optimizer_out)
        backs.append(min(max(back, 1), len(times[0])))
    return Offload(tuple(stages), tuple(outs), tuple(backs))


def _stage_offload(plan: Plan, stage: int, cap: int, act: np.ndarray, start: np.ndarray, end: np.ndarray,
                   link: HostLink, host_budget: float, queue_free: float,
                   weight: np.ndarray) -> tuple[StageOffload, float]:
    """One stage's offload with at most ``cap`` layers a chunk, and the bytes it takes off the
    binding windows (summed over them)."""
    actions = plan.stage_actions[stage]
    chunks = len(plan.chunks)
    f_at = np.zeros(chunks, dtype=np.int64)
    b_at = np.zeros(chunks, dtype=np.int64)
    for i, a in enumerate(actions):
        (f_at if a.kind == "F" else b_at)[a.chunk_id] = i
    covered = np.concatenate([[0.0], np.cumsum(weight)])  # binding windows before each action index
    layers = np.zeros(chunks, dtype=np.int64)
    lo = np.ones(chunks, dtype=np.int64)
    hi = np.zeros(chunks, dtype=np.int64)
    lead = np.zeros(chunks, dtype=np.int64)
    out_rate, in_rate, lat = link.d2h_concurrent_Bps, link.h2d_concurrent_Bps, link.latency_s
    counts = np.arange(cap, 0, -1)  # most layers first: ties go to the larger offload of equal benefit
    for a in actions:
        if a.kind != "F":
            continue
        c, fi, bi = a.chunk_id, f_at[a.chunk_id], b_at[a.chunk_id]
        if bi - fi < 3 or act[c] <= 0:  # no action between the copy out and the copy back
            continue
        done = max(end[fi], queue_free) + lat + counts * act[c] / out_rate
        first_free = np.searchsorted(start, done, side="left")  # first action starting after the copy out
        reload = start[bi] - lat - counts * act[c] / in_rate
        first_back = np.searchsorted(start, reload, side="right") - 1  # last action starting before it
        span = np.maximum(covered[np.maximum(first_back, first_free)] - covered[first_free], 0.0)
        gain = counts * act[c] * span
        best = int(np.argmax(gain))
        if gain[best] <= 0:
            continue
        layers[c], lo[c], hi[c] = counts[best], first_free[best], first_back[best] - 1
        queue_free = done[best]
    _copy_back_in_order(actions, layers, lo, hi, lead, b_at, act, start, in_rate, lat)
    _fit_host(actions, layers, lo, hi, lead, f_at, b_at, act, host_budget)
    on = np.flatnonzero(layers)
    gain = float(np.sum(layers[on] * act[on] * (covered[hi[on] + 1] - covered[lo[on]])))
    return StageOffload(layers, lo, hi, lead), gain


def _copy_back_in_order(actions, layers, lo, hi, lead, b_at, act, start, rate, lat) -> None:
    """Schedule the copies back one at a time in backward order, each as late as it can start and
    still end before its backward and before the next one's start; a chunk left with no action
    between its copy out and its copy back offloads nothing."""
    later = np.inf
    for a in reversed(actions):
        c = a.chunk_id
        if a.kind != "B" or not layers[c]:
            continue
        finish = min(start[b_at[c]], later)
        at = int(np.searchsorted(start, finish - lat - layers[c] * act[c] / rate, side="right")) - 1
        if at - 1 < lo[c]:
            layers[c], lo[c], hi[c] = 0, 1, 0
            continue
        hi[c] = min(hi[c], at - 1)
        lead[c] = b_at[c] - at
        later = start[at]


def _fit_host(actions, layers, lo, hi, lead, f_at, b_at, act, budget: float) -> None:
    """Lower offloads, the largest in the fullest window first, until the host holds every window:
    a chunk's bytes are on the host from the end of its forward to the start of its backward."""
    m = len(actions)
    while True:
        use = np.zeros(m + 1)
        on = np.flatnonzero(layers)
        np.add.at(use, f_at[on] + 1, layers[on] * act[on])
        np.add.at(use, b_at[on], -layers[on] * act[on])
        use = np.cumsum(use)[:m]
        worst = int(np.argmax(use)) if m else 0
        if not m or use[worst] <= budget:
            return
        inside = on[(f_at[on] < worst) & (b_at[on] > worst)]
        c = inside[np.argmax(layers[inside] * act[inside])]
        layers[c] -= 1  # a smaller copy ends sooner: the windows found for the larger one stay safe
        if not layers[c]:
            lo[c], hi[c], lead[c] = 1, 0, 0
