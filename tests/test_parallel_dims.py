"""Rank layout of the pp x dp_replicate x dp_shard x sp mesh: SP/FSDP groups inside a node,
pipeline stages across nodes; degrees the runtime cannot run yet are refused by name."""
from __future__ import annotations

import pytest

from infinipipe.config.schema import ParallelismConfig
from infinipipe.runtime.parallel_dims import MESH_DIMS, ParallelDims


def test_rank_coordinates_round_trip_with_sp_fastest():
    dims = ParallelDims(pp=2, dp_replicate=2, dp_shard=2, sp=2)
    seen = set()
    for rank in range(dims.world_size):
        coords = dims.coords_of(rank)
        assert dims.rank_of(*(coords[n] for n in MESH_DIMS)) == rank
        seen.add(tuple(coords.values()))
    assert len(seen) == 16
    assert dims.coords_of(1) == {"pp": 0, "dp_replicate": 0, "dp_shard": 0, "sp": 1}
    assert dims.coords_of(8)["pp"] == 1


def test_four_nodes_of_eight_hold_one_stage_each_with_sp8():
    dims = ParallelDims.from_config(ParallelismConfig(pipeline_parallel_degree=4, sequence_parallel_degree=8,
                                                      data_parallel_shard_degree=-1), 32)
    assert (dims.pp, dims.dp_shard, dims.sp, dims.fsdp, dims.dp) == (4, 1, 8, 8, 1)
    for rank in range(32):
        node = rank // 8
        assert dims.coords_of(rank)["pp"] == node  # a node is one stage
    sp_group = [dims.rank_of(2, 0, 0, q) for q in range(8)]
    assert sp_group == list(range(16, 24))
    assert dims.keeps_groups_in_nodes(8)


def test_layouts_whose_groups_cross_nodes_are_recognised():
    assert not ParallelDims(pp=1, sp=32).keeps_groups_in_nodes(8)  # DeepSpeed-Ulysses over 4 nodes
    assert not ParallelDims(pp=4, sp=4).keeps_groups_in_nodes(8)  # two stages share a node
    assert ParallelDims(pp=4, dp_replicate=2, sp=4).keeps_groups_in_nodes(8)
    assert ParallelDims(pp=1, dp_shard=2, sp=4).keeps_groups_in_nodes(8)


def test_shard_degree_minus_one_takes_ranks_left_after_sp():
    cfg = ParallelismConfig(pipeline_parallel_degree=2, sequence_parallel_degree=2, data_parallel_shard_degree=-1)
    assert ParallelDims.from_config(cfg, 16) == ParallelDims(2, 1, 4, 2)
    with pytest.raises(ValueError, match="x sequence_parallel_degree = 4"):
        ParallelDims.from_config(cfg, 6)


def test_context_parallel_is_refused_and_points_to_sequence_parallel():
    with pytest.raises(ValueError, match="sequence_parallel_degree"):
        ParallelismConfig(context_parallel_degree=2)
