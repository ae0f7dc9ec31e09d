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

_DIRECTIONS = ("d2h", "h2d")
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


class CopyLanes:
    """The device-to-host and host-to-device lanes of one device."""

    def __init__(self, link: HostLink):
        self.link = link
        self.now = 0.0
        self.queues: dict[str, deque[Copy]] = {d: deque() for d in _DIRECTIONS}
        self.busy_s = {d: 0.0 for d in _DIRECTIONS}

    def add(self, direction: str, release_s: float, nbytes: float, after: Copy | None = None) -> Copy:
        copy = Copy(direction, release_s, nbytes, after)
        self.queues[direction].append(copy)
        return copy

    def finish(self, copy: Copy | None = None) -> None:
        """Advance until ``copy`` is done (every copy, without one)."""
        while any(self.queues.values()) and (copy is None or copy.done_s != copy.done_s):
            self._step()

    def _head(self, direction: str) -> Copy | None:
        """The direction's running copy, or None while its next one may not start yet."""
        q = self.queues[direction]
        if not q:
            return None
        head = q[0]
        if head.start_s == head.start_s:
            return head
        ready = head.release_s if head.after is None else max(head.release_s, head.after.done_s)
        if ready != ready or ready > self.now:  # nan: what it waits for is not done yet
            return None
        head.start_s = self.now
        head.waiting = self.link.latency_s
        return head

    def _next_ready(self) -> float:
        out = math.inf
        for d in _DIRECTIONS:
            q = self.queues[d]
            if q and q[0].start_s != q[0].start_s:
                head = q[0]
                ready = head.release_s if head.after is None else max(head.release_s, head.after.done_s)
                if ready == ready:
                    out = min(out, ready)
        return out

    def _step(self) -> None:
        heads = {d: self._head(d) for d in _DIRECTIONS}
        moving = {d: h is not None and h.waiting <= _EPS and h.left > 0 for d, h in heads.items()}
        rates = {d: self.link.rate(d, moving[o]) for d, o in zip(_DIRECTIONS, reversed(_DIRECTIONS))}
        until = self._next_ready()
        for d, h in heads.items():
            if h is not None:
                until = min(until, self.now + (h.waiting if h.waiting > _EPS else h.left / rates[d]))
        if until == math.inf:  # a copy back waits for a copy out that was never asked for
            raise RuntimeError("a copy waits for one that does not run")
        dt = max(until - self.now, 0.0)
        for d, h in heads.items():
            if h is None:
                continue
            self.busy_s[d] += dt
            if h.waiting > _EPS:
                h.waiting -= dt
            else:
                h.left -= rates[d] * dt
            if h.waiting <= _EPS and h.left <= 1e-6 * max(h.nbytes, 1.0):
                h.done_s = until
                self.queues[d].popleft()
        self.now = until
