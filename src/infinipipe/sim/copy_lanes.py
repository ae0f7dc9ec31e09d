"""A device's two copy directions to its host, as the simulator plays them.

Each direction runs its copies one at a time in the order they were asked for (one copy stream
per direction); a copy starts once released and once what it depends on is done (a copy back
waits for its copy out), pays the link's latency, then moves its bytes at the direction's
bandwidth, which drops to the direction's concurrent figure while the other direction moves
bytes too (`HostLink.rate`). Copies are added in release order per direction, and a completion is
asked for only once every copy released before it is known, so the answer is exact.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ..contract.host import HostLink

DIRECTIONS = ("d2h", "h2d")
_EPS = 1e-12  # seconds: a latency left shorter than this has passed


@dataclass
class Copy:
    direction: str
    release_s: float
    nbytes: float
    after: "Copy | None" = None
    start_s: float = math.nan
    done_s: float = math.nan
    left: float = field(init=False)
    waiting: float = field(init=False)

    def __post_init__(self) -> None:
        self.left = self.nbytes
        self.waiting = 0.0

    def ready_s(self) -> float:
        """When it may start: once released and once what it waits for is done (nan: not known yet)."""
        if self.after is None:
            return self.release_s
        done = self.after.done_s
        return done if done != done else max(self.release_s, done)


class CopyLanes:
    """The device-to-host and host-to-device lanes of one device."""

    def __init__(self, link: HostLink):
        self.now = 0.0
        self.queues: tuple[deque[Copy], deque[Copy]] = (deque(), deque())
        self.alone = (link.d2h_Bps, link.h2d_Bps)
        self.together = (link.d2h_concurrent_Bps, link.h2d_concurrent_Bps)
        self.latency = link.latency_s

    def add(self, direction: str, release_s: float, nbytes: float, after: Copy | None = None) -> Copy:
        copy = Copy(direction, release_s, nbytes, after)
        self.queues[DIRECTIONS.index(direction)].append(copy)
        return copy

    def finish(self, copy: Copy | None = None) -> None:
        """Advance until ``copy`` is done (every copy, without one)."""
        queues = self.queues
        while (queues[0] or queues[1]) and (copy is None or copy.done_s != copy.done_s):
            self._step()

    def _head(self, lane: int) -> Copy | None:
        """The lane's running copy (started now if it may), else None."""
        q = self.queues[lane]
        if not q:
            return None
        head = q[0]
        if head.start_s != head.start_s:
            ready = head.ready_s()
            if ready != ready or ready > self.now:
                return None
            head.start_s, head.waiting = self.now, self.latency
        return head

    def _step(self) -> None:
        heads = (self._head(0), self._head(1))
        moving = [h is not None and h.waiting <= _EPS and h.left > 0 for h in heads]
        until = math.inf
        for lane, q in enumerate(self.queues):  # a lane waiting for its next copy to be released
            if q and heads[lane] is None:
                ready = q[0].ready_s()
                if ready == ready:
                    until = min(until, ready)
        rates = [self.together[lane] if moving[1 - lane] else self.alone[lane] for lane in (0, 1)]
        for lane, h in enumerate(heads):
            if h is not None:
                ends = self.now + (h.waiting if h.waiting > _EPS else h.left / rates[lane])
                if ends <= self.now:  # what is left takes less time than the clock resolves: done now
                    h.waiting, h.left = 0.0, 0.0
                until = min(until, ends)
        if until == math.inf:
            raise RuntimeError("a copy waits for one that does not run")
        dt = max(until - self.now, 0.0)
        for lane, h in enumerate(heads):
            if h is None:
                continue
            if h.waiting > _EPS:
                h.waiting -= dt
            else:
                h.left -= rates[lane] * dt
            if h.waiting <= _EPS and h.left <= 1e-6 * max(h.nbytes, 1.0):
                h.done_s = until
                self.queues[lane].popleft()
        self.now = until
