"""Baseline planners that emit the same `Plan` as EPP, for like-for-like comparison.

- ``batch-1f1b``: whole sequences packed into micro-batches of at most a token budget, run with
  1F1B (Megatron-LM / DAPPLE style).
- ``seq1f1b``: every sequence cut into fixed-size chunks, leftovers packed (Seq1F1B as the paper
  re-implements it for its comparison).
- ``seq1f1b-balanced``: the original Seq1F1B partition, each long sequence cut into slices of
  equal attention-aware compute, their number searched like ``seq1f1b``'s chunk size.
- ``gpipe``: packed micro-batches, all forwards then all backwards.
- ``epp-uniform``: the EPP ablation with equal-*token* slices of the longest sequence and
  token-only packing, in place of Algorithm 1's equal-time slicing and time-aware packing.

All use static uniform checkpointing: the smallest number of recomputed layers per stage (the
same on every stage and chunk) for which the simulator says the plan fits in memory.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from ..contract.ir import Action, Chunk, Plan, validate_plan
from ..sim.simulator import SimResult, simulate
from .packing import balanced_chunks, fixed_size_chunks, pack_whole
from .request import PlanRequest
from .schedule import epp_schedule


def gpipe_schedule(chunks: Sequence[Chunk], seq_lengths: Sequence[int], layers_per_stage: Sequence[int],
                   metadata: dict) -> Plan:
    """All forwards in chunk order, then all backwards in reverse order, on every stage."""
    ids = [c.id for c in chunks]
    stage_actions = tuple(
        tuple([Action("F", c) for c in ids] + [Action("B", c) for c in reversed(ids)])
        for _ in range(len(layers_per_stage))
    )
    return Plan(tuple(seq_lengths), tuple(chunks), stage_actions, tuple(layers_per_stage), metadata=metadata)


def uniform_recompute(plan: Plan, layers: int) -> Plan:
    """``plan`` with every chunk recomputing ``layers`` layers (at most all of its stage's)."""
    cap = plan.layers_per_stage
    return replace(plan, stage_actions=tuple(tuple(a.with_mode(min(layers, cap[s])) for a in acts)
                                             for s, acts in enumerate(plan.stage_actions)))


def _uniform_attempt(request: PlanRequest, base: Plan, r: int) -> tuple[Plan, SimResult]:
    plan = uniform_recompute(base, r)
    plan = replace(plan, metadata={**plan.metadata, "recompute_layers": r, "memory_budget": request.memory_budget})
    return plan, simulate(plan, request.cost, request.memory_budget, request.link)


def with_uniform_recompute(request: PlanRequest, base: Plan) -> tuple[Plan, SimResult]:
    """``base`` with the smallest uniform recompute count that fits (or option ``recompute``'s
    fixed layer count); if even full recompute does not fit, the full-recompute plan."""
    layers = request.layers
    r = request.options.recompute
    if r is not None:
        if r > max(layers):
            raise ValueError(f"option recompute={r} is outside 0..{max(layers)} (layers per stage {layers})")
        return _uniform_attempt(request, base, r)
    lo, hi = 0, max(layers)
    best = _uniform_attempt(request, base, hi)
    if not best[1].feasible:
        return best
    while lo < hi:
        mid = (lo + hi) // 2
        trial = _uniform_attempt(request, base, mid)
        if trial[1].feasible:
            hi, best = mid, trial
        else:
            lo = mid + 1
    return best


def uniform_faster_than(request: PlanRequest, base: Plan, limit: float) -> tuple[Plan, SimResult] | None:
    """`with_uniform_recompute`'s plan if it fits and runs faster than ``limit``, else None.

    Recompute only lengthens backwards, so time grows with the count: a count no faster than
    ``limit`` rules out every larger one, and the bisection stops as soon as nothing can win.
    """
    fixed = request.options.recompute
    if fixed is not None:
        found = with_uniform_recompute(request, base)
        return found if found[1].feasible and found[1].iteration_time_s < limit else None
    lo, hi = 0, max(request.layers)
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        plan, sim = _uniform_attempt(request, base, mid)
        if sim.feasible and sim.iteration_time_s < limit:
            best, hi = (plan, sim), mid - 1
        elif sim.feasible:
            hi = mid - 1
        elif sim.iteration_time_s >= limit:
            return None
        else:
            lo = mid + 1
    return best


def best_of(candidates: Sequence[tuple[Plan, SimResult]]) -> Plan:
    """The fastest plan that fits; if none fits, the one closest to fitting."""
    fits = [c for c in candidates if c[1].feasible]
    if fits:
        return min(fits, key=lambda c: c[1].iteration_time_s)[0]
    return min(candidates, key=lambda c: max(c[1].peak_memory_bytes))[0]


def one_f_one_b_uniform(request: PlanRequest, chunks: list[Chunk], metadata: dict) -> tuple[Plan, SimResult]:
    """``chunks`` in the EPP 1F1B order, one pipeline, with the smallest uniform recompute that fits."""
    base = epp_schedule(chunks, request.lengths, request.num_stages, request.layers, metadata=metadata)
    return with_uniform_recompute(request, base)


def plan_batch_1f1b(request: PlanRequest) -> Plan:
    """Option ``micro_batch_tokens`` (default: the longest sequence, i.e. the context length)."""
    budget = request.options.micro_batch_tokens or max(request.lengths)
    chunks = pack_whole(request.lengths, budget)
    return one_f_one_b_uniform(request, chunks, {"planner": "batch-1f1b", "micro_batch_tokens": budget})[0]


def gpipe_uniform(request: PlanRequest, chunks: list[Chunk], metadata: dict) -> tuple[Plan, SimResult]:
    """``chunks`` all forwards then all backwards, with the smallest uniform recompute that fits."""
    base = gpipe_schedule(chunks, request.lengths, request.layers, metadata)
    validate_plan(base)
    return with_uniform_recompute(request, base)


def plan_gpipe(request: PlanRequest) -> Plan:
    """Option ``micro_batch_tokens`` as for ``batch-1f1b``."""
    budget = request.options.micro_batch_tokens or max(request.lengths)
    chunks = pack_whole(request.lengths, budget)
    return gpipe_uniform(request, chunks, {"planner": "gpipe", "micro_batch_tokens": budget})[0]


def _power_of_two_sizes(longest: int) -> list[int]:
    top = max(math.ceil(math.log2(longest)), 11)
    return sorted({min(2**k, longest) for k in range(11, top + 1)})


def plan_seq1f1b(request: PlanRequest) -> Plan:
    """Option ``chunk_tokens``: the fixed chunk size, or (unset) the fastest fitting power of two
    from 2K to the longest sequence, as a tuned static setting would be."""
    choice = request.options.chunk_tokens
    sizes = _power_of_two_sizes(max(request.lengths)) if choice is None else [choice]
    return best_of([
        one_f_one_b_uniform(request, fixed_size_chunks(request.lengths, size),
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
        one_f_one_b_uniform(request, fixed_size_chunks(request.lengths, math.ceil(longest / k)),
                     {"planner": "epp-uniform", "num_slices": k})
        for k in counts
    ])


SEQ1F1B_SLICE_COUNTS = (2, 4, 8, 16, 32, 64)


def seq1f1b_slice_counts(longest: int) -> list[int]:
    """Seq1F1B's slice counts for a batch whose longest sequence has ``longest`` tokens: the
    ladder down to slices of about 1K tokens (one cut always)."""
    return [n for n in SEQ1F1B_SLICE_COUNTS if n == 2 or longest // n >= 1024]


def plan_seq1f1b_balanced(request: PlanRequest) -> Plan:
    """Option ``num_slices``: slices of the longest sequence, or (unset) the fastest fitting count
    of a power-of-two ladder down to slices of about 1K tokens."""
    longest = max(request.lengths)
    choice = request.options.num_slices
    counts = seq1f1b_slice_counts(longest) if choice is None else [choice]
    return best_of([
        one_f_one_b_uniform(request, balanced_chunks(request.lengths, request.cost, n),
                     {"planner": "seq1f1b-balanced", "num_slices": n})
        for n in counts
    ])
