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
from ..sim.host_schedule import action_starts, optimizer_back_lead, optimizer_out_s


@dataclass(frozen=True)
class StageOffload:
    """One stage's offload, per chunk id: layers offloaded, the first and last action index at
    which none of their bytes are on the device (``lo > hi``: none offloaded), and the reload's
    lead (actions before the backward at whose start the copy back begins)."""

    layers: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    lead: np.ndarray

    @classmethod
    def nothing(cls, chunks: int) -> "StageOffload":
        return cls(np.zeros(chunks, dtype=np.int64), np.ones(chunks, dtype=np.int64), np.zeros(chunks, dtype=np.int64),
                   np.zeros(chunks, dtype=np.int64))

    def between(self, action_index: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """Whether each (window at ``action_index``, ``chunk`` in it) pair has the chunk's
        offloaded layers on the host."""
        return (self.layers[chunk] > 0) & (self.lo[chunk] <= action_index) & (action_index <= self.hi[chunk])


@dataclass(frozen=True)
class Offload:
    """A plan's offload on every stage; where the optimizer state waits on the host, how long its
    copy out takes at the step's start (the device holds it until then) and how many actions
    before the stage's end its copy back starts (so the optimizer step need not wait for it;
    None: the step is too short for the round trip and the state stays on the device);
    ``optimizer_out_wait``: the stages whose first action waits for the copy out to end, where
    the actions it would overlap cannot hold the state beside their own bytes (empty: none)."""

    stages: tuple[StageOffload, ...]
    optimizer_out_s: tuple[float, ...]
    optimizer_back_lead: tuple[int | None, ...]
    optimizer_out_wait: tuple[bool, ...] = ()



def plan_offload(plan: Plan, cost: CostModel, shapes: list[ChunkShape] | None = None,
                 binding: list[np.ndarray] | None = None, memo: dict | None = None) -> Offload | None:
    """Each stage's offload for ``plan`` on ``cost``'s host tier (None without one). ``binding``
    marks, per stage and action, the windows that exceed the budget without recompute: only
    bytes off the device there save anything, so only those count (every window, without it)."""
    if not cost.offloads:
        return None
    link = cost.host_link
    shapes = shapes if shapes is not None else [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    act = np.array([cost.layer_act_bytes(sh) for sh in shapes])
    stages, outs, backs = [], [], []
    last = plan.num_stages - 1
    for s in range(plan.num_stages):
        n, first, is_last = plan.layers_per_stage[s], s == 0, s == last
        host = cost.host_budget
        optimizer_out, back = 0.0, None
        times = action_starts(plan, cost, s, shapes, memo)
        if cost.optimizer_on_host:
            back = optimizer_back_lead(cost, s, n, last, *times)
        opt_bytes = cost.optimizer_host_bytes(n, first, is_last)
        if back is not None:
            host -= opt_bytes
            optimizer_out = optimizer_out_s(cost, s, n, last)
        weight = np.ones(len(plan.stage_actions[s])) if binding is None else binding[s].astype(float)
        # Each copy holds its direction of the link for its whole size: a few chunks offloading
        # every layer can crowd out many offloading some, so the most layers any chunk offloads
        # is searched (powers of two and the stage's layers), keeping the cap that takes the most
        # bytes off the binding windows. Copies back run in order, and the optimizer state's is
        # the step's last. A stage with no binding window offloads nothing.
        caps = sorted({min(n, 2**k) for k in range(n.bit_length() + 1)}) if weight.any() else []

        args = (plan, s, caps, act, times, link, max(host, 0.0), optimizer_out, weight)
        best = _best_offload(*args, back)
        if back is not None and best[2]:
            # The optimizer state's copy back may run beside the last copies out, at the concurrent
            # bandwidth: start it earlier where they slow it (the activations' copies back, before
            # it in order, then end earlier too; fewer copies out only speed it up).
            inbound = _Capacity(link, "h2d", best[2])
            at = int(np.searchsorted(times[0], inbound.latest_start(times[1][-1], opt_bytes), side="right")) - 1
            if len(times[0]) - max(at, 0) > back:
                back = len(times[0]) - max(at, 0)
                best = _best_offload(*args, back)
        stages.append(best[0])
        outs.append(optimizer_out)
        backs.append(back)
    return Offload(tuple(stages), tuple(outs), tuple(backs))


def _best_offload(plan: Plan, stage: int, caps: list[int], act: np.ndarray, times: tuple[np.ndarray, np.ndarray],
                  link: HostLink, host_budget: float, queue_free: float, weight: np.ndarray,
                  back: int | None) -> tuple[StageOffload, float, list[tuple[float, float]]]:
    """`_stage_offload` at the cap that takes the most bytes off the binding windows, with the
    copies back ending before the optimizer state's (``back`` actions before the stage's end)."""
    last_in = times[0][len(times[0]) - back] if back else np.inf
    return max((_stage_offload(plan, stage, cap, act, *times, link, host_budget, queue_free, last_in, weight)
                for cap in caps), key=lambda o: o[1], default=(StageOffload.nothing(len(plan.chunks)), 0.0, []))


def _stage_offload(plan: Plan, stage: int, cap: int, act: np.ndarray, start: np.ndarray, end: np.ndarray,
                   link: HostLink, host_budget: float, queue_free: float, last_in: float,
                   weight: np.ndarray) -> tuple[StageOffload, float, list[tuple[float, float]]]:
    """One stage's offload with at most ``cap`` layers a chunk, the bytes it takes off the
    binding windows (summed over them) and when its copies out run; copies out start after
    ``queue_free``, copies back end by ``last_in``."""
    actions = plan.stage_actions[stage]
    chunks = len(plan.chunks)
    f_at = np.zeros(chunks, dtype=np.int64)
    b_at = np.zeros(chunks, dtype=np.int64)
    for i, a in enumerate(actions):
        if a.kind != "W":
            (f_at if a.kind == "F" else b_at)[a.chunk_id] = i
    covered = np.concatenate([[0.0], np.cumsum(weight)])  # binding windows before each action index
    layers = np.zeros(chunks, dtype=np.int64)
    lo = np.ones(chunks, dtype=np.int64)
    hi = np.zeros(chunks, dtype=np.int64)
    lead = np.zeros(chunks, dtype=np.int64)
    out_rate, in_rate, lat = link.d2h_concurrent_Bps, link.h2d_Bps, link.latency_s
    busy: list[tuple[float, float]] = []  # when copies out run
    counts = np.arange(cap, 0, -1)  # most layers first: ties go to the larger offload of equal benefit
    start_out = queue_free
    # Per chunk in forward order, what does not depend on the copies out before it: its sizes and
    # the last action a copy back of each size lets it leave the device before. A chunk with no
    # binding window between its forward and its backward gains nothing.
    order = np.array([a.chunk_id for a in actions if a.kind == "F"], dtype=np.int64)
    fi, bi = f_at[order], b_at[order]
    worth = (bi - fi >= 3) & (act[order] > 0) & (covered[bi] - covered[np.minimum(fi + 1, bi)] > 0)
    sizes = counts[None, :] * act[order][:, None]
    first_back = np.searchsorted(start, np.minimum(start[bi], last_in)[:, None] - lat - sizes / in_rate,
                                 side="right") - 1
    for row in np.flatnonzero(worth):
        c, f_end = order[row], end[fi[row]]
        done = max(f_end, queue_free) + lat + sizes[row] / out_rate
        first_free = np.searchsorted(start, done, side="left")  # first action starting after the copy out
        span = np.maximum(covered[np.maximum(first_back[row], first_free)] - covered[first_free], 0.0)
        gain = sizes[row] * span
        best = int(np.argmax(gain))
        if gain[best] <= 0:
            continue
        layers[c], lo[c], hi[c] = counts[best], first_free[best], first_back[row, best] - 1
        busy.append((max(f_end, queue_free), done[best]))
        queue_free = done[best]
    inbound = _copy_back_in_order(actions, layers, lo, hi, lead, b_at, act, start, _Capacity(link, "h2d", busy),
                                  last_in)
    outbound = _copy_out_sooner(actions, layers, lo, f_at, act, start, end, _Capacity(link, "d2h", inbound), start_out)
    _fit_host(actions, layers, lo, hi, lead, f_at, b_at, act, host_budget)
    on = np.flatnonzero(layers)
    gain = float(np.sum(layers[on] * act[on] * (covered[hi[on] + 1] - covered[lo[on]])))
    return StageOffload(layers, lo, hi, lead), gain, outbound


class _Capacity:
    """What one copy direction can move over time: its own bandwidth, its concurrent one while
    the other direction runs (``busy``: sorted, disjoint spans of the other direction, timed no
    shorter than they run, so this capacity is never more than the link gives)."""

    def __init__(self, link: HostLink, direction: str, busy: list[tuple[float, float]]):
        self.latency, self.rate = link.latency_s, link.rate(direction, False)
        spans = np.array(busy, dtype=float).reshape(-1, 2)
        self.times = spans.reshape(-1) if len(spans) else np.zeros(1)
        lengths = spans[:, 1] - spans[:, 0]
        other = np.stack([np.cumsum(lengths) - lengths, np.cumsum(lengths)], axis=1).reshape(-1)
        # Bytes the direction can move from time 0 to each point.
        self.moved = self.rate * self.times - (self.rate - link.rate(direction, True)) * (
            other if len(spans) else np.zeros(1))

    def _moved_at(self, t: float) -> float:
        if t <= self.times[0]:
            return float(self.moved[0] - self.rate * (self.times[0] - t))
        if t >= self.times[-1]:
            return float(self.moved[-1] + self.rate * (t - self.times[-1]))
        return float(np.interp(t, self.times, self.moved))

    def _time_at(self, moved: float) -> float:
        if moved <= self.moved[0]:
            return float(self.times[0] - (self.moved[0] - moved) / self.rate)
        if moved >= self.moved[-1]:
            return float(self.times[-1] + (moved - self.moved[-1]) / self.rate)
        return float(np.interp(moved, self.moved, self.times))

    def latest_start(self, finish: float, nbytes: float) -> float:
        """When a copy of ``nbytes`` must start to end by ``finish``."""
        return self._time_at(self._moved_at(finish - self.latency) - nbytes)

    def earliest_end(self, start: float, nbytes: float) -> float:
        """When a copy of ``nbytes`` started at ``start`` ends."""
        return self._time_at(self._moved_at(start + self.latency) + nbytes)


def _copy_back_in_order(actions, layers, lo, hi, lead, b_at, act, start, inbound: _Capacity,
                        last_in: float) -> list[tuple[float, float]]:
    """Schedule the copies back one at a time in backward order, each as late as it can start and
    still end before its backward and before the next one's start (the last before
    ``last_in``); a chunk left with no action between its copy out and its copy back offloads
    nothing."""
    later = last_in
    spans = []
    for a in reversed(actions):
        c = a.chunk_id
        if a.kind != "B" or not layers[c]:
            continue
        finish = min(start[b_at[c]], later)
        at = int(np.searchsorted(start, inbound.latest_start(finish, layers[c] * act[c]), side="right")) - 1
        if at - 1 < lo[c]:
            layers[c], lo[c], hi[c] = 0, 1, 0
            continue
        hi[c] = at - 1
        lead[c] = b_at[c] - at
        later = start[at]
        spans.append((later, finish))
    return spans[::-1]


def _copy_out_sooner(actions, layers, lo, f_at, act, start, end, outbound: _Capacity,
                     queue_free: float) -> list[tuple[float, float]]:
    """Time the copies out again, now that the copies back are placed: each runs at its own
    bandwidth where no copy back runs, so it ends no later and its chunk leaves the device sooner.
    Returns when they run."""
    spans = []
    for a in actions:
        c = a.chunk_id
        if a.kind != "F" or not layers[c]:
            continue
        begin = max(end[f_at[c]], queue_free)
        queue_free = outbound.earliest_end(begin, layers[c] * act[c])
        spans.append((begin, queue_free))
        lo[c] = min(lo[c], int(np.searchsorted(start, queue_free, side="left")))
    return spans


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
