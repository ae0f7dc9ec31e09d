"""The device mesh built over real gloo processes puts SP groups on consecutive ranks and
pipeline stages outermost, as the pure rank layout says."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from infinipipe.runtime.launch import launch_local
from infinipipe.runtime.parallel_dims import ParallelDims

pytestmark = pytest.mark.slow


def _groups():
    mesh = ParallelDims(pp=2, dp_replicate=1, dp_shard=1, sp=2).build_mesh()
    return (dist.get_rank(), mesh.stage, mesh.sp_rank, mesh.dp_rank,
            dist.get_process_group_ranks(mesh.sp_group), dist.get_process_group_ranks(mesh.pp_group))


def test_gloo_mesh_matches_rank_layout():
    dims = ParallelDims(pp=2, sp=2)
    for rank, stage, sp_rank, dp_rank, sp_ranks, pp_ranks in launch_local(_groups, 4):
        coords = dims.coords_of(rank)
        assert (stage, sp_rank, dp_rank) == (coords["pp"], coords["sp"], 0)
        assert sp_ranks == [dims.rank_of(stage, 0, 0, q) for q in range(2)]
        assert pp_ranks == [dims.rank_of(s, 0, 0, sp_rank) for s in range(2)]
