"""When each stage posts each transfer, so that no order a plan can give hangs under NCCL.

Two NCCL rules make posting order matter (`nccl_semantics`): the ops of one `batch_isend_irecv`
complete together, and one process's groups on a communicator run one after another, in the
order they were posted. A stage that posts the receive of a later input before the send its
neighbour needs first waits for itself. A lookahead that only counts actions cannot avoid this
once orders interleave freely (a timed order runs a chunk's forward and then, a few actions on,
its backward on a middle stage).

So every stage posts its transfers in one global order (`transfer_order`): where a lockstep play
of the plan produces them. Each transfer's two ends then meet it at the same place in their
queues, and the earliest unfinished transfer can always complete: its sender has everything it
needs to compute it, and its receiver has posted it, since a stage posts its queue in order and
never waits on a group holding a transfer past its own next uncomputed send (`stage_posts`).
`nccl_hang` plays the stages' posts under both rules, so tests can show that no plan hangs.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..contract.ir import Action, Plan, downstream_stage, upstream_stage

Direction = Literal["act", "grad"]


@dataclass(frozen=True)
class Transfer:
    """One chunk's activation (forward) or input gradient (backward) from ``src`` to ``dst``."""

    direction: Direction
    chunk_id: int
    src: int
    dst: int


def output_of(action: Action, stage: int, num_stages: int) -> Transfer | None:
    dst = downstream_stage(action.kind, stage, num_stages)
    if dst is None:
        return None
    return Transfer("act" if action.kind == "F" else "grad", action.chunk_id, stage, dst)


def input_of(action: Action, stage: int, num_stages: int) -> Transfer | None:
    src = upstream_stage(action.kind, stage, num_stages)
    if src is None:
        return None
    return Transfer("act" if action.kind == "F" else "grad", action.chunk_id, src, stage)


def transfer_order(plan: Plan) -> list[Transfer]:
    """Every transfer of the plan in the order a lockstep play produces them: in each round every
    stage runs its next action if that action's input was produced in an earlier round. Any order
    that respects the data flow would do; lockstep keeps each stage's queue close to when its
    transfers really happen, so receives are not posted (their buffers not allocated) long early."""
    n = plan.num_stages
    ptr = [0] * n
    produced: set[Transfer] = set()
    order: list[Transfer] = []
    while any(ptr[s] < len(actions) for s, actions in enumerate(plan.stage_actions)):
        made: list[Transfer] = []
        ran = False
        for s, actions in enumerate(plan.stage_actions):
            if ptr[s] == len(actions):
                continue
            need = input_of(actions[ptr[s]], s, n)
            if need is not None and need not in produced:
                continue
            out = output_of(actions[ptr[s]], s, n)
            made.extend([out] if out is not None else [])
            ptr[s] += 1
            ran = True
        if not ran:
            raise ValueError(f"plan deadlocks: stages wait forever at actions {ptr}")
        produced.update(made)
        order.extend(made)
    return order


def stage_posts(plan: Plan, stage: int, lookahead: int = 1) -> list[tuple[Transfer, ...]]:
    """What ``stage`` posts as one group before each of its actions (entry ``i``: after action
    ``i - 1``'s compute, before waiting for action ``i``'s input), and at the end (the last entry).

    Its queue is its transfers in `transfer_order`, posted in order: after each compute, through
    the send just computed and through the receives of the next ``lookahead`` input-needing
    actions, but never past the stage's next send that is not computed yet."""
    n = plan.num_stages
    actions = plan.stage_actions[stage]
    queue = [t for t in transfer_order(plan) if stage in (t.src, t.dst)]
    where = {t: i for i, t in enumerate(queue)}
    outputs = [output_of(a, stage, n) for a in actions]
    inputs = [input_of(a, stage, n) for a in actions]
    needing = [i for i, t in enumerate(inputs) if t is not None]
    next_send = [len(queue)] * (len(actions) + 1)  # where the first send of actions i.. waits
    for i in reversed(range(len(actions))):
        next_send[i] = where[outputs[i]] if outputs[i] is not None else next_send[i + 1]
    posts: list[tuple[Transfer, ...]] = []
    done = 0
    for i in range(len(actions) + 1):
        upto = done
        if i and outputs[i - 1] is not None:
            upto = where[outputs[i - 1]] + 1
        first = bisect.bisect_left(needing, i)
        for j in needing[first:first + lookahead + 1]:
            if where[inputs[j]] < next_send[i]:
                upto = max(upto, where[inputs[j]] + 1)
        posts.append(tuple(queue[done:upto]))
        done = upto
    if done != len(queue):
        raise AssertionError(f"stage {stage} left {len(queue) - done} transfers unposted")
    return posts


def nccl_hang(plan: Plan, posts: Sequence[Sequence[tuple[Transfer, ...]]]) -> str | None:
    """Play every stage's ``posts`` (as `stage_posts` gives them) under NCCL's rules: before each
    action a stage posts that entry as one group and waits for the group holding the action's
    input; at the end it waits for all its groups. A group runs only once the stage's earlier
    groups completed; a transfer completes once the groups holding it run on both of its stages,
    a group once all its transfers have. None if every stage gets through, else where each is
    stuck."""
    n = plan.num_stages
    groups: list[list[frozenset[Transfer]]] = [[] for _ in range(n)]
    group_of: list[dict[Transfer, int]] = [{} for _ in range(n)]
    pc, posted, head = [0] * n, [0] * n, [0] * n
    done: set[Transfer] = set()
    progressed = True
    while progressed:
        progressed = False
        for s, actions in enumerate(plan.stage_actions):
            while pc[s] <= len(actions):
                i = pc[s]
                if posted[s] == i:
                    if posts[s][i]:
                        group_of[s].update((t, len(groups[s])) for t in posts[s][i])
                        groups[s].append(frozenset(posts[s][i]))
                    posted[s] = i + 1
                    progressed = True
                need = input_of(actions[i], s, n) if i < len(actions) else None
                if need is not None and need not in group_of[s]:
                    return f"stage {s} waits at action {i} for {need}, which it never posted"
                until = group_of[s][need] + 1 if need is not None else (len(groups[s]) if i == len(actions) else 0)
                if head[s] < until:
                    break
                pc[s] += 1
                progressed = True
        for s in range(n):
            while head[s] < len(groups[s]):
                for t in groups[s][head[s]] - done:
                    other = t.dst if t.src == s else t.src
                    if group_of[other].get(t, -1) == head[other]:
                        done.add(t)
                        progressed = True
                if not groups[s][head[s]] <= done:
                    break
                head[s] += 1
                progressed = True
    stuck = [s for s in range(n) if pc[s] <= len(plan.stage_actions[s])]
    if not stuck:
        return None
    return "; ".join(f"stage {s} before action {pc[s]} of {len(plan.stage_actions[s])}, its group {head[s]} of "
                     f"{len(groups[s])} not complete" for s in stuck)
