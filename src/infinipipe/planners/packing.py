"""Fixed-granularity chunkings: whole sequences packed first-fit, sequences cut at a fixed token
size, or (as the original Seq1F1B) into slices of equal compute. The baselines plan with them,
and EPP keeps them among its own candidates.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..contract.cost import CostModel
from ..contract.ir import Chunk, Segment, check_coverage
from .processor import SliceTimer, equal_time_cuts


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


def pack_whole(lengths: Sequence[int], budget: int) -> list[Chunk]:
    """First-fit-decreasing packing of whole sequences into chunks of at most ``budget`` tokens
    (a longer sequence gets a chunk of its own)."""
    if budget < 1:
        raise ValueError(f"micro-batch token budget must be >= 1, got {budget}")
    bins = FirstFitBins(budget)
    for seq in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        bins.put(Segment(seq, 0, lengths[seq]))
    return [Chunk(i, tuple(b)) for i, b in enumerate(bins.bins)]


def fixed_size_chunks(lengths: Sequence[int], size: int) -> list[Chunk]:
    """Cut every sequence longer than ``size`` at multiples of ``size``; its tail slice and the
    short sequences are packed first-fit-decreasing into chunks of at most ``size`` tokens, never
    two tails together."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    ordered: list[list[Segment]] = []
    bins = FirstFitBins(size)
    shorts = []
    for seq in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[seq]
        if n <= size:
            shorts.append(seq)
            continue
        starts = list(range(0, n, size))
        ordered.extend([Segment(seq, a, a + size)] for a in starts[:-1])
        ordered.append(bins.open(Segment(seq, starts[-1], n)))  # the same list: packing fills it
    tails = len(bins.bins)
    for seq in shorts:
        bins.put(Segment(seq, 0, lengths[seq]))
    ordered.extend(bins.bins[tails:])
    chunks = [Chunk(i, tuple(segs)) for i, segs in enumerate(ordered)]
    check_coverage(chunks, lengths)
    return chunks


def balanced_chunks(lengths: Sequence[int], cost: CostModel, num_slices: int) -> list[Chunk]:
    """Seq1F1B's own partition: the longest sequence in ``num_slices`` slices of equal compute,
    every other sequence in proportionally many (``ceil(num_slices * n / longest)``), each cut by
    equal attention-aware compute; sequences left whole are packed first-fit into chunks of at
    most ``ceil(longest / num_slices)`` tokens. No slice shares a chunk (no hybrid chunks)."""
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    longest = max(lengths)
    timer = SliceTimer(cost)
    ordered: list[list[Segment]] = []
    bins = FirstFitBins(-(-longest // num_slices))
    for seq in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[seq]
        k = min(n, -(-num_slices * n // longest))
        if k == 1:
            bins.put(Segment(seq, 0, n))
            continue
        points = [0] + equal_time_cuts(n, k, timer)
        ordered.extend([Segment(seq, a, b)] for a, b in zip(points[:-1], points[1:]))
    ordered.extend(bins.bins)
    chunks = [Chunk(i, tuple(segs)) for i, segs in enumerate(ordered)]
    check_coverage(chunks, lengths)
    return chunks
