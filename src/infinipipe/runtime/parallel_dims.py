"""Parallel degrees of a job and the device mesh they lay out.

`ParallelDims` owns the degrees (resolved against the world size, as torchtitan's class of the
same name does) and builds the mesh; `ParallelMesh` is one rank's place in it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config.schema import ParallelismConfig


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


@dataclass(frozen=True)
class ParallelDims:
    """Pipeline, data-parallel replicate and data-parallel shard degrees; ``dp`` replicas in all.

    Every data-parallel rank holds a full replica of its stage today, so ``dp_shard`` ranks
    replicate as ``dp_replicate`` ranks do.
    """

    pp: int
    dp_replicate: int = 1
    dp_shard: int = 1

    def __post_init__(self) -> None:
        for name in ("pp", "dp_replicate", "dp_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg: ParallelismConfig, world_size: int | None = None) -> "ParallelDims":
        """Degrees of ``cfg``; ``data_parallel_shard_degree = -1`` takes the ranks ``world_size``
        leaves (1 when the world size is not known yet, as for a local launch)."""
        pp, replicate, shard = cfg.pipeline_parallel_degree, cfg.data_parallel_replicate_degree, cfg.data_parallel_shard_degree
        if shard == -1:
            if world_size is None:
                shard = 1
            elif world_size % (pp * replicate):
                raise ValueError(f"world size {world_size} is not divisible by pipeline_parallel_degree x "
                                 f"data_parallel_replicate_degree = {pp * replicate}")
            else:
                shard = world_size // (pp * replicate)
        dims = cls(pp, replicate, shard)
        if world_size is not None and dims.world_size != world_size:
            raise ValueError(f"parallel degrees pp={pp} x dp_replicate={replicate} x dp_shard={shard} = "
                             f"{dims.world_size} != world size {world_size}")
        return dims

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    def build_mesh(self, device_type: str = "cpu") -> ParallelMesh:
        """The mesh over the already initialised default process group."""
        world = dist.get_world_size()
        if self.world_size != world:
            raise ValueError(f"dp ({self.dp}) x pp ({self.pp}) = {self.world_size} processes, but the job has {world}")
        mesh = init_device_mesh(device_type, (self.dp, self.pp), mesh_dim_names=("dp", "pp"))
        return ParallelMesh(mesh, self.dp, self.pp, mesh.get_local_rank("dp"), mesh.get_local_rank("pp"))
