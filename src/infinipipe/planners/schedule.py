"""EPP 1F1B schedule: per-stage F/B order for one or more back-to-back 1F1B pipelines.

Inside a pipeline, sequences with more chunks go first (a short one first would stall the
steady phase while a long one is half in flight), whole chunks follow them or (interleaved) fill
the gaps between split sequences so their K/V stores are not in flight together, a sequence's
slices run forward in order and backward in reverse, and stage ``p`` (0-indexed) warms up with
``d - 1 - p + N_split`` forwards so the last slice of the longest sequence can turn round on the
last stage. Every stage runs the same forward order and the same backward order, so sends and
receives pair up.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from ..contract.ir import Action, Chunk, Plan, validate_plan


def _owner(chunk: Chunk, seq_lengths: Sequence[int]) -> int | None:
    """The split sequence a chunk carries a slice of, if any."""
    for s in chunk.segments:
        if s.length < seq_lengths[s.seq_id]:
            return s.seq_id
    return None


def split_gap(num_stages: int, n_split: int) -> int:
    """Whole chunks between two split sequences that keep the second one's slices out of flight
    on every stage until the first one's backward is done: the first stage's warm-up less one."""
    return max(num_stages - 2 + n_split, 0)


def fill_gaps(split: Sequence[list[int]], whole: Sequence[list[int]], gap: int) -> list[list[int]]:
    """``split`` in order with up to ``gap`` of ``whole`` after each but the last, from the first
    gap on; the rest of ``whole`` after the last."""
    out: list[list[int]] = []
    taken = 0
    for i, item in enumerate(split):
        out.append(item)
        if i < len(split) - 1:
            out += whole[taken:taken + gap]
            taken = min(taken + gap, len(whole))
    return out + list(whole[taken:])


def pipeline_orders(chunks: Sequence[Chunk], seq_lengths: Sequence[int], ids: Sequence[int],
                    num_stages: int = 1, interleave: bool = False) -> tuple[list[int], list[int], int]:
    """Forward order, backward order and N_split of one pipeline holding chunks ``ids``.

    Split sequences go first, most slices first, back to back, then the whole chunks. With
    ``interleave``, whole chunks fill the gaps between split sequences instead, `split_gap` each
    from the first gap on (the rest follow the last one): a split sequence's backward then
    overlaps forwards of whole chunks, not the next split sequence's slices, so the largest K/V
    stores are in flight one at a time as far as the batch has short work for it (the short work
    then waits in the long sequences' window: which is faster depends on the batch).
    """
    by_seq: dict[int, list[Chunk]] = defaultdict(list)
    whole: list[int] = []
    for cid in ids:
        owner = _owner(chunks[cid], seq_lengths)
        if owner is None:
            whole.append(cid)
        else:
            by_seq[owner].append(chunks[cid])
    groups = [[c.id for c in sorted(cs, key=lambda c: next(s.start for s in c.segments if s.seq_id == seq))]
              for seq, cs in by_seq.items()]
    groups.sort(key=lambda g: (-len(g), g[0]))
    n_split = max((len(g) for g in groups), default=1)
    gap = split_gap(num_stages, n_split) if interleave else 0
    blocks = fill_gaps(groups, [[cid] for cid in whole], gap)
    forward = [cid for b in blocks for cid in b]
    backward = [cid for b in blocks for cid in reversed(b)]
    return forward, backward, n_split


def one_f_one_b(forward: Sequence[int], backward: Sequence[int], warmup: int) -> list[tuple[str, int]]:
    """``warmup`` forwards, then alternate backward/forward, then the remaining backwards."""
    warmup = min(warmup, len(forward))
    out = [("F", c) for c in forward[:warmup]]
    fi, bi = warmup, 0
    while bi < len(backward):
        out.append(("B", backward[bi]))
        bi += 1
        if fi < len(forward):
            out.append(("F", forward[fi]))
            fi += 1
    return out


def epp_schedule(
    chunks: Sequence[Chunk],
    seq_lengths: Sequence[int],
    num_stages: int,
    layers_per_stage: Sequence[int],
    pipelines: Sequence[Sequence[int]] | None = None,
    recompute: Callable[[int, int], int] | None = None,
    metadata: dict[str, Any] | None = None,
    validate: bool = True,
    interleave: bool = False,
) -> Plan:
    """A validated `Plan`; ``pipelines`` groups chunk ids into back-to-back 1F1B pipelines.

    ``recompute(stage, chunk_id)`` gives the layers that chunk recomputes on that stage (0 if
    omitted). A sequence's chunks must all sit in one pipeline (its K/V lives there).
    ``validate=False`` skips `validate_plan` for plans built only to be costed (a planner's
    throw-away candidates); a plan handed to the runtime must be validated. ``interleave`` puts
    whole chunks between split sequences (`pipeline_orders`).
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if len(layers_per_stage) != num_stages:
        raise ValueError(f"layers_per_stage has {len(layers_per_stage)} entries for {num_stages} stages")
    chunks = list(chunks)
    if not chunks:
        raise ValueError("chunks: nothing to schedule")
    groups = [list(range(len(chunks)))] if pipelines is None else [list(p) for p in pipelines]
    if any(not g for g in groups):
        raise ValueError("pipelines: every pipeline needs at least one chunk")
    home: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for cid in g:
            if not 0 <= cid < len(chunks):
                raise ValueError(f"pipelines: chunk id {cid} is not one of 0..{len(chunks) - 1}")
            for s in chunks[cid].segments:
                if home.setdefault(s.seq_id, gi) != gi:
                    raise ValueError(
                        f"pipelines: sequence {s.seq_id} has chunks in pipelines {home[s.seq_id]} and {gi}; "
                        "a sequence's slices must share one pipeline"
                    )
    stage_ops: list[list[Action]] = [[] for _ in range(num_stages)]
    ordered_pipes = []
    shared: dict[tuple[str, int], Action] = {}  # without recompute, every stage's actions are alike
    for g in groups:
        forward, backward, n_split = pipeline_orders(chunks, seq_lengths, g, num_stages, interleave)
        ordered_pipes.append(tuple(forward))
        for p in range(num_stages):
            for kind, cid in one_f_one_b(forward, backward, num_stages - 1 - p + n_split):
                if recompute:
                    stage_ops[p].append(Action(kind, cid, int(recompute(p, cid))))
                else:
                    if (kind, cid) not in shared:
                        shared[(kind, cid)] = Action(kind, cid)
                    stage_ops[p].append(shared[(kind, cid)])
    plan = Plan(
        seq_lengths=tuple(seq_lengths),
        chunks=tuple(chunks),
        stage_actions=tuple(tuple(ops) for ops in stage_ops),
        layers_per_stage=tuple(layers_per_stage),
        pipelines=tuple(ordered_pipes),
        metadata=dict(metadata or {}),
    )
    if validate:
        validate_plan(plan)
    return plan
