"""One action as the simulator ran it: what the timeline, the chart and the idle breakdown read."""
from __future__ import annotations

from typing import NamedTuple


class Interval(NamedTuple):
    """One action as it ran: ``recompute_s`` is the leading part of a backward spent recomputing;
    ``input_s`` when its input (the neighbour's activations or gradient) arrived, 0 where it needs
    none, so a later start is the stage's own doing.

    A named tuple: a simulation records one per action, and planners simulate thousands of plans."""

    stage: int
    kind: str
    chunk_id: int
    start_s: float
    end_s: float
    recompute_s: float = 0.0
    input_s: float = 0.0
