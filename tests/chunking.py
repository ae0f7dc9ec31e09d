"""Random ways of cutting a batch into chunks, for exactness tests."""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from infinipipe.contract.ir import Action, Chunk, Plan, Segment, validate_plan

HAND_LENGTHS = [23, 9, 1, 14]
# Packed (whole sequences), split (slices of one sequence) and hybrid (tail slice + whole) chunks.
HAND_CHUNKS = {
    "packed": [Chunk(0, (Segment(0, 0, 23), Segment(2, 0, 1))), Chunk(1, (Segment(1, 0, 9), Segment(3, 0, 14)))],
    "split": [Chunk(0, (Segment(0, 0, 7),)), Chunk(1, (Segment(0, 7, 16),)), Chunk(2, (Segment(0, 16, 23),)),
              Chunk(3, (Segment(1, 0, 9), Segment(2, 0, 1), Segment(3, 0, 14)))],
    "hybrid": [Chunk(0, (Segment(0, 0, 10), Segment(2, 0, 1))), Chunk(1, (Segment(1, 0, 9), Segment(0, 10, 23))),
               Chunk(2, (Segment(3, 0, 5),)), Chunk(3, (Segment(3, 5, 14),))],
}


def random_chunks(lengths: Sequence[int], rng: random.Random, max_slices: int = 4) -> list[Chunk]:
    """Split some sequences into slices, pack whole ones anywhere (hybrid chunks included)."""
    slices = {}
    for sid, n in enumerate(lengths):
        k = rng.randint(1, min(max_slices, n))
        cuts = sorted(rng.sample(range(1, n), k - 1)) if k > 1 else []
        bounds = [0, *cuts, n]
        slices[sid] = [Segment(sid, a, b) for a, b in zip(bounds, bounds[1:])]
    groups: list[list[Segment]] = []
    split = [sid for sid, sl in slices.items() if len(sl) > 1]
    whole = [sl[0] for sid, sl in slices.items() if len(sl) == 1]
    queues = {sid: list(slices[sid]) for sid in split}
    while queues:
        sid = rng.choice(sorted(queues))
        groups.append([queues[sid].pop(0)])
        if not queues[sid]:
            del queues[sid]
    for seg in whole:
        if groups and rng.random() < 0.6:
            rng.choice(groups).append(seg)
        else:
            groups.insert(rng.randint(0, len(groups)), [seg])
    for g in groups:
        rng.shuffle(g)
    return [Chunk(i, tuple(g)) for i, g in enumerate(groups)]


def sequential_plan(chunks: list[Chunk], lengths: Sequence[int], layers_per_stage: Sequence[int],
                    recompute: dict[int, int] | None = None) -> Plan:
    """All forwards in chunk order, then all backwards in reverse (valid for any chunking)."""
    stage_actions = []
    for n in layers_per_stage:
        rec = {c.id: min(n, (recompute or {}).get(c.id, 0)) for c in chunks}
        fwd = [Action("F", c.id, rec[c.id]) for c in chunks]
        bwd = [Action("B", c.id, rec[c.id]) for c in reversed(chunks)]
        stage_actions.append(fwd + bwd)
    return Plan(tuple(lengths), tuple(chunks), stage_actions, tuple(layers_per_stage),
                metadata={"planner": "test-sequential"})


def with_offload(plan: Plan, modes: Callable[[int, int, int], tuple[int, int, int]],
                 lead: Callable[[int, int], int] = max) -> Plan:
    """Each chunk on each stage takes ``modes(stage, chunk, layers)`` = (whole, elementwise,
    offloaded) layers; an offloading backward reloads ``lead(1, most)`` actions ahead, ``most``
    being the earliest start after the forward (a chunk whose backward follows its forward keeps
    its layers)."""
    stages = []
    for s, actions in enumerate(plan.stage_actions):
        pos = {(a.kind, a.chunk_id): i for i, a in enumerate(actions)}
        out = []
        for a in actions:
            whole, elementwise, off = modes(s, a.chunk_id, plan.layers_per_stage[s])
            most = pos["B", a.chunk_id] - pos["F", a.chunk_id] - 1
            off = off if most >= 1 else 0
            reload = lead(1, most) if a.kind == "B" and off else 0
            out.append(a.with_mode(whole, elementwise, off, reload))
        stages.append(tuple(out))
    plan = dataclasses.replace(plan, stage_actions=tuple(stages))
    validate_plan(plan)
    return plan


def timed_plan(chunks: list[Chunk], lengths: Sequence[int], layers_per_stage: Sequence[int], cfg,
               recompute: Callable[[int, int], int], rng: random.Random, pipelines=None) -> Plan:
    """EPP's timed order (a random lead, slack and cap on deferred weight gradients) on plausible
    coefficients for ``cfg``: what the runtime must play exactly whatever interleaving (and W
    actions) the list schedule picks per stage."""
    from infinipipe.contract.cost import CostModel, LinearTerm, Profile
    from infinipipe.planners.schedule import Order, epp_schedule

    prof = Profile(model=cfg, device="cpu", dtype="float32",
                   layer_fwd=LinearTerm({"attn": 2e-5, "tokens": 2e-3, "chunk": 0.05}),
                   layer_bwd=LinearTerm({"attn": 4e-5, "tokens": 4e-3, "chunk": 0.1}),
                   layer_act_bytes=LinearTerm({"tokens": 40 * cfg.hidden}))
    order = Order("timed", rng.randint(0, 3), rng.randint(0, 3), rng.randint(1, 3))
    plan = epp_schedule(chunks, lengths, len(layers_per_stage), layers_per_stage, pipelines, recompute=recompute,
                        order=order, cost=CostModel(prof, cfg))
    validate_plan(plan)
    return plan


def with_weight_actions(plan: Plan, rng: random.Random, share: float = 0.7) -> Plan:
    """``plan`` with about ``share`` of each stage's backwards leaving their weight gradients to
    a W action placed at a random later point of that stage (at the end at the latest)."""
    stages = []
    for actions in plan.stage_actions:
        out = list(actions)
        for a in actions:
            if a.kind == "B" and rng.random() < share:
                at = out.index(a)
                out.insert(rng.randint(at + 1, len(out)), Action("W", a.chunk_id))
        stages.append(tuple(out))
    deferred = dataclasses.replace(plan, stage_actions=tuple(stages))
    validate_plan(deferred)
    return deferred
