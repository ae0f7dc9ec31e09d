"""Process groups of a (data-parallel x pipeline) job, and the split of a global batch over replicas."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Sequence

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..plan.cost import ChunkShape, CostModel


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in a ``("dp", "pp")`` device mesh: global rank = dp_rank * pp + stage."""

    mesh: DeviceMesh
    dp: int
    pp: int
    dp_rank: int
    stage: int

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1


def make_mesh(dp: int, pp: int, device_type: str = "cpu") -> ParallelMesh:
    """Build the mesh over the already initialised default process group."""
    if dp < 1 or pp < 1:
        raise ValueError(f"dp and pp must be >= 1, got dp={dp} pp={pp}")
    world = dist.get_world_size()
    if dp * pp != world:
        raise ValueError(f"dp ({dp}) x pp ({pp}) = {dp * pp} processes, but the job has {world}")
    mesh = init_device_mesh(device_type, (dp, pp), mesh_dim_names=("dp", "pp"))
    return ParallelMesh(mesh, dp, pp, mesh.get_local_rank("dp"), mesh.get_local_rank("pp"))


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
