"""Plans of disjoint sub-batches joined into one plan whose pipelines run back to back.

EPP's search plans some batches best in parts, each with a chunking of its own: a sequence at the
context cap alone in a pipeline holds one K/V store at a time and no short work waits behind it.
Gradients accumulate across pipelines, so the joined plan computes the same loss and gradients
as any other plan of the batch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..contract.ir import Chunk, Plan, Segment


def join_plans(parts: Sequence[tuple[Plan, Sequence[int]]], seq_lengths: Sequence[int],
               metadata: dict[str, Any] | None = None) -> Plan:
    """``parts`` are ``(plan, seq_ids)``: sequence ``i`` of the part's plan is ``seq_ids[i]`` of
    the batch. Chunks are renumbered in part order; each stage runs the parts one after another."""
    if not parts:
        raise ValueError("join_plans: no parts")
    layers = parts[0][0].layers_per_stage
    chunks: list[Chunk] = []
    stage_actions: list[list] = [[] for _ in layers]
    pipelines: list[tuple[int, ...]] = []
    for plan, seq_ids in parts:
        if plan.layers_per_stage != layers:
            raise ValueError(f"join_plans: layer splits differ ({plan.layers_per_stage} vs {layers})")
        if [seq_lengths[q] for q in seq_ids] != list(plan.seq_lengths):
            raise ValueError("join_plans: a part's sequence lengths are not those of its sequences in the batch")
        offset = len(chunks)
        chunks += [Chunk(offset + c.id, tuple(Segment(seq_ids[s.seq_id], s.start, s.end) for s in c.segments))
                   for c in plan.chunks]
        for s, actions in enumerate(plan.stage_actions):
            stage_actions[s] += [dataclasses.replace(a, chunk_id=offset + a.chunk_id) for a in actions]
        pipelines += [tuple(offset + c for c in p) for p in (plan.pipelines or (tuple(range(len(plan.chunks))),))]
    return Plan(tuple(seq_lengths), tuple(chunks), tuple(tuple(a) for a in stage_actions), tuple(layers),
                tuple(pipelines), dict(metadata or {}))
