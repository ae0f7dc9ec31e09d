"""Where each stage's idle time lies, so a user sees why a plan is not at its compute floor.

A stage's busy time plus its idle categories is the iteration time. Each stretch of idle is named
for what the stage waited for, read from the recorded intervals (an action's start, end and when
its input arrived) and the stage's once-per-step collectives and optimizer wait:
- ``fill``: before the stage's first action, after any all-gather: the pipeline reaching it.
- ``forward_wait``: mid-step, a forward waiting for the previous stage's activations (a later
  pipeline filling, a long chunk upstream).
- ``chain``: mid-step, a backward waiting for the next stage's gradient while no forward could
  run instead (none left, or its input not there yet): mostly a split sequence's backwards, each
  slice's waiting for the last, crossing the stages.
- ``memory``: mid-step, a backward waiting for its gradient while the stage's next forward
  already had its input: the plan's order holds that forward back so that its activations are not
  held at once. Also a backward's wait for its copy back from the host and, at the step's end,
  the wait for the optimizer state's copy back.
- ``drain``: after the stage's step ends (last action, reduce-scatter, optimizer wait) until the
  iteration does.
- ``collectives``: the once-per-step FSDP all-gather at the start and reduce-scatter at the end.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

from .interval import Interval

CATEGORIES = ("fill", "forward_wait", "chain", "memory", "drain", "collectives")


@dataclass(frozen=True)
class IdleBreakdown:
    """One stage's idle seconds per category (or all stages' summed)."""

    fill: float = 0.0
    forward_wait: float = 0.0
    chain: float = 0.0
    memory: float = 0.0
    drain: float = 0.0
    collectives: float = 0.0

    @property
    def total_s(self) -> float:
        return sum(self.to_json().values())

    @property
    def largest(self) -> str:
        """The category that costs most (the first of equals)."""
        parts = self.to_json()
        return max(CATEGORIES, key=parts.__getitem__)

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @staticmethod
    def summed(parts: Sequence[IdleBreakdown]) -> IdleBreakdown:
        return IdleBreakdown(**{f.name: sum(getattr(p, f.name) for p in parts) for f in fields(IdleBreakdown)})


class IdleSpan(NamedTuple):
    """One stretch of a stage's idle time and its category (what the chart shades)."""

    stage: int
    category: str
    start_s: float
    end_s: float


def idle_spans(intervals: Sequence[Interval], num_stages: int, step_fsdp_s: Sequence[tuple[float, float]],
               optimizer_wait_s: Sequence[float], iteration_time_s: float) -> list[IdleSpan]:
    """Every idle stretch of every stage, in time order per stage; ``intervals`` as the simulator
    records them (each stage's in plan order), ``step_fsdp_s`` each stage's all-gather and
    reduce-scatter, ``optimizer_wait_s`` its wait at the end for the optimizer state (empty: none)."""
    by_stage: list[list[Interval]] = [[] for _ in range(num_stages)]
    for iv in intervals:
        by_stage[iv.stage].append(iv)
    spans: list[IdleSpan] = []
    for s, ivs in enumerate(by_stage):
        gather, reduce = step_fsdp_s[s] if step_fsdp_s else (0.0, 0.0)
        wait = optimizer_wait_s[s] if optimizer_wait_s else 0.0
        spans += _stage_spans(s, ivs, gather, reduce, wait, iteration_time_s)
    return spans


def idle_breakdown(spans: Sequence[IdleSpan], num_stages: int) -> tuple[IdleBreakdown, ...]:
    """Each stage's ``spans`` summed per category."""
    sums = [dict.fromkeys(CATEGORIES, 0.0) for _ in range(num_stages)]
    for span in spans:
        sums[span.stage][span.category] += span.end_s - span.start_s
    return tuple(IdleBreakdown(**parts) for parts in sums)


def _stage_spans(stage: int, ivs: Sequence[Interval], gather: float, reduce: float, optimizer_wait: float,
                 iteration_time_s: float) -> list[IdleSpan]:
    spans: list[IdleSpan] = []

    def add(category: str, start: float, end: float) -> None:
        if end > start:
            spans.append(IdleSpan(stage, category, start, end))

    add("collectives", 0.0, gather)
    next_forward_input = _next_forward_inputs(ivs)
    prev_end = gather
    for i, iv in enumerate(ivs):
        waited = min(max(iv.input_s, prev_end), iv.start_s)  # waiting for its input until then
        if i == 0:
            add("fill", prev_end, waited)
        elif iv.kind == "F":
            add("forward_wait", prev_end, waited)
        else:  # from when the next forward could run, the order holds it back
            held = min(max(next_forward_input[i], prev_end), waited)
            add("chain", prev_end, held)
            add("memory", held, waited)
        add("memory", waited, iv.start_s)  # its copy back from the host
        prev_end = iv.end_s
    reduced = prev_end + reduce
    step_end = reduced + optimizer_wait
    add("collectives", prev_end, reduced)
    add("memory", reduced, step_end)
    add("drain", step_end, iteration_time_s)
    return spans


def _next_forward_inputs(ivs: Sequence[Interval]) -> list[float]:
    """Per action, when the input of the stage's next forward after it arrived (inf: none left)."""
    out = [0.0] * len(ivs)
    upcoming = float("inf")
    for i in range(len(ivs) - 1, -1, -1):
        out[i] = upcoming
        if ivs[i].kind == "F":
            upcoming = ivs[i].input_s
    return out
