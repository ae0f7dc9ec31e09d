"""When a search stops starting new candidates: the planning deadline.

A plan is hidden only while planning step i+1 takes less than training step i, so the search's
budget is a share of that step: the step's measured time where the caller knows it (training),
else the simulated time of the best plan found so far (`infinipipe plan`, `bench`), or a fixed
number of seconds. A search never stops before it has a plan that fits: past the deadline it
only skips what could improve one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    """``seconds`` after ``start`` (``time.monotonic``, one clock for every process of a machine)
    where fixed; else ``share`` of ``step_s``, or of the best plan's simulated time while
    ``step_s`` is None; no deadline where both are unset or ``share`` is 0. A ``strict`` deadline
    holds even before a plan fits."""

    start: float
    seconds: float | None = None
    share: float = 0.0
    step_s: float | None = None
    strict: bool = False  # a part's search whose parent holds a plan already: it may end with none

    @classmethod
    def starting_now(cls, seconds: float | None, share: float, step_s: float | None) -> "Deadline":
        return cls(time.monotonic(), seconds, share, step_s)

    @property
    def active(self) -> bool:
        return self.seconds is not None or self.share > 0

    def limit(self, best_s: float | None) -> float | None:
        """The absolute time past which nothing new starts (None: none yet, or none at all)."""
        if self.seconds is not None:
            return self.start + self.seconds
        base = self.step_s if self.step_s is not None else best_s
        if self.share <= 0 or base is None:
            return None
        return self.start + self.share * base

    def seconds_for(self, best_s: float | None) -> float | None:
        """The deadline as seconds after the start, for reports."""
        at = self.limit(best_s)
        return None if at is None else at - self.start

    def for_part(self, best_s: float | None) -> "Deadline":
        """A sub-search's deadline: this one's, fixed where it is known already (strict where the
        parent has a plan: the part may then end without one); else the same share of the
        part's own best plan, from now."""
        at = self.limit(best_s)
        if at is not None:
            return Deadline(self.start, at - self.start, strict=best_s is not None)
        return Deadline(time.monotonic(), None, self.share, None)
