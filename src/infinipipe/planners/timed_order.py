"""Orders built from each chunk's time on each stage, so heavy and light chunks interlock.

In a 1F1B order a stage alternates backward and forward after a fixed warm-up. A split sequence's
backward starts with its last slice, which must cross every stage before stage 0 can run any
backward of it; with heavy slices (long prefixes) that chain leaves the first stages idle for
seconds, and a fixed warm-up cannot fill it. Here every stage's interleaving of forwards and
backwards comes from a list schedule on the cost model instead: whenever a stage would idle
waiting for a backward's gradient, it runs its next forward if that forward's input is there and
fewer than its cap of chunks are in flight. The cap is 1F1B's warm-up plus ``lead`` plus
``slack``: the memory the filling may take, which the checkpointing ILP then prices.

``lead`` whole chunks, the lightest, go ahead of the split sequences in both orders: they turn
round quickly, so the first stages run their backwards while the split sequences' forwards fill
the pipeline, and the pipeline's fill pays for light chunks rather than heavy slices.

With ``defer``, backwards leave their layers' weight gradients to W actions (`Action`), which
run where a stage would otherwise wait: the zero-bubble split of a backward, on token slices.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

Action = tuple[str, int]


def light_ahead(forward: Sequence[int], backward: Sequence[int], whole: Sequence[int], lead: int,
                work: Callable[[int], float]) -> tuple[list[int], list[int]]:
    """Both orders with the ``lead`` lightest of the ``whole`` chunks moved to the front, lightest
    first; everything else keeps its place."""
    ahead = sorted(whole, key=lambda c: (work(c), c))[:lead]
    moved = set(ahead)
    return (ahead + [c for c in forward if c not in moved],
            ahead + [c for c in backward if c not in moved])


def least_in_flight(forward: Sequence[int], backward: Sequence[int]) -> int:
    """The fewest chunks a stage must hold forwarded but not yet backwarded to reach every
    backward in ``backward`` order (a split sequence turns round only after its last slice)."""
    at = {c: i for i, c in enumerate(forward)}
    return max((at[c] + 1 - j for j, c in enumerate(backward)), default=0)


def list_schedule(forward: Sequence[int], backward: Sequence[int], num_stages: int,
                  duration: Callable[[int, str, int], float], wire: Callable[[int, int], float],
                  caps: Sequence[int], defer: int = 0,
                  weights: Callable[[int, int], float] | None = None) -> list[list[Action]]:
    """Each stage's actions, forwards in ``forward`` order and backwards in ``backward`` order on
    every stage, interleaved by a list schedule: the action that can start earliest runs next (a
    backward before a forward that could start at the same moment: it frees memory), a forward
    only while the stage holds fewer than ``caps[s]`` chunks (raised to `least_in_flight`, so
    nothing deadlocks). ``duration(stage, kind, chunk)`` and ``wire(hop, chunk)`` are seconds.

    With ``defer``, backwards leave their weight gradients (``weights(stage, chunk)`` seconds of
    their ``duration``) to W actions, so the stage's next backward (its gradient goes upstream) or
    forward (its output downstream) starts sooner: a stage runs its oldest pending W where it would
    otherwise wait, or before anything else once more than ``defer`` are pending, and the rest
    after its last backward. A W that runs right after its own backward is no W: that backward
    keeps its weight gradients."""
    n = len(forward)
    floor = least_in_flight(forward, backward)
    caps = [max(int(c), floor) for c in caps]
    last = num_stages - 1
    f_end: list[dict[int, float]] = [{} for _ in range(num_stages)]
    b_end: list[dict[int, float]] = [{} for _ in range(num_stages)]
    fi, bi, free = [0] * num_stages, [0] * num_stages, [0.0] * num_stages
    pending: list[list[int]] = [[] for _ in range(num_stages)]
    out: list[list[Action]] = [[] for _ in range(num_stages)]

    def next_start(s: int) -> tuple[float, int, str, int] | None:
        """The earliest action stage ``s`` can start next, given what has run so far."""
        if len(pending[s]) > defer:
            return free[s], -1, "W", pending[s][0]
        best = None
        if bi[s] < n:
            c = backward[bi[s]]
            if c in f_end[s]:
                ready = f_end[s][c] if s == last else b_end[s + 1].get(c, math.nan) + wire(s, c)
                if ready == ready:
                    best = (max(free[s], ready), 0, "B", c)
        if fi[s] < n and fi[s] - bi[s] < caps[s]:
            c = forward[fi[s]]
            ready = 0.0 if s == 0 else f_end[s - 1].get(c, math.nan) + wire(s - 1, c)
            if ready == ready and (best is None or (max(free[s], ready), 1) < best[:2]):
                best = (max(free[s], ready), 1, "F", c)
        if pending[s] and (best is None or best[0] > free[s]):
            return free[s], 2, "W", pending[s][0]
        return best

    # A stage's candidate changes only when it or a neighbour runs an action: keep one heap entry
    # per stage, stamped, and skip stale ones.
    stamp = [0] * num_stages
    heap: list[tuple[float, int, int, int, str, int]] = []

    def push(s: int) -> None:
        stamp[s] += 1
        cand = next_start(s)
        if cand is not None:
            heapq.heappush(heap, (cand[0], cand[1], s, stamp[s], cand[2], cand[3]))

    for s in range(num_stages):
        push(s)
    placed, total = 0, 2 * n * num_stages
    while heap:
        start, _, s, st, kind, c = heapq.heappop(heap)
        if st != stamp[s]:
            continue
        later = defer > 0 and kind == "B"
        if kind == "W":
            free[s] = start + weights(s, c)
        else:
            free[s] = start + duration(s, kind, c) - (weights(s, c) if later else 0.0)
        if kind == "F":
            f_end[s][c] = free[s]
            fi[s] += 1
        elif kind == "B":
            b_end[s][c] = free[s]
            bi[s] += 1
            if later:
                pending[s].append(c)
        else:
            pending[s].pop(0)
        placed += kind != "W"
        out[s].append((kind, c))
        for t in {s, max(s - 1, 0), min(s + 1, last)}:
            push(t)
    if placed != total:
        raise RuntimeError(f"list schedule placed {placed} of {total} actions")  # an internal error: caps >= floor
    return [_merged(actions) for actions in out]


def _merged(actions: list[Action]) -> list[Action]:
    """A W right after its own backward dropped: that backward computes its weight gradients."""
    return [a for i, a in enumerate(actions) if not (a[0] == "W" and actions[i - 1] == ("B", a[1]))]
