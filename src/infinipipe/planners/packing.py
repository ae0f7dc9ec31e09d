"""First-fit packing of segments into token-bounded chunks, shared by the fixed-granularity planners."""
from __future__ import annotations

from ..contract.ir import Segment


class FirstFitBins:
    """Bins of segments, each holding at most ``capacity`` tokens (a longer segment gets a bin of
    its own); a segment goes into the first bin, in opening order, with room for it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.bins: list[list[Segment]] = []
        self._used: list[int] = []

    def open(self, seg: Segment) -> list[Segment]:
        """A new bin seeded with ``seg``; later segments may still be packed into it."""
        self.bins.append([seg])
        self._used.append(seg.length)
        return self.bins[-1]

    def put(self, seg: Segment) -> list[Segment]:
        for b, used in enumerate(self._used):
            if used + seg.length <= self.capacity:
                self.bins[b].append(seg)
                self._used[b] += seg.length
                return self.bins[b]
        return self.open(seg)
