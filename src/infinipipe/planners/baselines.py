"""Baseline planners that emit the same `Plan` as EPP, for like-for-like comparison.

- ``batch-1f1b``: whole sequences packed into micro-batches of at most a token budget, run with
  1F1B (Megatron-LM / DAPPLE style).
- ``seq1f1b``: every sequence cut into fixed-size chunks, leftovers packed (Seq1F1B as the paper
  re-implements it for its comparison).
- ``gpipe``: packed micro-batches, all forwards then all backwards.
- ``epp-uniform``: the EPP ablation with equal-*token* slices of the longest sequence and
  token-only packing, in place of Algorithm 1's equal-time slicing and time-aware packing.

All use static uniform checkpointing: the smallest number of recomputed layers per stage (the
same on every stage and chunk) for which the simulator says the plan fits in memory.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from ..contract.ir import Action, Chunk, Plan, Segment, check_coverage, validate_plan
from ..sim.simulator import SimResult, simulate
from .packing import FirstFitBins
from .request import PlanRequest
from .schedule import epp_schedule

Recompute = Callable[[int, int], int]


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


def gpipe_schedule(chunks: Sequence[Chunk], seq_lengths: Sequence[int], layers_per_stage: Sequence[int],
                   recompute: Recompute, metadata: dict) -> Plan:
    """All forwards in chunk order, then all backwards in reverse order, on every stage."""
    ids = [c.id for c in chunks]
    stage_actions = tuple(
        tuple([Action("F", c, recompute(p, c)) for c in ids] + [Action("B", c, recompute(p, c)) for c in reversed(ids)])
        for p in range(len(layers_per_stage))
    )
    plan = Plan(tuple(seq_lengths), tuple(chunks), stage_actions, tuple(layers_per_stage), metadata=metadata)
    validate_plan(plan)
    return plan


def with_uniform_recompute(request: PlanRequest, build: Callable[[Recompute], Plan]) -> tuple[Plan, SimResult]:
    """Plan with the smallest uniform recompute count that fits (or option ``recompute``'s fixed
    layer count); if even full recompute does not fit, the full-recompute plan."""
    layers = request.layers

    def attempt(r: int) -> tuple[Plan, SimResult]:
        plan = build(lambda stage, _chunk: min(r, layers[stage]))
        plan = replace(plan, metadata={**plan.metadata, "recompute_layers": r,
                                       "memory_budget": request.memory_budget})
        return plan, simulate(plan, request.cost, request.memory_budget, request.link)

    r = request.options.recompute
    if r is not None:
        if r > max(layers):
            raise ValueError(f"option recompute={r} is outside 0..{max(layers)} (layers per stage {layers})")
        return attempt(r)
    lo, hi = 0, max(layers)
    best = attempt(hi)
    if not best[1].feasible:
        return best
    while lo < hi:
        mid = (lo + hi) // 2
        trial = attempt(mid)
        if trial[1].feasible:
            hi, best = mid, trial
        else:
            lo = mid + 1
    return best


def best_of(candidates: Sequence[tuple[Plan, SimResult]]) -> Plan:
    """The fastest plan that fits; if none fits, the one closest to fitting."""
    fits = [c for c in candidates if c[1].feasible]
    if fits:
        return min(fits, key=lambda c: c[1].iteration_time_s)[0]
    return min(candidates, key=lambda c: max(c[1].peak_memory_bytes))[0]


def _one_f_one_b(request: PlanRequest, chunks: list[Chunk], metadata: dict) -> tuple[Plan, SimResult]:
    def build(rec: Recompute) -> Plan:
        return epp_schedule(chunks, request.lengths, request.num_stages, request.layers,
                            recompute=rec, metadata=metadata)
    return with_uniform_recompute(request, build)


def plan_batch_1f1b(request: PlanRequest) -> Plan:
    """Option ``micro_batch_tokens`` (default: the longest sequence, i.e. the context length)."""
    budget = request.options.micro_batch_tokens or max(request.lengths)
    chunks = pack_whole(request.lengths, budget)
    return _one_f_one_b(request, chunks, {"planner": "batch-1f1b", "micro_batch_tokens": budget})[0]


def plan_gpipe(request: PlanRequest) -> Plan:
    """Option ``micro_batch_tokens`` as for ``batch-1f1b``."""
    budget = request.options.micro_batch_tokens or max(request.lengths)
    chunks = pack_whole(request.lengths, budget)
    meta = {"planner": "gpipe", "micro_batch_tokens": budget}

    def build(rec: Recompute) -> Plan:
        return gpipe_schedule(chunks, request.lengths, request.layers, rec, meta)
    return with_uniform_recompute(request, build)[0]


def _power_of_two_sizes(longest: int) -> list[int]:
    top = max(math.ceil(math.log2(longest)), 11)
    return sorted({min(2**k, longest) for k in range(11, top + 1)})


def plan_seq1f1b(request: PlanRequest) -> Plan:
    """Option ``chunk_tokens``: the fixed chunk size, or (unset) the fastest fitting power of two
    from 2K to the longest sequence, as a tuned static setting would be."""
    choice = request.options.chunk_tokens
    sizes = _power_of_two_sizes(max(request.lengths)) if choice is None else [choice]
    return best_of([
        _one_f_one_b(request, fixed_size_chunks(request.lengths, size),
                     {"planner": "seq1f1b", "chunk_tokens": size})
        for size in sizes
    ])


UNIFORM_SLICE_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def plan_epp_uniform(request: PlanRequest) -> Plan:
    """Option ``num_slices``: K for the longest sequence, or (unset) the fastest fitting K of a
    small ladder; slices hold ``ceil(longest / K)`` tokens."""
    longest = max(request.lengths)
    choice = request.options.num_slices
    counts = [k for k in UNIFORM_SLICE_COUNTS if k <= longest] if choice is None else [choice]
    return best_of([
        _one_f_one_b(request, fixed_size_chunks(request.lengths, math.ceil(longest / k)),
                     {"planner": "epp-uniform", "num_slices": k})
        for k in counts
    ])
