"""Contiguous layer split across pipeline stages, balanced with the cost model.

Layers are identical, but the first stage also runs the embedding and the last the final norm,
LM head and loss; with a large vocabulary the head costs about a layer, so an even split leaves
the last stage the pipeline's bottleneck.
"""
from __future__ import annotations

from functools import cache

from ..contract.cost import CostModel
from ..contract.shapes import ChunkShape

DEFAULT_SHAPE = ChunkShape((8192,))


def balance_layers(cost: CostModel, num_stages: int, typical_shape: ChunkShape | None = None) -> tuple[int, ...]:
    """Layers per stage minimising the slowest stage's forward+backward time on ``typical_shape``.

    Ties go to the split whose stages hold the most even layer counts (and so memory).
    """
    total = cost.model.layers
    if not 1 <= num_stages <= total:
        raise ValueError(f"num_stages must be in 1..{total} (the model's layers), got {num_stages}")
    if num_stages == 1:
        return (total,)
    shape = typical_shape or DEFAULT_SHAPE

    @cache
    def stage_ms(n: int, first: bool, last: bool) -> float:
        return cost.forward_ms(shape, n, first, last) + cost.backward_ms(shape, n, first, last)

    best: tuple[float, int, tuple[int, ...]] = (float("inf"), total, ())
    middle = num_stages - 2
    for n_first in range(1, total - num_stages + 2):
        for n_last in range(1, total - n_first - middle + 1):
            rest = total - n_first - n_last
            if middle == 0 and rest:
                continue
            mids = [rest // middle + (1 if i < rest % middle else 0) for i in range(middle)] if middle else []
            split = (n_first, *mids, n_last)
            times = [stage_ms(n_first, True, False), *(stage_ms(m, False, False) for m in mids),
                     stage_ms(n_last, False, True)]
            key = (max(times), max(split) - min(split), split)
            if key[:2] < best[:2]:
                best = key
    return best[2]
