"""Pipeline grouping (paper eq. 14): split one batch's chunks into back-to-back 1F1B pipelines.

One pipeline pays one warm-up/cool-down, but every chunk in it shares the in-flight window of its
longest sequence: a short sequence scheduled behind a long one must checkpoint more. Several
pipelines (gradients accumulate across them) pay more fill and drain but less recompute. A
dynamic program over the sequences sorted by chunk count picks the cut points:
``dp[j] = min_i dp[i] + delta(i..j) + T_ckpt(i..j)``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..contract.cost import CostModel
from ..contract.ir import Chunk, Segment
from ..contract.shapes import ChunkShape
from .ilp import min_recompute_ms
from .ilp_problem import InfeasibleMemoryError, SolverCache, build_problem, check_full_recompute
from .schedule import Order, epp_schedule, fill_gaps, split_gap

Checkpointing = Literal["ilp", "none", "full"]
CHECKPOINTING = ("ilp", "none", "full")


@dataclass(frozen=True)
class Grouping:
    """Chunk ids of each pipeline (ascending; the schedule orders them), the DP's cost estimate, whether it fits."""

    pipelines: tuple[tuple[int, ...], ...]
    cost_ms: float
    feasible: bool
    evaluated: int


def sequence_units(chunks: Sequence[Chunk]) -> list[list[int]]:
    """Chunk ids that must share a pipeline: those linked through a common sequence."""
    parent = list(range(len(chunks)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    home: dict[int, int] = {}
    for c in chunks:
        for s in c.segments:
            other = home.setdefault(s.seq_id, c.id)
            parent[find(c.id)] = find(other)
    units: dict[int, list[int]] = {}
    for c in chunks:
        units.setdefault(find(c.id), []).append(c.id)
    return list(units.values())


def sub_batch(chunks: Sequence[Chunk], seq_lengths: Sequence[int], ids: Sequence[int]) -> tuple[list[Chunk], list[int]]:
    """The chunks ``ids`` as a batch of their own (sequences and chunks renumbered in order)."""
    seq_map: dict[int, int] = {}
    lengths: list[int] = []
    out = []
    for new_id, cid in enumerate(ids):
        segs = []
        for s in chunks[cid].segments:
            if s.seq_id not in seq_map:
                seq_map[s.seq_id] = len(lengths)
                lengths.append(seq_lengths[s.seq_id])
            segs.append(Segment(seq_map[s.seq_id], s.start, s.end))
        out.append(Chunk(new_id, tuple(segs)))
    return out, lengths


class PipelineCoster:
    """Recompute cost of running a set of chunks as one pipeline (``inf`` when it cannot fit)."""

    def __init__(self, chunks: Sequence[Chunk], seq_lengths: Sequence[int], cost: CostModel,
                 layers_per_stage: Sequence[int], memory_budget: float | Sequence[float],
                 checkpointing: Checkpointing = "ilp", cache: SolverCache | None = None,
                 mip_gap: float = 0.02, time_limit_s: float = 10.0, order: Order | None = None):
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
        self.chunks, self.seq_lengths, self.cost = list(chunks), list(seq_lengths), cost
        self.layers = tuple(layers_per_stage)
        self.memory_budget = memory_budget
        self.checkpointing = checkpointing
        self.cache = SolverCache() if cache is None else cache
        self.mip_gap, self.time_limit_s, self.order = mip_gap, time_limit_s, order or Order()
        shapes = [ChunkShape.of(c, seq_lengths) for c in chunks]
        total = sum(self.layers)

        def mean_stage_ms(sh: ChunkShape) -> float:
            # Layers, embedding and head over all stages, spread evenly.
            per_layer = cost.forward_ms(sh, 1) + cost.backward_ms(sh, 1)
            ends = sum(cost.forward_ms(sh, 0, first, last) + cost.backward_ms(sh, 0, first, last)
                       for first, last in ((True, False), (False, True)))
            return (total * per_layer + ends) / len(self.layers)

        self.stage_ms = np.array([mean_stage_ms(sh) for sh in shapes])
        self.evaluated = 0
        self._memo: dict[tuple[int, ...], float] = {}

    def fill_ms(self, ids: Sequence[int]) -> float:
        """Warm-up plus cool-down of one more pipeline: ``(d_p - 1)`` mean chunk times."""
        return (len(self.layers) - 1) * float(self.stage_ms[list(ids)].mean())

    def recompute_ms(self, ids: Sequence[int]) -> float:
        """Memoised per chunk set. The sub-batch keeps the chunks' original relative order, so
        its schedule, and with it its ILP, is exactly that pipeline's part of the final plan:
        the final solve then finds every part in the cache."""
        key = tuple(sorted(ids))
        if key not in self._memo:
            self._memo[key] = self._recompute_ms(key)
        return self._memo[key]

    def _recompute_ms(self, ids: tuple[int, ...]) -> float:
        self.evaluated += 1
        sub_chunks, lengths = sub_batch(self.chunks, self.seq_lengths, ids)
        plan = epp_schedule(sub_chunks, lengths, len(self.layers), self.layers, validate=False,
                            order=self.order, cost=self.cost)
        if self.checkpointing == "ilp":
            try:
                return min_recompute_ms(plan, self.cost, self.memory_budget, self.mip_gap,
                                        self.time_limit_s, cache=self.cache)
            except InfeasibleMemoryError:
                return math.inf
        pp = build_problem(plan, self.cost, self.memory_budget, self.cache)
        if self.checkpointing == "none":
            return 0.0 if not pp.windows else math.inf
        try:
            check_full_recompute(pp)
        except InfeasibleMemoryError:
            return math.inf
        return float(pp.problem.upper @ pp.problem.weight_ms)


def ordered_units(chunks: Sequence[Chunk], num_stages: int, interleave: bool = False) -> list[list[int]]:
    """Sequence units in the order the grouping DP cuts them: by chunk count (most first). With
    ``interleave``, each split sequence is followed by as many whole chunks as `split_gap` asks
    (from the first gap on) and the remaining whole chunks come last: a cut then leaves every
    pipeline the short work that keeps its split sequences' stores apart, as `pipeline_orders`
    lays it out."""
    units = sequence_units(chunks)
    tokens = [sum(chunks[c].tokens for c in u) for u in units]
    units = [units[i] for i in sorted(range(len(units)), key=lambda i: (-len(units[i]), -tokens[i], units[i][0]))]
    split = [u for u in units if len(u) > 1]
    whole = [u for u in units if len(u) == 1]
    if not interleave or len(split) < 2:
        return units
    return fill_gaps(split, whole, split_gap(num_stages, len(split[0])))


def group_pipelines(coster: PipelineCoster, max_pipelines: int = 4, max_cuts: int = 12,
                    stop_at: float | None = None) -> Grouping:
    """Run the grouping DP over sequence units in `ordered_units` order.

    Cut points are restricted to where the chunk count changes, thinned to at most ``max_cuts``
    (plus evenly spaced points inside long runs of equal count), which keeps the number of ILPs
    small; candidates whose fill cost alone cannot beat the best found skip their ILP. Past
    ``stop_at`` (``time.monotonic``, a planning deadline) no new group is costed: the best
    grouping of the whole found so far is the answer (one pipeline at least).
    """
    if max_pipelines < 1:
        raise ValueError(f"max_pipelines must be >= 1, got {max_pipelines}")
    units = ordered_units(coster.chunks, len(coster.layers), coster.order.kind == "interleaved")
    counts = [len(u) for u in units]
    n = len(units)

    def ids(i: int, j: int) -> list[int]:
        return sorted(c for u in units[i:j] for c in u)

    whole = coster.recompute_ms(ids(0, n))
    if whole == 0.0 or max_pipelines == 1:
        return Grouping((tuple(ids(0, n)),), coster.fill_ms(ids(0, n)) + whole, math.isfinite(whole),
                        coster.evaluated)
    cuts = _cut_points(counts, max_cuts)
    memo = {(0, len(cuts) - 1): whole}

    def group_cost(a: int, b: int) -> float:
        if (a, b) not in memo:
            memo[(a, b)] = coster.recompute_ms(ids(cuts[a], cuts[b]))
        return memo[(a, b)]

    # dp[g][j]: best cost of units[:cuts[j]] in exactly g pipelines. Every further pipeline
    # pays at least its fill, so a prefix whose cost plus the fill of the rest cannot beat the
    # best complete grouping is dropped before its ILP is solved.
    inf = math.inf
    m = len(cuts)
    dp = np.full((max_pipelines + 1, m), inf)
    back = np.full((max_pipelines + 1, m), -1, dtype=int)
    dp[0][0] = 0.0
    dp[1][m - 1], back[1][m - 1] = coster.fill_ms(ids(0, n)) + whole, 0
    bound = dp[1][m - 1]
    stopped = False
    for j in range(1, m):
        rest = coster.fill_ms(ids(cuts[j], n)) if j < m - 1 else 0.0
        for g in range(1, max_pipelines + 1):
            cands = sorted((dp[g - 1][i] + coster.fill_ms(ids(cuts[i], cuts[j])), i)
                           for i in range(j) if dp[g - 1][i] < inf)
            for lower, i in cands:
                if lower >= dp[g][j] or lower + rest >= bound:
                    break
                stopped = stopped or (stop_at is not None and (i, j) not in memo and time.monotonic() > stop_at)
                if stopped:  # only groups costed already are read from here on
                    break
                total = lower + group_cost(i, j)
                if total < dp[g][j]:
                    dp[g][j], back[g][j] = total, i
            if j == m - 1:
                bound = min(bound, dp[g][j])
    g_best = int(np.argmin(dp[1:, m - 1])) + 1
    best = dp[g_best][m - 1]
    if not math.isfinite(best):
        return Grouping((tuple(ids(0, n)),), inf, False, coster.evaluated)
    groups, j, g = [], m - 1, g_best
    while j > 0:
        i = back[g][j]
        groups.append(tuple(ids(cuts[i], cuts[j])))
        j, g = i, g - 1
    return Grouping(tuple(reversed(groups)), float(best), True, coster.evaluated)


def _cut_points(counts: Sequence[int], max_cuts: int) -> list[int]:
    n = len(counts)
    changes = [i for i in range(1, n) if counts[i] != counts[i - 1]]
    if len(changes) > max_cuts:
        changes = [changes[round(k * (len(changes) - 1) / (max_cuts - 1))] for k in range(max_cuts)]
    spare = max(max_cuts - len(changes), 0)
    even = [round(k * n / (spare + 1)) for k in range(1, spare + 1)] if spare else []
    return sorted({0, n, *changes, *even})
