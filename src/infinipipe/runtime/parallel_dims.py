"""Parallel degrees of a job and the device mesh they lay out.

`ParallelDims` owns the degrees (resolved against the world size, as torchtitan's class of the
same name does) and builds the mesh; `ParallelMesh` is one rank's place in it.

The mesh is ``pp x dp_replicate x dp_shard x sp`` with ``sp`` innermost, so consecutive ranks
form a sequence-parallel group, then an FSDP group, and the pipeline dimension is outermost.
Under torchrun a node holds ``LOCAL_WORLD_SIZE`` consecutive ranks, so with
``dp_replicate x dp_shard x sp`` equal to the GPUs of a node each node holds one pipeline stage:
all-to-all and FSDP traffic stays on the node's links and only the pipeline's point-to-point
transfers cross nodes (the paper's layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config.schema import ParallelismConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "sp")
SHARD_DIM = "dp_shard_sp"


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in the ``pp x dp_replicate x dp_shard x sp`` mesh.

    ``dp`` counts data-parallel replicas (``dp_replicate x dp_shard``: each trains its own share of
    the batch) and ``dp_rank`` is this rank's replica; ``sp_rank`` its place in its SP group.
    ``fsdp`` counts the ranks (``dp_shard x sp``) a stage's parameters are sharded over, and
    ``dp_replicate`` the groups of them that hold replicas of the shards; ``shard_mesh`` is FSDP's
    mesh: those ranks, 2-D ``dp_replicate x dp_shard_sp`` when ``dp_replicate > 1`` (HSDP); None
    when ``fsdp`` is 1 (nothing is sharded).
    """

    mesh: DeviceMesh
    dp: int
    pp: int
    dp_rank: int
    stage: int
    sp: int = 1
    sp_rank: int = 0
    fsdp: int = 1
    dp_replicate: int = 1
    shard_mesh: DeviceMesh | None = None

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("sp")

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1


@dataclass(frozen=True)
class ParallelDims:
    """Pipeline, data-parallel replicate, data-parallel shard and Ulysses sequence-parallel degrees.

    ``dp_replicate`` ranks hold full copies of their stage (plain data parallelism);
    ``dp_shard`` ranks shard it FSDP-style (torchtitan's meaning); parameters are sharded over
    the ``dp_shard x sp`` ranks of a replica group, as torchtitan shards over ``dp_shard x cp``.
    """

    pp: int
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        for name in MESH_DIMS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg: ParallelismConfig, world_size: int | None = None) -> "ParallelDims":
        """Degrees of ``cfg``; ``data_parallel_shard_degree = -1`` takes the ranks ``world_size``
        leaves (1 when the world size is not known yet, as for a local launch)."""
        pp, replicate, shard = cfg.pipeline_parallel_degree, cfg.data_parallel_replicate_degree, cfg.data_parallel_shard_degree
        sp = cfg.sequence_parallel_degree
        if shard == -1:
            fixed = pp * replicate * sp
            if world_size is None:
                shard = 1
            elif world_size % fixed:
                raise ValueError(f"world size {world_size} is not divisible by pipeline_parallel_degree x "
                                 f"data_parallel_replicate_degree x sequence_parallel_degree = {fixed}")
            else:
                shard = world_size // fixed
        dims = cls(pp, replicate, shard, sp)
        if world_size is not None and dims.world_size != world_size:
            raise ValueError(f"parallel degrees pp={pp} x dp_replicate={replicate} x dp_shard={shard} x sp={sp} = "
                             f"{dims.world_size} != world size {world_size}")
        return dims

    @property
    def dp(self) -> int:
        """Data-parallel replicas: groups of ranks that train different sequences."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks a stage's parameters are sharded over (1: not sharded)."""
        return self.dp_shard * self.sp

    @property
    def ranks_per_stage(self) -> int:
        return self.dp_replicate * self.dp_shard * self.sp

    @property
    def world_size(self) -> int:
        return self.pp * self.ranks_per_stage

    def rank_of(self, stage: int, replicate: int = 0, shard: int = 0, sp_rank: int = 0) -> int:
        """Global rank at mesh coordinates (row-major over ``MESH_DIMS``, sp fastest)."""
        coords = (stage, replicate, shard, sp_rank)
        rank = 0
        for name, c in zip(MESH_DIMS, coords):
            size = getattr(self, name)
            if not 0 <= c < size:
                raise ValueError(f"{name} coordinate {c} outside 0..{size - 1}")
            rank = rank * size + c
        return rank

    def coords_of(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of global ``rank``, by dimension name."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        out = {}
        for name in reversed(MESH_DIMS):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        return {name: out[name] for name in MESH_DIMS}

    def keeps_groups_in_nodes(self, local_world_size: int) -> bool:
        """Whether, with ``local_world_size`` consecutive ranks per node, every SP/FSDP group lies
        inside one node and no node holds ranks of two pipeline stages (the paper's layout)."""
        inner = self.dp_shard * self.sp
        return local_world_size % inner == 0 and (self.pp == 1 or self.ranks_per_stage % local_world_size == 0)

    def build_mesh(self, device_type: str = "cpu") -> ParallelMesh:
        """The mesh over the already initialised default process group."""
        world = dist.get_world_size()
        if self.world_size != world:
            raise ValueError(f"pp ({self.pp}) x dp_replicate ({self.dp_replicate}) x dp_shard ({self.dp_shard}) x "
                             f"sp ({self.sp}) = {self.world_size} processes, but the job has {world}")
        mesh = init_device_mesh(device_type, tuple(getattr(self, n) for n in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        shard = None
        if self.fsdp > 1 and self.dp_replicate == 1:
            shard = mesh["dp_shard", "sp"]._flatten(SHARD_DIM)
        elif self.fsdp > 1:
            shard = mesh["dp_replicate", "dp_shard", "sp"]._flatten("dp_sp")._unflatten(
                0, (self.dp_replicate, self.fsdp), ("dp_replicate", SHARD_DIM))
        return ParallelMesh(mesh, self.dp, self.pp, mesh.get_local_rank("dp"), mesh.get_local_rank("pp"),
                            self.sp, mesh.get_local_rank("sp"), self.fsdp, self.dp_replicate, shard)
