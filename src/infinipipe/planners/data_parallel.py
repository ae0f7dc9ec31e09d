"""The split of a global batch over data-parallel replicas, balanced by predicted cost."""
from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from ..contract.cost import CostModel
from ..contract.shapes import ChunkShape


def whole_sequence_cost(cost: CostModel) -> Callable[[int], float]:
    """Predicted forward+backward milliseconds of one whole sequence through every layer."""
    layers = cost.model.layers

    def f(n: int) -> float:
        shape = ChunkShape((n,))
        return cost.forward_ms(shape, layers, True, True) + cost.backward_ms(shape, layers, True, True)

    return f


def split_batch(lengths: Sequence[int], dp: int,
                cost: Callable[[int], float] | None = None) -> list[list[int]]:
    """Sequence ids of each replica, balancing predicted cost (longest-processing-time first).

    ``cost(length)`` is the predicted time of one sequence (see `whole_sequence_cost`); without
    one, sequences are balanced by token count. Every replica gets at least one sequence.
    """
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    if len(lengths) < dp:
        raise ValueError(f"{len(lengths)} sequences cannot feed {dp} data-parallel replicas")
    weigh = cost or float
    order = sorted(range(len(lengths)), key=lambda i: (-weigh(lengths[i]), i))
    heap = [(0.0, r) for r in range(dp)]
    shares: list[list[int]] = [[] for _ in range(dp)]
    for i in order:
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + weigh(lengths[i]), r))
    return [sorted(s) for s in shares]
