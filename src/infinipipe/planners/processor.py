"""Sequence processor (the paper's Algorithm 1): workload-balanced chunking of one global batch.

The longest sequence is cut into K slices of equal predicted forward time (later slices are
shorter because they attend to a longer prefix); every other long sequence is cut at the same
points; short sequences are packed best-fit-decreasing around the tail slices under a time and a
token threshold. Where no bucket has room under both, a new bucket is opened (the paper instead
loosens the time threshold; that overfills the tail's hybrid chunk and, in simulation on the
committed H100 profiles, cost 3-10% of iteration time across the benchmark grid). Equal *time*
rather than equal *tokens* is what keeps the pipeline's stages in step, since causal attention
makes later tokens dearer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..contract.cost import CostModel
from ..contract.ir import Chunk, Segment, check_coverage
from ..contract.shapes import ChunkShape

_LINEAR = frozenset({"attn", "tokens", "kv", "chunk"})


class SliceTimer:
    """One layer's forward time of a chunk, from ``cost.forward_ms(shape, n_layers=1)``.

    For a profile linear in (attention pairs, tokens, keys read, 1) -- every GPU profile -- the
    root of the profile's own quadratic is where the search for a slice of a given time starts;
    the search then finds the exact length on ``forward_ms``, which also carries what the
    profile's coefficients do not (the layout's sequence-parallel share of the heads and tokens,
    its all-to-alls, the per-action overhead). Other profiles (the CPU one keeps an
    attention-area term) start the search at one token. Either way only needs time to grow with
    a slice's length.
    """

    def __init__(self, cost: CostModel):
        self.cost = cost
        coef = cost.profile.layer_fwd.coef
        self.linear = set(coef) <= _LINEAR
        self.attn, self.tokens, self.kv = (coef.get(k, 0.0) for k in ("attn", "tokens", "kv"))
        self.chunk = coef.get("chunk", 0.0)

    def shape_ms(self, shape: ChunkShape) -> float:
        return self.cost.forward_ms(shape, n_layers=1)

    def slice_ms(self, prefix: int, length: int) -> float:
        """A lone slice of ``length`` tokens after ``prefix`` cached tokens."""
        return self.shape_ms(ChunkShape((length,), prefix=prefix))

    def longest_slice(self, prefix: int, budget_ms: float) -> int:
        """Most tokens a slice after ``prefix`` may hold within ``budget_ms`` (at least 1)."""
        return self._search(prefix, budget_ms, self._root(prefix, budget_ms) if self.linear else 1)

    def _root(self, prefix: int, budget_ms: float) -> int:
        """The length the profile's coefficients alone give a slice of ``budget_ms``."""
        a = self.attn / 2
        b = self.attn / 2 + self.attn * prefix + self.tokens + self.kv
        c = self.kv * prefix + self.chunk - budget_ms
        if a > 0:
            root = (-b + np.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
        elif b > 0:
            root = -c / b
        else:
            raise ValueError("cost model predicts no time growth with tokens; cannot balance slices")
        return max(int(np.floor(root)), 1)

    def _search(self, prefix: int, budget_ms: float, start: int) -> int:
        """The largest fitting length, galloping from ``start`` in steps that double (where the
        root is exact, two evaluations), then bisecting the last step."""
        def fits(n: int) -> bool:
            return n <= 1 or self.slice_ms(prefix, n) <= budget_ms

        step = 1
        if fits(start):
            lo = start
            while fits(lo + step):
                lo, step = lo + step, step * 2
            hi = lo + step
        else:
            hi = start
            while not fits(hi - step):
                hi, step = hi - step, step * 2
            lo = max(hi - step, 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def equal_time_cuts(length: int, num_slices: int, timer: SliceTimer, max_tokens: int | None = None) -> list[int]:
    """Cut points ``0 < p_1 < ... < length`` splitting one sequence into slices of equal time.

    Bisection on the per-slice time: greedy slices of at most that time, the remainder last; the
    smallest time whose remainder also fits gives the balanced cut. No slice holds more than
    ``max_tokens`` (what one chunk may hold in memory): where the early, cheaper-per-token slices
    would exceed it they are capped, and more slices are used if ``num_slices`` cannot cover the
    sequence otherwise.
    """
    cap = length if max_tokens is None else max(1, int(max_tokens))
    k = min(max(num_slices, -(-length // cap)), length)
    if k == 1:
        return [length]

    def cuts_for(budget: float) -> tuple[list[int], bool]:
        pos, cuts = 0, []
        for _ in range(k - 1):
            pos += min(timer.longest_slice(pos, budget), cap)
            if pos >= length:
                return cuts + [length], True
            cuts.append(pos)
        return cuts + [length], length - pos <= cap and timer.slice_ms(pos, length - pos) <= budget

    lo, hi = 0.0, timer.slice_ms(0, length)
    for _ in range(100):
        mid = (lo + hi) / 2
        if cuts_for(mid)[1]:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-6 * hi:
            break
    return cuts_for(hi)[0]


@dataclass
class _Bucket:
    segments: list[Segment]
    time: float
    tokens: int
    seeded_by: int | None = None  # sequence whose tail slice seeded it


def process_sequences(lengths: Sequence[int], cost: CostModel, num_slices: int, token_capacity: int) -> list[Chunk]:
    """Chunks for one global batch (ids ``0..n-1``): the split slices of each long sequence in order
    (its tail last, with packed short sequences), then the chunks of short sequences only.

    ``token_capacity`` bounds a chunk's tokens (what one stage can hold for one chunk); the longest
    sequence gets more than ``num_slices`` slices where its slices would otherwise exceed it.
    """
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("lengths: the batch has no sequences")
    if min(lengths) < 1:
        raise ValueError(f"lengths: every sequence needs at least one token, got {min(lengths)}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if token_capacity < 1:
        raise ValueError(f"token_capacity must be >= 1, got {token_capacity}")

    timer = SliceTimer(cost)
    longest = max(lengths)
    cuts = equal_time_cuts(longest, num_slices, timer, token_capacity)
    first = cuts[0]
    time_limit = max(timer.slice_ms(a, b - a) for a, b in zip([0] + cuts[:-1], cuts))
    token_limit = min(token_capacity, first)

    ordered: list[list[Segment]] = []
    buckets: list[_Bucket] = []
    shorts: list[int] = []
    for seq in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[seq]
        if n <= first:
            shorts.append(seq)
            continue
        points = [0] + [p for p in cuts if p < n] + [n]
        ordered.extend([Segment(seq, a, b)] for a, b in zip(points[:-2], points[1:-1]))
        a = points[-2]
        ordered.append([])  # its tail's chunk, filled once packing is done
        buckets.append(_Bucket([Segment(seq, a, n)], timer.slice_ms(a, n - a), n - a, seeded_by=seq))

    shorts.sort(key=lambda i: (-timer.slice_ms(0, lengths[i]), i))
    for seq in shorts:
        n = lengths[seq]
        extra = timer.slice_ms(0, n) - timer.chunk
        if not buckets or min(b.tokens for b in buckets) + n > token_limit:
            buckets.append(_Bucket([Segment(seq, 0, n)], timer.slice_ms(0, n), n))
            continue
        # The cheapest-per-token bucket with room (the first such in opening order on a tie).
        target = min((b for b in buckets if b.time + extra <= time_limit and b.tokens + n <= token_limit),
                     key=lambda b: b.time / b.tokens, default=None)
        if target is None:
            buckets.append(_Bucket([Segment(seq, 0, n)], timer.slice_ms(0, n), n))
            continue
        target.segments.append(Segment(seq, 0, n))
        target.time += extra
        target.tokens += n

    tails = iter(b for b in buckets if b.seeded_by is not None)
    ordered = [segs or next(tails).segments for segs in ordered]
    ordered.extend(b.segments for b in buckets if b.seeded_by is None)
    chunks = [Chunk(i, tuple(segs)) for i, segs in enumerate(ordered)]
    check_coverage(chunks, lengths)
    return chunks
