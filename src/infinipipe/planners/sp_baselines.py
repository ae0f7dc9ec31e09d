"""Sequence-parallel baselines without a pipeline: DeepSpeed-Ulysses and FlexSP, on our simulator.

An SP-only plan is an `SPPlan`: one or more SP groups that run side by side on disjoint GPUs,
each a one-stage `Plan` (every layer) costed by a `CostModel` whose layout has that group's SP
degree. Both systems shard model states ZeRO-3 style over all ``gpus`` ranks, gathering weights
per micro-batch (``reshard_per_chunk``), as DeepSpeed does. The iteration ends when the slowest
group ends.

- ``ulysses``: one group of ``sp = gpus``; whole sequences packed into micro-batches (first fit
  decreasing) of the context length or a small multiple of it, the fastest that fits.
- ``flexsp``: the GPUs split into groups of power-of-two sizes (inside a node up to 8, then
  whole nodes; none larger than the model's attention heads); sequences assigned longest first
  to the group that would finish earliest among those whose memory holds them, balancing
  predicted time as FlexSP's solver does (greedily here, where FlexSP solves a MILP); the splits
  with the best predicted balance are planned and simulated, and the fastest is kept.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..contract.cost import CostModel
from ..contract.ir import Plan
from ..contract.layout import StageLayout
from ..contract.shapes import ChunkShape
from ..sim.simulator import SimResult
from .baselines import best_of, gpipe_uniform, pack_whole
from .data_parallel import whole_sequence_cost
from .options import PlannerOptions
from .request import PlanRequest

MICRO_BATCH_MULTIPLES = (1, 2, 4)
SPLITS_SIMULATED = 4  # flexsp: splits with the best predicted balance that are planned and simulated


@dataclass(frozen=True)
class SPGroup:
    """``sp`` GPUs running ``plan`` (one stage: every layer) on the sequences ``seq_ids`` name."""

    sp: int
    seq_ids: tuple[int, ...]
    plan: Plan
    result: SimResult


@dataclass(frozen=True)
class SPPlan:
    planner: str
    gpus: int
    groups: tuple[SPGroup, ...]

    @property
    def iteration_time_s(self) -> float:
        return max(g.result.iteration_time_s for g in self.groups)

    @property
    def feasible(self) -> bool:
        return all(g.result.feasible for g in self.groups)

    @property
    def peak_memory_bytes(self) -> float:
        return max(max(g.result.peak_memory_bytes) for g in self.groups)

    def to_json(self) -> dict:
        return {"planner": self.planner, "gpus": self.gpus, "iteration_time_s": self.iteration_time_s, "feasible": self.feasible,
                "peak_memory_bytes": [self.peak_memory_bytes], "bubble_ratio": self.idle_ratio,
                "groups": [{"sp": g.sp, "sequences": len(g.seq_ids), "iteration_time_s": g.result.iteration_time_s}
                           for g in self.groups]}

    @property
    def idle_ratio(self) -> float:
        """Share of GPU time the groups that finish early stand idle (FlexSP's imbalance)."""
        total = self.iteration_time_s * self.gpus
        busy = sum(g.sp * g.result.iteration_time_s for g in self.groups)
        return max(0.0, 1.0 - busy / total) if total > 0 else 0.0


def sp_layout(base: StageLayout, sp: int, gpus: int) -> StageLayout:
    """The layout of an SP group of ``sp`` GPUs whose model states are sharded over all ``gpus``."""
    return replace(base, sp=sp, fsdp=gpus, reshard_per_chunk=True)


def _group_plan(cost: CostModel, lengths: Sequence[int], seq_ids: Sequence[int], memory_budget: float,
                options: PlannerOptions, planner: str) -> tuple[Plan, SimResult]:
    """Packed micro-batches of the group's sequences, one stage, smallest uniform recompute that fits."""
    sub = [lengths[i] for i in seq_ids]
    request = PlanRequest(sub, cost, 1, memory_budget, options=options)
    budgets = ([options.micro_batch_tokens] if options.micro_batch_tokens
               else [k * max(sub) for k in MICRO_BATCH_MULTIPLES])
    candidates = []
    for budget in budgets:
        chunks = pack_whole(sub, budget)
        meta = {"planner": planner, "micro_batch_tokens": budget, "sp": cost.layout.sp}
        candidates.append(gpipe_uniform(request, chunks, meta))
    best = best_of(candidates)
    return best, next(r for p, r in candidates if p is best)


def plan_ulysses(cost: CostModel, lengths: Sequence[int], gpus: int, memory_budget: float,
                 options: PlannerOptions | None = None) -> SPPlan:
    """DeepSpeed-Ulysses: every GPU in one SP group, packed sequences, no pipeline."""
    options = options or PlannerOptions()
    if gpus > cost.model.heads:
        raise ValueError(f"ulysses: an SP group of {gpus} GPUs exceeds the model's {cost.model.heads} attention "
                         "heads (Ulysses spreads heads over the SP ranks)")
    group_cost = replace(cost, layout=sp_layout(cost.layout, gpus, gpus))
    ids = tuple(range(len(lengths)))
    plan, result = _group_plan(group_cost, lengths, ids, memory_budget, options, "ulysses")
    return SPPlan("ulysses", gpus, (SPGroup(gpus, ids, plan, result),))


def group_splits(gpus: int, node: int, smallest: int = 1, most: int = 8) -> list[tuple[int, ...]]:
    """Ways to cut ``gpus`` into at most ``most`` groups, largest first: powers of two up to a
    node, then multiples of whole nodes (so no group straddles a node boundary)."""
    sizes = sorted({s for s in (2**k for k in range(gpus.bit_length())) if smallest <= s <= node}
                   | {node * k for k in range(1, gpus // node + 1)}, reverse=True)
    out: list[tuple[int, ...]] = []

    def walk(left: int, cap: int, acc: tuple[int, ...]) -> None:
        if left == 0:
            out.append(acc)
            return
        if len(acc) == most:
            return
        for s in sizes:
            if s <= min(left, cap):
                walk(left - s, s, acc + (s,))

    walk(gpus, gpus, ())
    return out


def _fits(cost: CostModel, length: int, memory_budget: float) -> bool:
    """Whether one sequence alone fits a group, all layers recomputed but the loss's working set."""
    shape = ChunkShape((length,))
    layers = cost.model.layers
    held = cost.activation_bytes(shape, layers, layers, True, True) + cost.head_work_bytes(shape)
    return cost.model_state_bytes(layers, True, True) + held <= memory_budget


def plan_flexsp(cost: CostModel, lengths: Sequence[int], gpus: int, memory_budget: float,
                options: PlannerOptions | None = None) -> SPPlan:
    """FlexSP-style: SP groups of varying size, sequences balanced over them by predicted time."""
    options = options or PlannerOptions()
    node = cost.layout.gpus_per_node

    @functools.cache
    def group_cost(sp: int) -> CostModel:
        return replace(cost, layout=sp_layout(cost.layout, sp, gpus))

    @functools.cache
    def seq_ms(sp: int, n: int) -> float:
        return whole_sequence_cost(group_cost(sp))(n)

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    balanced = []
    for split in group_splits(gpus, node):
        if len(split) > len(lengths) or split[0] > cost.model.heads:
            continue
        load = [0.0] * len(split)
        members: list[list[int]] = [[] for _ in split]
        for i in order:
            able = [g for g, sp in enumerate(split) if _fits(group_cost(sp), lengths[i], memory_budget)]
            if not able:
                break
            g = min(able, key=lambda g: (load[g] + seq_ms(split[g], lengths[i]), g))
            load[g] += seq_ms(split[g], lengths[i])
            members[g].append(i)
        else:
            if all(members):
                balanced.append((max(load), split, members))
    best: SPPlan | None = None
    for _, split, members in sorted(balanced)[:SPLITS_SIMULATED]:
        groups = []
        for sp, ids in zip(split, members):
            plan, result = _group_plan(group_cost(sp), lengths, sorted(ids), memory_budget, options, "flexsp")
            groups.append(SPGroup(sp, tuple(sorted(ids)), plan, result))
        trial = SPPlan("flexsp", gpus, tuple(groups))
        if best is None or (trial.feasible, -trial.iteration_time_s) > (best.feasible, -best.iteration_time_s):
            best = trial
    if best is None:
        raise ValueError(f"flexsp: no split of {gpus} GPUs into SP groups holds the longest sequence "
                         f"({max(lengths)} tokens) in {memory_budget / 2**30:.1f} GiB per GPU")
    return best
